"""Bad input, fuzzed: random configs and inputs through the public API and the CLI.

Every call either works or raises a :class:`~flowtext.errors.FlowtextError` whose message names a
fix (CLI usage errors: ``SystemExit`` with a message, or exit code 2). Anything else — a raw
``RuntimeError``/``IndexError``/``TypeError`` from deep inside torch, a hang — fails the test.
Example counts are bounded (and derandomized) so the whole file runs in well under a minute on
two cores; ``FLOWTEXT_FUZZ_EXAMPLES=500`` runs a longer, random hunt.
"""

import math
import os
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowtext import policies, schedules, solvers
from flowtext.checkpoint import read_checkpoint
from flowtext.cli import main as cli_main
from flowtext.data import FlowTextDataModule
from flowtext.decoding import generate
from flowtext.errors import FlowtextError
from flowtext.nn import FlowTransformer, FlowTransformerConfig
from flowtext.training import TINY_OVERRIDES, latest_checkpoint

FUZZ = settings(
    max_examples=int(os.environ.get("FLOWTEXT_FUZZ_EXAMPLES", 40)),
    deadline=5000,  # a hang or a pathological slow path fails instead of stalling CI
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize="FLOWTEXT_FUZZ_EXAMPLES" not in os.environ,  # the same examples in CI
)


def works_or_flowtext_error(fn, *args, **kwargs):
    """Run ``fn``; a FlowtextError is fine if its message is a sentence with a fix."""
    try:
        out = fn(*args, **kwargs)
    except FlowtextError as e:
        assert len(str(e)) > 15, f"unhelpful message: {e!r}"
        event(f"{getattr(fn, '__name__', type(fn).__name__)}: {type(e).__name__} {str(e)[:90]}")
        return None
    event(f"{getattr(fn, '__name__', type(fn).__name__)}: works")
    return out


numbers = st.one_of(
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0, 1, -1, 0.0, 1.0, 0.5, 1e-9, 1e9]),
)
junk = st.one_of(
    numbers, st.none(), st.text(max_size=4), st.booleans(), st.lists(numbers, max_size=3)
)


def mostly(valid, bad=junk, one_in=8):
    """``valid``, replaced by ``bad`` about once in ``one_in`` draws (one bad field at a time)."""
    pick = st.sampled_from(range(one_in))  # uniform (integers() favours the bounds)
    return st.tuples(pick, valid, bad).map(lambda x: x[2] if x[0] == 1 else x[1])


def names_or_typos(registry):
    return mostly(st.sampled_from(registry.names()), st.text(string.ascii_letters, max_size=8))


def kwargs_for(fields, valid=None):
    bad = st.dictionaries(st.sampled_from([*fields, "bogus"]), junk, max_size=2)
    return mostly(valid if valid is not None else st.just({}), bad, one_in=4)


POLICY_KWARGS = {
    "block": st.fixed_dictionaries({"size": st.integers(1, 9)}),
    "diagonal": st.fixed_dictionaries({"width": st.floats(0.01, 3.0)}),
    "adaptive": st.fixed_dictionaries(
        {
            "threshold": st.floats(0.0, 1.0),
            "rate": st.floats(0.01, 1.0),
            "window": st.integers(1, 20),
        }
    ),
}


POLICY_FIELDS = ["size", "width", "threshold", "rate", "window", "t_min", "signal", "max_commits"]
SCHEDULE_FIELDS = ["shift", "base", "beta_min", "beta_max"]
SOLVER_FIELDS = ["eta", "method", "rtol", "atol", "options"]


@FUZZ
@given(
    name=names_or_typos(schedules),
    kwargs=kwargs_for(
        SCHEDULE_FIELDS, st.sampled_from([{}, {"shift": 2.0, "base": "cosine"}, {"beta_max": 5.0}])
    ),
    t=st.lists(st.one_of(st.floats(-1, 2, width=32), st.just(math.nan)), min_size=1, max_size=5),
)
def test_schedules(name, kwargs, t):
    sched = works_or_flowtext_error(schedules.get, name, **kwargs)
    if sched is not None:
        out = works_or_flowtext_error(sched.alpha, torch.tensor(t, dtype=torch.float64))
        assert out is None or out.shape == (len(t),)


@FUZZ
@given(
    data=st.data(),
    name=names_or_typos(policies),
    length=mostly(st.integers(1, 48), st.one_of(st.integers(-2, 0), junk)),
    steps=mostly(st.integers(1, 96), st.one_of(st.integers(-2, 0), junk)),
)
def test_policy_grids(data, name, length, steps):
    kwargs = data.draw(kwargs_for(POLICY_FIELDS, POLICY_KWARGS.get(name)))
    policy = works_or_flowtext_error(policies.get, name, **kwargs)
    if policy is None or name == "adaptive":
        return
    grid = works_or_flowtext_error(policy.grid, length, steps)
    if grid is not None:
        assert grid.shape == (steps + 1, length)
        assert bool((grid[:-1] >= grid[1:]).all()) and bool(torch.isfinite(grid).all())


def _toy_denoiser(z, t):
    return torch.tanh(z) * (1 - t[..., None])


@FUZZ
@given(
    solver=names_or_typos(solvers),
    skw=kwargs_for(SOLVER_FIELDS),
    schedule=st.sampled_from(schedules.names()),
    shape=mostly(
        st.lists(st.integers(1, 3), min_size=3, max_size=3),
        st.lists(st.integers(0, 4), min_size=1, max_size=4),
    ),
    steps=st.integers(1, 5),
    per_row=st.booleans(),
    grid_values=mostly(
        st.sampled_from(["linspace", "random"]),
        st.sampled_from(["nan", "increasing", "outside", "wrong_shape"]),
        one_in=3,
    ),
)
def test_integrate(solver, skw, schedule, shape, steps, per_row, grid_values):
    if solver == "torchdiffeq" and "options" not in skw:
        # a singular field at t = 0 runs dopri5 to its step cap: a small cap keeps it a fast error
        skw = {**skw, "options": {"max_num_steps": 50}}
    solver = works_or_flowtext_error(solvers.get, solver, **skw)
    if solver is None:
        return
    z = torch.randn(*shape, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    b, length = (shape + [1, 1])[:2] if len(shape) != 3 else shape[:2]
    grid_shape = [steps + 1, b, length] if per_row else [steps + 1, length]
    if grid_values == "wrong_shape":
        grid_shape, grid_values = [steps + 1, length + 1], "linspace"
    times = {
        "linspace": lambda s: torch.linspace(1, 0, s[0])[(...,) + (None,) * (len(s) - 1)].expand(
            *s
        ),
        "random": lambda s: torch.rand(*s, generator=g).sort(0, descending=True).values,
        "nan": lambda s: torch.full(s, float("nan")),
        "increasing": lambda s: torch.linspace(0, 1, s[0])[(...,) + (None,) * (len(s) - 1)].expand(
            *s
        ),
        "outside": lambda s: torch.linspace(3, -2, s[0])[(...,) + (None,) * (len(s) - 1)].expand(
            *s
        ),
    }[grid_values](grid_shape).to(torch.float64)
    res = works_or_flowtext_error(solvers.integrate, _toy_denoiser, z, times, schedule, solver)
    if res is not None:
        assert res.z.shape == z.shape


TINY_NET = FlowTransformerConfig(
    vocab_size=11, max_len=16, d_model=16, n_layers=1, n_heads=2, d_embed=4, cond_dim=8, cond_rank=2
)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return FlowTransformer(TINY_NET).eval()


@FUZZ
@given(
    b=mostly(st.integers(1, 3), st.just(0)),
    length=mostly(st.integers(1, 16), st.sampled_from([0, 17, 40])),
    d=mostly(st.just(4), st.sampled_from([3, 0])),
    t_kind=mostly(st.just("ok"), st.sampled_from(["nan", "outside", "int", "wrong_shape"])),
    o_kind=mostly(st.just("ok"), st.sampled_from(["float", "negative", "wrong_shape"])),
    dtype=mostly(
        st.just(torch.float32), st.sampled_from([torch.float64, torch.bfloat16, torch.int64])
    ),
)
def test_transformer_forward(net, b, length, d, t_kind, o_kind, dtype):
    z = torch.zeros(b, length, d).to(dtype)
    t = {
        "ok": torch.rand(b, length),
        "nan": torch.full((b, length), float("nan")),
        "outside": torch.full((b, length), 1.5),
        "int": torch.ones(b, length, dtype=torch.int64),
        "wrong_shape": torch.rand(b + 1, length),
    }[t_kind]
    o = {
        "ok": torch.zeros(b, length, dtype=torch.int64),
        "float": torch.zeros(b, length),
        "negative": torch.full((b, length), -5, dtype=torch.int64),
        "wrong_shape": torch.zeros(length, dtype=torch.int64),
    }[o_kind]
    with torch.no_grad():
        out = works_or_flowtext_error(net, z, t, o)
    if out is not None:
        assert out.logits.shape == (b, length, TINY_NET.vocab_size)


@FUZZ
@given(
    data=st.data(),
    length=mostly(st.integers(1, 12), st.one_of(st.integers(-1, 0), st.just(40), junk)),
    policy=names_or_typos(policies),
    steps=mostly(st.one_of(st.none(), st.integers(1, 24)), st.one_of(st.integers(-1, 0), junk)),
    solver=mostly(st.sampled_from(["euler", "heun", "ancestral", "rk4"]), junk),
    temperature=mostly(st.floats(0.05, 2.0), numbers),
    top_p=mostly(st.floats(0.05, 1.0), numbers),
    prompt=mostly(
        st.one_of(
            st.none(),
            st.lists(st.integers(0, 10), min_size=1, max_size=4),
            st.lists(st.lists(st.integers(0, 10), max_size=4), min_size=1, max_size=3),
        ),
        st.one_of(st.lists(st.integers(-2, 14), max_size=6), junk),
    ),
    eos=mostly(st.one_of(st.none(), st.integers(0, 10)), st.integers(-1, 12)),
)
def test_generate(net, data, length, policy, steps, solver, temperature, top_p, prompt, eos):
    pkw = data.draw(kwargs_for(POLICY_FIELDS, POLICY_KWARGS.get(policy)))
    sched = schedules.get("cosine")
    res = works_or_flowtext_error(
        generate,
        net,
        sched,
        prompt=prompt,
        length=length,
        policy=policy,
        policy_kwargs=pkw,
        steps=steps,
        solver=solver,
        temperature=temperature,
        top_p=top_p,
        eos_id=eos,
        generator=torch.Generator().manual_seed(0),
    )
    if res is not None:
        assert all(0 <= i < TINY_NET.vocab_size for row in res.tokens for i in row)


FILES = st.sampled_from(
    [
        b"",
        b"\x00\x01\x02\xff\xfe" * 40,
        b"x" * 300_000,  # one huge line
        "héllo wörld\n".encode() * 50,
        b"def f():\n    return 1\n" * 30,
        b"\xff\xfeh\x00i\x00",  # UTF-16 with BOM
        b"\n\n\n",
    ]
)


@settings(FUZZ, max_examples=min(FUZZ.max_examples, 25))
@given(
    files=st.lists(FILES, min_size=1, max_size=5),
    single_file=st.booleans(),
    tokenizer=mostly(st.sampled_from(["byte", "char"]), st.just("word")),
    seq_len=mostly(st.integers(2, 64), st.one_of(st.integers(-1, 1), junk)),
    batch_size=mostly(st.integers(1, 4), st.one_of(st.just(0), junk)),
    splits=mostly(
        st.sampled_from([(0.8, 0.1, 0.1), (0.34, 0.33, 0.33)]),
        st.sampled_from([(1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.9, 0.1, 0.0)]),
    ),
)
def test_datamodule_on_a_folder_corpus(
    tmp_path_factory, files, single_file, tokenizer, seq_len, batch_size, splits
):
    root = tmp_path_factory.mktemp("corpus")
    for i, data in enumerate(files):
        (root / f"f{i}.txt").write_bytes(data)
    if single_file:  # one file is split by position, a folder by file
        (root / "all.txt").write_bytes(b"".join(files))

    def build():
        dm = FlowTextDataModule(
            str(root / "all.txt") if single_file else str(root),
            tokenizer=tokenizer,
            seq_len=seq_len,
            batch_size=batch_size,
            splits=splits,
            train_samples_per_epoch=8,
            eval_samples=4,
            cache_dir=str(root / ".cache"),
        )
        dm.prepare_data()
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert batch["tokens"].shape == (batch_size, seq_len)
        assert int(batch["tokens"].max()) < dm.vocab_size
        return dm

    works_or_flowtext_error(build)


CLI_ARGS = st.one_of(
    st.tuples(
        st.just("demo"),
        st.sampled_from(["--length", "--schedule", "--bogus"]),
        st.sampled_from(["0", "-3", "x", "nope", "1e9"]),
    ),
    st.tuples(
        st.just("sample"),
        st.sampled_from(["--ckpt", "--steps", "--policy", "--length", "--temperature"]),
        st.sampled_from(["missing.ckpt", "0", "-1", "nan", "block"]),
    ),
    st.tuples(
        st.just("fit"),
        st.sampled_from(
            [
                "--data.seq_len",
                "--data.batch_size",
                "--data.corpus",
                "--data.tokenizer",
                "--model.init_args.regime.steps_per_block",
                "--model.init_args.schedule",
                "--trainer.precision",
                "--trainer.val_check_interval",
                "--config",
            ]
        ),
        st.sampled_from(["0", "-1", "abc", "nope.yaml", "1.5", "/no/such/dir"]),
    ),
    st.tuples(st.sampled_from(["", "frobnicate", "--help-me"]), st.just(""), st.just("")),
)


@settings(FUZZ, max_examples=25, deadline=20000)
@given(args=CLI_ARGS)
def test_cli_bad_arguments(args, capsys, tmp_path_factory):
    cmd, flag, value = args
    argv = [a for a in (cmd, flag, value) if a]
    if cmd == "fit":
        root = tmp_path_factory.mktemp("fit")
        argv[1:1] = [
            "--model=flowtext.AutoregressiveLM",
            f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=1",
            "--trainer.max_time=00:00:00:20",  # a hard bound whatever the fuzzed option
            "--model.init_args.net.max_len=32",
            "--model.init_args.net.d_model=16",
            "--model.init_args.net.n_layers=1",
            "--model.init_args.net.n_heads=2",
            "--data.seq_len=16",
            "--data.batch_size=2",
            "--data.corpus=addition",
            "--trainer.limit_val_batches=0",
        ]
    if cmd == "sample" and flag != "--ckpt":
        argv += ["--ckpt", "missing.ckpt"]
    try:
        code = cli_main(argv)
    except SystemExit as e:
        code = e.code
    except FlowtextError as e:
        assert len(str(e)) > 15
        return
    capsys.readouterr()
    assert code in (0, 2, None) or isinstance(code, str), code


# --------------------------------------------------------- corrupt files and signals (CLI)
TINY_FIT = [
    "--config",
    str(Path(__file__).resolve().parents[1] / "experiments" / "configs" / "ar-tiny.yaml"),
    *TINY_OVERRIDES,
    "--trainer.limit_val_batches=0",
]


class Good:
    """The bytes of a genuine 2-step checkpoint (a class, so hypothesis does not print them)."""

    data = b""


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    argv = ["fit", *TINY_FIT, f"--trainer.default_root_dir={root}", "--trainer.max_steps=2"]
    assert cli_main(argv) == 0
    Good.data = latest_checkpoint(root).read_bytes()
    return Good


CORRUPTIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0, exclude_max=True)),
    st.tuples(st.just("flip"), st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("random"), st.binary(max_size=512)),
)


def corrupt(data: bytes, how) -> bytes:
    if how[0] == "truncate":
        return data[: int(how[1] * len(data))]
    if how[0] == "flip":
        i = int(how[1] * len(data))
        return data[:i] + bytes([data[i] ^ how[2]]) + data[i + 1 :]
    return how[1]


def exit_code(argv) -> int:
    try:
        return cli_main(argv)
    except SystemExit as e:
        return e.code


@settings(FUZZ, max_examples=min(FUZZ.max_examples, 30), deadline=20000)
@given(how=CORRUPTIONS)
def test_sample_from_corrupt_checkpoints(good_checkpoint, how, tmp_path_factory, capsys):
    path = tmp_path_factory.mktemp("bad") / "x.ckpt"
    path.write_bytes(corrupt(good_checkpoint.data, how))
    code = exit_code(["sample", "--ckpt", str(path), "--length", "2", "--policy", "autoregressive"])
    err = capsys.readouterr().err
    event(f"{how[0]}: exit {code}")
    assert code in (0, 2) and "Traceback" not in err, err[-2000:]
    if code == 2:
        assert [line for line in err.splitlines() if line.startswith("error:")], err


@settings(FUZZ, max_examples=min(FUZZ.max_examples, 4), deadline=None)
@given(how=CORRUPTIONS)
def test_fit_from_corrupt_checkpoints(good_checkpoint, how, tmp_path_factory, capsys):
    root = tmp_path_factory.mktemp("resume")
    path = root / "x.ckpt"
    path.write_bytes(corrupt(good_checkpoint.data, how))
    argv = ["fit", *TINY_FIT, f"--trainer.default_root_dir={root}", "--trainer.max_steps=3"]
    code = exit_code([*argv, f"--ckpt_path={path}"])
    err = capsys.readouterr().err
    event(f"{how[0]}: exit {code}")
    assert code in (0, 2) and "Traceback" not in err, err[-2000:]


@pytest.mark.slow
@settings(FUZZ, max_examples=min(FUZZ.max_examples, 3), deadline=None)
@given(delay=st.floats(0.0, 12.0))
def test_sigterm_at_any_time_exits_non_zero_with_a_readable_checkpoint(delay, tmp_path_factory):
    root = tmp_path_factory.mktemp("sigterm")
    cmd = [sys.executable, "-m", "flowtext.cli", "fit", *TINY_FIT]
    cmd += [f"--trainer.default_root_dir={root}", "--trainer.max_steps=100000"]
    cmd += ["--checkpoint.every_n_train_steps=3"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    event(f"exit {proc.returncode}")
    assert proc.returncode in (143, -signal.SIGTERM)  # -15: stopped before training started
    last = latest_checkpoint(root)
    if last is not None:
        assert read_checkpoint(last)["global_step"] >= 1
