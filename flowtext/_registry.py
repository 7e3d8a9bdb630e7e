"""A tiny name -> class registry shared by every component family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from flowtext.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to component classes so configs and the CLI can name components.

    Args:
        family: Human-readable family name used in error messages (e.g. ``"schedule"``).
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator registering ``cls`` under ``name``.

        Args:
            name: Registry key; must be new.

        Returns:
            The decorator, which returns the class unchanged.
        """

        def deco(cls: type[T]) -> type[T]:
            if name in self._classes:
                raise ConfigError(f"{self.family} {name!r} is already registered")
            self._classes[name] = cls
            cls.name = name  # type: ignore[attr-defined]  # T may not declare name; now it has one
            return cls

        return deco

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._classes)

    def cls(self, name: str) -> type[T]:
        """The class registered under ``name``.

        Raises:
            ConfigError: (a ``ValueError``) If ``name`` is unknown; the message lists
                the valid names.
        """
        if not isinstance(name, str) or name not in self._classes:
            raise ConfigError(
                f"unknown {self.family} {name!r}; valid names: {', '.join(self.names())}"
            )
        return self._classes[name]

    def get(self, name: str, **kwargs: Any) -> T:
        """Instantiate the component registered under ``name`` with ``kwargs``.

        Raises:
            ConfigError: (a ``ValueError``) If ``name`` is unknown or the keyword
                arguments do not fit.
        """
        cls = self.cls(name)
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ConfigError(f"bad arguments for {self.family} {name!r}: {err}") from err

    def resolve(self, component: T | str) -> T:
        """Return ``component`` itself, or build it with :meth:`get` when given a name.

        Raises:
            ConfigError: (a ``ValueError``) If the name is unknown.
        """
        return self.get(component) if isinstance(component, str) else component
