"""Trained weights for the throughput benchmark (issue 11: trained models ran slower than fresh ones).

A freshly initialised model's gates sit near 0.5; a trained model's saturate, and the sigmoid of
a large argument, or the product of two tiny gates, is a denormal float that x86 CPUs may handle
in slow microcode. Timing fresh weights only hides that, so the benchmark also times the cores of
a nested and a stacked character LM trained briefly (Adam, truncated BPTT) on PTB characters from
``$NLSTM_DATA_DIR``, or on the synthetic corpus when PTB is absent. Trained weights are cached in
``$NLSTM_CACHE_DIR`` (``torch.load(weights_only=True)``), so only the first run pays for training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlstm import CharLM, ModelConfig
from nlstm.data.corpora import load_corpus
from nlstm.data.download import CorpusError, default_cache_dir

LR = 3e-3  # a little above the studies' 2e-3: saturation comes sooner in a short run


@dataclass
class TrainedCores:
    """The recurrent cores of trained LMs, with inputs from their own (trained) embeddings."""

    corpus: str
    steps: int
    cores: dict[str, nn.Module] = field(default_factory=dict)  # arch ("nlstm" | "stacked") -> core
    inputs: dict[str, Tensor] = field(default_factory=dict)  # arch -> (B, T, embedding), batch first as the cores
    bpc: dict[str, float] = field(default_factory=dict)  # arch -> training BPC of the last step
    seconds: float = 0.0  # training time spent in this run (0 when loaded from the cache)


def _corpus(data_dir: str | None):
    try:
        return load_corpus("ptb", data_dir=data_dir, download=False)
    except CorpusError:
        return load_corpus("synthetic")


def trained_cores(depth: int, width: int, B: int, T: int, steps: int, seed: int = 0,
                  data_dir: str | None = None, cache_dir: str | Path | None = None) -> TrainedCores:
    """Train (or load) a nested and a stacked char LM, ``steps`` Adam steps of B x T tokens each
    (``steps=0``: the same models untrained)."""
    corpus = _corpus(data_dir)
    V = len(corpus.vocab)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stream = corpus.train[: (corpus.train.numel() // B) * B].view(B, -1)
    result = TrainedCores(corpus.name, steps)
    for arch in ("nlstm", "stacked"):
        torch.manual_seed(seed)
        model = CharLM(ModelConfig(vocab_size=V, arch=arch, depth=depth, width=width))
        path = cache / f"bench-trained-{corpus.fingerprint[:12]}-{arch}-d{depth}-w{width}-b{B}-t{T}-s{steps}-{seed}.pt"
        if steps == 0:  # fresh weights, the trained runs' starting point
            result.bpc[arch] = float("nan")
        elif path.exists():
            saved = torch.load(path, weights_only=True)
            model.load_state_dict(saved["model"])
            result.bpc[arch] = float(saved["bpc"])
        else:
            t0 = time.perf_counter()
            result.bpc[arch] = _train(model, stream, T, steps)
            result.seconds += time.perf_counter() - t0
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "bpc": result.bpc[arch]}, path)
        with torch.no_grad():
            tokens = stream[:, -T:]  # the end of the training stream: text it was not trained on yet
            result.inputs[arch] = model.embed(tokens)
        result.cores[arch] = model.core
    return result


def _detach(state):
    return state.detach() if isinstance(state, Tensor) else tuple(_detach(s) for s in state)


def _train(model: CharLM, stream: Tensor, T: int, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    V = model.cfg.vocab_size
    usable = (stream.shape[1] - 1 - T) // T
    state, loss = None, torch.zeros(())
    for step in range(steps):
        pos = (step % usable) * T
        if pos == 0:
            state = None
        tokens = stream[:, pos : pos + T + 1]
        logits, state = model(tokens[:, :-1], state)
        state = _detach(state)
        loss = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return loss.item() / 0.6931471805599453
