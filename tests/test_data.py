"""Tests of the data layer: vocabulary, corpora (real files, checksums, download), synthetic.

Real corpora are read from ``$NLSTM_DATA_DIR`` (CI: ../shared/data), else from the sibling
``shared/data`` folder of this checkout if there is one; tests that need them skip otherwise.
No test reaches the network: ``urlopen`` is guarded to allow only 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import math
import os
import shutil
import threading
import time
import urllib.parse
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nlstm.data import (
    CORPUS_NAMES,
    ChecksumError,
    Corpus,
    CorpusError,
    CorpusNotFoundError,
    SyntheticConfig,
    Vocabulary,
    corpora,
    default_cache_dir,
    default_data_dir,
    load_corpus,
    synthetic_corpus,
    unigram_entropy_bits,
)
from nlstm.data.corpora import FILES, RemoteFile
from nlstm.data.synthetic import bracket_spans, synthetic_texts

# -- locating the real data --------------------------------------------------------------


def _real_data_dir() -> Path | None:
    env = os.environ.get("NLSTM_DATA_DIR")
    if env:
        return Path(env).resolve() if Path(env).is_dir() else None
    sibling = Path(__file__).resolve().parents[2] / "shared" / "data"
    return sibling if sibling.is_dir() else None


REAL_DATA = _real_data_dir()


def _need_real(*relpaths: str) -> Path:
    if REAL_DATA is None:
        pytest.skip("real corpora absent: set NLSTM_DATA_DIR to the shared/data folder")
    for rel in relpaths:
        if not (REAL_DATA / rel).is_file():
            pytest.skip(f"{rel} absent from {REAL_DATA}")
    return REAL_DATA


# -- isolation: no network, no real cache, no inherited data dir -------------------------


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NLSTM_DATA_DIR", raising=False)
    monkeypatch.setenv("NLSTM_CACHE_DIR", str(tmp_path / "cache"))
    real_urlopen = urllib.request.urlopen

    def guarded(url, *args, **kwargs):  # type: ignore[no-untyped-def]
        host = urllib.parse.urlsplit(url if isinstance(url, str) else url.full_url).hostname
        if host != "127.0.0.1":
            raise AssertionError(f"test tried to reach the network: {url}")
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", guarded)


def _fake_spec(monkeypatch: pytest.MonkeyPatch, url: str, sha256: str) -> RemoteFile:
    """Point the tinyshakespeare spec at one small file (keeps the real builder)."""
    rf = RemoteFile("tinyshakespeare/input.txt", url, sha256)
    spec = dataclasses.replace(corpora.CORPORA["tinyshakespeare"], files=(rf,))
    monkeypatch.setitem(corpora.CORPORA, "tinyshakespeare", spec)
    return rf


TEXT = "To be, or not to be: that is the question.\n" * 40


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- Vocabulary ---------------------------------------------------------------------------


def test_vocabulary_sorted_deterministic_and_roundtrip() -> None:
    a = Vocabulary.from_symbols("hello world", eos="<eos>")
    b = Vocabulary.from_symbols(reversed("dlrow olleh"), eos="<eos>")
    assert a == b and a.symbols == tuple(sorted(set("helo wrd") | {"<eos>"}))
    ids = a.encode(list("hello") + ["<eos>"])
    assert ids.dtype == torch.long and a.decode(ids) == [*"hello", "<eos>"]
    assert Vocabulary.from_json(a.to_json()) == a
    assert a.eos_id == a["<eos>"] and a.unk_id is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.unk = "x"  # type: ignore[misc]


def test_vocabulary_unknown_symbols() -> None:
    v = Vocabulary.from_symbols("abc")
    with pytest.raises(KeyError, match="'z'"):
        v.encode("abz")
    with pytest.raises(KeyError, match="'z'"):
        v.encode(["a", "z"])
    u = Vocabulary.from_symbols("abc", unk="?")
    assert u.decode(u.encode("azb")) == ["a", "?", "b"]
    assert u.decode(u.encode(["a", "zz", "b"])) == ["a", "?", "b"]
    with pytest.raises(ValueError):
        Vocabulary(("a", "b"), unk="c")


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_vocabulary_fast_char_path_equals_token_path(text: str) -> None:
    v = Vocabulary.from_symbols(text)
    fast = v.encode(text)
    assert torch.equal(fast, v.encode(list(text)))
    assert "".join(v.decode(fast)) == text


def test_vocabulary_bytes_are_latin1_symbols() -> None:
    data = bytes([0, 200, 255, 10, 200])
    v = Vocabulary.from_symbols(chr(b) for b in data)
    ids = v.encode(data)
    assert bytes(ord(s) for s in v.decode(ids)) == data


# -- Corpus -------------------------------------------------------------------------------


def _tiny_corpus(train: list[int]) -> Corpus:
    v = Vocabulary.from_symbols("abcd")
    t = torch.tensor(train, dtype=torch.long)
    return Corpus("tiny", v, t, torch.tensor([0, 1]), torch.tensor([2, 3]))


def test_corpus_fingerprint_entropy_truncation() -> None:
    c = _tiny_corpus([0, 1, 2, 3] * 5)
    assert c.fingerprint == _tiny_corpus([0, 1, 2, 3] * 5).fingerprint
    assert len(c.fingerprint) == 64
    assert c.fingerprint != _tiny_corpus([0, 1, 2, 3] * 4 + [0, 1, 2, 2]).fingerprint
    assert c.unigram_entropy_bits() == pytest.approx(2.0)
    assert _tiny_corpus([0, 0, 0, 1]).unigram_entropy_bits() == pytest.approx(
        -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    )
    t = c.truncated(7, 1)
    assert (t.train.numel(), t.valid.numel(), t.test.numel()) == (7, 1, 1)
    assert torch.equal(t.train, c.train[:7]) and t.fingerprint != c.fingerprint
    assert c.train.numel() == 20  # the original is untouched


def test_unigram_entropy_against_a_hand_count() -> None:
    text = "abracadabra"  # a:5 b:2 r:2 c:1 d:1 of 11
    by_hand = -sum(n / 11 * math.log2(n / 11) for n in (5, 2, 2, 1, 1))
    corpus = load_corpus_from_text(text)
    assert corpus.unigram_entropy_bits() == pytest.approx(by_hand, abs=1e-12)
    assert unigram_entropy_bits(torch.tensor([2, 2, 0, 1], dtype=torch.uint8), 5) == pytest.approx(1.5)
    assert unigram_entropy_bits(torch.zeros(0, dtype=torch.int16), 3) == 0.0


def load_corpus_from_text(train_text: str) -> Corpus:
    vocab = Vocabulary.from_symbols(train_text)
    return Corpus("hand", vocab, vocab.encode(train_text), vocab.encode("ab"), vocab.encode("ra"))


def test_corpus_rejects_bad_streams() -> None:
    v = Vocabulary.from_symbols("ab")
    with pytest.raises(ValueError):
        Corpus("x", v, torch.tensor([0, 2]), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(TypeError):
        Corpus("x", v, torch.tensor([0.0]), torch.tensor([0]), torch.tensor([0]))


# -- real corpora -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ptb(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = _need_real(*(rf.path for rf in FILES["ptb"]))
    cache = tmp_path_factory.mktemp("cache")
    return load_corpus("ptb-char", data_dir=root, cache_dir=cache, download=False)


def test_real_ptb_char(ptb: Corpus) -> None:
    assert ptb.name == "ptb" and len(ptb.vocab) == 50
    assert (ptb.train.numel(), ptb.valid.numel(), ptb.test.numel()) == (5_017_482, 393_042, 442_423)
    expected = set("abcdefghijklmnopqrstuvwxyz0123456789_N<>#$&'*-./\\") | {"<eos>"}
    assert set(ptb.vocab.symbols) == expected and ptb.vocab.eos == "<eos>"
    assert ptb.checksums == {rf.path: rf.sha256 for rf in FILES["ptb"]}
    assert int((ptb.train == ptb.vocab.eos_id).sum()) == 42_068  # one <eos> per line
    assert ptb.vocab.decode(ptb.train[:5]) == list("aer_b")
    assert 3.0 < ptb.unigram_entropy_bits() < math.log2(50)


def test_real_tinyshakespeare_via_env(monkeypatch: pytest.MonkeyPatch) -> None:
    root = _need_real("tinyshakespeare/input.txt")
    monkeypatch.setenv("NLSTM_DATA_DIR", str(root))
    c = load_corpus("tinyshakespeare", download=False)
    assert len(c.vocab) == 65 and c.source == str(root)
    n = c.train.numel() + c.valid.numel() + c.test.numel()
    assert n == 1_115_394 and c.train.numel() == int(n * 0.9) and c.valid.numel() == int(n * 0.05)


def test_real_chinese_poetry() -> None:
    root = _need_real(*(rf.path for rf in FILES["chinese-poetry"]))
    c = load_corpus("chinese-poetry", data_dir=root, download=False)
    # 20 characters + 3 line separators + <eos> per 5-character quatrain
    assert (c.train.numel(), c.valid.numel(), c.test.numel()) == (11_274 * 24, 1_000 * 24, 1_025 * 24)
    assert {"<R>", "<sep>", "<eos>"} <= set(c.vocab.symbols) and c.vocab.unk == "<R>"
    first = c.vocab.decode(c.train[:24])
    assert first[:5] == list("偶寻半开梅") and first[5::6] == ["<sep>"] * 3 + ["<eos>"]
    full = load_corpus("chinese-poetry", data_dir=root, download=False, eval_set="all")
    assert full.valid.numel() == 1_000 * 24 + 1_000 * 32 and full.vocab == c.vocab
    assert torch.equal(full.valid[: c.valid.numel()], c.valid)


def test_real_file_with_one_changed_byte_is_rejected(tmp_path: Path) -> None:
    root = _need_real("tinyshakespeare/input.txt")
    (tmp_path / "tinyshakespeare").mkdir()
    copy = tmp_path / "tinyshakespeare" / "input.txt"
    shutil.copyfile(root / "tinyshakespeare/input.txt", copy)
    data = bytearray(copy.read_bytes())
    data[1000] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as e:
        load_corpus("tinyshakespeare", data_dir=tmp_path, download=True)
    msg = str(e.value)
    assert str(copy) in msg and FILES["tinyshakespeare"][0].sha256 in msg and _sha(bytes(data)) in msg
    assert "\n" not in msg
    assert copy.read_bytes() == bytes(data)  # left untouched


# -- lookup, checksums and errors (no real data needed) -----------------------------------


def test_missing_corpus_without_download(tmp_path: Path) -> None:
    with pytest.raises(CorpusNotFoundError) as e:
        load_corpus("ptb", data_dir=tmp_path / "empty", cache_dir=tmp_path / "c", download=False)
    msg = str(e.value)
    for rf in FILES["ptb"]:
        assert rf.url in msg and rf.path in msg
    assert "--data-dir" in msg and "NLSTM_DATA_DIR" in msg and "\n" not in msg
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, CorpusError)
    assert not (tmp_path / "c").exists()


def test_checksum_mismatch_in_data_dir_and_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_spec(monkeypatch, "http://127.0.0.1:9/input.txt", _sha(TEXT.encode()))
    good = tmp_path / "data" / "tinyshakespeare" / "input.txt"
    good.parent.mkdir(parents=True)
    good.write_text(TEXT)
    assert load_corpus("tinyshakespeare", data_dir=tmp_path / "data").vocab.decode([0]) == ["\n"]
    bad = tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    bad.parent.mkdir(parents=True)
    bad.write_text(TEXT.replace("question", "questiom"))
    for kwargs in ({"data_dir": tmp_path / "cache"}, {}):  # as a data dir, then as the cache
        with pytest.raises(ChecksumError, match="input.txt: expected sha256"):
            load_corpus("tinyshakespeare", download=True, **kwargs)
    assert bad.read_text() == TEXT.replace("question", "questiom")  # never overwritten


def test_lookup_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_spec(monkeypatch, "http://127.0.0.1:9/input.txt", _sha(TEXT.encode()))
    for d in ("arg", "env", "cache"):
        p = tmp_path / d / "tinyshakespeare" / "input.txt"
        p.parent.mkdir(parents=True)
        p.write_text(TEXT)
    monkeypatch.setenv("NLSTM_DATA_DIR", str(tmp_path / "env"))
    assert default_data_dir() == tmp_path / "env" and default_cache_dir() == tmp_path / "cache"
    assert load_corpus("tinyshakespeare", data_dir=tmp_path / "arg").source == str(tmp_path / "arg")
    assert load_corpus("tinyshakespeare").source == str(tmp_path / "env")
    monkeypatch.delenv("NLSTM_DATA_DIR")
    assert default_data_dir() is None
    assert load_corpus("tinyshakespeare").source == str(tmp_path / "cache")


def test_unknown_corpus_and_names() -> None:
    assert {"ptb", "ptb-char", "text8", "enwik8", "chinese-poetry", "tinyshakespeare", "synthetic"} == set(CORPUS_NAMES)
    with pytest.raises(CorpusError, match="unknown corpus"):
        load_corpus("wikitext-103")


def test_text_file_corpus(tmp_path: Path) -> None:
    text = "Ünïcödé text, 漢字 too.\n" * 50
    p = tmp_path / "t.txt"
    p.write_text(text, encoding="utf-8")
    c = load_corpus(f"text:{p}")
    assert len(c.vocab) == len(set(text))
    assert "".join(c.vocab.decode(torch.cat([c.train, c.valid, c.test]))) == text
    assert c.train.numel() == int(len(text) * 0.9) and c.checksums == {"t.txt": _sha(p.read_bytes())}
    c2 = load_corpus(f"text:{p}", split=(0.5, 0.25, 0.25))
    assert c2.train.numel() == len(text) // 2 and c2.fingerprint != c.fingerprint
    with pytest.raises(ValueError):
        load_corpus(f"text:{p}", split=(0.5, 0.5, 0.5))
    p.write_bytes(b"\xff\xfe abc")
    with pytest.raises(CorpusError, match="not valid UTF-8"):
        load_corpus(f"text:{p}")
    with pytest.raises(CorpusNotFoundError):
        load_corpus(f"text:{tmp_path / 'nope.txt'}")


@pytest.mark.parametrize("name", ["text8", "enwik8"])
def test_zip_corpora_split_and_vocab(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    """The text8/enwik8 path on a 100-symbol stand-in (the real zips are 31-36 MB downloads)."""
    payload = bytes((i * 37) % 251 for i in range(100)) if name == "enwik8" else (b"anarchism originated " * 5)[:100]
    zpath = tmp_path / name / f"{name}.zip"
    zpath.parent.mkdir()
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr(name, payload)
    spec = corpora.CORPORA[name]
    rf = dataclasses.replace(spec.files[0], sha256=_sha(zpath.read_bytes()))
    monkeypatch.setitem(corpora.CORPORA, name, dataclasses.replace(spec, files=(rf,)))
    monkeypatch.setattr(corpora, "MAHONEY_SPLIT", (90, 95))
    c = load_corpus(name, data_dir=tmp_path, download=False)
    assert (c.train.numel(), c.valid.numel(), c.test.numel()) == (90, 5, 5)
    assert len(c.vocab) == len(set(payload))
    decoded = "".join(c.vocab.decode(torch.cat([c.train, c.valid, c.test])))
    assert decoded.encode("latin-1") == payload  # byte-exact


def test_poetry_option_is_checked_before_any_lookup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="eval_set"):
        load_corpus("chinese-poetry", data_dir=tmp_path, download=False, eval_set="7")


# -- download through a local HTTP server -------------------------------------------------


class _Server:
    def __init__(self, root: Path) -> None:
        self.requests = 0
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.requests += 1
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    root = tmp_path / "srv"
    root.mkdir()
    s = _Server(root)
    yield s
    if s.thread.is_alive():
        s.close()


def test_download_verify_cache_then_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: _Server) -> None:
    (tmp_path / "srv" / "input.txt").write_text(TEXT)
    rf = _fake_spec(monkeypatch, f"{server.url}/input.txt", _sha(TEXT.encode()))
    cache = tmp_path / "cache"
    c = load_corpus("tinyshakespeare")
    assert server.requests == 1 and c.source == str(cache)
    assert (cache / rf.path).read_text() == TEXT and c.checksums == {rf.path: rf.sha256}
    assert sorted(p.name for p in (cache / "tinyshakespeare").iterdir()) == ["input.txt"]  # no .part
    server.close()  # second load must not need the network
    c2 = load_corpus("tinyshakespeare", download=True)
    assert c2.fingerprint == c.fingerprint and server.requests == 1


def test_download_with_wrong_content_leaves_no_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: _Server
) -> None:
    served = TEXT.replace("be", "bee").encode()
    (tmp_path / "srv" / "input.txt").write_bytes(served)
    rf = _fake_spec(monkeypatch, f"{server.url}/input.txt", _sha(TEXT.encode()))
    with pytest.raises(ChecksumError) as e:
        load_corpus("tinyshakespeare")
    msg = str(e.value)
    assert rf.url in msg and rf.sha256 in msg and _sha(served) in msg and "\n" not in msg
    cache = tmp_path / "cache"
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_download_failure_is_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: _Server) -> None:
    rf = _fake_spec(monkeypatch, f"{server.url}/missing.txt", _sha(TEXT.encode()))  # 404
    with pytest.raises(CorpusNotFoundError) as e:
        load_corpus("tinyshakespeare")
    assert rf.url in str(e.value) and "NLSTM_DATA_DIR" in str(e.value)
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


# -- synthetic ----------------------------------------------------------------------------

SMALL = SyntheticConfig(train_chars=30_000, valid_chars=3_000, test_chars=3_000)


def _text(c: Corpus, split: str) -> str:
    return "".join(c.vocab.decode(getattr(c, split)))


def test_synthetic_deterministic_and_seed_dependent() -> None:
    a, b = synthetic_corpus(SMALL), synthetic_corpus(SMALL)
    for split in ("train", "valid", "test"):
        assert torch.equal(getattr(a, split), getattr(b, split))
    assert a.fingerprint == b.fingerprint
    other = synthetic_corpus(dataclasses.replace(SMALL, seed=1))
    assert other.fingerprint != a.fingerprint and _text(other, "train") != _text(a, "train")
    assert (a.train.numel(), a.valid.numel(), a.test.numel()) == (30_000, 3_000, 3_000)
    longer = synthetic_corpus(dataclasses.replace(SMALL, train_chars=40_000))
    assert torch.equal(longer.valid, a.valid)  # valid text independent of train_chars
    via_loader = load_corpus("synthetic", train_chars=30_000, valid_chars=3_000, test_chars=3_000)
    assert via_loader.fingerprint == a.fingerprint


def test_synthetic_brackets_parse_and_have_long_range() -> None:
    cfg = dataclasses.replace(SMALL, dependency_length=40, max_nesting=3)
    c = synthetic_corpus(cfg)
    for split in ("train", "valid", "test"):
        spans = bracket_spans(_text(c, split))  # raises on any mismatched or open span
        assert len(spans) > 20
    spans = bracket_spans(_text(c, "train"))
    outer = [close - open_ for open_, close, depth in spans if depth == 0]
    assert 0.85 * 40 < sum(outer) / len(outer) < 1.15 * 40
    assert max(depth for *_, depth in spans) == 2  # max_nesting=3 -> depths 0, 1, 2
    assert {_text(c, "train")[o] for o, _, _ in spans} == set("([{<")
    flat = synthetic_corpus(dataclasses.replace(SMALL, max_nesting=1))
    assert {d for *_, d in bracket_spans(_text(flat, "train"))} == {0}
    none = synthetic_corpus(dataclasses.replace(SMALL, max_nesting=0))
    assert not set(_text(none, "train")) & set("()[]{}<>")


def test_bracket_parser_rejects_mismatches() -> None:
    assert bracket_spans("a ( b [ c ] d ) e") == [(6, 10, 1), (2, 14, 0)]
    for bad in ("( ]", "( [ ) ]", "( (", ")"):
        with pytest.raises(ValueError):
            bracket_spans(bad)


def test_synthetic_entropy_and_predictability() -> None:
    c = synthetic_corpus(SMALL)
    text = _text(c, "train")
    counts = Counter(text)
    h1 = -sum(k / len(text) * math.log2(k / len(text)) for k in counts.values())
    assert c.unigram_entropy_bits() == pytest.approx(h1, rel=1e-9)
    assert 3.0 < h1 < math.log2(len(c.vocab))
    # Words from a fixed lexicon: even a bigram model is far below the unigram entropy.
    pairs = Counter(zip(text, text[1:], strict=False))
    n = len(text) - 1
    h2 = -sum(k / n * math.log2(k / counts[a]) for (a, _), k in pairs.items())
    assert h2 < h1 - 1.5


def test_synthetic_generation_is_fast() -> None:
    t = time.perf_counter()
    synthetic_texts(SyntheticConfig())  # 240k characters
    assert time.perf_counter() - t < 1.0


def test_synthetic_config_validation() -> None:
    with pytest.raises(ValueError):
        SyntheticConfig(brackets="(a")
    with pytest.raises(ValueError):
        SyntheticConfig(dependency_length=1)
    with pytest.raises(TypeError):
        load_corpus("synthetic", no_such_option=1)
