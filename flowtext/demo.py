"""The component-library demo: transport the exact Gaussian toy under every policy and solver.

Run it as ``flowtext demo``. It writes, into the output folder, ``time_grids.png`` (the per-token
time grid of each policy), ``convergence.png`` (transport error vs steps per solver and policy)
and ``toy_results.csv``, and prints the observed convergence orders.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from flowtext import policies, schedules, solvers
from flowtext.errors import ConfigError
from flowtext.plotting import plot_convergence, plot_time_grids
from flowtext.solvers import integrate
from flowtext.toy import GaussianToy

__all__ = ["DEMO_POLICIES", "pushforward", "toy_report"]

MAX_TOY_LENGTH = 64
"""Longest toy sequence :func:`toy_report` accepts."""

DEMO_POLICIES = {
    "synchronous": policies.Synchronous(),
    "block(2)": policies.Block(size=2),
    "diagonal(0.3)": policies.Diagonal(width=0.3),
    "autoregressive": policies.Autoregressive(),
}


def pushforward(
    toy: GaussianToy, times: torch.Tensor, schedule, solver
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact output law of the discretized flow started from the marginal at ``times[0]``.

    With the exact Gaussian denoiser every deterministic step is affine in ``z``, so pushing
    ``0`` and the Cholesky columns of the start covariance through gives the output mean
    ``[L, d]`` and covariance ``[L d, L d]`` with no Monte Carlo error.

    Args:
        toy: The Gaussian toy.
        times: Grid ``[K + 1, L]``.
        schedule: Schedule instance or name.
        solver: Deterministic solver instance or name.

    Returns:
        ``(mean, cov)``.
    """
    n = toy.mean.numel()
    m1, c1 = toy.marginal(times[0], schedule)
    chol = torch.linalg.cholesky(c1)
    basis = torch.cat([torch.zeros(1, n, dtype=c1.dtype), torch.eye(n, dtype=c1.dtype)])
    z = (m1.reshape(-1) + basis @ chol.T).reshape(n + 1, *toy.shape)
    out = integrate(toy.denoiser(schedule), z, times, schedule, solver).z.reshape(n + 1, n)
    jac = (out[1:] - out[0]).T
    return out[0].reshape(toy.shape), jac @ jac.T


def _steps(policy: policies.StaticPolicy, length: int, mult: int) -> int:
    return policy.n_blocks(length) * mult if isinstance(policy, policies.Block) else length * mult


def toy_report(
    out_dir: str | Path = "outputs/demo",
    *,
    length: int = 8,
    dim: int = 2,
    schedule: str = "linear",
    multipliers: tuple[int, ...] = (1, 2, 4, 8, 16),
    seed: int = 0,
) -> dict[str, list[tuple[int, float]]]:
    """Transport the toy under every demo policy and ODE solver; write figures and a CSV.

    Args:
        out_dir: Output folder.
        length: Toy sequence length ``L``.
        dim: Toy token dimension ``d``.
        schedule: Schedule name.
        multipliers: Steps per block (per token for AR/diagonal) to sweep.
        seed: Seed of the random toy.

    Returns:
        ``"policy/solver" -> [(steps, transport error)]`` where the error is the largest
        absolute deviation of the output mean or covariance from the data law.

    Raises:
        ConfigError: ``length`` outside ``[1, MAX_TOY_LENGTH]`` or an unknown schedule.
    """
    if not isinstance(length, int) or not 1 <= length <= MAX_TOY_LENGTH:
        raise ConfigError(
            f"toy length must be an int in [1, {MAX_TOY_LENGTH}] (the exact pushforward is cubic "
            f"in L * d), got {length!r}"
        )
    schedules.get(schedule)  # an unknown name fails here, listing the valid ones
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    toy = GaussianToy.random(length, dim, generator=torch.Generator().manual_seed(seed))
    grids = {label: p.grid(length, _steps(p, length, 2)) for label, p in DEMO_POLICIES.items()}
    plot_time_grids(grids, out / "time_grids.png", title=f"per-token time grids (L={length})")
    results: dict[str, list[tuple[int, float]]] = {}
    orders = {n: solvers.get(n).order for n in solvers.names()}
    ode = {n: p for n, p in orders.items() if p is not None}  # deterministic: name -> order
    for label, pol in DEMO_POLICIES.items():
        for name in ode:
            rows = []
            for m in multipliers:
                steps = _steps(pol, length, m)
                mean, cov = pushforward(
                    toy, pol.grid(length, steps, dtype=torch.float64), schedule, name
                )
                err = max((mean - toy.mean).abs().max().item(), (cov - toy.cov).abs().max().item())
                rows.append((steps, err))
            results[f"{label}/{name}"] = rows
    with open(out / "toy_results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "solver", "steps", "transport_error"])
        for key, rows in results.items():
            pol_label, name = key.split("/")
            for steps, err in rows:
                w.writerow([pol_label, name, steps, f"{err:.6e}"])
    curves = {
        k: ([s for s, _ in v], [e for _, e in v])
        for k, v in results.items()
        if k.startswith("synchronous/") or k.endswith("/rk4")
    }
    plot_convergence(
        curves,
        out / "convergence.png",
        xlabel="global steps K",
        ylabel="max |mean/cov error|",
        title=f"Gaussian toy, {schedule} schedule",
        slopes={f"synchronous/{n}": p for n, p in ode.items()},
    )
    return results


def observed_orders(results: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    """Observed order from the last two points of each curve: ``log2(e_{K} / e_{2K})``."""
    orders = {}
    for key, rows in results.items():
        (s1, e1), (s2, e2) = rows[-2], rows[-1]
        orders[key] = math.log(e1 / e2) / math.log(s2 / s1)
    return orders
