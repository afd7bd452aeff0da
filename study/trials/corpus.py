"""A trial's corpus: loaded once per trial process, and checked on every node against the driver's
(the same fingerprint), with errors that name the node.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from nlstm.data import Corpus, CorpusError, load_corpus
from study.spec.schema import StudySpec
from study.trials.placement import node_name


@functools.lru_cache(maxsize=2)
def _load(corpus: str, options_json: str, data_dir: str | None, max_train: int | None, max_eval: int | None) -> Corpus:
    data = load_corpus(corpus, data_dir=data_dir, **json.loads(options_json))
    if max_train is not None or max_eval is not None:
        data = data.truncated(max_train if max_train is not None else len(data.train),
                              max_eval if max_eval is not None else max(len(data.valid), len(data.test)))
    return data


def data_key(overrides: dict[str, Any]) -> str:
    """Names a trial's corpus variant (``TrialConfig.data``); ``'{}'`` is the study's own corpus."""
    return json.dumps(overrides, sort_keys=True)


def load_study_corpus(spec: StudySpec, data_dir: str | None, download: bool = True,
                      overrides: dict[str, Any] | None = None, cached: bool = True) -> Corpus:
    """The study's corpus (with a trial's option ``overrides``), truncated as ``data`` says; cached
    per process (a reused Tune actor loads it once). The driver reads it afresh (``cached=False``): a
    ``text:PATH`` file edited between two studies of one process is other data."""
    d = spec.data
    options = d.options | (overrides or {})
    if not download or not cached:
        data = load_corpus(d.corpus, data_dir=data_dir, download=download, **options)
        if d.max_train_tokens is not None or d.max_eval_tokens is not None:
            data = data.truncated(d.max_train_tokens or len(data.train),
                                  d.max_eval_tokens or max(len(data.valid), len(data.test)))
        return data
    return _load(d.corpus, json.dumps(options, sort_keys=True), data_dir, d.max_train_tokens, d.max_eval_tokens)


def node_corpus(spec: StudySpec, data_dir: str | None, fingerprint: str | None, where: dict[str, str],
                overrides: dict[str, Any] | None = None) -> Corpus:
    """The study's corpus on this node: from ``data_dir`` if that folder exists here, else this
    node's ``$NLSTM_DATA_DIR``, cache or a download; it must be the driver's corpus (same
    fingerprint). Errors name the node."""
    if data_dir is not None and not Path(data_dir).is_dir():
        data_dir = None  # the driver's --data-dir is not mounted on this node
    try:
        corpus = load_study_corpus(spec, data_dir, overrides=overrides)
    except (CorpusError, OSError, ValueError) as e:
        raise CorpusError(f"node {node_name(where)}: corpus {spec.data.corpus!r} not available there ({e}); "
                          "mount --data-dir at the same path on every node, or set NLSTM_DATA_DIR or "
                          "NLSTM_CACHE_DIR on the node") from None
    if fingerprint is not None and corpus.fingerprint != fingerprint:
        raise CorpusError(f"node {node_name(where)}: its {spec.data.corpus} corpus ({corpus.source}) differs from "
                          f"the driver's (fingerprint {corpus.fingerprint[:12]} != {fingerprint[:12]})")
    return corpus


