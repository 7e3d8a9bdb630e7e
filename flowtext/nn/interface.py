"""The backbone interface: what the objectives, the Lightning modules and the decoder use of a net.

:class:`FlowNetwork` is a structural type (:class:`typing.Protocol`): any module with these
members is a flow backbone, without inheriting from anything. :class:`~flowtext.nn.FlowTransformer`
(with :class:`~flowtext.nn.KVCache`) and :class:`~flowtext.nn.hf_backbone.PretrainedBackbone`
(with :class:`~flowtext.nn.hf_backbone.PretrainedCache`) are the two in flowtext; mypy checks
both against it (the ``TYPE_CHECKING`` block at the end), and ``isinstance(net, FlowNetwork)``
checks the members' presence at run time.

The cache type is a parameter: ``FlowNetwork[KVCache]``. Code that only passes caches from
:meth:`~FlowNetwork.new_cache` to :meth:`~FlowNetwork.commit` and back writes ``FlowNetwork``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn

from flowtext.nn.backbone import FlowOutput

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["FlowNetwork", "FlowNetworkConfig"]

CacheT = TypeVar("CacheT")


@runtime_checkable
class FlowNetworkConfig(Protocol):
    """The sizes read from ``net.config`` (read-only: frozen dataclasses qualify)."""

    @property
    def vocab_size(self) -> int:
        """Token ids ``V``."""

    @property
    def max_len(self) -> int:
        """Context length: positions lie in ``[0, max_len)``."""

    @property
    def d_embed(self) -> int:
        """Latent dimension ``d`` of ``z``."""

    @property
    def d_model(self) -> int:
        """Width of the residual stream (memory estimates)."""

    @property
    def n_layers(self) -> int:
        """Number of layers (memory estimates)."""

    @property
    def dropout(self) -> float:
        """Largest dropout rate; non-zero makes training seed the global generator per batch."""

    @property
    def difficulty_detach(self) -> bool:
        """Whether the difficulty head reads detached features."""


@runtime_checkable
class FlowNetwork(Protocol[CacheT]):
    """A time-conditioned denoiser ``(z, t, o) -> logits, difficulty`` with an exact cache.

    Shapes: ``z [B, L, d_embed]``, times ``t [B, L]`` in ``[0, 1]``, orders ``o [B, L]``
    (integer), ``positions [B, L]`` or ``[L]``. Committed tokens (``t = 0``) go into a cache
    with :meth:`commit`; queries attend to it (theory §2).
    """

    training: bool
    """Training mode (``nn.Module``'s flag); decoding switches to eval mode and back."""

    @property
    def config(self) -> FlowNetworkConfig:
        """The network's sizes."""

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The parameters (their device and dtype are the decoder's)."""

    def train(self, mode: bool = True) -> Self:
        """Set training mode."""

    def eval(self) -> Self:
        """Set eval mode."""

    def embedding_table(self) -> Tensor:
        """All token latents ``e(v)`` ``[V, d_embed]``."""

    def embed(self, tokens: Tensor) -> Tensor:
        """Latents ``e(x)`` ``[B, L, d_embed]`` of token ids ``[B, L]``."""

    def x0_hat(self, logits: Tensor) -> Tensor:
        """Mean latent under the readout: ``[..., V] -> [..., d_embed]``."""

    def __call__(
        self,
        z: Tensor,
        t: Tensor,
        o: Tensor,
        positions: Tensor | None = None,
        cache: CacheT | None = None,
    ) -> FlowOutput:
        """Run :meth:`forward` (``nn.Module.__call__``: hooks included)."""

    def forward(
        self,
        z: Tensor,
        t: Tensor,
        o: Tensor,
        positions: Tensor | None = None,
        cache: CacheT | None = None,
    ) -> FlowOutput:
        """Logits ``[B, L, V]`` and difficulty ``[B, L]`` of the given tokens, against ``cache``."""

    def new_cache(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> CacheT:
        """An empty cache for ``batch_size`` rows."""

    def commit(self, cache: CacheT, z: Tensor, o: Tensor, positions: Tensor) -> CacheT:
        """The cache extended by committed tokens ``z [B, n, d_embed]`` (``cache`` unchanged)."""

    def commit_forward(
        self,
        cache: CacheT,
        committed: tuple[Tensor, Tensor, Tensor],
        z: Tensor,
        t: Tensor,
        o: Tensor,
        positions: Tensor,
        *,
        readout: Tensor | None = None,
    ) -> tuple[FlowOutput, CacheT]:
        """:meth:`commit` of ``committed = (z_c, o_c, positions_c)``, then :meth:`forward`.

        ``readout [B]`` picks one committed token per row (``-1``: none) whose logits come back
        as the output's ``next_logits [B, V]``: the commit distribution of the token after it.
        """


if TYPE_CHECKING:  # static conformance of flowtext's backbones, checked by mypy (make test)
    from flowtext.nn.cache import KVCache
    from flowtext.nn.hf_backbone import PretrainedBackbone, PretrainedCache
    from flowtext.nn.transformer import FlowTransformer

    def _flow_transformer(net: FlowTransformer) -> FlowNetwork[KVCache]:
        return net

    def _pretrained_backbone(net: PretrainedBackbone) -> FlowNetwork[PretrainedCache]:
        return net
