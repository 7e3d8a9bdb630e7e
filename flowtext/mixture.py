"""The mixture reverse step of theory §4b: its KL term, its limits, and its sampler.

The forward process is Gaussian per token, ``z_t = alpha(t) e(x) + sigma(t) eps``, and its
posterior for ``s < t`` is ``q(z_s | z_t, x) = N(A z_t + B e(x), var I)``. The true reverse step
of discrete data is the *mixture* ``sum_v q(v | z_t) q(z_s | z_t, e_v)``; the model uses the same
family with its own token posterior::

    p(z_s | z_t) = sum_v p(v | z_t) q(z_s | z_t, e_v)            (per token)

With ``Delta = B^2 / var = SNR(s) - SNR(t)`` and ``z_s = A z_t + B e_x + sqrt(var) xi``,
``xi ~ N(0, I_d)``, the per-token KL of one reverse step is::

    KL(q(z_s | z_t, x) || p(z_s | z_t))
        = E_xi[ -log sum_v p(v | z_t) exp(-1/2 Delta |e_v - e_x|^2 + sqrt(Delta) xi.(e_v - e_x)) ]

:func:`mixture_kl` is the one-draw estimate inside that expectation. Every draw is at most the
commit cross-entropy ``-log p(x | z_t)`` (the ``v = x`` summand alone is ``p(x | z_t)``); at
``Delta = inf`` (a step to ``s = 0``) it *is* that cross-entropy; as ``Delta -> 0`` its mean is
``1/2 Delta |e_x - e_hat|^2 + O(Delta^2)``, the Gaussian-mean term of :func:`gaussian_mean_kl`.

:func:`mixture_step` is the matching sampler (``ancestral-mixture``): draw ``v ~ p(. | z_t)``,
then ``z_s ~ q(z_s | z_t, e_v)``; at ``s = 0`` the token commits to ``v``.

Shapes: logits ``[B, L, V]``, embedding table ``[V, d]``, tokens and times ``[B, L]``, states
and ``xi`` ``[B, L, d]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flowtext.errors import ConfigError, ShapeError, TimeRangeError
from flowtext.schedules import NoiseSchedule

__all__ = [
    "gaussian_mean_kl",
    "mixture_kl",
    "mixture_step",
    "posterior_coefficients",
    "sample_tokens",
    "snr_gap",
]


def _check_step_times(t: Tensor, s: Tensor) -> None:
    if t.shape != s.shape:
        raise ShapeError(
            f"t and s must have the same shape, got {tuple(t.shape)}, {tuple(s.shape)}"
        )
    if bool((s > t).any()) or bool((s < 0).any()) or bool((t > 1).any()):
        raise TimeRangeError("a reverse step needs 0 <= s <= t <= 1 for every token")


def snr_gap(t: Tensor, s: Tensor, schedule: NoiseSchedule) -> Tensor:
    """``Delta = SNR(s) - SNR(t)`` for ``s <= t``, computed from the log-SNR without overflow.

    Written as ``exp(lambda_s) * (1 - exp(lambda_t - lambda_s))``, so no ``inf - inf`` arises:
    ``Delta = inf`` exactly when ``s = 0 < t`` (or ``SNR(s)`` overflows the dtype, where the
    step is a commit to working precision), and ``Delta = 0`` where ``s = t``.

    Args:
        t: Current times ``[...]``.
        s: Target times ``[...]``, ``s <= t``.
        schedule: The noise schedule.

    Returns:
        ``Delta``, same shape, ``>= 0``.

    Raises:
        TimeRangeError: ``s > t`` somewhere, or times outside ``[0, 1]``.
    """
    _check_step_times(t, s)
    moving = s < t
    lam_t = schedule.log_snr(t)
    lam_s = schedule.log_snr(torch.where(moving, s, t))
    gap = torch.exp(lam_s) * -torch.expm1(torch.where(moving, lam_t - lam_s, -1.0))
    return torch.where(moving, gap, 0.0)


def posterior_coefficients(
    t: Tensor, s: Tensor, schedule: NoiseSchedule
) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients of ``q(z_s | z_t, x) = N(A z_t + B e(x), var I)`` for ``s <= t``.

    With ``r = 1 - SNR(t) / SNR(s) = -expm1(lambda_t - lambda_s)`` (stable for close times):
    ``A = alpha_t sigma_s^2 / (alpha_s sigma_t^2)``, ``B = alpha_s r``, ``var = sigma_s^2 r``,
    hence ``B^2 / var = SNR(s) r = SNR(s) - SNR(t)`` (:func:`snr_gap`). Tokens with ``s = t``
    get ``(1, 0, 0)`` (frozen); a step to ``s = 0`` gets ``(0, 1, 0)`` (``z_s = e(x)``). The
    mean and std of :func:`flowtext.solvers.posterior` are ``A z_t + B x`` and ``sqrt(var)``.

    Args:
        t: Current times ``[...]``.
        s: Target times ``[...]``, ``s <= t``.
        schedule: The noise schedule.

    Returns:
        ``(A, B, var)``, each shaped like ``t``.

    Raises:
        TimeRangeError: ``s > t`` somewhere, or times outside ``[0, 1]``.
    """
    _check_step_times(t, s)
    moving = s < t
    s_ = torch.where(moving, s, t)
    a_t, sg_t = schedule.alpha(t), schedule.sigma(t)
    a_s, sg_s = schedule.alpha(s_), schedule.sigma(s_)
    lam_t, lam_s = schedule.log_snr(t), schedule.log_snr(s_)
    r = -torch.expm1(torch.where(moving, lam_t - lam_s, -1.0))
    a_coef = (
        a_t * sg_s**2 / (torch.where(a_s > 0, a_s, 1.0) * torch.where(sg_t > 0, sg_t, 1.0) ** 2)
    )
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    return (
        torch.where(moving, a_coef, one),
        torch.where(moving, a_s * r, zero),
        torch.where(moving, sg_s**2 * r, zero),
    )


def _check_readout(logits: Tensor, table: Tensor, tokens: Tensor) -> None:
    if logits.ndim != 3 or table.ndim != 2 or logits.shape[-1] != table.shape[0]:
        raise ShapeError(
            f"need logits [B, L, V] and table [V, d] with the same V, got "
            f"{tuple(logits.shape)} and {tuple(table.shape)}"
        )
    if tokens.shape != logits.shape[:2] or tokens.dtype not in (torch.int64, torch.int32):
        raise ShapeError(
            f"tokens must be an integer tensor {tuple(logits.shape[:2])}, got "
            f"{tuple(tokens.shape)} {tokens.dtype}"
        )


def mixture_kl(logits: Tensor, table: Tensor, tokens: Tensor, delta: Tensor, xi: Tensor) -> Tensor:
    """One-draw Monte Carlo estimate of the mixture step's KL, per token.

    ``-log sum_v p(v | z_t) exp(-1/2 Delta |e_v - e_x|^2 + sqrt(Delta) xi.(e_v - e_x))`` with
    ``p = softmax(logits)`` and ``x = tokens``; its mean over ``xi ~ N(0, I)`` is
    ``KL(q(z_s | z_t, x) || p(z_s | z_t))``. Computed by log-sum-exp in at least float32; the
    ``v = x`` exponent is exactly 0, so every estimate is ``<= -log p(x | z_t)``. ``Delta = inf``
    gives the commit cross-entropy exactly (embeddings equal to ``e_x`` keep their mass, the
    exact limit); ``Delta = 0`` gives 0 up to rounding. Costs two ``[B, L, d] x [d, V]``
    products.

    Args:
        logits: ``[B, L, V]`` at the state ``z_t``.
        table: Embeddings ``e_v``, ``[V, d]``.
        tokens: True tokens ``x``, ``[B, L]``.
        delta: ``SNR(s) - SNR(t) >= 0``, ``[B, L]`` (``inf`` for a step to ``s = 0``).
        xi: Standard normal draw ``[B, L, d]``.

    Returns:
        ``[B, L]`` nats.

    Raises:
        ShapeError: Inconsistent shapes.
    """
    _check_readout(logits, table, tokens)
    if delta.shape != tokens.shape or xi.shape != (*tokens.shape, table.shape[1]):
        raise ShapeError(
            f"need delta {tuple(tokens.shape)} and xi {(*tokens.shape, table.shape[1])}, got "
            f"{tuple(delta.shape)} and {tuple(xi.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(logits.dtype, table.dtype), torch.float32)
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    table, xi, delta = table.to(dtype), xi.to(dtype), delta.to(dtype)
    idx = tokens.long()[..., None]
    norms = (table**2).sum(-1)  # [V]
    cross = F.embedding(tokens.long(), table) @ table.T  # e_x . e_v, [B, L, V]
    sq = (norms + norms[tokens.long()][..., None] - 2 * cross).clamp_min(0.0)
    sq = sq.scatter(-1, idx, 0.0)  # |e_x - e_x|^2 = 0 exactly
    proj = xi @ table.T  # xi . e_v
    lin = proj - proj.gather(-1, idx)  # xi . (e_v - e_x), exactly 0 at v = x
    finite = torch.isfinite(delta)[..., None]
    d = torch.where(finite, delta[..., None], 1.0)  # a finite stand-in keeps inf * 0 out
    expo = -0.5 * d * sq + torch.sqrt(d) * lin
    limit = torch.where(sq == 0, 0.0, -torch.inf).to(dtype)
    expo = torch.where(finite, expo, limit)
    return -torch.logsumexp(logp + expo, dim=-1)


def gaussian_mean_kl(x_emb: Tensor, x_hat: Tensor, delta: Tensor) -> Tensor:
    """KL of the Gaussian-mean step ``q(z_s | z_t, e_hat)``: ``1/2 Delta |e_x - e_hat|^2``.

    The reverse step of theory §4 before §4b; ``Delta = inf`` (a step to ``s = 0``) has no
    finite Gaussian-mean KL (the bound reads the commit cross-entropy instead).

    Args:
        x_emb: True embeddings ``[B, L, d]``.
        x_hat: Predicted mean embeddings ``[B, L, d]``.
        delta: ``SNR(s) - SNR(t)``, ``[B, L]``.

    Returns:
        ``[B, L]`` nats.
    """
    return 0.5 * delta * ((x_emb - x_hat) ** 2).sum(-1)


def sample_tokens(
    logits: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Draw ``v ~ softmax(logits / temperature)`` per token (``temperature = 0``: argmax).

    Args:
        logits: ``[..., V]``.
        temperature: ``>= 0``.
        generator: Random generator (``None``: the global one).

    Returns:
        Ids ``[...]`` (long).

    Raises:
        ConfigError: Negative or non-finite temperature.
    """
    if not (temperature >= 0 and temperature != float("inf")):
        raise ConfigError(f"temperature must be a finite number >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    ids = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return ids.reshape(logits.shape[:-1])


def mixture_step(
    z_t: Tensor,
    logits: Tensor,
    table: Tensor,
    t: Tensor,
    s: Tensor,
    schedule: NoiseSchedule,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    tokens: Tensor | None = None,
    xi: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One ``ancestral-mixture`` step: ``v ~ p(. | z_t)``, then ``z_s ~ q(z_s | z_t, e_v)``.

    Tokens with ``s = t`` keep ``z_t``; tokens reaching ``s = 0`` commit: ``z_s = e_v`` exactly.
    Under ``autoregressive`` (every token jumps from 1 to 0) this is plain AR sampling. A caller
    that manages its own randomness passes ``tokens`` and ``xi`` (then nothing is drawn here).

    Args:
        z_t: State ``[B, L, d]`` at times ``t``.
        logits: ``[B, L, V]``, the denoiser's readout at ``(z_t, t)``.
        table: Embeddings ``[V, d]``.
        t: Current times ``[B, L]``.
        s: Next times ``[B, L]``, ``s <= t``.
        schedule: The noise schedule.
        temperature: Of the token draw (``0``: argmax).
        generator: Random generator for the draws.
        tokens: Pre-drawn ids ``[B, L]`` (default: drawn here).
        xi: Pre-drawn standard normal noise ``[B, L, d]`` (default: drawn here).

    Returns:
        ``(z_s [B, L, d], tokens [B, L])``: the new state and the drawn ids (the committed ids
        where ``s = 0``).

    Raises:
        ShapeError: Inconsistent shapes.
        TimeRangeError: ``s > t`` or times outside ``[0, 1]``.
    """
    if tokens is None:
        tokens = sample_tokens(logits, temperature, generator)
    _check_readout(logits, table, tokens)
    if z_t.shape != (*tokens.shape, table.shape[1]):
        raise ShapeError(f"z_t must be {(*tokens.shape, table.shape[1])}, got {tuple(z_t.shape)}")
    if xi is None:
        dev = generator.device if generator is not None else "cpu"
        xi = torch.randn(z_t.shape, generator=generator, dtype=z_t.dtype, device=dev)
        xi = xi.to(z_t.device)
    a, b, var = (c[..., None].to(z_t.dtype) for c in posterior_coefficients(t, s, schedule))
    e = F.embedding(tokens.long(), table.to(z_t.dtype))
    z_s = a * z_t + b * e + torch.sqrt(var) * xi
    z_s = torch.where((s == 0)[..., None], e, z_s)
    return torch.where((s < t)[..., None], z_s, z_t), tokens
