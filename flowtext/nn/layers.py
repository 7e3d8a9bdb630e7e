"""Building blocks of the backbone: time features, low-rank adaLN, rotary attention, blocks.

Everything here is per token: the conditioning vector ``c`` has shape ``[B, L, cond_dim]`` and
every block modulates each token with its own shift, scale and gate.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowtext.attention import AttentionPlan, attention
from flowtext.nn.config import FlowTransformerConfig

__all__ = [
    "Block",
    "LayerInputs",
    "LowRankModulation",
    "SelfAttention",
    "TimeEmbedding",
    "apply_rotary",
    "fold_in",
    "fold_out",
    "rms_norm",
    "rotary",
    "time_features",
    "widening_linear",
]

_EPS = 1e-6
_CPU_NORM_DTYPES = (torch.float32, torch.float64)
_compiling = torch.compiler.is_compiling


class _RMSNorm(torch.autograd.Function):
    """``x * rsqrt(mean(x^2) + eps)`` over the last dimension, with a backward of three passes.

    PyTorch's CPU ``rms_norm`` is its decomposition (power, mean, add, rsqrt, product, each with
    its own backward), about twice the time of this forward and backward at ``d = 128``.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        d = x.shape[-1]  # vecdot: the sum of squares without a temporary
        r = torch.rsqrt(torch.linalg.vecdot(x, x).unsqueeze(-1) / d + _EPS)
        y = x * r
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> Tensor:
        # d/dx of x r: r (g - y mean(g y)), with y = x r
        y, r = ctx.saved_tensors
        mean = torch.linalg.vecdot(g, y).unsqueeze(-1) / y.shape[-1]
        return torch.addcmul(g, y, mean, value=-1.0).mul_(r)


def rms_norm(x: Tensor) -> Tensor:
    """RMS normalization over the last dimension, without learned affine parameters.

    ``F.rms_norm`` (fused on the GPU and under ``torch.compile``), except for float32/float64
    on the CPU when a gradient is recorded, where a hand-written backward takes about half its
    time (same values). Without one (decoding, validation) ``F.rms_norm`` is the faster forward.
    """
    cpu = x.device.type == "cpu" and x.dtype in _CPU_NORM_DTYPES and not _compiling()
    if cpu and x.requires_grad and torch.is_grad_enabled():
        return _RMSNorm.apply(x)
    return F.rms_norm(x, (x.shape[-1],), eps=_EPS)


class _WideningLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` from a narrow input, with a backward in fast CPU layouts.

    For ``x`` ``[N, r]`` with ``r`` much smaller than the output width (the adaLN up-projection:
    ``r = cond_rank``), PyTorch's backward forms ``g^T x`` and ``g W`` with a transposed operand
    that the CPU GEMM runs several times slower than the same products as ``(x^T g)^T`` and
    ``(W^T g^T)^T`` (about 6x for ``g^T x`` at ``N = 4096, r = 8``, output 768).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = (weight.t() @ g2.t()).t().reshape(x.shape) if need_x else None
        gw = (x2.t() @ g2).t() if need_w else None
        gb = g2.sum(0) if ctx.has_bias and need_b else None
        return gx, gw, gb


def widening_linear(x: Tensor, linear: nn.Linear) -> Tensor:
    """``linear(x)`` for a narrow input ``x`` ``[..., r]`` (``r`` much below the output width).

    The same values; on the CPU, when a gradient is recorded (outside autocast), the backward of
    :class:`_WideningLinear` (its two products in the layouts the CPU GEMM runs fast).
    """
    cpu = x.device.type == "cpu" and not _compiling() and not torch.is_autocast_enabled("cpu")
    if cpu and torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad):
        return _WideningLinear.apply(x, linear.weight, linear.bias)
    return linear(x)


def time_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of times ``t`` in ``[0, 1]``, ``[..., dim]``.

    Frequencies are geometric from ``1`` to ``1 / max_period`` applied to ``1000 t`` (the
    convention of DDPM/DiT timestep embeddings, with the time rescaled to ``[0, 1000]``).

    Args:
        t: Times of any shape.
        dim: Number of features (even): ``dim / 2`` cosines then ``dim / 2`` sines.
        max_period: Longest period, in units of ``1000 t``.

    Returns:
        Features ``[*t.shape, dim]`` in the dtype of ``t``.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half
    )
    args = (1000.0 * t)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rotary(
    positions: Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Cosines and sines of the rotary embedding at integer ``positions``.

    Args:
        positions: Positions ``[B, L]`` (integer).
        head_dim: Per-head width (even).
        base: Frequency base.
        dtype: Floating dtype of the result (computed in at least float32).

    Returns:
        ``(cos, sin)``, each ``[B, 1, L, head_dim / 2]``.
    """
    work = torch.promote_types(dtype, torch.float32)
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, device=positions.device, dtype=work) / half)
    angles = positions.to(work)[:, None, :, None] * inv_freq
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs ``(x[..., 2j], x[..., 2j + 1])`` of ``x`` ``[B, H, L, D]``.

    Pair ``j`` turns by the angle whose cosine and sine are ``cos[..., j]``, ``sin[..., j]``:
    one complex multiplication (a quarter of the time of the split-halves form on CPU).
    Computed in the promoted dtype of ``x`` and the angles (at least float32), returned in the
    dtype of ``x`` (so bfloat16 activations under autocast keep float32 angles).
    """
    work = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32)
    pairs = torch.view_as_complex(x.to(work).unflatten(-1, (-1, 2)))
    turned = pairs * torch.complex(cos.to(work), sin.to(work))
    return torch.view_as_real(turned).flatten(-2).to(x.dtype)


class TimeEmbedding(nn.Module):
    """Per-token conditioning vector ``c_i = MLP(features(t_i))``, ``[B, L] -> [B, L, dim]``.

    Args:
        dim: Width of the features and of the output.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        """Embed times ``t`` ``[B, L]`` into ``[B, L, dim]``."""
        return self.mlp(time_features(t.to(next(self.mlp.parameters()).dtype), self.dim))


class LowRankModulation(nn.Module):
    """adaLN modulation through a rank-``r`` bottleneck: ``silu(c) -> r -> n_chunks * d``.

    The up-projection starts at zero (DiT's adaLN-Zero), so every shift, scale and gate is zero at
    initialization and each block starts as the identity.

    Args:
        cond_dim: Width of the conditioning vector.
        rank: Bottleneck width ``r``.
        d_model: Width of each produced chunk.
        n_chunks: Number of chunks (6 in a block: shift/scale/gate for attention and MLP).
    """

    def __init__(self, cond_dim: int, rank: int, d_model: int, n_chunks: int) -> None:
        super().__init__()
        self.n_chunks = n_chunks
        self.down = nn.Linear(cond_dim, rank, bias=False)
        self.up = nn.Linear(rank, n_chunks * d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero the up-projection (identity blocks at initialization)."""
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, c_act: Tensor) -> tuple[Tensor, ...]:
        """Chunks ``[B, L, d]`` from the activated conditioning ``silu(c)`` ``[B, L, cond_dim]``."""
        return widening_linear(self.down(c_act), self.up).chunk(self.n_chunks, dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``rms_norm(x) * (1 + scale) + shift``, per token (one fused multiply-add)."""
    return torch.addcmul(shift, rms_norm(x), 1 + scale)


Affine = tuple[Tensor, Tensor | None]
"""A linear map's ``(weight [out, in], bias [out] or None)``, as ``F.linear`` takes them."""


def fold_in(linear: nn.Linear, shift: Tensor, scale: Tensor) -> Affine:
    """``linear(n * (1 + scale) + shift)`` as one affine map of ``n`` (``shift, scale`` ``[in]``).

    ``W (n (1 + s) + u) + b = (W diag(1 + s)) n + (W u + b)``: the modulation of a conditioning
    vector shared by every token moves into the weights (``out x in`` products instead of
    ``B x L x in``).
    """
    bias = linear.weight @ shift
    return linear.weight * (1 + scale), bias if linear.bias is None else bias + linear.bias


def fold_out(linear: nn.Linear, gate: Tensor) -> Affine:
    """``gate * linear(h)`` as one affine map of ``h`` (``gate`` ``[out]``)."""
    bias = None if linear.bias is None else gate * linear.bias
    return gate[:, None] * linear.weight, bias


def _apply(linear: nn.Linear, x: Tensor, affine: Affine | None) -> Tensor:
    return linear(x) if affine is None else F.linear(x, *affine)


class LayerInputs(NamedTuple):
    """What every layer of one forward pass reads alike (built once per pass).

    Attributes:
        rope: ``(cos, sin)`` of the tokens' positions, each ``[B, 1, L, Dh/2]``.
        t_q: Times of the given tokens ``[B, L]``.
        o_q: Orders of the given tokens ``[B, L]``.
        t_k: Times of all keys (cached then given) ``[B, Lc + L]``.
        o_k: Orders of all keys ``[B, Lc + L]``.
        plan: The :func:`~flowtext.attention.plan_attention` of ``(t_q, o_q, t_k, o_k)``, shared
            by every layer (``None``: each attention call builds its own).
    """

    rope: tuple[Tensor, Tensor]
    t_q: Tensor
    o_q: Tensor
    t_k: Tensor
    o_k: Tensor
    plan: AttentionPlan | None = None


class SelfAttention(nn.Module):
    """Multi-head attention with rotary positions under the visibility rule of theory §2.

    Queries are the given tokens; keys and values are the cached ones (if any) followed by the
    given tokens' own, matching :func:`flowtext.attention.attention` (queries are the last keys).

    Args:
        config: Model configuration.
    """

    def __init__(self, config: FlowTransformerConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.backend = config.attention_backend
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        inputs: LayerInputs | None,
        past: tuple[Tensor, Tensor] | None = None,
        folded: tuple[Affine, Affine] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attend from ``x`` ``[B, L, d]``.

        Args:
            x: Normalized, modulated input ``[B, L, d]``.
            inputs: The pass's rotary tables, token vectors and attention plan; ``None``: every
                token sees only itself (a lone null query, no cache), so its output is its value
                (and the returned keys carry no rotary).
            past: Cached ``(K, V)``, each ``[B, H, Lc, Dh]``, or ``None``.
            folded: Affine maps used in place of ``qkv`` and ``proj`` (:func:`fold_in`,
                :func:`fold_out`), or ``None``.

        Returns:
            ``(out [B, L, d], (k, v))`` where ``k, v`` ``[B, H, L, Dh]`` are the given tokens' own
            keys (after rotary) and values, ready to be cached.
        """
        b, n, d = x.shape
        qkv_map, proj_map = (None, None) if folded is None else folded
        qkv = _apply(self.qkv, x, qkv_map)
        q, k, v = qkv.view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if inputs is None:  # softmax over the token's own key alone: weight 1 on its value
            return _apply(self.proj, v.transpose(1, 2).reshape(b, n, d), proj_map), (k, v)
        rope, t_q, o_q, t_k, o_k, plan = inputs
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        k_all, v_all = (k, v)
        if past is not None:
            k_all, v_all = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = attention(q, k_all, v_all, t_q, o_q, t_k, o_k, backend=self.backend, plan=plan)
        return _apply(self.proj, out.transpose(1, 2).reshape(b, n, d), proj_map), (k, v)


class MLP(nn.Module):
    """Two-layer GELU MLP ``d -> hidden -> d`` (exact GELU: faster on CPU than the tanh form)."""

    def __init__(self, config: FlowTransformerConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_hidden)
        self.proj = nn.Linear(config.mlp_hidden, config.d_model)

    def forward(self, x: Tensor, folded: tuple[Affine, Affine] | None = None) -> Tensor:
        """Apply to ``[..., d]`` (``folded``: affine maps in place of ``fc`` and ``proj``)."""
        fc_map, proj_map = (None, None) if folded is None else folded
        return _apply(self.proj, F.gelu(_apply(self.fc, x, fc_map)), proj_map)


class Block(nn.Module):
    """Pre-norm Transformer block with per-token adaLN-Zero modulation.

    ``x += gate_a * attn(norm(x) * (1 + scale_a) + shift_a)``, then the same for the MLP; the six
    per-token vectors come from :class:`LowRankModulation` of the time conditioning. When every
    token shares one conditioning vector (``c_act`` ``[1, 1, cond_dim]``, e.g. the AR stream, all
    at ``t = 0``) and there are at least ``d_model`` tokens, the six vectors are folded into the
    weights of the branches' first and last linear maps (:func:`fold_in`, :func:`fold_out`): the
    same values up to float rounding, and no modulation work per token.

    Args:
        config: Model configuration.
    """

    def __init__(self, config: FlowTransformerConfig) -> None:
        super().__init__()
        self.modulation = LowRankModulation(
            config.cond_dim, config.cond_rank, config.d_model, n_chunks=6
        )
        self.attn = SelfAttention(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        c_act: Tensor,
        inputs: LayerInputs | None,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Update the residual stream ``x`` ``[B, L, d]``; see :meth:`SelfAttention.forward`.

        Returns:
            ``(x, (k, v))``: the new residual stream and the given tokens' keys and values.
        """
        mods = self.modulation(c_act)
        # one vector for all tokens, and more tokens than features (the weights' work, about
        # d x d per map, is then below the tokens' L x d): fold it into the weights
        if c_act.shape[:-1].numel() == 1 and x.shape[:-1].numel() >= x.shape[-1]:
            return self._folded(x, [m.reshape(-1) for m in mods], inputs, past)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        h, kv = self.attn(modulate(x, shift_a, scale_a), inputs, past)
        x = torch.addcmul(x, gate_a, self.drop(h))  # x + gate * h in one pass
        x = torch.addcmul(x, gate_m, self.drop(self.mlp(modulate(x, shift_m, scale_m))))
        return x, kv

    def _folded(
        self,
        x: Tensor,
        mods: list[Tensor],
        inputs: LayerInputs | None,
        past: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """:meth:`forward` with the six modulation vectors (each ``[d]``) in the weights."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        attn = (fold_in(self.attn.qkv, shift_a, scale_a), fold_out(self.attn.proj, gate_a))
        h, kv = self.attn(rms_norm(x), inputs, past, attn)
        x = x + self.drop(h)  # dropout is elementwise: drop(gate * h) = gate * drop(h)
        mlp = (fold_in(self.mlp.fc, shift_m, scale_m), fold_out(self.mlp.proj, gate_m))
        return x + self.drop(self.mlp(rms_norm(x), mlp)), kv
