"""The Hugging Face extra: BPE / tokenizer.json, dataset corpora, pretrained backbones, export.

Everything is built here, on the spot: tiny random ``transformers`` configs, a BPE vocabulary
trained on a few KB of text. Nothing is downloaded (``HF_HUB_OFFLINE=1``). The module is skipped
only when the ``hf`` extra is not installed (``pip install -e '.[dev]'`` installs it).
"""

import ast
import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

tf = pytest.importorskip("transformers", reason="the hf extra is not installed")
datasets = pytest.importorskip("datasets", reason="the hf extra is not installed")
pytest.importorskip("tokenizers", reason="the hf extra is not installed")
pytest.importorskip("safetensors", reason="the hf extra is not installed")

from flowtext.adapt import AdaptedLM, adapt, check_tokenizer  # noqa: E402
from flowtext.cli import main  # noqa: E402
from flowtext.data import (  # noqa: E402
    ByteTokenizer,
    FlowTextDataModule,
    TextCorpus,
    open_tokens,
    tokenizer_from_state,
)
from flowtext.data._hf import HFTokenizer, build_bpe_tokenizer, load_tokenizer_json, require  # noqa: E402
from flowtext.errors import ConfigError, DataError  # noqa: E402
from flowtext.export import export_checkpoint, export_module, load_export  # noqa: E402
from flowtext.lm import FlowLM  # noqa: E402
from flowtext.nn import FlowTransformerConfig  # noqa: E402
from flowtext.nn.hf_backbone import PretrainedBackbone  # noqa: E402
from flowtext.objectives import two_stream_loss  # noqa: E402
from flowtext.schedules import get as get_schedule  # noqa: E402

tf.logging.set_verbosity_error()
tf.utils.logging.disable_progress_bar()
datasets.disable_progress_bars()

TEXT = "".join(
    f"def f{i}(x):\n    return x * {i} + {i % 7}  # rule {i}: the quick brown fox\n\n"
    for i in range(120)
)
FAMILIES = {
    "gpt2": lambda v: tf.GPT2Config(
        vocab_size=v, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
    ),
    "llama": lambda v: tf.LlamaConfig(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "qwen2": lambda v: tf.Qwen2Config(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="module")
def corpus_file(workdir):
    path = workdir / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def bpe(corpus_file, workdir):
    return build_bpe_tokenizer(TextCorpus(corpus_file), 320, workdir / "cache")


@pytest.fixture(scope="module")
def model_dirs(workdir, bpe):
    """One tiny random causal LM per family, saved with the BPE tokenizer beside it."""
    out = {}
    for name, make in FAMILIES.items():
        torch.manual_seed(0)
        path = workdir / name
        tf.AutoModelForCausalLM.from_config(make(bpe.vocab_size)).save_pretrained(path)
        bpe.save(path / "tokenizer.json")
        out[name] = path
    return out


def _hf_nats(path, tokens, dtype):
    """Per-token next-token cross-entropy of the original model, positions 1..L-1."""
    ref = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).eval()
    with torch.no_grad():
        logits = ref(tokens).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")


def _ar_nats(net, tokens):
    with torch.no_grad():
        return two_stream_loss(net, tokens, get_schedule("cosine"), block_size=1).nats[:, 1:]


# --------------------------------------------------------------------------- initial equivalence


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ar_likelihood_equals_the_pretrained_model_at_init(family, model_dirs, bpe):
    tokens = torch.randint(3, bpe.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    net = PretrainedBackbone.from_pretrained(model_dirs[family], dtype=torch.float64).eval()
    ours, theirs = _ar_nats(net, tokens), _hf_nats(model_dirs[family], tokens, torch.float64)
    assert theirs.min() > 1.0  # a random model: the comparison is not between near-zero numbers
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("part", ["in_proj", "time_in", "time_shift"])
def test_the_equivalence_rests_on_the_zero_initialization(part, model_dirs, bpe):
    """Any adapter that does not start at zero breaks the AR equality: the test above can fail."""
    tokens = torch.randint(3, bpe.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    net = PretrainedBackbone.from_pretrained(model_dirs["llama"], dtype=torch.float64).eval()
    module = {"in_proj": net.in_proj, "time_in": net.time_in, "time_shift": net.time_shift[0].up}
    with torch.no_grad():
        module[part].bias.normal_(0.0, 0.1)  # t = 0 and t = 1 tokens carry c(t) != 0
        module[part].weight.normal_(0.0, 0.1)
    gap = (_ar_nats(net, tokens) - _hf_nats(model_dirs["llama"], tokens, torch.float64)).abs()
    assert gap.max() > 1e-4


def test_greedy_ar_decoding_is_the_pretrained_greedy_continuation(model_dirs, bpe):
    lm = adapt(model_dirs["llama"], tokenizer=bpe).eval()
    prompt = torch.tensor([bpe.encode("def f3(x):\n    return")] * 2)
    prompt[1, 0] = 7
    ref = tf.AutoModelForCausalLM.from_pretrained(model_dirs["llama"], local_files_only=True)
    with torch.no_grad():
        expected = ref.eval().generate(
            prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
        )[:, prompt.shape[1] :]
    for use_cache in (True, False):
        for policy in ("autoregressive", "speculative"):  # speculative: the AR law, drafted
            got = lm.generate(
                prompt=prompt.tolist(), length=8, policy=policy, greedy=True, use_cache=use_cache,
            )  # fmt: skip
            assert got.tokens == expected.tolist(), policy


def test_a_short_fit_lowers_the_evo_losses(model_dirs, bpe):
    torch.manual_seed(0)
    lm = adapt(model_dirs["gpt2"], tokenizer=bpe, schedule="cosine")
    ids = bpe.encode(TEXT)
    batch = torch.tensor([ids[i : i + 16] for i in range(0, 64, 16)])

    def bounds():
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return [
                lm.policy_bound(batch, p, 16, generator=gen).nats.mean().item()
                for p in ("autoregressive", "block", "synchronous")
            ]

    before = bounds()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-3)
    for _ in range(25):
        loss, _ = lm.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = bounds()
    assert all(a < b for a, b in zip(after, before)), (before, after)


# ----------------------------------------------------------------------------------- bad inputs


def test_a_directory_that_is_not_a_causal_lm_is_refused(workdir, model_dirs):
    with pytest.raises(ConfigError, match="no config.json"):
        PretrainedBackbone.from_pretrained(workdir / "nowhere")
    with pytest.raises(ConfigError, match="no config.json"):
        PretrainedBackbone.from_pretrained(workdir)  # a folder without a model
    t5 = workdir / "t5"  # an encoder-decoder: weights, but not a causal LM
    tf.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                num_heads=2).save_pretrained(t5)  # fmt: skip
    with pytest.raises(ConfigError, match="not a causal language model"):
        PretrainedBackbone.from_pretrained(t5)
    weightless = workdir / "weightless"
    tf.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                   num_attention_heads=2).save_pretrained(weightless)  # fmt: skip
    with pytest.raises(ConfigError, match="cannot load causal-LM weights"):
        PretrainedBackbone.from_pretrained(weightless)
    assert main(["adapt", str(t5), "--max-steps", "0"]) == 2


def test_a_tokenizer_whose_vocabulary_disagrees_is_refused(workdir, model_dirs, bpe):
    check_tokenizer(bpe, PretrainedBackbone.from_pretrained(model_dirs["gpt2"]))  # its own: fine
    for vocab in (100, 2000):  # fewer ids than the tokenizer; far more (another model's)
        path = workdir / f"vocab-{vocab}"
        tf.AutoModelForCausalLM.from_config(FAMILIES["llama"](vocab)).save_pretrained(path)
        with pytest.raises(
            ConfigError, match=f"{bpe.vocab_size} ids .* has {vocab}: they disagree"
        ):
            adapt(path, tokenizer=bpe)
    with pytest.raises(ConfigError, match="disagree"):
        adapt(model_dirs["gpt2"], tokenizer=ByteTokenizer())


def test_an_empty_dataset_is_refused(workdir):
    empty = workdir / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        FlowTextDataModule(str(empty), seq_len=8, cache_dir=str(workdir / "cache")).prepare_data()
    saved = workdir / "empty-saved"
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(saved))
    with pytest.raises(DataError, match="empty"):
        FlowTextDataModule(str(saved), seq_len=8, cache_dir=str(workdir / "cache")).prepare_data()
    no_field = workdir / "nofield.jsonl"
    no_field.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="text_field"):
        FlowTextDataModule(
            str(no_field), seq_len=8, cache_dir=str(workdir / "cache")
        ).prepare_data()


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ConfigError, match=r"flowtext\[hf\]"):
        require("tokenizers")


HF_PACKAGES = ("transformers", "tokenizers", "datasets", "safetensors", "pyarrow")
HF_MODULES = ("data/_hf.py", "nn/hf_backbone.py", "adapt.py", "export.py")


def _imports(node):
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            yield from (a.name.split(".")[0] for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            yield n.module.split(".")[0]


def test_the_core_never_imports_the_extra():
    """Only the hf modules name the Hugging Face packages, and only inside functions, so
    ``import flowtext`` and everything without the extra work when they are not installed."""
    root = Path(__file__).resolve().parents[1] / "flowtext"
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        rel = path.relative_to(root).as_posix()
        nodes = [tree]
        if rel in HF_MODULES:  # these may import the packages, inside functions only
            nodes = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        found = {m for node in nodes for m in _imports(node) if m in HF_PACKAGES}
        assert not found, f"{rel} imports {found} at module level"


# ----------------------------------------------------------------------------------- tokenizers


def test_bpe_round_trips_and_counts_bytes_exactly(bpe, corpus_file, workdir):
    assert bpe.special_ids == (0, 1, 2) and bpe.kind == "bpe"
    text = "def g(x):\n    return x  # héllo → wörld"
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.count_bytes(ids) == len(text.encode("utf-8"))
    assert len(ids) < len(text.encode("utf-8"))  # merges learned from the corpus compress it
    assert bpe.bytes_per_token > 1.5
    state = json.loads(json.dumps(bpe.state_dict()))
    assert tokenizer_from_state(state) == bpe
    again = build_bpe_tokenizer(TextCorpus(corpus_file), 320, workdir / "cache")  # the cache
    assert again == bpe


def test_tokenizer_json_from_a_model_folder(model_dirs, bpe, workdir):
    tok = load_tokenizer_json(model_dirs["llama"])
    assert tok.encode("return x") == bpe.encode("return x")
    assert tok.eos_id == 2
    (workdir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|pad|>"}))
    (workdir / "tokenizer.json").write_text(bpe.state_dict()["json"])
    assert load_tokenizer_json(workdir / "tokenizer.json").eos_id == 0  # the config wins
    no_eos = json.loads(bpe.state_dict()["json"])
    no_eos["added_tokens"] = []
    no_eos["model"]["vocab"] = {
        k: v for k, v in no_eos["model"]["vocab"].items() if not k.startswith("<|")
    }
    (workdir / "no-eos.json").write_text(json.dumps(no_eos))
    with pytest.raises(DataError, match="end-of-sequence"):
        load_tokenizer_json(workdir / "no-eos.json")


# -------------------------------------------------------------------------------------- corpora


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved", "saved_dict"])
def test_dataset_corpora_stream_documents_into_the_cache(fmt, workdir):
    rows = [f"document {i}: " + "lorem ipsum dolor " * (1 + i % 5) for i in range(120)]
    ds = datasets.Dataset.from_dict({"text": rows, "id": list(range(120))})
    path = workdir / f"docs-{fmt}"
    if fmt == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    elif fmt == "parquet":
        path = path.with_suffix(".parquet")
        ds.to_parquet(str(path))
    elif fmt == "saved":
        ds.save_to_disk(str(path))
    else:
        parts = {"train": ds.select(range(100)), "validation": ds.select(range(100, 110)),
                 "test": ds.select(range(110, 120))}  # fmt: skip
        datasets.DatasetDict(parts).save_to_disk(str(path))
    dm = FlowTextDataModule(str(path), tokenizer="byte", seq_len=16, batch_size=4,
                            cache_dir=str(workdir / "cache"), eval_samples=4)  # fmt: skip
    dm.prepare_data()
    dm.setup(None)
    n_docs = 0
    for split in ("train", "val", "test"):
        tokens, meta = open_tokens(dm._prepare(split))
        docs = list(dm.source.documents(split))
        assert meta["n_documents"] == len(docs) == int((tokens == dm.tokenizer.eos_id).sum())
        n_docs += len(docs)
    assert n_docs == 120  # every row in exactly one split, one document each
    if fmt == "saved_dict":
        assert len(list(dm.source.documents("val"))) == 10
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape == (4, 16)


def test_fit_with_bpe_on_a_corpus_reports_bits_per_byte(corpus_file, workdir):
    dm = FlowTextDataModule(str(corpus_file), tokenizer="bpe:320", seq_len=16, batch_size=4,
                            cache_dir=str(workdir / "cache"), eval_samples=4)  # fmt: skip
    assert dm.vocab_size == dm.tokenizer.vocab_size and dm.bytes_per_token > 1.5
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))["tokens"]
    assert int(batch.max()) < dm.vocab_size
    train, val = (open_tokens(dm._prepare(s))[0] for s in ("train", "val"))
    assert len(val) < len(train)  # each split has its own cache file, even for "corpus.txt"


# --------------------------------------------------------------------------------------- export


def _gen():
    return torch.Generator().manual_seed(1)


def _tiny_flowlm(vocab):
    cfg = FlowTransformerConfig(vocab_size=vocab, max_len=32, d_model=32, n_layers=1, n_heads=2,
                                d_embed=8, cond_dim=16, cond_rank=4)  # fmt: skip
    return FlowLM(net=cfg)


@pytest.mark.parametrize("kind", ["flow_transformer", "adapted"])
def test_export_reloads_and_decodes_identically(kind, model_dirs, bpe, workdir):
    torch.manual_seed(0)
    lm = _tiny_flowlm(bpe.vocab_size) if kind != "adapted" else adapt(model_dirs["qwen2"])
    with torch.no_grad():  # move off the initialization so a silent re-init would show
        for p in lm.net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = workdir / f"{kind}.ckpt"
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams),
                "flowtext_tokenizer": bpe.state_dict()}, ckpt)  # fmt: skip
    out = export_checkpoint(ckpt, workdir / f"export-{kind}")
    assert {"model.safetensors", "config.json", "flowtext_tokenizer.json"} <= set(os.listdir(out))
    lm2, tok2 = load_export(out)
    assert tok2 == bpe and type(lm2) is type(lm)
    prompt = [bpe.encode("def f1(x):")]
    for policy, kwargs in (("autoregressive", {"greedy": True}), ("adaptive", {"steps": 4})):
        a = lm.eval().generate(prompt=prompt, length=6, policy=policy, generator=_gen(), **kwargs)
        b = lm2.generate(prompt=prompt, length=6, policy=policy, generator=_gen(), **kwargs)
        assert a.tokens == b.tokens
    assert main(["export", str(ckpt), str(workdir / f"cli-{kind}")]) == 0


def test_adapted_lm_rebuilds_from_its_hyper_parameters(model_dirs):
    lm = adapt(model_dirs["gpt2"])
    again = AdaptedLM(**{k: v for k, v in lm.hparams.items()})
    again.load_state_dict(lm.state_dict())
    assert "pretrained" not in lm.hparams and "backbone" in lm.hparams
    with pytest.raises(ConfigError, match="exactly one"):
        AdaptedLM()


def test_export_of_a_plain_module_without_a_checkpoint(bpe, workdir):
    lm = _tiny_flowlm(bpe.vocab_size)
    out = export_module(lm, bpe, workdir / "plain")
    lm2, _ = load_export(out)
    for (n, p), (_, q) in zip(lm.net.state_dict().items(), lm2.net.state_dict().items()):
        assert torch.equal(p, q), n
    assert isinstance(HFTokenizer.from_state(bpe.state_dict()), HFTokenizer)


def test_adapt_cli_fine_tunes_and_saves(model_dirs, corpus_file, workdir, capsys):
    out = workdir / "adapt-run"
    code = main([
        "adapt", str(model_dirs["llama"]), "--corpus", str(corpus_file), "--seq-len", "16",
        "--batch-size", "2", "--max-steps", "3", "--max-bytes", "20000", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "val/bpb_ar (before -> after)" in printed
    assert (out / "adapted.ckpt").is_file()
    assert main(["export", str(out / "adapted.ckpt"), str(out / "export")]) == 0
    lm, tok = load_export(out / "export")
    assert isinstance(lm, AdaptedLM) and tok.kind == "hf"
