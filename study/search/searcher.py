"""Every trial of a study, phase after phase, from its record: the Tune ``Searcher`` of the study's one Tuner.

**Search.** One Optuna study per family (``study.search.space.SearchFamily``) in the study's Optuna storage
(ask-and-tell): each family gets exactly its number of trials and its sampler learns from its own
trials only. A trial is told how it ended: COMPLETE with its best valid BPC when it finished, PRUNED
when its family's scheduler stopped it (with every value it reported), FAIL when it failed for good
(diverged, or gave up after ``MAX_ATTEMPTS``). A trial that was interrupted, or failed in a way a
rerun may cure, stays RUNNING: the next driver runs it again under the same number, key and MLflow
run, from its checkpoint. Every trial carries user attributes that link it to the record: its run
name, family, chosen values and, once it ended, its MLflow run id, parameter count and stop reason.

**Evaluate, ablation.** Once the search has ended, the configurations are chosen from the record (the
search trial runs in MLflow, whatever folder the driver runs from), their config runs are found or
created, and every (configuration, seed) whose run has not ended is run.

Nothing is read from Tune's experiment state and nothing here is ever restored from a pickle: a new
driver builds the searcher again from the record (MLflow and the Optuna storage).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import Searcher

from study.record.layout import (
    FAIL_REASON_TAG,
    FAMILY_TAG,
    PARAMS_JSON_TAG,
    SELECTED_TAG,
    SOURCE_TRIAL_TAG,
    STATUS_TAG,
    STOP_REASON_TAG,
    TRIAL_ID_TAG,
    below_chance,
    planned_key,
    search_key,
)
from study.search.space import DefineByRun, SearchFamily, make_sampler, tuning_families
from study.spec.configs import TRIAL_NUMBER, ablation_cells, resolve
from study.trials.trainable import DISK_FULL, TrialSpec

METRIC, MODE = "best_valid_bpc", "min"  # each trial's best epoch so far: what schedulers and Optuna compare
PARAMS_ATTR, RUN_NAME_ATTR, FAMILY_ATTR = "params", "run_name", "family"
FINAL_FAILURES = ("diverged", "gave up")  # failure reasons a rerun would not cure


class RecordMismatch(RuntimeError):
    """The study's stores disagree (an Optuna storage that lost trials the MLflow record has): one line."""


class SearchIncomplete(RuntimeError):
    """A phase that needs the search's results was asked for before the search ended."""


@dataclass
class FamilySearch:
    """A family's Optuna study and what of it is still to run."""

    family: SearchFamily
    study: optuna.Study
    reissue: list[FrozenTrial] = field(default_factory=list)  # RUNNING in the storage, not ended in the record
    counted: int = 0  # trials that count toward the budget (asked and started)

    @property
    def wanted(self) -> int:
        return max(0, self.family.trials - self.counted) + len(self.reissue)


@dataclass
class PhaseWork:
    phase: str
    planned: list[str] = field(default_factory=list)  # every key of the phase (ended before or not)
    queue: list[TrialSpec] = field(default_factory=list)  # evaluate/ablation: still to run


def is_final_failure(reason: str | None) -> bool:
    return bool(reason) and reason.startswith(FINAL_FAILURES)


class StudySearcher(Searcher):
    def __init__(self, run: Any, phases: list[str], max_concurrent: int,
                 stopped: set[str], on_phase_end: Callable[[StudySearcher, str], None]) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self.run = run  # study.driver.StudyRun: spec, tracker, corpora, Optuna storage
        self.phases = list(phases)
        self.max_concurrent = max_concurrent
        self.stopped = stopped  # trials a scheduler stopped (study.search.scheduler)
        self.on_phase_end = on_phase_end  # the driver records the phase's outcome; raises nothing
        self.live: dict[str, TrialSpec] = {}
        self.failure: str | None = None  # set when a phase ended without a result worth going on from
        self.current: PhaseWork | None = None
        self.searches: list[FamilySearch] = []
        self._ot: dict[str, tuple[optuna.Study, int]] = {}  # Tune trial id -> (Optuna study, trial number)
        self._last_step: dict[str, int] = {}
        self._planned: dict[str, list[str]] = {}  # evaluate/ablation: every key of the phase
        self.totals: dict[str, tuple[int, int]] = {}  # phase -> (trials in all, ended before this driver)
        self.recorded_best: dict[str, tuple[float, str]] = {}  # phase -> best valid BPC of its earlier drivers' trials
        # Evaluate each family as soon as its own search has ended (with per-family budgets and per-family
        # selection): no slot waits for the other families' last search trials, and Tune keeps its trial
        # processes (an idle slot at a phase barrier makes it stop one).
        spec = run.spec
        self.ran_search = "search" in self.phases
        self.pipelined = ("search" in self.phases and "evaluate" in self.phases and bool(spec.search.families)
                          and spec.evaluate.per == "family")
        self.early = PhaseWork("evaluate")  # evaluate trials of families whose search has ended
        self._evaluated: dict[str, set[str]] = {}  # family -> config hashes chosen for it
        self._begun: set[str] = set()  # evaluate/ablation keys an earlier driver began (interrupted runs)
        self._start_next(raise_problems=True)

    # ------------------------------------------------------------------ Tune's side
    def suggest(self, trial_id: str) -> dict | str | None:
        while True:
            if self.current is None:
                return Searcher.FINISHED
            if len(self.live) >= self.max_concurrent:
                return None
            trial = self._next_trial(trial_id)
            if trial is not None:
                self.live[trial_id] = trial
                return trial.as_config()
            if any(t.phase == self.current.phase for t in self.live.values()):
                return None  # the phase's last trials are running; the next phase needs their results
            self._end_current()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot:
            self._report(trial_id, *self._ot[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self.live.pop(trial_id, None)
        if trial is None:
            return
        if error:
            record = self.run.tracker.trial_run(trial.key)
            reason = record.data.tags.get(FAIL_REASON_TAG, "") if record is not None else ""
            if reason.startswith(DISK_FULL):  # stop at once: every other trial would fail the same way
                self.failure = f"{reason}: free some space, then rerun the same command to resume"
                self.phases, self.current = [], None
        if trial_id in self._ot:
            self._tell(trial_id, trial, result or {}, error)
            if self.pipelined and self.failure is None:
                self._maybe_evaluate_early(trial.tuning_group)
        elif trial.phase in ("evaluate", "ablation") and (result or {}).get("finished"):
            self.run.tracker.update_config_summary(trial.parent_run_id)

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its search algorithm with the experiment; this one is never restored from it."""
        return {}

    def save_to_dir(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to save: the record (MLflow, the Optuna storage, the checkpoints) is the state."""

    def save(self, checkpoint_path: str) -> None:
        """See ``save_to_dir``."""

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError("a study's searcher is built again from its record, never restored")

    # ------------------------------------------------------------------ phases
    def _start_next(self, raise_problems: bool = False) -> None:
        """Start the next phase that has work. A phase that cannot start (the stores disagree, the search has
        not ended) raises before Tune starts, and stops the study with its reason once Tune runs."""
        while self.phases and self.failure is None:
            phase = self.phases.pop(0)
            try:
                work = {"search": self._start_search, "evaluate": self._start_evaluate,
                        "ablation": self._start_ablation}[phase]()
            except (RecordMismatch, SearchIncomplete) as e:
                if raise_problems:
                    raise
                self.failure = str(e)
                break
            self.current = work
            if self._has_work():
                return
            self._end_current(start_next=False)
        self.current = None

    def _has_work(self) -> bool:
        if self.current is None:
            return False
        if self.current.phase == "search":
            return any(s.wanted for s in self.searches)
        return bool(self.current.queue)

    def _end_current(self, start_next: bool = True) -> None:
        phase = self.current.phase
        self.current = None
        self.on_phase_end(self, phase)  # may set self.failure
        if start_next:
            self._start_next()

    def _next_trial(self, trial_id: str) -> TrialSpec | None:
        work = self.current
        if work.phase == "search":
            trial = self._next_search_trial(trial_id)
            return trial if trial is not None or not self.early.queue else self.early.queue.pop(0)
        return work.queue.pop(0) if work.queue else None

    def planned_keys(self, phase: str) -> list[str]:
        """Every trial key of ``phase`` as this driver planned it (for the phase's outcome)."""
        if phase == "search":
            return sorted(t.user_attrs[RUN_NAME_ATTR] for s in self.searches
                          for t in s.study.get_trials(deepcopy=False) if RUN_NAME_ATTR in t.user_attrs)
        return list(self._planned.get(phase, []))

    # ------------------------------------------------------------------ search
    def _start_search(self) -> PhaseWork:
        run = self.run
        runs = {r.data.tags.get(TRIAL_ID_TAG): r for r in run.tracker.trial_runs("search")}
        self.searches = []
        for family in tuning_families(run.spec):
            study = optuna.load_study(study_name=family.optuna_study, storage=run.optuna_storage)
            study.sampler = make_sampler(run.spec, trials_so_far=len(study.get_trials(deepcopy=False)))
            self.searches.append(self._reconcile(family, study, runs))
        known = {t.user_attrs.get(RUN_NAME_ATTR) for s in self.searches for t in s.study.get_trials(deepcopy=False)}
        lost = sorted(k for k in runs if k and k not in known and "-superseded-" not in k)
        if lost:
            raise RecordMismatch(f"the Optuna storage {run.optuna_location} lacks {len(lost)} search trial(s) that the "
                                 f"MLflow record has ({', '.join(lost[:3])}): it was replaced or damaged; restore it, "
                                 "or rerun with --restart (which discards this study's runs)")
        total = sum(s.family.trials for s in self.searches)
        self.totals["search"] = (total, total - sum(s.wanted for s in self.searches))
        self._note_best("search", runs.values())
        return PhaseWork("search")

    def _reconcile(self, family: SearchFamily, study: optuna.Study, runs: dict[str, Any]) -> FamilySearch:
        """Bring the family's Optuna study in line with the record: a trial the record saw end but Optuna did
        not (a driver stopped in between) is told now; one that has not ended is run again."""
        search = FamilySearch(family, study)
        for t in study.get_trials(deepcopy=False):
            key = t.user_attrs.get(RUN_NAME_ATTR)
            if key is None:  # asked by a driver that stopped before the trial was named: never ran
                if t.state == TrialState.RUNNING:
                    self._fenced_tell(study, t.number, TrialState.FAIL, attrs={"nlstm.orphan": True})
                continue
            search.counted += 1
            if t.state != TrialState.RUNNING:
                continue
            record = runs.get(key)
            status = record.data.tags.get(STATUS_TAG) if record is not None else None
            if status == "completed":
                value = record.data.metrics.get(METRIC)
                self._fenced_tell(study, t.number, TrialState.COMPLETE, value, self._attrs(record))
            elif status == "pruned":
                self._fenced_tell(study, t.number, TrialState.PRUNED, attrs=self._attrs(record))
            elif status == "failed" and is_final_failure(record.data.tags.get(FAIL_REASON_TAG)):
                self._fenced_tell(study, t.number, TrialState.FAIL, attrs=self._attrs(record))
            else:
                search.reissue.append(t)
        return search

    def _next_search_trial(self, trial_id: str) -> TrialSpec | None:
        open_searches = [s for s in self.searches if s.wanted]
        if not open_searches:
            return None
        search = min(open_searches, key=lambda s: s.counted - len(s.reissue))  # the family furthest behind
        study = search.study
        if search.reissue:
            frozen = search.reissue.pop(0)
            params = json.loads(frozen.user_attrs[PARAMS_ATTR])
            key, family, number = frozen.user_attrs[RUN_NAME_ATTR], frozen.user_attrs[FAMILY_ATTR], frozen.number
        else:
            self.run.tracker.fence()
            ot_trial = study.ask()
            constants = DefineByRun(self.run.spec, search.family.fixed)(ot_trial)
            params = {k: v for k, v in (ot_trial.params | constants).items() if k != TRIAL_NUMBER}
            family, number = resolve(self.run.spec, "search", params).family, ot_trial.number
            key = search_key(family, number)
            for name, value in ((RUN_NAME_ATTR, key), (FAMILY_ATTR, family),
                                (PARAMS_ATTR, json.dumps(params, sort_keys=True))):
                ot_trial.set_user_attr(name, value)
            search.counted += 1
        self._ot[trial_id] = (study, number)
        return TrialSpec(key, "search", family, params, self.run.spec.search.seed, self.run.tracker.parent_run_id,
                         self.run.fingerprint({}), tuning_group=search.family.name)

    def _report(self, trial_id: str, study: optuna.Study, number: int, result: dict) -> None:
        """An intermediate value (the best valid BPC so far at this epoch) of an Optuna trial."""
        if METRIC not in result or "epoch" not in result:
            return
        step, value = int(result["epoch"]), result[METRIC]
        if self._last_step.get(trial_id) == step or not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        frozen = study.get_trials(deepcopy=False)[number]
        if step in frozen.intermediate_values or frozen.state != TrialState.RUNNING:
            return
        optuna.trial.Trial(study, frozen._trial_id).report(float(value), step)
        self._last_step[trial_id] = step

    def _tell(self, trial_id: str, trial: TrialSpec, result: dict, error: bool) -> None:
        study, number = self._ot.pop(trial_id)
        record = self.run.tracker.trial_run(trial.key)
        attrs = self._attrs(record) if record is not None else {}
        if error:
            reason = record.data.tags.get(FAIL_REASON_TAG) if record is not None else None
            if is_final_failure(reason):
                self._fenced_tell(study, number, TrialState.FAIL, attrs=attrs)
            return  # a failure a rerun may cure: RUNNING, run again by the next driver
        if result.get("finished"):
            self._fenced_tell(study, number, TrialState.COMPLETE, result.get(METRIC), attrs)
        elif trial_id in self.stopped:
            self._report(trial_id, study, number, result)  # the result the scheduler stopped it on (Tune skips it)
            self._fenced_tell(study, number, TrialState.PRUNED, attrs=attrs | {"stop_reason": "pruned"})
        # else interrupted: RUNNING, continued from its checkpoint by the next driver

    @staticmethod
    def _attrs(record: Any) -> dict[str, Any]:
        """User attributes that link an Optuna trial to its MLflow run (optuna-dashboard shows them)."""
        m, tags = record.data.metrics, record.data.tags
        attrs = {"mlflow_run_id": record.info.run_id, "stop_reason": tags.get(STOP_REASON_TAG, tags.get(STATUS_TAG))}
        if m.get("num_params") is not None:
            attrs["num_params"] = int(m["num_params"])
        return attrs

    def _fenced_tell(self, study: optuna.Study, number: int, state: TrialState, value: float | None = None,
                     attrs: dict[str, Any] | None = None) -> None:
        self.run.tracker.fence()
        frozen = study.get_trials(deepcopy=False)[number]
        if frozen.state.is_finished():
            return
        trial = optuna.trial.Trial(study, frozen._trial_id)
        for name, v in (attrs or {}).items():
            trial.set_user_attr(name, v)
        if state == TrialState.COMPLETE and (value is None or not math.isfinite(value)):
            state = TrialState.FAIL  # nothing Optuna could learn from
        study.tell(number, value if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True)

    # ------------------------------------------------------------------ evaluate and ablation
    def _search_rows(self) -> list[dict[str, Any]]:
        """The search's trials as the record has them, best first (by best valid BPC)."""
        rows = []
        for r in self.run.tracker.trial_runs("search"):
            tags = r.data.tags
            if PARAMS_JSON_TAG not in tags or "-superseded-" in tags.get(TRIAL_ID_TAG, ""):
                continue
            rows.append({"key": tags[TRIAL_ID_TAG], "status": tags.get(STATUS_TAG), "family": tags.get(FAMILY_TAG),
                         "params": json.loads(tags[PARAMS_JSON_TAG]),
                         "best_valid_bpc": r.data.metrics.get(METRIC, math.inf)})
        rows.sort(key=lambda row: (row["best_valid_bpc"], row["key"]))
        return rows

    def _check_search_ended(self, phase: str) -> None:
        """Evaluate and ablation build on the search: when this driver did not run it, the record must show
        every trial it asks for ended (completed, pruned or failed)."""
        spec = self.run.spec
        if spec.search is None or self.ran_search:
            return
        ended = {row["key"] for row in self._search_rows() if row["status"] in ("completed", "pruned", "failed")}
        asked = 0
        for family in tuning_families(spec):
            try:
                study = optuna.load_study(study_name=family.optuna_study, storage=self.run.optuna_storage)
            except KeyError:
                continue
            asked += sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get(RUN_NAME_ATTR) in ended)
        total = sum(f.trials for f in tuning_families(spec))
        if asked < total:
            raise SearchIncomplete(f"{phase}: the search has ended {asked} of its {total} trials; run it first "
                                   "(--phases search, or no --phases)")

    def usable(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Search rows that may be chosen: ended with a finite value below chance (one chance rule)."""
        bar = self.run.unigram_bits
        return [r for r in rows if r["status"] in ("completed", "pruned") and below_chance(r["best_valid_bpc"], bar)]

    def _evaluate_configs(self, rows: list[dict[str, Any]]) -> list[tuple[Any, dict, dict, dict]]:
        configs, seen = [], set()
        for row in select_top(self.run.spec, rows):
            cfg = resolve(self.run.spec, "evaluate", row["params"])
            if cfg.config_hash not in seen:
                seen.add(cfg.config_hash)
                configs.append((cfg, row["params"], {}, {SOURCE_TRIAL_TAG: row["key"], SELECTED_TAG: "true"}))
        return configs

    def _maybe_evaluate_early(self, family: str) -> None:
        """Plan ``family``'s evaluate trials once its search has ended (none of its trials left to run)."""
        search = next((s for s in self.searches if s.family.name == family), None)
        if search is None or search.wanted or family in self._evaluated or any(
                t.phase == "search" and t.tuning_group == family for t in self.live.values()):
            return
        rows = [r for r in self.usable(self._search_rows()) if r["family"] == family]
        configs = self._evaluate_configs(rows)
        self._evaluated[family] = {cfg.config_hash for cfg, *_ in configs}
        if configs:
            self.early.queue = self._in_seed_order(self.early.queue + self._plan(
                "evaluate", configs, self.run.spec.evaluate.seeds).queue)

    def _start_evaluate(self) -> PhaseWork:
        spec, tracker = self.run.spec, self.run.tracker
        if self.pipelined:  # the families evaluated early keep their choice; the others are chosen now
            for search in self.searches:
                self._maybe_evaluate_early(search.family.name)
            work = PhaseWork("evaluate", list(self._planned.get("evaluate", [])),
                             self._in_seed_order(self.early.queue))
            self.early = PhaseWork("evaluate")
            chosen = set().union(*self._evaluated.values()) if self._evaluated else set()
        else:
            self._check_search_ended("evaluate")
            configs = self._evaluate_configs(self.usable(self._search_rows()))
            chosen = {cfg.config_hash for cfg, *_ in configs}
            work = self._plan("evaluate", configs, spec.evaluate.seeds) if configs else PhaseWork("evaluate")
        if not chosen:
            self.failure = "evaluate: no search trial finished below chance, so there is no configuration to evaluate"
            return PhaseWork("evaluate")
        tracker.mark_unselected("evaluate", chosen)
        return work

    def _start_ablation(self) -> PhaseWork:
        spec = self.run.spec
        base: dict[str, Any] = {}
        if spec.ablation.base == "search":
            self._check_search_ended("ablation")
            rows = self.usable(self._search_rows())
            if not rows:
                self.failure = "ablation: no search trial finished below chance, so there is no base configuration"
                return PhaseWork("ablation")
            base = rows[0]["params"]
        cells = ablation_cells(spec, base)
        configs = [(c.config, c.config.params, c.factors, {}) for c in cells]
        return self._plan("ablation", configs, spec.ablation.seeds)

    def _plan(self, phase: str, configs: list[tuple[Any, dict, dict, dict]], seeds: list[int]) -> PhaseWork:
        """Config runs for ``configs`` ((config, chosen values, factors, extra tags)), then every
        (config, seed) trial whose run has not ended, in :meth:`_in_seed_order`. Planning a phase's families
        one after another adds to its planned keys and totals."""
        tracker = self.run.tracker
        work = PhaseWork(phase)
        runs = {r.data.tags.get(TRIAL_ID_TAG): r for r in tracker.trial_runs(phase)}
        parents = {}
        for cfg, _, factors, tags in configs:
            solved = cfg.solve(len(self.run.corpus_for(cfg.data).vocab))
            logged = solved.mlflow_params(seed=0)
            logged.pop("seed")
            parents[cfg.config_hash] = tracker.config_run(phase, cfg, logged, factors or None, tags)
        for seed in seeds:
            for cfg, params, _, _ in configs:
                key = planned_key(phase, cfg.family, seed, cfg.config_hash)
                work.planned.append(key)
                record = runs.get(key)
                status = record.data.tags.get(STATUS_TAG) if record is not None else None
                if status == "completed" or (status == "failed"
                                             and is_final_failure(record.data.tags.get(FAIL_REASON_TAG))):
                    continue
                if status == "interrupted":
                    self._begun.add(key)
                work.queue.append(TrialSpec(key, phase, cfg.family, dict(params), seed, parents[cfg.config_hash],
                                            self.run.fingerprint(cfg.data)))
        self._planned[phase] = self._planned.get(phase, []) + work.planned
        work.queue = self._in_seed_order(work.queue)
        total, before = self.totals.get(phase, (0, 0))
        self.totals[phase] = (total + len(work.planned), before + len(work.planned) - len(work.queue))
        self._note_best(phase, runs.values())
        return work

    def _in_seed_order(self, queue: list[TrialSpec]) -> list[TrialSpec]:
        """Trials an earlier driver began first (they continue from their checkpoints), then the first seed of
        every configuration, then the second, ...: a study paused or stopped midway holds the same seeds of
        every family, so its partial comparison is balanced (and paired)."""
        return sorted(queue, key=lambda t: (t.key not in self._begun, t.seed))  # stable: configurations keep order

    def _note_best(self, phase: str, runs: Any) -> None:
        """The best completed trial the record already has in ``phase``, so that a resumed study's progress
        line names the study's best, not only the best of the trials this driver ran."""
        for r in runs:
            value = r.data.metrics.get("best_valid_bpc")
            if r.data.tags.get(STATUS_TAG) == "completed" and value is not None and math.isfinite(value) and \
                    value < self.recorded_best.get(phase, (math.inf, ""))[0]:
                self.recorded_best[phase] = (value, r.data.tags.get(TRIAL_ID_TAG, r.info.run_name))


def select_top(spec: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluate phase's configurations: the top-k rows (sorted by best valid BPC, pruned or not)
    overall, per arch or per family."""
    ev = spec.evaluate
    if ev.per == "none":
        return rows[: ev.top_k]
    chosen, counts = [], {}
    for row in rows:
        cfg = resolve(spec, "search", row["params"])
        group = cfg.arch if ev.per == "arch" else cfg.family
        if counts.get(group, 0) < ev.top_k:
            counts[group] = counts.get(group, 0) + 1
            chosen.append(row)
    return chosen

