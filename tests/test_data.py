"""flowtext.data: tokenizers, corpora and splits, memmap caches, tasks, the DataModule, errors."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowtext import data
from flowtext.data import (
    AdditionTask,
    ByteTokenizer,
    CharTokenizer,
    CopyTask,
    EpochSampler,
    FlowTextDataModule,
    ReversalTask,
    StdlibCorpus,
    TextCorpus,
    TokenWindows,
    open_tokens,
    prepare_tokens,
    split_of,
    tokenizer_from_state,
    write_atomic,
)
from flowtext.errors import ConfigError, DataError

SMALL = 200_000  # bytes of stdlib in the DataModule tests
TASKS = ["addition", "reverse", "copy"]

text_st = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)


# ---------------------------------------------------------------- tokenizers


@given(text_st)
def test_byte_roundtrip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8")) == tok.count_bytes(ids)
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text


@given(st.lists(text_st, min_size=1, max_size=4).filter(lambda ts: any(ts)), st.data())
def test_char_roundtrip(texts, draw):
    tok = CharTokenizer.from_texts(texts)
    assert tok.vocab_size == len(set("".join(texts))) + 3
    text = draw.draw(st.sampled_from(texts))
    ids = tok.encode(text)
    assert all(3 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids + [tok.eos_id]) == text
    assert tok.count_bytes(ids) == len(text.encode("utf-8"))
    assert tok.encode_bytes(text.encode("utf-8")).tolist() == ids


def test_special_ids_and_decode_modes():
    for tok in (ByteTokenizer(), CharTokenizer.from_texts(["ab"])):
        specials = {tok.pad_id, tok.bos_id, tok.eos_id}
        assert len(specials) == 3 and all(0 <= i < tok.vocab_size for i in specials)
        assert tok.token_bytes[list(specials)].sum() == 0
        ids = tok.encode("ab") + [tok.eos_id]
        assert tok.decode(ids, skip_special=False) == "ab<|eos|>"
        assert tok.decode(torch.tensor(ids)) == "ab"
    assert ByteTokenizer().decode([0xC3]) == "\ufffd"  # errors="replace"
    with pytest.raises(DataError):
        ByteTokenizer().decode([259])


def test_tokenizer_state_roundtrip_and_mismatch():
    byte = ByteTokenizer()
    char = CharTokenizer.from_texts(["hello wörld"])
    for tok in (byte, char):
        again = tokenizer_from_state(json.loads(json.dumps(tok.state_dict())))
        assert again == tok and again.encode("hello") == tok.encode("hello")
        tok.check_state(tok.state_dict())
    with pytest.raises(DataError, match="mismatch"):
        byte.check_state(char.state_dict())
    with pytest.raises(DataError, match="mismatch"):
        char.check_state(CharTokenizer.from_texts(["hello"]).state_dict())
    assert char.bytes_per_token == pytest.approx(len("hello wörld".encode()) / 11)


def test_char_vocab_rejects_non_utf8_and_unknown_chars(tmp_path):
    with pytest.raises(DataError, match="byte tokenizer"):
        CharTokenizer.from_texts([b"abc\xff"])
    tok = CharTokenizer.from_texts(["abc"])
    with pytest.raises(DataError, match="byte tokenizer"):
        tok.encode("abz")
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"caf\xe9 latin-1 " * 50)
    with pytest.raises(DataError, match="byte tokenizer"):
        _ = FlowTextDataModule(
            str(folder), tokenizer="char", splits=(1.0, 0.0, 0.0), cache_dir=str(tmp_path / "cache")
        ).vocab_size


# ---------------------------------------------------------------- corpora and splits


def test_split_of_is_deterministic_and_follows_fractions():
    paths = [f"pkg/mod{i}.py" for i in range(4000)]
    a = [split_of(p) for p in paths]
    assert a == [split_of(p) for p in paths]
    counts = {s: a.count(s) / len(a) for s in data.SPLITS}
    assert abs(counts["train"] - 0.9) < 0.03 and abs(counts["val"] - 0.05) < 0.02
    assert {split_of(p, (0.0, 1.0, 0.0)) for p in paths} == {"val"}
    with pytest.raises(ConfigError):
        split_of("x", (0.5, 0.5, 0.5))


def test_stdlib_splits_disjoint_by_file_and_cover_it():
    corpus = StdlibCorpus()
    names = {s: [n for n, _ in corpus.documents(s)] for s in data.SPLITS}
    files = {f.relative_to(corpus.root).as_posix() for f in corpus._files() if f.stat().st_size}
    assert all(not set(names[a]) & set(names[b]) for a in names for b in names if a < b)
    assert set().union(*map(set, names.values())) == files
    assert all(split_of(n) == s for s, ns in names.items() for n in ns)
    assert not any(p.startswith(("test/", "site-packages/")) or "/tests/" in p for p in files)
    assert names == {s: [n for n, _ in corpus.documents(s)] for s in data.SPLITS}


def test_max_bytes_caps_each_split():
    corpus = StdlibCorpus()
    for split, frac in zip(data.SPLITS, corpus.fractions):
        docs = list(corpus.documents(split, max_bytes=100_000))
        total = sum(len(d) for _, d in docs)
        assert 0 < total <= int(100_000 * frac)
        assert all(split_of(n) == split for n, _ in docs)
        docs[-1][1].decode("utf-8")  # cut at a character boundary


def test_folder_corpus_split_by_file_with_pattern(tmp_path):
    for i in range(40):
        sub = tmp_path / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.txt").write_text(f"file {i}\n" * 3)
        (sub / f"f{i}.md").write_text("markdown")
    corpus = TextCorpus(tmp_path, pattern="*.txt")
    got = {s: {n for n, _ in corpus.documents(s)} for s in data.SPLITS}
    assert sum(map(len, got.values())) == 40
    assert all(n.endswith(".txt") and split_of(n) == s for s, ns in got.items() for n in ns)


def test_single_file_split_by_contiguous_ranges(tmp_path):
    path = tmp_path / "one.txt"
    text = "".join(f"line {i} é\n" for i in range(2000))
    path.write_text(text)
    corpus = TextCorpus(path)
    parts = [b"".join(d for _, d in corpus.documents(s)) for s in data.SPLITS]
    assert b"".join(parts).decode("utf-8") == text
    n = len(text.encode())
    assert abs(len(parts[0]) - 0.9 * n) <= 4 and abs(len(parts[1]) - 0.05 * n) <= 8
    capped = [b"".join(d for _, d in corpus.documents(s, max_bytes=1000)) for s in data.SPLITS]
    assert (
        b"".join(capped) == text.encode()[: len(b"".join(capped))]
        and 996 <= len(b"".join(capped)) <= 1000
    )


def test_binary_files_are_skipped_with_warning(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n" * 100)
    (tmp_path / "b.bin").write_bytes(b"\x00\x01\x02" * 100)
    corpus = TextCorpus(tmp_path, fractions=(1.0, 0.0, 0.0))
    with pytest.warns(UserWarning, match="binary"):
        docs = list(corpus.documents("train"))
    assert [n for n, _ in docs] == ["a.txt"]


# ---------------------------------------------------------------- caching


def test_memmap_equals_direct_encoding_and_is_reused(tmp_path):
    corpus = StdlibCorpus()
    for tok in (
        ByteTokenizer(),
        CharTokenizer.from_texts(d for s in data.SPLITS for _, d in corpus.documents(s, 60_000)),
    ):
        path = prepare_tokens(corpus, tok, "val", tmp_path, max_bytes=60_000)
        arr, meta = open_tokens(path, tok)
        assert arr.dtype == np.uint16 and isinstance(arr, np.memmap)
        expected = []
        for _, d in corpus.documents("val", 60_000):
            expected += tok.encode(d.decode("utf-8")) + [tok.eos_id]
        assert arr.tolist() == expected
        assert meta["n_tokens"] == len(expected) and meta["n_documents"] == expected.count(
            tok.eos_id
        )
        mtime = path.stat().st_mtime_ns
        assert prepare_tokens(corpus, tok, "val", tmp_path, max_bytes=60_000) == path
        assert path.stat().st_mtime_ns == mtime


def test_atomic_write_never_leaves_a_partial_final_file(tmp_path):
    target = tmp_path / "x.bin"

    def chunks():
        yield b"a" * 1000
        assert not target.exists()  # mid-write: the final path does not exist yet
        raise KeyboardInterrupt  # the "crash"

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, chunks())
    assert not target.exists() and list(tmp_path.iterdir()) == []
    write_atomic(target, [b"old"])
    with pytest.raises(RuntimeError):
        write_atomic(target, _boom())
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def _boom():
    yield b"new-partial"
    raise RuntimeError("crash")


def test_interrupted_prepare_leaves_no_cache(tmp_path, monkeypatch):
    corpus = TextCorpus(_text_folder(tmp_path / "c"), fractions=(1.0, 0.0, 0.0))
    real = corpus.documents

    def crashing(split, max_bytes=None):
        it = real(split, max_bytes)
        yield next(it)
        raise RuntimeError("killed")

    monkeypatch.setattr(corpus, "documents", crashing)
    with pytest.raises(RuntimeError):
        prepare_tokens(corpus, ByteTokenizer(), "train", tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.bin")) and not list(
        (tmp_path / "cache").rglob("*.tmp")
    )
    monkeypatch.setattr(corpus, "documents", real)
    path = prepare_tokens(corpus, ByteTokenizer(), "train", tmp_path / "cache")
    assert open_tokens(path)[1]["n_documents"] == 5
    path.with_suffix(".json").unlink()  # a .bin without meta does not count
    with pytest.raises(DataError, match="prepare_data"):
        open_tokens(path)


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWTEXT_CACHE", str(tmp_path / "envcache"))
    assert data.default_cache_dir() == tmp_path / "envcache"
    dm = FlowTextDataModule(
        str(_text_folder(tmp_path / "c", n=30)), seq_len=8, splits=(0.6, 0.2, 0.2)
    )
    dm.prepare_data()
    assert list((tmp_path / "envcache" / "tokens").glob("*.bin"))


# ---------------------------------------------------------------- windows and sampler


def test_windows_shape_range_and_determinism(tmp_path):
    path = prepare_tokens(StdlibCorpus(), ByteTokenizer(), "train", tmp_path, max_bytes=50_000)
    arr, _ = open_tokens(path)
    train = TokenWindows(path, 32, train=True, num_samples=50, seed=3)
    items = [train[i]["tokens"] for i in range(50)]
    assert all(t.shape == (32,) and t.dtype == torch.long for t in items)
    assert all(0 <= int(t.min()) and int(t.max()) < 259 for t in items)
    s = train.start(7)
    assert items[7].tolist() == arr[s : s + 32].tolist()
    again = TokenWindows(path, 32, train=True, num_samples=50, seed=3)
    assert all(torch.equal(again[i]["tokens"], items[i]) for i in range(50))
    assert len({train.start(i) for i in range(50, 100)} - {train.start(i) for i in range(50)})
    evals = TokenWindows(path, 32, train=False)
    starts = [evals.start(i) for i in range(len(evals))]
    assert starts == list(range(0, len(arr) - 31, 32))[: len(evals)]
    assert len(evals) == len(arr) // 32
    thin = TokenWindows(path, 32, train=False, num_samples=10)
    assert len(thin) == 10 and len({thin.start(i) for i in range(10)}) == 10


def test_epoch_sampler_moves_on():
    s = EpochSampler(4)
    assert list(s) == [0, 1, 2, 3] and list(s) == [4, 5, 6, 7]
    s.set_epoch(5)
    assert list(s) == [20, 21, 22, 23] and len(s) == 4


# ---------------------------------------------------------------- tasks


def _parse_addition(prompt, answer, reverse):
    a, b = prompt.rstrip("=").split("+")
    return int(a), int(b), int(answer[::-1] if reverse else answer)


@pytest.mark.parametrize("reverse", [False, True])
def test_addition_examples_are_correct(reverse):
    task = AdditionTask(digits=4, reverse_answer=reverse)
    tok = ByteTokenizer()
    for i in range(200):
        ex = task.example("train", i, seed=1)
        a, b, c = _parse_addition(ex.prompt, ex.answer, reverse)
        assert a + b == c and a < 10**4 and b < 10**4
        enc = task.encode(ex, tok, task.min_seq_len())
        toks, mask = enc["tokens"], enc["answer_mask"]
        assert toks.shape == mask.shape == (task.min_seq_len(),)
        assert tok.decode(toks[mask]) == ex.answer and tok.decode(toks[~mask]) == ex.prompt
        assert int(toks[mask][-1]) == tok.eos_id
        assert task.exact_match(ex.text, ex) and task.exact_match(ex.answer, ex)
        assert task.exact_match_ids(toks, ex, tok)
        assert not task.exact_match(ex.prompt + str(c + 1), ex)


@pytest.mark.parametrize("name", ["reverse", "copy"])
def test_reversal_and_copy_examples_are_correct(name):
    task = data.get(name, min_len=3, max_len=9)
    for i in range(200):
        ex = task.example("val", i)
        src = ex.prompt[:-1]
        assert ex.prompt.endswith(">") and 3 <= len(src) <= 9 and src.isalpha()
        assert ex.answer == (
            src[::-1] if isinstance(task, ReversalTask) and not isinstance(task, CopyTask) else src
        )
        assert task.exact_match(ex.text, ex) and not task.exact_match(ex.prompt + "zz", ex)


@pytest.mark.parametrize("name", TASKS)
def test_task_splits_deterministic_and_disjoint(name):
    task = data.get(name)
    ex = {s: [task.example(s, i, seed=2) for i in range(150)] for s in data.SPLITS}
    assert ex["val"] == [task.example("val", i, seed=2) for i in range(150)]
    assert ex["val"] != [task.example("val", i, seed=3) for i in range(150)]
    prompts = {s: {e.prompt for e in v} for s, v in ex.items()}
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]


# ---------------------------------------------------------------- DataModule


def test_datamodule_stdlib(tmp_path):
    dm = FlowTextDataModule(
        seq_len=64,
        batch_size=8,
        max_bytes=SMALL,
        cache_dir=str(tmp_path),
        train_samples_per_epoch=32,
        eval_samples=12,
    )
    assert dm.vocab_size == 259 and dm.bytes_per_token == 1.0
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and all(b["tokens"].shape == (8, 64) for b in batches)
    assert all(0 <= int(b["tokens"].min()) and int(b["tokens"].max()) < 259 for b in batches)
    second = list(dm.train_dataloader())[0]["tokens"]
    assert not torch.equal(second, batches[0]["tokens"])  # new windows next epoch
    val = list(dm.val_dataloader())
    assert sum(len(b["tokens"]) for b in val) == 12
    assert torch.equal(val[0]["tokens"], next(iter(dm.val_dataloader()))["tokens"])
    dm.setup("test")
    assert next(iter(dm.test_dataloader()))["tokens"].shape[1] == 64
    state = dm.state_dict()
    FlowTextDataModule(seq_len=64, max_bytes=SMALL, cache_dir=str(tmp_path)).load_state_dict(state)
    char = FlowTextDataModule(
        seq_len=64, max_bytes=SMALL, cache_dir=str(tmp_path), tokenizer="char"
    )
    assert 60 < char.vocab_size < 259 and char.bytes_per_token >= 1.0
    with pytest.raises(DataError, match="mismatch"):
        char.load_state_dict(state)


@pytest.mark.parametrize("name", TASKS)
def test_datamodule_tasks(name, tmp_path):
    dm = FlowTextDataModule(
        name,
        seq_len=32,
        batch_size=4,
        train_samples_per_epoch=8,
        eval_samples=6,
        cache_dir=str(tmp_path),
    )
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape == batch["answer_mask"].shape == (4, 32)
    assert batch["answer_mask"].any(1).all()
    assert sum(len(b["tokens"]) for b in dm.val_dataloader()) == 6
    assert not list(tmp_path.iterdir())  # tasks need no cache


def test_datamodule_char_folder(tmp_path):
    folder = _text_folder(tmp_path / "c", n=30)
    dm = FlowTextDataModule(
        str(folder),
        tokenizer="char",
        seq_len=8,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
        splits=(0.5, 0.25, 0.25),
        train_samples_per_epoch=4,
    )
    dm.prepare_data()
    dm.setup()
    toks = next(iter(dm.train_dataloader()))["tokens"]
    assert toks.shape == (2, 8) and int(toks.max()) < dm.vocab_size
    assert set(dm.tokenizer.decode(toks.flatten())) <= set("line 0123456789é\n")


# ---------------------------------------------------------------- errors


def test_errors_name_the_fix(tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="no files"):
        FlowTextDataModule(str(empty_dir))
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("")
    with pytest.raises(DataError, match="empty"):
        FlowTextDataModule(str(empty_file))
    with pytest.raises(DataError, match="does not exist"):
        FlowTextDataModule(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="does not exist"):
        FlowTextDataModule("missing_corpus.txt")
    binary = tmp_path / "bin"
    binary.mkdir()
    for i in range(3):
        (binary / f"b{i}.dat").write_bytes(bytes(range(256)) * 4)
    dm = FlowTextDataModule(str(binary), cache_dir=str(tmp_path / "cache"))
    with warnings.catch_warnings(), pytest.raises(DataError, match="binary"):
        warnings.simplefilter("ignore")
        dm.prepare_data()
    with pytest.raises(ConfigError, match="stdlib") as err:
        FlowTextDataModule("wikipedia")
    assert all(n in str(err.value) for n in data.names())
    with pytest.raises(ConfigError, match="byte, char"):
        FlowTextDataModule(tokenizer="wordpiece")  # "bpe" is a tokenizer now (hf extra)
    with pytest.raises(ConfigError, match="bad arguments"):
        FlowTextDataModule("addition", corpus_options={"digitz": 3})
    for bad in (1, 0):
        with pytest.raises(DataError, match="seq_len"):
            FlowTextDataModule("addition", seq_len=bad)
    with pytest.raises(DataError, match="seq_len >= "):
        FlowTextDataModule("addition", seq_len=8)


def test_corpus_shorter_than_a_window(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny corpus " * 20)
    dm = FlowTextDataModule(str(path), seq_len=512, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    with pytest.raises(DataError, match="fewer than one window"):
        dm.setup("fit")


def _text_folder(path, n=5):
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (path / f"doc{i}.txt").write_text("".join(f"line {j} é\n" for j in range(i, i + 40)))
    return path


def test_public_api_is_exported():
    for name in data.__all__:
        assert getattr(data, name) is not None
    assert set(data.names()) >= {"stdlib", *TASKS}
    assert os.fspath(data.default_cache_dir())


def test_lightning_fit_stores_and_checks_tokenizer(tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self, vocab):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, 8)
            self.out = torch.nn.Linear(8, vocab)
            self.seen = []

        def _loss(self, batch):
            toks = batch["tokens"]
            return torch.nn.functional.cross_entropy(self.out(self.emb(toks)).transpose(1, 2), toks)

        def training_step(self, batch, _):
            self.seen.append(batch["tokens"].clone())
            return self._loss(batch)

        def validation_step(self, batch, _):
            self.log("val", self._loss(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    kw = dict(
        seq_len=16,
        batch_size=4,
        max_bytes=SMALL,
        cache_dir=str(tmp_path / "cache"),
        train_samples_per_epoch=8,
        eval_samples=4,
    )
    dm = FlowTextDataModule(**kw)
    model = Tiny(dm.vocab_size)
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    assert len(model.seen) == 4 and not torch.equal(model.seen[0], model.seen[2])
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    assert torch.load(ckpt, weights_only=False)["FlowTextDataModule"]["tokenizer"]["kind"] == "byte"
    char = FlowTextDataModule(**kw, tokenizer="char")
    trainer = L.Trainer(
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path / "again"),
    )
    with pytest.raises(DataError, match="mismatch"):
        trainer.fit(Tiny(dm.vocab_size), datamodule=char, ckpt_path=str(ckpt))


def test_docs_page_code_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "data.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)
    assert len(blocks) >= 2
    monkeypatch.setenv("FLOWTEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_data"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"data.md[block {i}]", "exec"), namespace)
    assert namespace["dm"].vocab_size == 259
    assert list((tmp_path / "cache" / "tokens").glob("*.bin"))


@pytest.mark.parametrize("module", ["_tokenizers", "_tasks", "__init__"])
def test_docstring_examples(module):
    import doctest
    import importlib

    mod = importlib.import_module("flowtext.data" + ("" if module == "__init__" else f".{module}"))
    result = doctest.testmod(mod)
    assert result.failed == 0 and result.attempted > 0


def test_encode_refuses_non_text_and_keeps_undecodable_argv_bytes():
    for tok in (ByteTokenizer(), CharTokenizer("ab")):
        with pytest.raises(DataError, match="encode takes text"):
            tok.encode(None)
    raw = b"caf\xe9"  # Latin-1 on a UTF-8 command line: Python keeps the byte as a surrogate
    text = raw.decode("utf-8", errors="surrogateescape")
    assert ByteTokenizer().encode(text) == list(raw)


def test_nan_split_fractions_are_refused():
    with pytest.raises(ConfigError, match="split fractions"):
        FlowTextDataModule("addition", seq_len=16, splits=(float("nan"), 0.5, 0.5))


def test_char_vocabulary_mismatch_says_how_they_differ():
    with pytest.raises(DataError) as info:
        CharTokenizer("abc").check_state(CharTokenizer("abd").state_dict())
    assert "only in the checkpoint/cache: ['d']" in str(info.value)
    assert "only in the data: ['c']" in str(info.value)


@pytest.mark.parametrize("name", ["addition", "text"])
def test_training_items_carry_their_global_sample_index(name, tmp_path):
    corpus = name
    if name == "text":
        (tmp_path / "t.txt").write_text("hello world, " * 400)
        corpus = str(tmp_path / "t.txt")
    dm = FlowTextDataModule(
        corpus, seq_len=16, batch_size=2, train_samples_per_epoch=8, cache_dir=str(tmp_path)
    )
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = [b["index"].tolist() for b in loader]
    second = [b["index"].tolist() for b in loader]
    assert first == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert second == [[8, 9], [10, 11], [12, 13], [14, 15]]  # the next epoch: new samples
    assert "index" not in next(iter(dm.val_dataloader()))
