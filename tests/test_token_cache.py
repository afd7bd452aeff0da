"""The token cache: streams in the smallest dtype, encoded once, memory-mapped, keyed by the
source bytes and the options, verified on every load, rebuilt when stale or damaged."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from nlstm.data import Corpus, Vocabulary, corpora, load_corpus, synthetic_corpus
from nlstm.data.token_cache import smallest_dtype

SPLIT = (0.9, 0.05, 0.05)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """~300 KB of words with a few non-ASCII characters (the UTF-32 encoding path)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyzé") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    path = tmp_path_factory.mktemp("text") / "big.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(60_000)), encoding="utf-8")
    return path


def reference_streams(path: Path) -> tuple[list[str], list[np.ndarray]]:
    """The ids by an independent route: sorted distinct characters, ids by binary search, 90/5/5 cut."""
    codes = np.frombuffer(path.read_text(encoding="utf-8").encode("utf-32-le"), dtype=np.uint32)
    symbols = np.unique(codes)
    ids = np.searchsorted(symbols, codes)
    a, b = int(len(ids) * SPLIT[0]), int(len(ids) * SPLIT[0]) + int(len(ids) * SPLIT[1])
    return [chr(c) for c in symbols], [ids[:a], ids[a:b], ids[b:]]


def int64_fingerprint(corpus: Corpus) -> str:
    """The fingerprint as it was defined when streams were int64 (the recorded values must not change)."""
    h = hashlib.sha256(b"nlstm-corpus-v1\n")
    h.update(corpus.vocab.to_json().encode("utf-8"))
    for split in ("train", "valid", "test"):
        t = getattr(corpus, split).long().contiguous()
        h.update(f"\n{split}:{t.numel()}\n".encode())
        h.update(np.ascontiguousarray(t.numpy().astype("<i8")).data)
    return h.hexdigest()


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "tokens").iterdir() if not p.name.startswith("."))


def load(path: Path, cache: Path, **options) -> Corpus:
    return load_corpus(f"text:{path}", cache_dir=cache, **options)


def forbid_building(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the corpus was encoded again instead of read from the cache")

    monkeypatch.setattr(corpora, "_build_text_file", fail)


def test_cached_streams_are_small_identical_and_reused(text_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load(text_file, cache)
    symbols, expected = reference_streams(text_file)
    assert list(first.vocab.symbols) == symbols
    for split, ids in zip(("train", "valid", "test"), expected, strict=True):
        t = getattr(first, split)
        assert t.dtype == torch.uint8 and torch.equal(t.long(), torch.from_numpy(ids).long()), split
    assert first.fingerprint == int64_fingerprint(first)
    (entry,) = entries(cache)
    assert {p.name for p in entry.iterdir()} == {"meta.json", "train.npy", "valid.npy", "test.npy"}

    forbid_building(monkeypatch)
    again = load(text_file, cache)
    assert all(torch.equal(getattr(again, s), getattr(first, s)) for s in ("train", "valid", "test"))
    assert again.fingerprint == first.fingerprint and again.vocab == first.vocab
    assert not again.train.numpy().flags.owndata  # a view of the mapped file, not a copy
    assert entries(cache) == [entry]


def test_a_changed_source_or_option_gets_its_own_entry(text_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    original = load(text_file, cache)
    other_split = load(text_file, cache, split=(0.8, 0.1, 0.1))
    assert len(other_split.train) < len(original.train) and len(entries(cache)) == 2

    changed = tmp_path / "big.txt"
    text = text_file.read_text(encoding="utf-8")
    changed.write_text("z" + text[1:], encoding="utf-8")  # same name, same size, one character differs
    edited = load(changed, cache)
    assert len(entries(cache)) == 3 and edited.fingerprint != original.fingerprint
    assert int(edited.train[0]) == edited.vocab["z"]


@pytest.mark.parametrize("damage", ["flip a token", "truncate a stream", "edit meta", "stale key", "drop a stream"])
def test_a_damaged_or_stale_entry_is_rebuilt(text_file, tmp_path, damage):
    cache = tmp_path / "cache"
    good = load(text_file, cache)
    expected = [getattr(good, s).clone() for s in ("train", "valid", "test")]  # good maps the files damaged below
    (entry,) = entries(cache)
    meta_path = entry / "meta.json"
    if damage == "flip a token":
        raw = bytearray((entry / "train.npy").read_bytes())
        raw[-1] ^= 1
        (entry / "train.npy").write_bytes(bytes(raw))
    elif damage == "truncate a stream":
        (entry / "valid.npy").write_bytes((entry / "valid.npy").read_bytes()[:200])
    elif damage == "edit meta":
        meta_path.write_text(meta_path.read_text().replace(good.fingerprint, "0" * 64))
    elif damage == "stale key":  # a well-formed entry, written for other data, under this entry's name
        meta = json.loads(meta_path.read_text())
        meta["key"] = "f" * 64
        meta["meta_sha256"] = corpora_meta_checksum(meta)
        meta_path.write_text(json.dumps(meta))
    else:
        (entry / "test.npy").unlink()
    with pytest.warns(UserWarning, match="is damaged"):
        rebuilt = load(text_file, cache)
    assert rebuilt.fingerprint == good.fingerprint == int64_fingerprint(rebuilt)
    assert all(torch.equal(getattr(rebuilt, s), e) for s, e in zip(("train", "valid", "test"), expected, strict=True))
    assert entries(cache) == [entry]
    load(text_file, cache)  # healthy again: no warning (pytest's filterwarnings=error would fail otherwise)


def corpora_meta_checksum(meta: dict) -> str:
    from nlstm.data.token_cache import _meta_checksum

    return _meta_checksum(meta)


def test_an_unwritable_cache_falls_back_to_memory(text_file, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="cannot write the token cache"):
        corpus = load(text_file, blocker)
    assert corpus.fingerprint == int64_fingerprint(corpus) and corpus.train.dtype == torch.uint8


def test_smallest_dtype_and_corpus_conversion():
    assert [smallest_dtype(n) for n in (2, 256, 257, 32768, 32769)] == [
        torch.uint8, torch.uint8, torch.int16, torch.int16, torch.int32]
    vocab = Vocabulary.from_symbols(chr(0x4E00 + i) for i in range(300))
    c = Corpus("wide", vocab, torch.tensor([0, 299, 5]), torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert c.train.dtype == torch.int16 and c.train.tolist() == [0, 299, 5]
    assert vocab.encode("".join(vocab.symbols[:3]), dtype=torch.int16).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot hold"):
        vocab.encode("x", dtype=torch.uint8)
    assert synthetic_corpus().train.dtype == torch.uint8


def test_a_real_corpus_is_cached_outside_its_read_only_data_dir(tmp_path, monkeypatch):
    data_dir = Path(os.environ.get("NLSTM_DATA_DIR", "/nonexistent"))
    if not (data_dir / "ptb" / "ptb.char.train.txt").is_file():
        pytest.skip("PTB not available (set NLSTM_DATA_DIR)")
    before = sorted(p.name for p in data_dir.rglob("*"))
    cache = tmp_path / "cache"
    fresh = load_corpus("ptb", data_dir=data_dir, cache_dir=cache, cache_tokens=False)
    built = load_corpus("ptb", data_dir=data_dir, cache_dir=cache)
    monkeypatch.setitem(corpora.CORPORA, "ptb", dataclasses.replace(corpora.CORPORA["ptb"], build=None))
    cached = load_corpus("ptb", data_dir=data_dir, cache_dir=cache)  # build=None: must come from the cache
    for split in ("train", "valid", "test"):
        got = getattr(cached, split)
        assert torch.equal(got, getattr(fresh, split)) and got.dtype == torch.uint8
    assert cached.fingerprint == built.fingerprint == fresh.fingerprint == int64_fingerprint(fresh)
    assert len(entries(cache)) == 1 and sorted(p.name for p in data_dir.rglob("*")) == before


def test_the_model_reads_small_dtype_tokens_as_it_reads_int64():
    """Corpora hand out uint8 streams: the model (forward, generate) must take them as they are."""
    from nlstm import CharLM, ModelConfig

    for embedding_dim in (None, 4):
        torch.manual_seed(0)
        model = CharLM(ModelConfig(vocab_size=10, width=8, embedding_dim=embedding_dim))
        tokens = torch.tensor([[1, 2, 3, 9]])
        assert torch.equal(model(tokens.to(torch.uint8))[0], model(tokens)[0])
        g = torch.Generator().manual_seed(1)
        sample = model.generate(tokens[0].to(torch.uint8), 5, generator=g)
        assert torch.equal(sample, model.generate(tokens[0], 5, generator=torch.Generator().manual_seed(1)))
