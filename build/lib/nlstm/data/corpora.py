"""The corpora this project trains on: where their files come from, and how they become tensors.

``FILES`` below is the one table of every downloadable file (relative path in a data dir or
cache, URL, sha256), copied from shared/data/README.md. ``load_corpus`` finds each file in
this order: the explicit ``data_dir`` argument, else ``$NLSTM_DATA_DIR``; else the cache
(``cache_dir``, else ``$NLSTM_CACHE_DIR``, else ``~/.cache/nlstm``); else it downloads into
the cache. Every file's sha256 is checked wherever it was found (see download.py for why).

Tokenisation conventions (they decide the BPC denominator, so they are fixed here):
- PTB char: a line's symbols are its whitespace-separated fields, plus one ``<eos>`` per line:
  50 symbols (49 characters + ``<eos>``), as in Mikolov's files and the Nested LSTM paper.
- text8 / enwik8: the standard 90M / 5M / 5M split of the 100M-symbol file; the vocabulary is
  every distinct character (text8: 27) or byte (enwik8) of the whole file. enwik8 bytes are
  symbols ``chr(b)`` (Latin-1), so ids and decoding stay byte-exact.
- Chinese quatrains: the space-separated characters (``<R>`` is one token), ``<sep>`` for the
  TAB between the four lines of a poem, ``<eos>`` after each poem. The vocabulary is the
  training set's; valid/test characters unseen in training map to ``<R>`` (the data's own
  rare-character token), so every evaluation symbol has an id.
- tinyshakespeare and ``text:<path>``: characters of the UTF-8 text, split 90/5/5 by position
  (contiguous, no shuffling: a language model must not see future text), vocabulary over the
  whole file (a valid/test-only character would otherwise have no id).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import urllib.error
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from nlstm.data.download import (
    DATA_DIR_ENV,
    ChecksumError,
    CorpusError,
    CorpusNotFoundError,
    default_cache_dir,
    default_data_dir,
    download_file,
    sha256_file,
    verify_file,
)
from nlstm.data.token_cache import cache_key, cached_streams, smallest_dtype
from nlstm.data.vocab import Vocabulary

__all__ = [
    "CORPORA",
    "ChecksumError",
    "CorpusError",
    "CorpusNotFoundError",
    "CORPUS_ALIASES",
    "CORPUS_NAMES",
    "FILES",
    "Corpus",
    "CorpusSpec",
    "RemoteFile",
    "load_corpus",
    "unigram_entropy_bits",
]

EOS = "<eos>"
POETRY_LINE_SEP = "<sep>"
POETRY_RARE = "<R>"
SPLIT_NAMES = ("train", "valid", "test")
#: End of train and of valid in text8 / enwik8 (the standard 90M / 5M / 5M split).
MAHONEY_SPLIT = (90_000_000, 95_000_000)


# ------------------------------------------------------------------------------------------
# Corpus
# ------------------------------------------------------------------------------------------


_CHUNK = 1 << 22  # symbols converted to int64 at a time (fingerprint, counts): bounds the copy to 32 MB


def _counts(ids: np.ndarray, minlength: int) -> np.ndarray:
    """``np.bincount`` of ids in [0, minlength), in chunks: it copies its input to int64, which
    would be 800 MB for 100M uint8 symbols."""
    counts = np.zeros(minlength, dtype=np.int64)
    for start in range(0, ids.size, _CHUNK):
        counts += np.bincount(ids[start : start + _CHUNK], minlength=minlength)
    return counts


def unigram_entropy_bits(tokens: torch.Tensor, vocab_size: int) -> float:
    """Entropy in bits of the symbol frequencies of ``tokens`` (ids in [0, vocab_size)); 0 if empty."""
    counts = _counts(tokens.contiguous().numpy(), vocab_size)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


_ID_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def streams_fingerprint(vocab: Vocabulary, train: torch.Tensor, valid: torch.Tensor, test: torch.Tensor) -> str:
    """sha256 hex over the vocabulary and the three streams as little-endian int64, whatever
    their storage dtype (so the value is the same as when streams were held as int64)."""
    h = hashlib.sha256(b"nlstm-corpus-v1\n")
    h.update(vocab.to_json().encode("utf-8"))
    for split, t in zip(SPLIT_NAMES, (train, valid, test), strict=True):
        flat = t.contiguous().numpy()
        h.update(f"\n{split}:{flat.size}\n".encode())
        for start in range(0, flat.size, _CHUNK):
            h.update(np.ascontiguousarray(flat[start : start + _CHUNK].astype("<i8")).data)
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenised corpus: one vocabulary and three 1-D token streams.

    The streams are stored in the smallest integer dtype that holds the vocabulary
    (``token_cache.smallest_dtype``: uint8 for every character corpus here; tensors given in
    another integer dtype are converted once). text8 as int64 would be 800 MB per process;
    consumers convert to int64 per batch (``StreamBatches``) or call ``.long()`` on a slice.
    The streams are treated as immutable (``fingerprint`` is computed once and cached).
    ``source``: the folder (or generator description) the data came from; ``checksums``: the
    sha256 of each source file used, keyed by its relative path.
    """

    name: str
    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    source: str = ""
    checksums: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dtype = smallest_dtype(len(self.vocab))
        for split in SPLIT_NAMES:
            t = getattr(self, split)
            if not isinstance(t, torch.Tensor) or t.dtype not in _ID_DTYPES or t.dim() != 1:
                raise TypeError(f"Corpus.{split} must be a 1-D integer tensor ({', '.join(map(str, _ID_DTYPES))})")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= len(self.vocab)):
                raise ValueError(f"Corpus.{split} has ids outside [0, {len(self.vocab)})")
            if t.dtype != dtype:
                object.__setattr__(self, split, t.to(dtype))

    @cached_property
    def fingerprint(self) -> str:
        """sha256 hex over the vocabulary and the three streams: the "data checksum".

        Independent of ``name``/``source`` and of the storage dtype, so the same data found in
        another folder (or regenerated from the same seed) has the same fingerprint; any change
        of a token, of the split points or of the vocabulary changes it.
        """
        return streams_fingerprint(self.vocab, self.train, self.valid, self.test)

    def truncated(self, max_train: int, max_eval: int) -> Corpus:
        """Prefixes of the streams (for smoke runs); the fingerprint changes accordingly."""
        if max_train < 0 or max_eval < 0:
            raise ValueError("truncation lengths must be >= 0")
        return dataclasses.replace(
            self,
            train=self.train[:max_train].clone(),
            valid=self.valid[:max_eval].clone(),
            test=self.test[:max_eval].clone(),
            checksums=dict(self.checksums),
        )

    def unigram_entropy_bits(self) -> float:
        """Entropy (bits/symbol) of the train unigram distribution: the BPC of a model that
        ignores context, i.e. the bar any sequence model must clear."""
        return unigram_entropy_bits(self.train, len(self.vocab))

    def __repr__(self) -> str:
        return (
            f"Corpus(name={self.name!r}, vocab={len(self.vocab)}, train={self.train.numel()}, "
            f"valid={self.valid.numel()}, test={self.test.numel()}, source={self.source!r})"
        )


# ------------------------------------------------------------------------------------------
# The file table
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One source file: where it lives under a data dir / the cache, its URL, its sha256."""

    path: str
    url: str
    sha256: str


_PTB = "https://raw.githubusercontent.com/townie/PTB-dataset-from-Tomas-Mikolov-s-webpage/master/data"
_POEMS = (
    "https://raw.githubusercontent.com/iamkissg/nevermore/83007f05eea0cf64ba2bbbbf0f98cc7c27a21472"
    "/data/rnnpg_data_emnlp-2014/partitions_in_Table_2/rnnpg"
)
_POEMS_DIR = "chinese_poetry_zhang_lapata_2014"
_CHARRNN = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare"

# fmt: off
FILES: dict[str, tuple[RemoteFile, ...]] = {
    "ptb": (
        RemoteFile("ptb/ptb.char.train.txt", f"{_PTB}/ptb.char.train.txt",
                   "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9"),
        RemoteFile("ptb/ptb.char.valid.txt", f"{_PTB}/ptb.char.valid.txt",
                   "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8"),
        RemoteFile("ptb/ptb.char.test.txt", f"{_PTB}/ptb.char.test.txt",
                   "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe"),
    ),
    "text8": (
        RemoteFile("text8/text8.zip", "http://mattmahoney.net/dc/text8.zip",
                   "a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232"),
    ),
    "enwik8": (
        RemoteFile("enwik8/enwik8.zip", "http://mattmahoney.net/dc/enwik8.zip",
                   "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"),
    ),
    # No published checksum: these are the sha256 of the shipped files (shared/data/README.md).
    "chinese-poetry": (
        RemoteFile(f"{_POEMS_DIR}/qtrain_5", f"{_POEMS}/qtrain_5",
                   "ee8fe03e3ae920b037e12c18c4b2b4aa516fc61002cfabe945a1d3cf8c0a1bc7"),
        RemoteFile(f"{_POEMS_DIR}/qvalid_5", f"{_POEMS}/qvalid_5",
                   "41457840728ae5fdbe765e5b96695b00815cf7b014372eb23c6a0d97ecc88d5e"),
        RemoteFile(f"{_POEMS_DIR}/qtest_5", f"{_POEMS}/qtest_5",
                   "22806e2e53f9bd3cba24ce075da2ae585ed6a53289eef8682c55a64fb573a47b"),
        RemoteFile(f"{_POEMS_DIR}/qvalid_7", f"{_POEMS}/qvalid_7",
                   "0aca06351cd613038e8b9b7140871d080706e20781a3b69624d8f94a8b49d05d"),
        RemoteFile(f"{_POEMS_DIR}/qtest_7", f"{_POEMS}/qtest_7",
                   "011503512dfcf420464626ce2f717b5a52f4c67e3c344bd816741b194a297748"),
    ),
    "tinyshakespeare": (
        RemoteFile("tinyshakespeare/input.txt", f"{_CHARRNN}/input.txt",
                   "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    ),
}
# fmt: on


# ------------------------------------------------------------------------------------------
# Builders: local files -> (vocab, train, valid, test)
# ------------------------------------------------------------------------------------------

Streams = tuple[Vocabulary, torch.Tensor, torch.Tensor, torch.Tensor]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _line_tokens(text: str) -> list[str]:
    """Whitespace-separated fields of each line, plus one ``<eos>`` per line.

    A line is text ending in ``\\n``; what follows the last ``\\n`` counts only if it has
    symbols (Mikolov's char files end in ``"\\n "``, which is not an extra line).
    """
    lines = text.split("\n")
    if not lines[-1].strip():
        lines.pop()
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


def _build_ptb(paths: Mapping[str, Path]) -> Streams:
    splits = [_line_tokens(_read_text(p)) for p in paths.values()]  # train, valid, test
    if len(splits) != 3:
        raise CorpusError(f"PTB needs 3 files (train, valid, test), got {list(paths)}")
    vocab = Vocabulary.from_symbols((s for split in splits for s in split), eos=EOS)
    train, valid, test = (vocab.encode(s) for s in splits)
    return vocab, train, valid, test


def _split_by_fraction(n: int, split: Sequence[float]) -> tuple[int, int]:
    if len(split) != 3 or any(x <= 0 for x in split) or not math.isclose(sum(split), 1.0):
        raise ValueError(f"split must be three positive fractions summing to 1, got {split}")
    n_train = int(n * split[0])
    n_valid = int(n * split[1])
    return n_train, n_train + n_valid


def _chars_corpus(text: str | bytes, cut: tuple[int, int]) -> Streams:
    """Character (or byte) streams cut at ``cut``; vocabulary = every distinct symbol."""
    if isinstance(text, bytes) or text.isascii():  # bincount: O(n), no 100M-element sort
        raw = text if isinstance(text, bytes) else text.encode("ascii")
        codes = np.flatnonzero(_counts(np.frombuffer(raw, dtype=np.uint8), 256))
    else:
        codes = np.unique(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32))
    vocab = Vocabulary.from_symbols(chr(int(c)) for c in codes)
    ids = vocab.encode(text, dtype=smallest_dtype(len(vocab)))
    a, b = cut
    return vocab, ids[:a], ids[a:b], ids[b:]


def _build_text_file(path: Path, split: Sequence[float] = (0.9, 0.05, 0.05)) -> Streams:
    text = _read_text(path)
    if len(text) < 3:
        raise CorpusError(f"{path} has fewer than 3 characters")
    return _chars_corpus(text, _split_by_fraction(len(text), split))


def _build_tinyshakespeare(paths: Mapping[str, Path], split: Sequence[float] = (0.9, 0.05, 0.05)) -> Streams:
    (path,) = paths.values()
    return _build_text_file(path, split)


def _zip_member(path: Path, member: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(member)


def _build_text8(paths: Mapping[str, Path]) -> Streams:
    (path,) = paths.values()
    return _chars_corpus(_zip_member(path, "text8"), MAHONEY_SPLIT)


def _build_enwik8(paths: Mapping[str, Path]) -> Streams:
    (path,) = paths.values()
    return _chars_corpus(_zip_member(path, "enwik8"), MAHONEY_SPLIT)


def _poem_tokens(text: str) -> list[str]:
    tokens: list[str] = []
    for poem in text.split("\n"):
        if not poem.strip():
            continue
        for k, verse in enumerate(poem.split("\t")):
            if k:
                tokens.append(POETRY_LINE_SEP)
            tokens.extend(verse.split())
        tokens.append(EOS)
    return tokens


def _poem_files(eval_set: str = "5") -> tuple[str, ...]:
    """``eval_set="5"``: qvalid_5 / qtest_5 (matches the 5-character training part);
    ``"all"``: qvalid / qtest, which the release defines as the _5 file followed by the _7
    file (checked byte for byte), so they are rebuilt from those two files."""
    names = {
        "5": ("qtrain_5", "qvalid_5", "qtest_5"),
        "all": ("qtrain_5", "qvalid_5", "qtest_5", "qvalid_7", "qtest_7"),
    }
    if eval_set not in names:
        raise ValueError(f"eval_set must be '5' or 'all', got {eval_set!r}")
    return tuple(f"{_POEMS_DIR}/{n}" for n in names[eval_set])


def _build_poetry(paths: Mapping[str, Path], eval_set: str = "5") -> Streams:
    def read(name: str) -> str:
        return _read_text(paths[f"{_POEMS_DIR}/{name}"])

    train = _poem_tokens(read("qtrain_5"))
    valid_text, test_text = read("qvalid_5"), read("qtest_5")
    if eval_set == "all":
        valid_text += read("qvalid_7")
        test_text += read("qtest_7")
    vocab = Vocabulary.from_symbols([*train, POETRY_LINE_SEP, EOS], unk=POETRY_RARE, eos=EOS)
    return (vocab, vocab.encode(train), vocab.encode(_poem_tokens(valid_text)), vocab.encode(_poem_tokens(test_text)))


# ------------------------------------------------------------------------------------------
# Registry and loader
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSpec:
    """A file-based corpus: its files, and how to turn them into streams.

    ``needs(**options)`` names the relative paths a load with these options reads (default:
    all of ``files``), so an option such as Chinese poetry's ``eval_set`` fetches only what it
    uses. ``build(paths, **options)`` receives {relative path: verified local path} in the
    order of ``files``.
    """

    name: str
    files: tuple[RemoteFile, ...]
    build: Callable[..., Streams]
    homepage: str = ""
    needs: Callable[..., tuple[str, ...]] | None = None

    def required(self, options: Mapping[str, object]) -> tuple[RemoteFile, ...]:
        if self.needs is None:
            return self.files
        wanted = set(self.needs(**options))
        return tuple(f for f in self.files if f.path in wanted)


CORPORA: dict[str, CorpusSpec] = {
    "ptb": CorpusSpec("ptb", FILES["ptb"], _build_ptb, "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"),
    "text8": CorpusSpec("text8", FILES["text8"], _build_text8, "http://mattmahoney.net/dc/"),
    "enwik8": CorpusSpec("enwik8", FILES["enwik8"], _build_enwik8, "http://mattmahoney.net/dc/"),
    "chinese-poetry": CorpusSpec(
        "chinese-poetry",
        FILES["chinese-poetry"],
        _build_poetry,
        "http://homepages.inf.ed.ac.uk/mlap/Data/EMNLP14/",
        needs=_poem_files,
    ),
    "tinyshakespeare": CorpusSpec(
        "tinyshakespeare", FILES["tinyshakespeare"], _build_tinyshakespeare, "https://github.com/karpathy/char-rnn"
    ),
}
CORPUS_ALIASES: dict[str, str] = {"ptb-char": "ptb"}
#: Accepted names (``text:<path>`` is accepted as well: any UTF-8 text file).
CORPUS_NAMES: tuple[str, ...] = (*CORPORA, *CORPUS_ALIASES, "synthetic")


def _resolve_files(
    spec: CorpusSpec,
    files: Sequence[RemoteFile],
    data_dir: Path | None,
    cache_dir: Path,
    download: bool,
) -> tuple[dict[str, Path], dict[str, str], str]:
    """Find (or fetch) and verify each file; return paths, checksums and a source string."""
    paths: dict[str, Path] = {}
    checksums: dict[str, str] = {}
    roots: list[str] = []
    missing: list[RemoteFile] = []
    for rf in files:
        for root in (data_dir, cache_dir):
            if root is not None and (root / rf.path).is_file():
                paths[rf.path] = root / rf.path
                checksums[rf.path] = verify_file(root / rf.path, rf.sha256)
                if str(root) not in roots:
                    roots.append(str(root))
                break
        else:
            missing.append(rf)
    if missing:
        target = data_dir if data_dir is not None else cache_dir
        hint = (
            f"get {' '.join(rf.url for rf in missing)} and put the files in {target} as "
            f"{', '.join(rf.path for rf in missing)}, or pass --data-dir / set {DATA_DIR_ENV} "
            "to a folder that has them"
        )
        if not download:
            raise CorpusNotFoundError(f"corpus {spec.name!r} not found and download=False: {hint}")
        for rf in missing:
            dest = cache_dir / rf.path
            try:
                checksums[rf.path] = download_file(rf.url, dest, rf.sha256)
            except (urllib.error.URLError, OSError) as e:
                reason = " ".join(str(e).split())  # keep the message on one line
                raise CorpusNotFoundError(
                    f"corpus {spec.name!r}: download of {rf.url} failed ({reason}); offline? {hint}"
                ) from e
            paths[rf.path] = dest
        if str(cache_dir) not in roots:
            roots.append(str(cache_dir))
    # In the table's order: builders rely on it (train, valid, test).
    ordered = {rf.path: paths[rf.path] for rf in files}
    return ordered, {p: checksums[p] for p in ordered}, "; ".join(roots)


def _cached_corpus(name: str, checksums: dict[str, str], options: Mapping[str, object], source: str,
                   cache_root: Path, cache_tokens: bool, build: Callable[[], Streams]) -> Corpus:
    """Build the streams, or map them from the token cache (see token_cache.py)."""
    if not cache_tokens:
        return Corpus(name, *build(), source=source, checksums=checksums)
    key = cache_key(name, checksums, options)
    streams, fingerprint = cached_streams(cache_root, name, key, build, lambda s: streams_fingerprint(*s))
    corpus = Corpus(name, *streams, source=source, checksums=checksums)
    if fingerprint is not None:
        corpus.__dict__["fingerprint"] = fingerprint  # computed when the entry was built; the entry is verified
    return corpus


def load_corpus(
    name: str,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    download: bool = True,
    cache_tokens: bool = True,
    **options: object,
) -> Corpus:
    """Load a corpus by name (see ``CORPUS_NAMES``; also ``text:<path>``).

    ``options`` go to the corpus: ``split=(0.9, 0.05, 0.05)`` for tinyshakespeare and
    ``text:``, ``eval_set="5"|"all"`` for chinese-poetry, ``SyntheticConfig`` fields for
    synthetic. Raises ChecksumError on a file whose sha256 is not the expected one and
    CorpusNotFoundError when the files are absent and cannot be downloaded.

    File corpora are encoded once and kept in the cache folder (``tokens/``, memory-mapped on
    later loads; ``cache_tokens=False``: encode in memory every time). Nothing is ever written to
    ``data_dir``, which may be read-only.
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if name.startswith("text:"):
        path = Path(name[len("text:") :]).expanduser()
        if not path.is_file():
            raise CorpusNotFoundError(f"text corpus file {path} does not exist")
        checksums = {path.name: sha256_file(path)}
        return _cached_corpus(name, checksums, options, str(path), cache_root, cache_tokens,
                              lambda: _build_text_file(path, **options))  # type: ignore[arg-type]
    key = CORPUS_ALIASES.get(name.lower(), name.lower())
    if key == "synthetic":
        from nlstm.data.synthetic import SyntheticConfig, synthetic_corpus

        return synthetic_corpus(SyntheticConfig(**options))  # type: ignore[arg-type]
    if key not in CORPORA:
        raise CorpusError(f"unknown corpus {name!r}; known: {', '.join(CORPUS_NAMES)}, text:<path>")
    spec = CORPORA[key]
    data_root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    files = spec.required(options)
    paths, checksums, source = _resolve_files(spec, files, data_root, cache_root, download)
    return _cached_corpus(spec.name, checksums, options, source, cache_root, cache_tokens,
                          lambda: spec.build(paths, **options))
