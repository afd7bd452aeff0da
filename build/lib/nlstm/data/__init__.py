"""Data layer: corpora (download -> verify -> cache -> tensors), a synthetic long-range
corpus, and contiguous-stream batching for truncated BPTT.

Pure PyTorch/NumPy plus the standard library (tqdm optional, for download progress).
"""

from nlstm.data.batching import StreamBatches, batchify, batchify_padded
from nlstm.data.corpora import CORPUS_NAMES, Corpus, load_corpus, unigram_entropy_bits
from nlstm.data.download import (
    ChecksumError,
    CorpusError,
    CorpusNotFoundError,
    default_cache_dir,
    default_data_dir,
)
from nlstm.data.synthetic import SyntheticConfig, synthetic_corpus
from nlstm.data.vocab import Vocabulary

__all__ = [
    "CORPUS_NAMES",
    "ChecksumError",
    "Corpus",
    "CorpusError",
    "CorpusNotFoundError",
    "StreamBatches",
    "SyntheticConfig",
    "Vocabulary",
    "batchify",
    "batchify_padded",
    "default_cache_dir",
    "default_data_dir",
    "load_corpus",
    "synthetic_corpus",
    "unigram_entropy_bits",
]
