"""The trial plan that ``--dry-run`` prints: what each phase will run, the solved widths and
parameter counts, and an estimated duration from a short throughput measurement of each model
(a few training steps on this machine with the trial's thread count; nothing is written).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nlstm.data import Corpus, StreamBatches
from nlstm.model import CharLM, ModelConfig
from nlstm.params import lm_parameters, width_for_budget
from nlstm.trainer import TrainConfig, Trainer
from study.record.layout import ARCHS, search_key
from study.search.space import num_samples, preview_search, sampler_description, scheduler_description, tuning_families
from study.spec.configs import TrialConfig, ablation_cells, condition_holds, fixed_budget, resolve
from study.spec.errors import SpecError
from study.spec.memory import trial_room
from study.spec.schema import MIN_BUDGET, CategoricalEntry, FixedEntry, StudySpec, entry_values

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


def _rough_duration(seconds: float) -> str:
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
        groups = tuning_families(spec)
        if s.families:
            lines.append(f"  {len(groups)} families, each tuned alone (its own Optuna study, sampler and scheduler) "
                         f"with {s.trials_per_family} trials:")
        else:
            lines.append("  every architecture at each budget bound:")
            for budget in sorted({min(_budgets(spec)), max(_budgets(spec))}):
                for arch, depth in search_families(spec):
                    cfg = resolve(spec, "search", {"arch": arch, "depth": depth, "layers": depth, "budget": budget})
                    lines.append("    " + _row(cfg.solve(vocab)))
        seconds = []
        for group in groups:
            preview = preview_search(spec, min(group.trials, 8 // len(groups) or 1), group.fixed)
            which = f" for {group.name}" if group.name else ""
            lines.append(f"  first {len(preview)} trials the sampler proposes{which}:")
            for i, params in enumerate(preview):
                cfg = resolve(spec, "search", params).solve(vocab)
                extra = _params_text(cfg)
                if measure:
                    sec = trial_seconds(cfg, corpus, tp) * slow
                    seconds.append(sec)
                    family_seconds.setdefault(cfg.family if s.families else cfg.arch, []).append(sec)
                    extra += f"  ~{sec / 60:.1f} min"
                lines.append(f"    {search_key(cfg.family, i)} " + _row(cfg, extra))
        if measure and seconds:
            mean = sum(seconds) / len(seconds)
            full = n * mean / min(concurrency, s.max_concurrent or concurrency)
            ratio = asha_epochs(spec) / t.epochs
            estimates["search"] = full * ratio + n * TRIAL_OVERHEAD_S * (1 - ratio) / concurrency
            lines.append(f"  estimate: {_rough_duration(estimates['search'])} "
                         f"({_rough_duration(full)} if no trial were stopped early)")

    if spec.evaluate is not None:
        ev = spec.evaluate
        groups = ([a for a in ARCHS if a in {arch for arch, _ in search_families(spec)}] if ev.per == "arch"
                  else [f"{a}-d{d}" for a, d in search_families(spec)] if ev.per == "family" else ["overall"])
        if spec.search is not None and spec.search.families and ev.per != "none":
            groups = [g.name for g in tuning_families(spec)]
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
            lines.append(f"  estimate: {_rough_duration(estimates['evaluate'])}")

    if spec.ablation is not None:
        ab = spec.ablation
        base: dict[str, Any] = {}
        base_text = "the model/train defaults"
        if ab.base == "search":
            base_text = "the best search configuration (unknown before the search; defaults shown)"
            if fixed_budget(spec) is None and "budget" not in ab.params and "budget" not in ab.factors:
                base["budget"] = min(_budgets(spec))  # the searched budget: its lowest value shown
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
            lines.append(f"  estimate: {_rough_duration(estimates['ablation'])}")

    if measure and estimates:
        rates = ", ".join(f"{k[0]}-d{k[1]} w{k[2]} {v / 1000:.0f}k" for k, v in list(tp.cache.items())[:6])
        lines += ["", f"estimated duration: {_rough_duration(sum(estimates.values()) + 15)} in all "
                      f"({', '.join(f'{k} {_rough_duration(v)}' for k, v in estimates.items())}; +15 s start-up)",
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


# ------------------------------------------------------------------ budgets and memory
HARD_MEMORY_CAP = 2**40  # bytes: what a trial may need when its device is not on this machine (1 TiB)
SCAN_LIMIT = 20_000  # budgets tried one by one below the envelope's bound (each solve is ~15 us)


@dataclass(frozen=True)
class BudgetUse:
    """A budget the study trains at: where the file sets it and the configurations trained at it.
    ``searched_from``: the low end of a searched range, so every budget above it is used too."""

    path: str
    budget: float
    configs: list[TrialConfig]
    searched_from: bool = False


def _budget_entries(spec: StudySpec) -> list[tuple[str, float, bool]]:
    """(key path, value, is the low end of a range) for every value the top-level budget takes."""
    entry = spec.budget
    if isinstance(entry, FixedEntry):
        return [("budget", float(entry.value), False)]
    if isinstance(entry, CategoricalEntry):
        return [(f"budget.choices[{i}]", float(v), False) for i, v in enumerate(entry.choices)]
    return [("budget.low", float(entry.low), True), ("budget.high", float(entry.high), False)]


def _embedding_values(spec: StudySpec) -> list[int | None]:
    """The embedding sizes the search can use (a searched embedding_dim: its choices or range ends;
    conditions are ignored, so this may check more combinations than are sampled)."""
    entry = spec.search.space.get("embedding_dim") if spec.search else None
    return [spec.model.embedding_dim] if entry is None else list(dict.fromkeys(entry_values(entry)))


def budget_uses(spec: StudySpec) -> list[BudgetUse]:
    """Every budget of the study with every architecture trained at it, per phase."""
    uses: list[BudgetUse] = []
    if spec.search is not None:
        phases = ["search", *(["evaluate"] if spec.evaluate is not None else [])]
        for path, budget, searched_from in _budget_entries(spec):
            configs = [resolve(spec, phase, {"arch": arch, "depth": depth, "layers": depth, "budget": budget,
                                             "embedding_dim": emb})
                       for phase in phases for arch, depth in search_families(spec) for emb in _embedding_values(spec)]
            uses.append(BudgetUse(path, budget, configs, searched_from))
    ab = spec.ablation
    if ab is not None:
        own = "budget" in ab.params or "budget" in ab.factors
        bases = [("", None, False)] if own or isinstance(spec.budget, FixedEntry) else _budget_entries(spec)
        for base_path, base_budget, searched_from in bases:
            base = {} if base_budget is None else {"budget": base_budget}
            by_path: dict[str, list[TrialConfig]] = {}
            for cell in ablation_cells(spec, base):
                if "budget" in cell.factors:
                    path = f"ablation.factors.budget[{ab.factors['budget'].index(cell.factors['budget'])}]"
                else:
                    path = "ablation.params.budget" if "budget" in ab.params else base_path or "budget"
                by_path.setdefault(path, []).append(cell.config)
            uses += [BudgetUse(path, configs[0].budget, configs, searched_from and path == base_path)
                     for path, configs in by_path.items()]
    return uses


def _relative_error(cfg: TrialConfig, vocab_size: int) -> float:
    try:
        return cfg.solve(vocab_size).solution.relative_error
    except ValueError:  # width_for_budget: even width 1 is more than twice the budget
        return math.inf


@functools.cache
def minimum_budget(arch: str, depth: int, vocab_size: int, embedding_dim: int | None, tolerance: float) -> int:
    """The smallest budget from which on (at it and at every larger one) ``width_for_budget``
    matches this architecture within ``tolerance``.

    Below it the match depends on luck (at 100 parameters some architectures land within 2 %,
    others 38 % off). The search: ``width_for_budget`` lands within half a step of the budget,
    and a step is one embedding unit (V + 4n parameters; with one-hot input, one unit of width),
    so the error is at most half a step over the budget, an envelope that falls with the budget.
    Bisection finds where the envelope meets the tolerance; from there a scan downwards finds the
    last budget that actually misses it (capped at SCAN_LIMIT budgets; then the envelope's bound,
    which also works, is returned)."""
    def count(width: int, emb: int | None = embedding_dim) -> int:
        return lm_parameters(arch, depth, width, vocab_size, emb)

    c = count(0)
    a = (count(2) - 2 * count(1) + c) / 2
    b = count(1) - c - a

    def envelope(budget: int) -> float:
        root = (-b + math.sqrt(b * b + 4 * a * max(budget - c, 0))) / (2 * a)
        half_step = (vocab_size + 4 * max(root, 1)) / 2 if embedding_dim is not None else (a * (2 * root + 1) + b) / 2
        return half_step / budget

    def matches(budget: int) -> bool:
        try:
            s = width_for_budget(arch, depth, budget, vocab_size, embedding_dim=embedding_dim)
        except ValueError:
            return False
        return abs(s.relative_error) <= tolerance

    # the envelope holds once the embedding can shrink to 1 (or, one-hot, from width 1 on)
    low = max(MIN_BUDGET, count(1, 1) if embedding_dim is not None else count(1))
    high = low
    while envelope(high) > tolerance:
        high *= 2
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if envelope(mid) <= tolerance else (mid + 1, high)
    budget = low
    for _ in range(SCAN_LIMIT):
        if budget <= MIN_BUDGET or not matches(budget - 1):
            return budget
        budget -= 1
    return low


def _memory_needed(cfg: TrialConfig, vocab_size: int) -> int:
    """Bytes a trial needs at least (float32): weights, gradients and the optimizer's state, plus
    what training keeps for the backward pass per token of a batch x bptt window (the embedding,
    per level or layer its 4 gates and 2 states, the logits and their gradient), or evaluation's
    window if larger."""
    s, t = cfg.solution, cfg.train
    states = {"adam": 2, "adamw": 2}.get(t["optimizer"], 1 if t["momentum"] > 0 else 0)
    weights = 4 * s.params * (2 + states)
    emb = s.embedding_dim or vocab_size
    train = 4 * t["batch_size"] * t["bptt"] * (emb + 6 * s.width * cfg.depth + 2 * vocab_size)
    evaluate = 4 * t["eval_batch_size"] * t["bptt"] * (emb + 2 * s.width * cfg.depth + vocab_size)
    return weights + max(train, evaluate)


def trial_memory(gpus_per_trial: float, concurrency: int = 1, local: bool = True) -> tuple[int, str]:
    """(bytes, what they are) that one trial may use: its share of this machine's GPU; or, on CPUs,
    the tightest of this machine's RAM and cgroup limit shared by the ``concurrency`` trials that run
    at once, and this process's resource limits, which each trial inherits (``local``: the trials
    run on this machine, or this process measures them as ``--dry-run`` does; else only the RAM,
    as before); a trial on a GPU this machine lacks (a cluster's) gets HARD_MEMORY_CAP."""
    if gpus_per_trial > 0:
        if not torch.cuda.is_available():
            return HARD_MEMORY_CAP, "the cap for a device that is not on this machine"
        total = torch.cuda.get_device_properties(0).total_memory
        share = min(gpus_per_trial, 1.0)
        return int(total * share), f"{share:g} of this machine's GPU ({total / 2**30:.1f} GiB)"
    room = trial_room(concurrency if local else 1, limits=local)
    return min(room.bytes, HARD_MEMORY_CAP), room.what


def check_budgets(spec: StudySpec, vocab_size: int, file: str | Path = "<spec>",
                  gpus_per_trial: float | None = None, concurrency: int = 1, local: bool = True) -> None:
    """Raise SpecError (one line, naming the budget's key) if a budget of the study is below the
    one that matches every architecture within ``budget_tolerance`` (naming that minimum), or if
    a trial would not fit in the memory one trial gets (``gpus_per_trial`` defaults to the file's;
    ``concurrency`` and ``local`` as ``trial_memory`` takes them)."""
    tolerance = spec.budget_tolerance
    gpus = spec.resources.gpus_per_trial if gpus_per_trial is None else gpus_per_trial
    available, where = trial_memory(gpus, concurrency, local)
    for use in budget_uses(spec):
        configs = [cfg.solve(vocab_size) if math.isfinite(_relative_error(cfg, vocab_size)) else cfg
                   for cfg in use.configs]
        families = ", ".join(dict.fromkeys(cfg.family for cfg in configs))
        missed = [cfg for cfg in configs if not abs(_relative_error(cfg, vocab_size)) <= tolerance]
        if missed or use.searched_from:
            needed = max(minimum_budget(cfg.arch, cfg.depth, vocab_size, cfg.model["embedding_dim"], tolerance)
                         for cfg in configs)
            if missed or use.budget < needed:
                what = "a searched budget from" if use.searched_from else "a budget of"
                detail = (f"{missed[0].family} is {_relative_error(missed[0], vocab_size):+.1%} off at "
                          f"{use.budget:,.0f}" if missed else f"below it some are more than {tolerance:.0%} off")
                raise SpecError(file, use.path, f"expected {what} at least {needed:,} parameters, from which every "
                                f"architecture ({families}) is within {tolerance:.0%} (budget_tolerance); {detail}")
        for cfg in configs:
            needed = _memory_needed(cfg, vocab_size)
            if needed > available:
                t = cfg.train
                raise SpecError(file, use.path, f"expected a model that fits in memory: {cfg.family} at "
                                f"{use.budget:,.0f} parameters needs at least {needed / 2**30:,.1f} GiB to train "
                                f"(batch {t['batch_size']} x bptt {t['bptt']}, {t['optimizer']}), and a trial has "
                                f"{available / 2**30:,.1f} GiB ({where})")
