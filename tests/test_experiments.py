"""The experiment scripts' --quick modes run end to end and report sane numbers (issue 6)."""

import csv
import importlib
import json
import math

import pytest


def _load(name):
    """The experiment scripts are modules of the ``experiments`` package (``python -m``)."""
    return importlib.import_module(f"experiments.{name}")


def test_limits_quick_reproduces_the_limit_statements(tmp_path):
    limits = _load("limits")
    assert limits.main(["--quick", "--out", str(tmp_path)]) == 0
    for name in (
        "limits.md",
        "summary.json",
        "toy/convergence.png",
        "toy/toy_results.csv",
        "toy_orders.csv",
        "toy_block_sweep.png",
        "diagonal_sweep.png",
        "block_sweep.png",
        "diagonal_elbo.png",
        "elbo_vs_k.png",
        "elbo_vs_k.csv",
        "ar_elbo_vs_nll.csv",
    ):
        assert (tmp_path / name).is_file(), name
    s = json.loads((tmp_path / "summary.json").read_text())
    # T6: observed orders on the toy (synchronous) near 1 / 2 / 2 / 4 (midpoint superconverges
    # on this affine problem before reaching its asymptotic order, hence the wider band)
    orders = {r["solver"]: r["observed_order"] for r in s["toy"]["orders"]}
    sync = {
        r["solver"]: r["observed_order"] for r in s["toy"]["orders"] if r["policy"] == "synchronous"
    }
    assert 0.75 < sync["euler"] < 1.3, orders
    assert 1.7 < sync["heun"] < 2.5, orders
    assert 1.7 < sync["midpoint"] < 3.3, orders
    assert 3.5 < sync["rk4"] < 5.0, orders
    # T3: a diagonal narrower than 1/(2L) is the AR grid; a wide one approaches synchronous
    diag = s["toy"]["diagonal"]
    assert diag[0]["dist_to_AR_K=L"] == 0
    assert diag[-1]["dist_to_sync_K=L"] < 0.1
    # T7: more steps, less transport error, for every block size
    assert all(r["error_rk4"] < 0.05 for r in s["toy"]["block"])
    # T4: ELBO under autoregressive == AR NLL
    assert s["ckpt"]["ar_check"]["max_abs_diff_nats_per_token"] < 1e-4
    # T5: the synchronous K-step ELBO approaches the continuous bound about like 1/K
    gaps = [r["gap"] for r in s["ckpt"]["elbo_vs_k"]]
    assert gaps[-1] < gaps[0]
    assert -1.8 < s["ckpt"]["elbo_vs_k_slope"] < -0.6
    for r in s["ckpt"]["block"] + s["ckpt"]["diagonal"]:
        assert math.isfinite(r["bpb"]) and r["bpb"] > 0
    assert "NO CHECKPOINT GIVEN" in (tmp_path / "limits.md").read_text()


def test_compare_quick_trains_evaluates_and_appends(tmp_path):
    compare = _load("compare")
    assert compare.main(["--quick", "--out", str(tmp_path)]) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for name in (
        "compare.md",
        "bpb.csv",
        "samples.csv",
        "addition.csv",
        "train.csv",
        "bpb_by_policy.png",
        "quality_vs_nfe.png",
        "summary.json",
    ):
        assert (run_dir / name).is_file(), name
    for model in ("ar", "diffusion", "evo"):  # the config of every run beside its result
        assert (run_dir / "lm" / model / "config.yaml").is_file()
        assert (run_dir / "addition" / model / "config.yaml").is_file()
    s = json.loads((run_dir / "summary.json").read_text())
    # a 3-step model is near uniform over 259 byte ids: about log2(259) = 8.02 bits under AR
    ar = [r for r in s["bpb"] if r["policy"] == "autoregressive"]
    assert len(ar) == 3 and all(7.0 < r["bpb"] < 9.0 for r in ar)
    assert all(math.isfinite(r["bpb"]) for r in s["bpb"])
    assert {r["model"] for r in s["samples"]} == {"ar", "diffusion", "evo"}
    assert all(r["nfe"] >= 1 and r["judge_bpb"] > 0 for r in s["samples"])
    assert all(0.0 <= r["exact_match"] <= 1.0 for r in s["addition"])
    assert len(s["goals"]) == 4
    n_lines = len((tmp_path / "results.jsonl").read_text().splitlines())

    # evaluate the same runs again from their checkpoints: results are appended, not overwritten
    assert (
        compare.main(
            [
                "--quick",
                "--out",
                str(tmp_path),
                "--skip-addition",
                "--ckpt-dir",
                str(run_dir / "lm"),
            ]
        )
        == 0
    )
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) > n_lines
    assert len({json.loads(x)["run_id"] for x in lines}) == 2
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"timestamp", "run_id", "metric", "value"} <= set(rows[0])
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2

    # the speculative decoding report reads the same runs (greedy: the AR decoder's tokens)
    table = tmp_path / "speculative.csv"
    assert _load("speculative").main(["--quick", "--ckpt-dir", str(run_dir / "lm"),
                                      "--csv", str(table)]) == 0  # fmt: skip
    with open(table) as f:
        rows = list(csv.DictReader(f))
    greedy = {r["decoder"]: float(r["judge_bpb"]) for r in rows if r["greedy"] == "True"}
    assert len(greedy) == 3 and len(set(greedy.values())) == 1, greedy
    assert all(float(r["tokens_per_eval"]) >= 1 for r in rows if "speculative" in r["decoder"])


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize("model", ["ar", "diffusion", "evo"])
def test_every_model_declares_one_primary_addition_decoder(model, quick):
    compare = _load("compare")
    decoders = compare.addition_decoders(model, 6, quick)
    primary = compare.primary_decoder(model, decoders)
    assert primary in decoders and len({d.label for d in decoders}) == len(decoders)
    assert primary.kwargs()["policy"] in ("autoregressive", "synchronous", "adaptive")


def test_a_missing_primary_decoder_is_an_error_not_a_score():
    compare = _load("compare")
    ar = compare.Decoder("autoregressive", "autoregressive")
    with pytest.raises(ValueError, match="exactly one primary"):
        compare.primary_decoder("ar", [ar])
    rows = [
        {"model": m, "policy": "x", "primary": m != "evo", "exact_match": 0.5}
        for m in ("ar", "diffusion", "evo")
    ]
    with pytest.raises(ValueError, match="evo"):
        compare.goals([], [], rows)


def test_decoder_settings_are_generate_arguments():
    compare = _load("compare")
    dec = compare.Decoder("block(8) K=4", "block", 4, (("size", 8),))
    assert dec.kwargs() == {"policy": "block", "policy_kwargs": {"size": 8}, "steps": 4}
    labels = [d.label for d in compare.decode_settings("evo", 64, quick=False)]
    assert len(labels) == len(set(labels))


def test_shared_output_helpers(tmp_path):
    from experiments.common import md_table, write_csv

    rows = [{"a": 1.23456, "b": "x|y", "c": True}, {"a": float("nan"), "b": "z", "c": False}]
    lines = md_table(rows, digits=2)
    assert lines[0] == "| a | b | c |" and lines[2] == "| 1.23 | x\\|y | yes |"
    assert lines[3] == "| - | z |  |"
    write_csv(tmp_path / "r.csv", rows)
    with open(tmp_path / "r.csv") as f:
        assert [r["b"] for r in csv.DictReader(f)] == ["x|y", "z"]


def test_bound_bpb_averages_policy_bound_over_batches_and_repeats():
    import torch

    from experiments.common import bound_bpb
    from flowtext.lm import FlowLM
    from flowtext.nn import FlowTransformerConfig

    net = FlowTransformerConfig(
        vocab_size=13, max_len=16, d_model=32, n_layers=1, n_heads=2, d_embed=8, cond_dim=16,
        cond_rank=4, attention_backend="sdpa",
    )  # fmt: skip
    lm = FlowLM(net=net)
    batches = [torch.randint(0, 13, (2, 8)) for _ in range(2)]
    bpb, se = bound_bpb(
        lm, batches, "synchronous", 4, bytes_per_token=2.0, repeats=2,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    vals = [
        float(lm.policy_bound(t, "synchronous", 4, generator=g).nats.mean())
        for _ in range(2)
        for t in batches
    ]
    assert bpb == pytest.approx(sum(vals) / 4 / math.log(2) / 2.0)
    assert se > 0


def test_ablate_quick_trains_every_variant_and_writes_table_and_figure(tmp_path, capsys):
    from experiments import ablate

    assert ablate.main(["--quick", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    rows = (tmp_path / "ablate.csv").read_text().splitlines()
    assert len(rows) == 1 + len(ablate.FAMILIES) * len(ablate.REVERSES) * len(ablate.SCHEDULES)
    for fam, rev, sch in [("diffusion", "mixture", "info-uniform"), ("evo", "gaussian", "cosine")]:
        assert f"| {fam} | {rev} | {sch} |" in table
    values = [float(v) for row in rows[1:] for v in row.split(",")[3:]]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert (tmp_path / "ablate_steps.png").stat().st_size > 1000


def test_balance_quick_measures_bounds_and_gradient_noise_of_every_drawn_bound(tmp_path):
    from experiments import balance
    from flowtext.regime import TrainingRegime

    argv = ["--quick", "--out", str(tmp_path), "--regimes", "ar,w0", "--variant"]
    assert balance.main([*argv, 'w0={"bound_weights": {"block0": 0.0}}']) == 0
    bounds = list(csv.DictReader(open(tmp_path / "balance.csv")))
    assert [r["regime"] for r in bounds] == ["ar", "w0"]
    assert all(float(r["ar"]) > 0 and math.isfinite(float(r["sync2"])) for r in bounds)
    grads = {(r["regime"], r["bound"]): r for r in csv.DictReader(open(tmp_path / "gradients.csv"))}
    evo = TrainingRegime.evo().probabilities()
    assert {b for r, b in grads if r == "w0"} == set(evo)  # every bound Evo draws
    for key in [("ar", "block1"), ("w0", "block1")]:  # the AR bound has no noise
        assert float(grads[key]["cos_noise"]) == pytest.approx(1.0, abs=1e-5)
    assert float(grads["w0", "block0"]["norm_vs_ar"]) == 0.0  # weight 0: no gradient at all
    assert all(-1 <= float(r["cos_noise"]) <= 1 + 1e-5 for r in grads.values())
    assert "Gradients of each drawn bound" in (tmp_path / "balance.md").read_text()


def test_tune_quick_trains_scores_and_reuses_every_variant(tmp_path, capsys):
    from experiments import tune

    argv = ["--quick", "--out", str(tmp_path), "--variant", "base=",
            "--variant", "fixed=max_lr_steps=7,lr=4e-3"]  # fmt: skip
    assert tune.main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "tune-ar-tiny.csv")))
    assert [r["variant"] for r in rows] == ["base", "fixed"]
    base, fixed = rows
    assert int(fixed["max_lr_steps"]) == 7  # a variant's own schedule is kept
    assert int(base["max_lr_steps"]) > 7  # the probe sized the decay to the budget
    for r in rows:  # a few seconds of training: below uniform over 259 byte ids (8.02 bits)
        assert int(r["steps"]) > 0 and float(r["tokens_per_s"]) > 0
        assert 0 < float(r["bpb_ar"]) < 8.5
    assert float(base["ratio"]) == 1.0
    assert float(fixed["ratio"]) == pytest.approx(float(fixed["bpb_ar"]) / float(base["bpb_ar"]))
    assert "| fixed |" in (tmp_path / "tune-ar-tiny.md").read_text()
    capsys.readouterr()
    assert tune.main(argv) == 0  # the same runs again: read back, not retrained
    assert capsys.readouterr().out.count("reusing") == 2
    assert list(csv.DictReader(open(tmp_path / "tune-ar-tiny.csv"))) == rows


def test_tune_variants_expand_short_overrides_and_refuse_unknown_ones():
    from experiments import tune

    name, args = tune.parse_variant("w=d_model=192,--data.seq_len=64")
    assert name == "w"
    assert args == ["--model.init_args.net.d_model=192", "--data.seq_len=64"]
    assert tune.parse_variant("base=") == ("base", [])
    for bad in ("=lr=1", "x=width=3", "x=lr"):
        with pytest.raises(ValueError):
            tune.parse_variant(bad)
    assert tune.max_time(3 * 60) == "00:00:03:00" and tune.max_time(90061.5) == "01:01:01:02"


def test_tune_sizes_an_ar_tail_by_the_mixed_rate_of_its_steps():
    from experiments import tune

    _, args = tune.parse_variant("t=ar_tail=0.2,lr=1e-3,ar_tail=0.3")
    assert tune.ar_tail(args) == 0.3 and tune.ar_tail([]) == 0.0
    assert tune.mixed_rate(2.0, 4.0, 0.0) == 2.0 and tune.mixed_rate(2.0, 4.0, 1.0) == 4.0
    # half the steps at 2/s and half at 4/s: 0.25 + 0.125 s per step on average
    assert tune.mixed_rate(2.0, 4.0, 0.5) == pytest.approx(1 / 0.375)
