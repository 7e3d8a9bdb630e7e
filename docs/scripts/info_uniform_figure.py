"""Commit cross-entropy vs t before and after fitting the information-uniform schedule.

The model is the exact per-token posterior (the "unigram oracle") of i.i.d. bytes drawn from the
byte frequencies of the Python standard library, with d = 32 unit-RMS random embeddings; its
commit cross-entropy at time t is ``E[-log p(x | z_t)]``. The script also prints the K-step bound
of that oracle with the Gaussian-mean and the mixture reverse step (theory §4b).

Run from the repository root: ``python docs/scripts/info_uniform_figure.py``; writes
``docs/img/info_uniform.png`` (used by ``docs/theory.md``).
"""

import math
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from flowtext import policies, schedules  # noqa: E402
from flowtext.objectives import discrete_elbo  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "img" / "info_uniform.png"
LN2 = math.log(2)


def stdlib_byte_law(max_bytes=4_000_000):
    """Log-frequencies ``[256]`` of the bytes of the standard library's ``.py`` files."""
    counts = torch.zeros(256, dtype=torch.float64)
    seen = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts or seen >= max_bytes:
            continue
        data = path.read_bytes()
        if not data:
            continue
        counts += torch.bincount(
            torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), minlength=256
        ).double()
        seen += len(data)
    counts += 1e-3  # every byte possible
    return torch.log(counts / counts.sum())


class Oracle:
    """Exact posterior ``log pi_v - |z - alpha e_v|^2 / (2 sigma^2)``, the objectives' interface."""

    def __init__(self, log_pi, table, schedule):
        self.log_pi, self.table, self.schedule = log_pi, table, schedule

    def embedding_table(self):  # noqa: D102
        return self.table

    def embed(self, tokens):  # noqa: D102
        return self.table[tokens]

    def x0_hat(self, logits):  # noqa: D102
        return torch.softmax(logits, -1) @ self.table

    def __call__(self, z, t, o=None, positions=None):  # noqa: D102
        a = self.schedule.alpha(t)[..., None]
        s2 = self.schedule.sigma(t).pow(2).clamp_min(1e-12)[..., None]
        d2 = (z**2).sum(-1, keepdim=True) - 2 * a * z @ self.table.T + a**2 * self.d2_table
        return SimpleNamespace(logits=self.log_pi - d2 / (2 * s2), difficulty=torch.zeros_like(t))

    @property
    def d2_table(self):  # noqa: D102
        return (self.table**2).sum(-1)


def commit_ce(net, t, n, g):
    """``(log-SNR, ce)`` of ``n`` tokens at times ``t [n]`` (bits)."""
    x = torch.multinomial(net.log_pi.exp(), n, True, generator=g)
    e = net.table[x]
    eps = torch.randn(e.shape, generator=g, dtype=e.dtype)
    z = net.schedule.alpha(t)[:, None] * e + net.schedule.sigma(t)[:, None] * eps
    logits = net(z[None], t[None]).logits[0]
    ce = -torch.log_softmax(logits, -1).gather(-1, x[:, None])[:, 0] / LN2
    return net.schedule.log_snr(t), ce


def ce_curve(net, g, n_t=41, n=8192):
    """Mean commit cross-entropy (bits) at ``n_t`` equally spaced times."""
    ts = torch.linspace(0, 1, n_t, dtype=torch.float64)
    return ts, torch.stack([commit_ce(net, torch.full((n,), t.item()), n, g)[1].mean() for t in ts])


def fit_schedule(log_pi, table, g, steps=200, batch=4096):
    """Fit ``info-uniform`` as a trainer would: times uniform under the current schedule."""
    sched = schedules.get("info-uniform")
    net = Oracle(log_pi, table, sched)
    for i in range(steps):
        lam, ce = commit_ce(net, torch.rand(batch, generator=g, dtype=torch.float64), batch, g)
        sched.update(lam, ce)
        if i % 20 == 19:
            sched.fit()
    sched.freeze()
    return sched


def bounds(net, g, ks=(4, 16, 64), rows=256, length=16):
    """Print the synchronous K-step bound (bits/token) with both reverse steps."""
    tokens = torch.multinomial(net.log_pi.exp(), rows * length, True, generator=g)
    tokens = tokens.view(rows, length)
    for k in ks:
        grid = policies.get("synchronous").grid(length, k, dtype=torch.float64)
        row = {
            r: discrete_elbo(net, tokens, grid, net.schedule, generator=g, reverse=r)
            for r in ("gaussian", "mixture")
        }
        print(f"K={k:3d}: " + ", ".join(f"{r} {v.mean() / LN2:.2f}" for r, v in row.items()))


def main():
    """Print the bounds and the linearity, draw the figure."""
    g = torch.Generator().manual_seed(0)
    log_pi = stdlib_byte_law()
    d = 32
    table = torch.randn(256, d, generator=g, dtype=torch.float64)
    table = math.sqrt(d) * table / table.norm(dim=-1, keepdim=True)
    entropy = -(log_pi.exp() * log_pi).sum().item() / LN2
    cosine = Oracle(log_pi, table, schedules.get("cosine"))
    print(f"unigram entropy {entropy:.3f} bits; bound (bits/token), cosine schedule:")
    with torch.no_grad():
        bounds(cosine, g)
        ts, before = ce_curve(cosine, g)
        fitted = Oracle(log_pi, table, fit_schedule(log_pi, table, g))
        _, after = ce_curve(fitted, g)
        print("info-uniform schedule:")
        bounds(fitted, g)
    dev = lambda c: ((c - c[0]) / (c[-1] - c[0]) - ts).abs().max().item()  # noqa: E731
    print(f"max deviation from linear: cosine {dev(before):.3f}, info-uniform {dev(after):.3f}")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(ts, before, "o-", ms=3, label="cosine")
    ax.plot(ts, after, "s-", ms=3, label="info-uniform (fitted on cosine)")
    ax.plot([0, 1], [after[0], after[-1]], "k:", lw=1, label="linear in t")
    ax.set_xlabel("t")
    ax.set_ylabel("commit cross-entropy (bits)")
    ax.set_title("exact unigram posterior, stdlib bytes, d = 32")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT, dpi=130)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
