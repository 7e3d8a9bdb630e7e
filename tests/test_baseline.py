"""The plain-GPT baseline (benchmarks/plain_gpt.py) and the ar-tiny side by side (ar_vs_gpt.py)."""

import csv
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # spawned workers import ar_vs_gpt by name from here too

plain_gpt = importlib.import_module("plain_gpt")
ar_vs_gpt = importlib.import_module("ar_vs_gpt")

TINY = plain_gpt.GPTConfig(vocab_size=259, max_len=16, d_model=32, n_layers=2, n_heads=2)


def test_gpt_is_causal_and_scores_every_token():
    torch.manual_seed(0)
    model = plain_gpt.PlainGPT(TINY).eval()
    x = torch.randint(0, 256, (3, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 256
    with torch.no_grad():
        lx, ly = model(x), model(y)
        nx, ny = plain_gpt.token_nats(model, x, 257), plain_gpt.token_nats(model, y, 257)
    assert torch.equal(lx[:, :9], ly[:, :9])  # positions before the change cannot see it
    assert not torch.allclose(lx[:, 9:], ly[:, 9:])
    assert nx.shape == (3, 16)
    assert torch.allclose(nx[:, :9], ny[:, :9])  # x_9 is read only from position 10 on
    assert not torch.allclose(nx[:, 9:], ny[:, 9:])  # ... and is itself scored at 9
    vocab_sized = [n for n, p in model.named_parameters() if p.shape[0] == TINY.vocab_size]
    assert vocab_sized == ["tok.weight"]  # the head is tied to the token embedding


def test_train_for_lowers_the_loss_of_a_batch():
    torch.manual_seed(0)
    model = plain_gpt.PlainGPT(TINY)
    batch = torch.randint(0, 8, (4, 16))  # 8 symbols: learnable well below log(259)
    stats = plain_gpt.train_for(
        lambda b: plain_gpt.token_nats(model, b, 257).mean(),
        list(model.parameters()),
        iter(lambda: batch, None),
        seconds=1.5,
    )
    assert stats["steps"] >= 5
    assert stats["tokens"] == stats["steps"] * batch.numel()
    assert stats["last_loss"] < math.log(259) - 1.0


def test_apply_overrides_writes_nested_yaml_values():
    cfg = {"data": {"seq_len": 128, "corpus": "stdlib"}, "model": {"init_args": {}}}
    out = ar_vs_gpt.apply_overrides(
        cfg, ["--data.seq_len=32", "--model.init_args.net.d_model=16", "--trainer.max_steps=-1"]
    )
    assert out["data"] == {"seq_len": 32, "corpus": "stdlib"}
    assert out["model"]["init_args"]["net"]["d_model"] == 16
    assert out["trainer"]["max_steps"] == -1
    assert cfg["data"]["seq_len"] == 128  # the input is left alone


def test_heldout_windows_are_fixed_third_party_bytes():
    a, info = ar_vs_gpt.heldout_windows(64, kib=2)
    b, again = ar_vs_gpt.heldout_windows(64, kib=2)
    assert torch.equal(a, b) and info["sha1"] == again["sha1"]
    assert a.shape == (2 * 2 * 1024 // 64, 64)
    assert int(a.max()) <= 258 and int(a.min()) >= 0
    assert "site-packages" in info["site_packages"]
    assert set(info["packages"]) == set(ar_vs_gpt.HELDOUT_PACKAGES)
    c, _ = ar_vs_gpt.heldout_windows(64, kib=3)
    assert not torch.equal(c[: len(a)], a)  # each package's stream is cut at its own budget


def test_flow_ar_bound_reads_no_noise():
    from flowtext import AutoregressiveLM
    from flowtext.nn import FlowTransformerConfig

    torch.manual_seed(0)
    lm = AutoregressiveLM(
        net=FlowTransformerConfig(
            vocab_size=259, max_len=16, d_model=16, n_layers=1, n_heads=2, d_embed=8, cond_dim=8
        )
    ).eval()
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        one = ar_vs_gpt._flow_nats(lm)(x)
        torch.manual_seed(1)
        two = ar_vs_gpt._flow_nats(lm)(x)
    assert one.shape == (2, 16)
    assert torch.equal(one, two)


@pytest.mark.slow  # two spawned processes that import Lightning: a minute on a busy machine
def test_quick_side_by_side_trains_both_and_writes_a_row(tmp_path, capsys):
    assert ar_vs_gpt.main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "held-out bits/byte" in printed and "load average" in printed
    row = json.loads((tmp_path / "ar_vs_gpt.json").read_text())["row"]
    assert 0 < row["gpt_heldout_bpb"] < math.log2(259)  # trained below uniform
    assert 0 < row["ar_heldout_bpb"] < 20
    assert row["bpb_ratio_ar_over_gpt"] == pytest.approx(
        row["ar_heldout_bpb"] / row["gpt_heldout_bpb"]
    )
    assert row["gpt_steps"] > 0 and row["ar_steps"] > 0
    split = row["ar_time_step_s"] + row["ar_time_val_s"] + row["ar_time_other_s"]
    assert split >= row["train_seconds"] * 0.9  # max_time stops at the first step past it
    assert row["equal_gpt_tokens_per_s"] > 0 and row["equal_ar_tokens_per_s"] > 0
    with (tmp_path / "ar_vs_gpt.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 1
    assert "| held-out bits/byte |" in (tmp_path / "ar_vs_gpt.md").read_text()


def test_interleaved_steps_alternate_the_models_and_time_every_round():
    calls = []
    steps = {name: (lambda b, name=name: calls.append((name, b))) for name in ("gpt", "ar-tiny")}
    times = ar_vs_gpt.interleaved_steps(steps, "batch", rounds=3, iters=2, warmup=1)
    warmup, even = ["gpt", "ar-tiny"], ["gpt", "gpt", "ar-tiny", "ar-tiny"]
    assert [n for n, _ in calls] == warmup + even + even[::-1] + even  # neither always first
    assert all(b == "batch" for _, b in calls)
    assert {k: len(v) for k, v in times.items()} == {"gpt": 3, "ar-tiny": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_step_only_quick_writes_a_row(tmp_path, capsys):
    assert ar_vs_gpt.main(["--step-only", "--quick", "--out", str(tmp_path)]) == 0
    assert "tokens per CPU second" in capsys.readouterr().out
    with (tmp_path / "ar_vs_gpt_steps.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    gpt, ar = float(row["gpt_cpu_s_per_step"]), float(row["ar_cpu_s_per_step"])
    assert gpt > 0 and ar > 0
    assert float(row["ratio_ar_over_gpt"]) == pytest.approx(gpt / ar)
    assert float(row["median_round_ratio"]) > 0
    assert int(row["gpt_params"]) > 0 and int(row["ar_params"]) > 0
