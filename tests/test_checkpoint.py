"""Checkpoints are data: hostile or broken files are refused with one clear error, nothing runs."""

import os
import pickle

import pytest
import torch

from flowtext.checkpoint import load_checkpoint, read_checkpoint
from flowtext.data import ByteTokenizer
from flowtext.errors import CheckpointError
from flowtext.lm import FlowLM
from flowtext.nn import FlowTransformerConfig

from ._nets import tiny

NET = tiny(vocab_size=259, n_layers=1)


def _genuine(path, **net):
    lm = FlowLM(net=FlowTransformerConfig(**{**NET, **net}))
    state = {
        "state_dict": lm.state_dict(),
        "hyper_parameters": dict(lm.hparams),
        "flowtext_tokenizer": ByteTokenizer().state_dict(),
        "global_step": 3,
    }
    torch.save(state, path)
    return lm


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears iff code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_genuine_checkpoint_loads_and_matches(tmp_path):
    lm = _genuine(tmp_path / "ok.ckpt")
    back, tok, note = load_checkpoint(tmp_path / "ok.ckpt")
    assert isinstance(tok, ByteTokenizer) and "checkpoint" in note
    for k, v in lm.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert not back.training


@pytest.mark.parametrize("where", ["top", "hyper_parameters", "state_dict"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, where):
    marker = tmp_path / "pwned"
    state = {"state_dict": {}, "hyper_parameters": {}}
    if where == "top":
        state["evil"] = _Payload(marker)
    else:
        state[where]["evil"] = _Payload(marker)
    torch.save(state, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refused to load"):
        read_checkpoint(tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists(), "loading the checkpoint ran code"
    # the same file does run code under a plain unpickler: the test would notice a regression
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "p.ckpt", "wb") as f:
        pickle.dump({"state_dict": _Payload(marker)}, f)
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "p.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "directory", "missing", "list"])
def test_broken_files_get_one_clear_error(tmp_path, kind):
    path = tmp_path / "x.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        _genuine(tmp_path / "full.ckpt")
        data = (tmp_path / "full.ckpt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "directory":
        path.mkdir()
    elif kind == "list":
        torch.save([1, 2, 3], path)
    expected = {
        "empty": "empty",
        "truncated": "corrupt or truncated",
        "random": "corrupt",
        "directory": "directory",
        "missing": "does not exist",
        "list": "not a Lightning checkpoint",
    }[kind]
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_recorded_config(tmp_path):
    _genuine(tmp_path / "a.ckpt")
    state = torch.load(tmp_path / "a.ckpt", weights_only=True)
    state["hyper_parameters"]["net"]["d_model"] = 64
    torch.save(state, tmp_path / "b.ckpt")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "b.ckpt")


def test_non_finite_weights_are_named(tmp_path):
    _genuine(tmp_path / "a.ckpt")
    state = torch.load(tmp_path / "a.ckpt", weights_only=True)
    name = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
    state["state_dict"][name] = torch.full_like(state["state_dict"][name], float("nan"))
    torch.save(state, tmp_path / "b.ckpt")
    with pytest.raises(CheckpointError, match="non-finite") as info:
        load_checkpoint(tmp_path / "b.ckpt")
    assert name in str(info.value)


def test_vocabulary_mismatch_names_both_sizes(tmp_path):
    _genuine(tmp_path / "a.ckpt", vocab_size=300)
    with pytest.raises(CheckpointError, match="vocab_size=300.*259 ids"):
        load_checkpoint(tmp_path / "a.ckpt")


def test_sample_cli_refuses_a_malicious_checkpoint(tmp_path, capsys):
    from flowtext.cli import main

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, tmp_path / "evil.ckpt")
    assert main(["sample", "--ckpt", str(tmp_path / "evil.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "Traceback" not in err
    assert not marker.exists()
