"""Attention under progression-time visibility (theory §2).

One entry point, :func:`attention`, takes per-token times and orders and dispatches to a backend:
``"sdpa"`` (dense mask + PyTorch SDPA, the reference) or ``"triton"`` (the fused kernel of
:mod:`flowtext.kernels`). ``"auto"`` picks the kernel on CUDA and SDPA elsewhere.
:func:`plan_attention` does the token-vector work of a backend once, for every layer of a forward
pass to reuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch

from flowtext.attention.reference import (
    SdpaLayout,
    sdpa_attention,
    sdpa_layout,
    two_stream_layout,
    visibility_mask,
)
from flowtext.errors import ConfigError
from flowtext.visibility import LIVE, check_times

if TYPE_CHECKING:  # importing the kernel imports Triton: only when it is used
    from flowtext.kernels import TileSummaries

__all__ = [
    "BACKENDS",
    "LIVE",
    "AttentionPlan",
    "Backend",
    "SdpaLayout",
    "attention",
    "check_times",
    "plan_attention",
    "sdpa_attention",
    "sdpa_layout",
    "two_stream_layout",
    "visibility_mask",
]

Backend = Literal["auto", "sdpa", "triton"]
"""The attention backends: the one list every other place (config, tests) reads."""
BACKENDS: tuple[str, ...] = get_args(Backend)


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """The token-vector work of one forward pass, done once and reused by every layer.

    Every layer attends with the same ``(t_q, o_q, t_k, o_k)``; what a backend derives from them
    (SDPA: the fast-path checks and the dense mask; the kernel: its tile summaries, value checks
    and autotuning key) is built once by :func:`plan_attention`. A plan is refused for other
    token vectors, or after they were modified in place.

    Attributes:
        backend: The resolved backend, ``"sdpa"`` or ``"triton"``.
        sdpa: The :class:`SdpaLayout` (SDPA backend), else ``None``.
        summaries: The kernel's :class:`~flowtext.kernels.TileSummaries` (Triton backend), else
            ``None``.
        sources: Identity of the token vectors it was built from (storage, shape, version).
    """

    backend: str
    sdpa: SdpaLayout | None
    summaries: TileSummaries | None
    sources: tuple


def _resolve(backend: str, cuda: bool) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return "triton" if backend == "triton" or (backend == "auto" and cuda) else "sdpa"


def _sources(*tensors: torch.Tensor) -> tuple:
    return tuple((x.data_ptr(), tuple(x.shape), x.dtype, x._version) for x in tensors)


def plan_attention(
    t_q: torch.Tensor,
    o_q: torch.Tensor,
    t_k: torch.Tensor,
    o_k: torch.Tensor,
    *,
    backend: str = "auto",
) -> AttentionPlan:
    """Build what every :func:`attention` call with these token vectors reuses.

    Args:
        t_q: Query times ``[B, Lq]`` in ``[0, 1]``.
        o_q: Query orders ``[B, Lq]``.
        t_k: Key times ``[B, Lk]``.
        o_k: Key orders ``[B, Lk]``.
        backend: As for :func:`attention` (``"auto"`` resolves on the device of ``t_q``).

    Returns:
        An :class:`AttentionPlan` to pass as ``attention(..., plan=)``.

    Raises:
        ConfigError: An unknown backend.
        ShapeError: Mismatched shapes (and, for the kernel, the checks of
            :func:`~flowtext.kernels.tile_summaries`).
    """
    resolved = _resolve(backend, t_q.is_cuda)
    sources = _sources(t_q, o_q, t_k, o_k)
    if resolved == "triton":
        from flowtext import kernels  # imports Triton only when used

        _kernel_outside_compile()
        return AttentionPlan(resolved, None, kernels.tile_summaries(t_q, o_q, t_k, o_k), sources)
    return AttentionPlan(resolved, sdpa_layout(t_q, o_q, t_k, o_k), None, sources)


def _check_plan(plan, backend: str, t_q, o_q, t_k, o_k) -> None:
    if not isinstance(plan, AttentionPlan):
        raise ConfigError(f"plan must be an AttentionPlan; got {type(plan).__name__}")
    if plan.backend != backend:
        raise ConfigError(f"plan was built for backend {plan.backend!r}, not {backend!r}")
    if not torch.compiler.is_compiling() and plan.sources != _sources(t_q, o_q, t_k, o_k):
        raise ConfigError(
            "plan was built from other (or since modified) t_q, o_q, t_k, o_k; build it with "
            "plan_attention(t_q, o_q, t_k, o_k) from the tensors passed here"
        )


def _kernel(q, k, v, t_q, o_q, t_k, o_k, summaries):
    from flowtext.kernels import visibility_attention  # imports Triton only when used

    return visibility_attention(q, k, v, t_q, o_q, t_k, o_k, summaries=summaries)


_OUTSIDE_COMPILE: dict = {}


def _kernel_outside_compile():
    """:func:`_kernel` under ``torch.compiler.disable``, made once, on first use.

    Under ``torch.compile`` the kernel runs eagerly (a graph break), as its own autograd
    Function. Made by :func:`plan_attention`, outside any compiled region (it imports
    ``torch._dynamo``, which a plain import of this package should not pay).
    """
    if "kernel" not in _OUTSIDE_COMPILE:
        _OUTSIDE_COMPILE["kernel"] = torch.compiler.disable(_kernel)
    return _OUTSIDE_COMPILE["kernel"]


def attention(q, k, v, t_q, o_q, t_k, o_k, *, backend: str = "auto", summaries=None, plan=None):
    """Visibility-masked attention, ``[B, H, Lq, D]`` from queries/keys/values and token vectors.

    Args:
        q: Queries ``[B, H, Lq, D]``.
        k: Keys ``[B, H, Lk, D]``.
        v: Values ``[B, H, Lk, D]``.
        t_q: Query times ``[B, Lq]`` in ``[0, 1]``.
        o_q: Query orders ``[B, Lq]`` (commit order, or group for live tokens).
        t_k: Key times ``[B, Lk]``.
        o_k: Key orders ``[B, Lk]``.
        backend: ``"auto"``, ``"sdpa"`` or ``"triton"``.
        summaries: Optional :func:`flowtext.kernels.tile_summaries` of these token vectors,
            reused by the kernel across layers (ignored by SDPA).
        plan: Optional :func:`plan_attention` of these token vectors and this backend, reused
            across layers (for either backend; its summaries take the place of ``summaries``).

    Returns:
        Attention output ``[B, H, Lq, D]``.

    Raises:
        ConfigError: An unknown backend, or a plan built for another backend or other vectors.
    """
    resolved = _resolve(backend, q.is_cuda)
    if plan is not None:
        _check_plan(plan, resolved, t_q, o_q, t_k, o_k)
        summaries = plan.summaries
    if resolved == "triton":
        run = _kernel_outside_compile() if torch.compiler.is_compiling() else _kernel
        return run(q, k, v, t_q, o_q, t_k, o_k, summaries)
    return sdpa_attention(q, k, v, t_q, o_q, t_k, o_k, layout=plan.sdpa if plan else None)
