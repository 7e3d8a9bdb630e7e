"""The backbone interface :class:`flowtext.nn.FlowNetwork` and the backbones that offer it.

mypy checks both backbones against the protocol statically (``flowtext/nn/interface.py``, run by
``make test``); these tests check it at run time, and that the protocol names every member of a
backbone that the rest of flowtext reads.
"""

import ast
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import flowtext
from flowtext.nn import (
    FlowNetwork,
    FlowNetworkConfig,
    FlowTransformer,
    FlowTransformerConfig,
    KVCache,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = FlowTransformerConfig(
    vocab_size=16, max_len=8, d_model=32, n_layers=1, n_heads=2, d_embed=8, cond_dim=16,
    cond_rank=4,
)  # fmt: skip


def _members(protocol: type) -> set[str]:
    """Public methods and properties of a protocol, and its annotated attributes."""
    return {n for n in dir(protocol) if not n.startswith("_")} | set(protocol.__annotations__)


GENERIC = ("objectives.py", "regime.py", "lm.py", "decoding")
"""Modules that take any backbone as ``net`` (elsewhere a local ``net`` may be a concrete one)."""


def _sources() -> list[tuple[str, ast.AST]]:
    root = Path(flowtext.__file__).parent
    return [
        (str(path.relative_to(root)), ast.parse(path.read_text(encoding="utf-8")))
        for path in sorted(root.rglob("*.py"))
        if path.parent.name != "nn"
    ]


def _is_net(node: ast.AST, rel: str) -> bool:
    """``<obj>.net`` anywhere, or a plain ``net`` in a generic module."""
    if isinstance(node, ast.Attribute):
        return node.attr == "net"
    return isinstance(node, ast.Name) and node.id == "net" and rel.startswith(GENERIC)


def _used_members() -> dict[str, set[str]]:
    """``{member: files}`` of every backbone member read outside ``flowtext.nn``."""
    used: dict[str, set[str]] = {}
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_net(node.value, rel):
                used.setdefault(node.attr, set()).add(rel)
    return used


def test_flow_transformer_is_a_flow_network():
    net = FlowTransformer(TINY)
    assert isinstance(net, FlowNetwork)
    assert isinstance(net.config, FlowNetworkConfig)
    assert isinstance(net.new_cache(2), KVCache)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pretrained_backbone_is_a_flow_network(family):
    tf = pytest.importorskip("transformers", reason="the hf extra is not installed")
    from flowtext.nn.hf_backbone import AdapterConfig, PretrainedBackbone, PretrainedCache

    tf.logging.set_verbosity_error()
    config = {
        "gpt2": lambda: tf.GPT2Config(
            vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1,
            eos_token_id=2,
        ),
        "llama": lambda: tf.LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
            bos_token_id=1, eos_token_id=2,
        ),
    }[family]()  # fmt: skip
    adapter = AdapterConfig(d_embed=4, cond_dim=8, cond_rank=2)
    net = PretrainedBackbone.from_config(config.to_dict(), adapter)
    assert isinstance(net, FlowNetwork)
    assert isinstance(net.config, FlowNetworkConfig)
    assert isinstance(net.new_cache(2), PretrainedCache)
    # the protocol's call runs forward: logits over the vocabulary for every token
    tokens = torch.randint(0, 40, (2, 5))
    out = net(net.embed(tokens), torch.zeros(2, 5), torch.arange(5).expand(2, 5))
    assert out.logits.shape == (2, 5, 40)


def test_modules_without_the_interface_are_refused():
    assert not isinstance(nn.Linear(2, 2), FlowNetwork)
    assert not isinstance(TINY, FlowNetwork)

    class ConfigOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = TINY

    assert not isinstance(ConfigOnly(), FlowNetwork)
    assert not isinstance(object(), FlowNetworkConfig)


def test_protocol_names_every_backbone_member_flowtext_reads():
    used = _used_members()
    assert {"config", "embed", "x0_hat", "new_cache", "commit"} <= set(used)  # the scan works
    missing = {name: files for name, files in used.items() if name not in _members(FlowNetwork)}
    assert not missing, f"backbone members read but not in FlowNetwork: {missing}"


def test_protocol_names_every_config_field_flowtext_reads():
    read = {
        node.attr
        for rel, tree in _sources()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "config"
        and _is_net(node.value.value, rel)
    }
    assert {"vocab_size", "max_len"} <= read  # the scan works
    assert read <= _members(FlowNetworkConfig), read - _members(FlowNetworkConfig)
