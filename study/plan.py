"""The trial plan that ``--dry-run`` prints: what each phase will run, the solved widths and
parameter counts, and an estimated duration from a short throughput measurement of each model
(a few training steps on this machine with the trial's thread count; nothing is written).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from nlstm.data import Corpus, StreamBatches
from nlstm.model import CharLM, ModelConfig
from nlstm.trainer import TrainConfig, Trainer
from study.space import (
    TrialConfig,
    ablation_cells,
    condition_holds,
    num_samples,
    preview_search,
    resolve,
    sampler_description,
    scheduler_description,
)
from study.spec import ARCHS, CategoricalEntry, FixedEntry, StudySpec, entry_values

TRIAL_OVERHEAD_S = 3.0  # starting/resetting a trial, MLflow writes, checkpoints (measured: 2-4 s)
CONCURRENCY_SLOWDOWN = 1.15  # two trials on two cores each run ~10-15 % slower than one alone


def _budgets(spec: StudySpec) -> list[float]:
    return [float(v) for v in entry_values(spec.budget)]


def _int_values(entry: Any) -> list[int]:
    if isinstance(entry, (CategoricalEntry, FixedEntry)):
        return [int(v) for v in entry_values(entry)]
    return list(range(int(entry.low), int(entry.high) + 1, int(getattr(entry, "step", 1) or 1)))


def search_families(spec: StudySpec) -> list[tuple[str, int]]:
    """Every (arch, depth) the search space can produce (for solving and measuring)."""
    space = spec.search.space if spec.search else {}
    archs = entry_values(space["arch"]) if "arch" in space else [spec.model.arch]
    out: list[tuple[str, int]] = []
    for arch in archs:
        depths = [spec.model.depth]
        for name in ("depth", "layers"):
            entry = space.get(name)
            if entry is None or (name == "layers" and arch != "stacked"):
                continue
            if entry.when and not condition_holds(entry.when, {"arch": arch}):
                continue
            depths = _int_values(entry)
        for depth in [1] if arch == "single" else sorted(depths):
            if (arch, depth) not in out:
                out.append((arch, depth))
    return out


@dataclass
class Throughput:
    """Measured training tokens/s per (family, width, embedding, batch, bptt)."""

    corpus: Corpus
    threads: int
    seconds_per_model: float = 1.5
    cache: dict[tuple, float] = field(default_factory=dict)

    def tokens_per_s(self, cfg: TrialConfig) -> float:
        s = cfg.solution
        key = (cfg.arch, cfg.depth, s.width, s.embedding_dim, cfg.train["batch_size"], cfg.train["bptt"],
               cfg.model["impl"])
        if key not in self.cache:
            self.cache[key] = self._measure(cfg)
        return self.cache[key]

    def _measure(self, cfg: TrialConfig) -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            torch.manual_seed(0)
            model = CharLM(ModelConfig(**cfg.model_config(len(self.corpus.vocab))))
            tc = TrainConfig(**(cfg.train | {"epochs": 1, "max_steps_per_epoch": None}))
            trainer = Trainer(model, self.corpus, tc)
            batches = trainer.train_batches
            x, y = batches[0]
            trainer.train_step(x, y)  # warm-up
            steps, start = 0, time.perf_counter()
            while steps < 1 or (time.perf_counter() - start < self.seconds_per_model and steps < 20):
                x, y = batches[(steps + 1) % len(batches)]
                trainer.train_step(x, y)
                steps += 1
            return steps * y.numel() / (time.perf_counter() - start)
        finally:
            torch.set_num_threads(threads)


def steps_per_epoch(corpus: Corpus, train: dict[str, Any]) -> int:
    n = len(StreamBatches(corpus.train, train["batch_size"], train["bptt"]))
    return min(n, train["max_steps_per_epoch"] or n)


def trial_seconds(cfg: TrialConfig, corpus: Corpus, tp: Throughput, epochs: float | None = None) -> float:
    """Estimated wall time of one trial: training, per-epoch validation and the final test
    (evaluation runs forward only, about 3x the training throughput)."""
    t = cfg.train
    rate = tp.tokens_per_s(cfg)
    epochs = t["epochs"] if epochs is None else epochs
    train_tokens = steps_per_epoch(corpus, t) * t["batch_size"] * t["bptt"]
    eval_tokens = min(len(corpus.valid), t["max_eval_tokens"] or len(corpus.valid))
    test_tokens = min(len(corpus.test), t["max_eval_tokens"] or len(corpus.test))
    return epochs * (train_tokens + eval_tokens / 3) / rate + test_tokens / 3 / rate + TRIAL_OVERHEAD_S


def asha_epochs(spec: StudySpec) -> float:
    """Expected epochs per trial under (synchronous) successive halving."""
    s, max_t = spec.search.scheduler, spec.search.train.epochs
    if s.type != "asha":
        return float(max_t)
    rungs, r = [], min(s.grace_period, max_t)
    while r < max_t:
        rungs.append(r)
        r *= s.reduction_factor
    total, previous = 0.0, 0.0
    for i, rung in enumerate([*rungs, max_t]):
        total += (rung - previous) / s.reduction_factor**i
        previous = rung
    return total


def _clock(seconds: float) -> str:
    m = int(round(seconds / 60))
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else (f"{m} min" if m else f"{int(seconds)} s")


def _params_text(cfg: TrialConfig, skip: tuple[str, ...] = ("arch", "depth", "layers", "budget")) -> str:
    items = []
    for k, v in cfg.params.items():
        if k in skip:
            continue
        items.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(items)


def _row(cfg: TrialConfig, extra: str = "") -> str:
    s = cfg.solution
    emb = "onehot" if s.embedding_dim is None else str(s.embedding_dim)
    return (f"{cfg.family:<11} budget {int(cfg.budget):>9,}  width {s.width:>5}  emb {emb:>6}  params {s.params:>10,} "
            f"({100 * s.relative_error:+.2f}%)  {extra}").rstrip()


def build_plan(spec: StudySpec, corpus: Corpus, cpus_per_trial: float, gpus_per_trial: float, concurrency: int,
               measure: bool = True) -> str:
    """The dry-run text: the plan of every phase and the estimated duration."""
    vocab = len(corpus.vocab)
    tp = Throughput(corpus, threads=max(1, int(cpus_per_trial)))
    slow = CONCURRENCY_SLOWDOWN if concurrency > 1 else 1.0
    lines = [f"study {spec.name}: {spec.description.strip().splitlines()[0] if spec.description.strip() else ''}",
             f"data: {spec.data.corpus} (vocabulary {vocab}; train {len(corpus.train):,}, valid {len(corpus.valid):,}, "
             f"test {len(corpus.test):,} tokens; fingerprint {corpus.fingerprint[:12]})",
             f"resources: {cpus_per_trial:g} CPU (torch threads {max(1, int(cpus_per_trial))}) and "
             f"{gpus_per_trial:g} GPU per trial, {concurrency} trial(s) at a time",
             f"phases: {' -> '.join(spec.phases)}"]
    estimates: dict[str, float] = {}
    family_seconds: dict[str, list[float]] = {}

    if spec.search is not None:
        s, n = spec.search, num_samples(spec)
        t = s.train
        lines += ["", f"search: {n} trials, sampler {sampler_description(spec)}, "
                      f"scheduler {scheduler_description(spec)}, "
                      f"max {min(concurrency, s.max_concurrent or concurrency)} at a time, tuning seed {s.seed}",
                  f"  training: {t.epochs} epochs x {steps_per_epoch(corpus, t.model_dump())} steps "
                  f"(batch {t.batch_size}, bptt {t.bptt}), lr {t.lr:g}, {t.optimizer}, patience {t.patience}"]
        lines.append("  space: " + "; ".join(_entry_text(k, e) for k, e in [("budget", spec.budget), *s.space.items()]
                                             if not (k == "budget" and isinstance(e, FixedEntry))) or "  space: (none)")
        lines.append("  every architecture at each budget bound:")
        for budget in sorted({min(_budgets(spec)), max(_budgets(spec))}):
            for arch, depth in search_families(spec):
                cfg = resolve(spec, "search", {"arch": arch, "depth": depth, "layers": depth, "budget": budget})
                lines.append("    " + _row(cfg.solve(vocab)))
        preview = preview_search(spec, min(n, 8))
        lines.append(f"  first {len(preview)} trials the sampler proposes:")
        seconds = []
        for i, params in enumerate(preview):
            cfg = resolve(spec, "search", params).solve(vocab)
            extra = _params_text(cfg)
            if measure:
                sec = trial_seconds(cfg, corpus, tp) * slow
                seconds.append(sec)
                family_seconds.setdefault(cfg.arch, []).append(sec)
                extra += f"  ~{sec / 60:.1f} min"
            lines.append(f"    search-{i:04d} " + _row(cfg, extra))
        if measure and seconds:
            mean = sum(seconds) / len(seconds)
            full = n * mean / min(concurrency, s.max_concurrent or concurrency)
            ratio = asha_epochs(spec) / t.epochs
            estimates["search"] = full * ratio + n * TRIAL_OVERHEAD_S * (1 - ratio) / concurrency
            lines.append(f"  estimate: {_clock(estimates['search'])} ({_clock(full)} if no trial were stopped early)")

    if spec.evaluate is not None:
        ev = spec.evaluate
        groups = ([a for a in ARCHS if a in {arch for arch, _ in search_families(spec)}] if ev.per == "arch"
                  else [f"{a}-d{d}" for a, d in search_families(spec)] if ev.per == "family" else ["overall"])
        n_configs = ev.top_k * len(groups)
        t = ev.train
        lines += ["", f"evaluate: the top {ev.top_k} search configuration(s) "
                      f"{'per ' + ev.per if ev.per != 'none' else 'overall'} ({', '.join(groups)}) x seeds {ev.seeds}"
                      f" = up to {n_configs * len(ev.seeds)} runs",
                  f"  training: {t.epochs} epochs x {steps_per_epoch(corpus, t.model_dump())} steps "
                  f"(batch {t.batch_size}, bptt {t.bptt}), patience {t.patience}; memory timescales after training"]
        if measure and family_seconds and spec.search is not None:
            # the evaluate configs are the search's best: price them like the sampled ones, at evaluate's budget
            ratio = _trial_ratio(spec, corpus)
            per_group = [sum(v) / len(v) for v in family_seconds.values()]
            mean = sum(per_group) / len(per_group)
            estimates["evaluate"] = n_configs * len(ev.seeds) * mean * ratio / concurrency
            lines.append(f"  estimate: {_clock(estimates['evaluate'])}")

    if spec.ablation is not None:
        ab = spec.ablation
        base: dict[str, Any] = {}
        base_text = "the model/train defaults"
        if ab.base == "search":
            base_text = "the best search configuration (unknown before the search; defaults shown)"
        cells = ablation_cells(spec, base)
        factors = " x ".join(f"{k} {v}" for k, v in ab.factors.items())
        lines += ["", f"ablation: {factors} on {base_text}{' + ' + str(ab.params) if ab.params else ''}",
                  f"  {len(cells)} distinct cells x seeds {ab.seeds} = {len(cells) * len(ab.seeds)} runs; "
                  f"{ab.train.epochs} epochs x {steps_per_epoch(corpus, ab.train.model_dump())} steps "
                  f"(batch {ab.train.batch_size}, bptt {ab.train.bptt})"]
        total = 0.0
        for cell in cells:
            cfg = cell.config.solve(vocab)
            extra = " ".join(f"{k}={v}" for k, v in cell.factors.items())
            if measure:
                sec = trial_seconds(cfg, corpus, tp) * slow
                total += sec * len(ab.seeds)
                extra += f"  ~{sec / 60:.1f} min/seed"
            lines.append("    " + _row(cfg, extra))
        if measure:
            estimates["ablation"] = total / concurrency
            lines.append(f"  estimate: {_clock(estimates['ablation'])}")

    if measure and estimates:
        rates = ", ".join(f"{k[0]}-d{k[1]} w{k[2]} {v / 1000:.0f}k" for k, v in list(tp.cache.items())[:6])
        lines += ["", f"estimated duration: {_clock(sum(estimates.values()) + 15)} in all "
                      f"({', '.join(f'{k} {_clock(v)}' for k, v in estimates.items())}; +15 s start-up)",
                  f"  measured training tokens/s on this machine at {tp.threads} thread(s): {rates}"]
    if not measure:
        lines += ["", "no duration estimate: the study asks for GPUs and this machine has none"]
    lines += ["", "dry run: nothing was trained or written."]
    return "\n".join(lines)


def _trial_ratio(spec: StudySpec, corpus: Corpus) -> float:
    """How much longer an evaluate trial is than a search trial (epochs x steps per epoch)."""
    s, e = spec.search.train, spec.evaluate.train
    search = s.epochs * steps_per_epoch(corpus, s.model_dump()) * s.batch_size * s.bptt
    evaluate = e.epochs * steps_per_epoch(corpus, e.model_dump()) * e.batch_size * e.bptt
    return evaluate / max(search, 1)


def _entry_text(name: str, entry: Any) -> str:
    cond = ""
    if entry.when:
        cond = " when " + ", ".join(f"{k}={v}" for k, v in entry.when.items())
    if entry.type == "fixed":
        return f"{name}={entry.value}{cond}"
    if entry.type == "categorical":
        return f"{name} in {entry.choices}{cond}"
    scale = " log" if getattr(entry, "log", False) else ""
    step = f" step {entry.step}" if getattr(entry, "step", None) not in (None, 1) else ""
    return f"{name} {entry.type} [{entry.low:g}, {entry.high:g}]{scale}{step}{cond}"


def check_budgets(spec: StudySpec, vocab_size: int) -> None:
    """Raise ValueError ('budget ...') if some architecture of the study cannot meet a budget."""
    configs: list[TrialConfig] = []
    if spec.search is not None:
        for budget in _budgets(spec):
            for arch, depth in search_families(spec):
                configs.append(resolve(spec, "search", {"arch": arch, "depth": depth, "layers": depth,
                                                        "budget": budget}))
    if spec.ablation is not None:
        configs += [c.config for c in ablation_cells(spec, {})]
    for cfg in configs:
        cfg.solve(vocab_size)
