"""Train one character-level language model from the command line.

    python -m nlstm.train --corpus ptb --arch nlstm --depth 2 --budget 1e6 --epochs 3

Prints BPC per epoch with a progress bar, writes ``config.json``, ``result.json`` and a
resumable ``checkpoint.pt`` to ``--out``; re-running the same command resumes from it
(``--fresh`` discards it). Bad arguments, data or checkpoints are one line on stderr and exit
code 2; a diverging run exits 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from nlstm.checkpoint import CheckpointError
from nlstm.data import CORPUS_NAMES, CorpusError, load_corpus
from nlstm.model import CharLM, ModelConfig
from nlstm.params import ARCHITECTURES, width_for_budget
from nlstm.trainer import (
    DivergenceError,
    EpochResult,
    PeriodicCheckpoint,
    SettingsMismatchError,
    TrainConfig,
    Trainer,
    seed_everything,
)


def boolean(text: str) -> bool:
    if text.lower() in ("true", "yes", "on", "1"):
        return True
    if text.lower() in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


ARG_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float, "bool": boolean}


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def embedding_dim(text: str) -> int | None:
    return None if text.lower() in ("none", "onehot", "one-hot") else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nlstm.train", description=__doc__.split("\n\n")[0])
    data = p.add_argument_group("data")
    data.add_argument("--corpus", default="synthetic",
                      help=f"one of {', '.join(CORPUS_NAMES)}, or text:PATH for any UTF-8 file (default: synthetic)")
    data.add_argument("--data-dir", help="offline folder with the corpus files (else $NLSTM_DATA_DIR, the cache, "
                                         "or a download)")
    data.add_argument("--cache-dir", help="download cache (default $NLSTM_CACHE_DIR or ~/.cache/nlstm)")
    data.add_argument("--max-train-tokens", type=int, help="use only a prefix of the training stream")
    model = p.add_argument_group("model")
    model.add_argument("--arch", choices=ARCHITECTURES, default="nlstm")
    model.add_argument("--depth", type=int, default=2, help="nesting depth (nlstm) or layers (stacked)")
    size = model.add_mutually_exclusive_group()
    size.add_argument("--width", type=int, help="hidden width")
    size.add_argument("--budget", type=positive_float, help="total parameter budget; the width is solved from it")
    model.add_argument("--embedding-dim", type=embedding_dim, default=128, help="int, or 'none' for one-hot input")
    model.add_argument("--dropout", type=float, default=0.0)
    model.add_argument("--candidate-activation", choices=("identity", "tanh"), default="identity")
    model.add_argument("--forget-bias", type=float, default=1.0)
    model.add_argument("--impl", choices=("fused", "reference"), default="fused")
    train = p.add_argument_group("training")
    defaults = TrainConfig()
    for f in fields(TrainConfig):  # every training option, with the dataclass's defaults
        if f.name != "device":
            flag = "--" + f.name.replace("_", "-")
            train.add_argument(flag, type=ARG_TYPES[f.type], default=getattr(defaults, f.name))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help="output folder (default runs/train-ARCH-dDEPTH-seedSEED)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: epochs only)")
    p.add_argument("--fresh", action="store_true",
                   help="discard an existing checkpoint in --out and start over (a damaged one, or other settings)")
    p.add_argument("--sample", type=int, default=200, help="characters to generate after training (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class ProgressPrinter:
    """A tqdm bar over each epoch's steps and one line per epoch."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar = quiet, None

    def on_step_end(self, trainer: Trainer, step: int, loss_bpc: float) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.steps_per_epoch, initial=trainer.batch_index - 1, leave=False,
                            desc=f"epoch {trainer.epoch + 1}", unit="step", file=sys.stderr)
        self.bar.update(1)
        self.bar.set_postfix(bpc=f"{loss_bpc:.3f}")

    def on_epoch_end(self, trainer: Trainer, r: EpochResult) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        print(f"epoch {r.epoch:3d}  train {r.train_bpc:.4f}  valid {r.valid_bpc:.4f} bpc  lr {r.lr:.2e}  "
              f"{r.tokens_per_s:,.0f} tok/s  {r.wall_time_s:.1f}s", flush=True)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    train_cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    corpus = load_corpus(args.corpus, data_dir=args.data_dir, cache_dir=args.cache_dir)
    if args.max_train_tokens:
        corpus = corpus.truncated(args.max_train_tokens, len(corpus.valid) + len(corpus.test))
    if args.budget:
        sol = width_for_budget(args.arch, args.depth, args.budget, len(corpus.vocab), args.embedding_dim)
        width, emb = sol.width, sol.embedding_dim
        print(f"budget {sol.budget:,} -> width {width}, embedding {emb}: {sol.params:,} parameters "
              f"({sol.relative_error:+.2%})")
    else:
        width, emb = args.width or 256, args.embedding_dim
    model_cfg = ModelConfig(
        vocab_size=len(corpus.vocab), arch=args.arch, depth=args.depth, width=width, embedding_dim=emb,
        dropout=args.dropout, candidate_activation=args.candidate_activation, forget_bias=args.forget_bias,
        impl=args.impl,
    )
    out = args.out or Path("runs") / f"train-{args.arch}-d{args.depth}-seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(train_cfg.seed)
    model = CharLM(model_cfg)
    print(f"{corpus.name}: vocab {len(corpus.vocab)}, train {len(corpus.train):,} tokens, unigram entropy "
          f"{corpus.unigram_entropy_bits():.3f} bits | {args.arch} depth {args.depth} width {width}: "
          f"{model.num_params():,} parameters")
    checkpoint = out / "checkpoint.pt"
    progress = ProgressPrinter(args.quiet)
    trainer = Trainer(model, corpus, train_cfg, [progress, PeriodicCheckpoint(checkpoint, args.checkpoint_every)])
    if args.fresh:
        checkpoint.unlink(missing_ok=True)  # discarded now: a run killed before its first save cannot resume it
    if checkpoint.exists():
        try:
            changed = trainer.load_checkpoint(checkpoint)
        except SettingsMismatchError as exc:
            raise CheckpointError(f"{exc}; rerun with those settings, or add --fresh to discard it and start "
                                  "over") from exc
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; rerun with --fresh to discard it and start over") from exc
        note = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        print(f"resumed from {checkpoint} at epoch {trainer.epoch + 1}, step {trainer.global_step}"
              + (f" ({note})" if note else ""))
    (out / "config.json").write_text(json.dumps(
        {"model": model_cfg.to_dict(), "train": asdict(train_cfg), "corpus": corpus.name,
         "data_fingerprint": corpus.fingerprint, "num_params": model.num_params(),
         "setting_changes": trainer.setting_changes}, indent=2))
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except DivergenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    test = f"{result.test_bpc:.4f}" if result.test_bpc is not None else "n/a"
    print(f"best valid {result.best_valid_bpc:.4f} bpc (epoch {result.best_epoch}), test {test} bpc, "
          f"{result.tokens_per_s:,.0f} tok/s, stopped by {result.stop_reason}, {time.perf_counter() - start:.1f}s")
    (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    torch.save({"model_config": model_cfg.to_dict(), "state_dict": model.state_dict(),
                "vocab": corpus.vocab.to_json()}, out / "model.pt")
    if args.sample:
        prefix = corpus.valid[:20].long()
        sample = model.generate(prefix, args.sample, temperature=0.8, generator=torch.Generator().manual_seed(0))
        print("sample:", " ".join(corpus.vocab.decode(sample)) if corpus.name.startswith("ptb")
              else "".join(corpus.vocab.decode(sample)))
    print(f"outputs in {out}/ (config.json, result.json, model.pt, checkpoint.pt)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, CorpusError, CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
