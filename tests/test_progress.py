"""The progress output of a study in a log file (not a terminal): one line per trial end and a
periodic summary, not a line per change; trials a scheduler stopped are pruned, trials an
interruption stopped are interrupted, in every phase."""

from __future__ import annotations

import io
from types import SimpleNamespace

from study.driver.progress import ProgressLine


def trial(key: str, phase: str = "search", status: str = "RUNNING", **result) -> SimpleNamespace:
    return SimpleNamespace(trial_id=key, status=status, config={"trial_key": key, "phase": phase}, error_file=None,
                           error_msg=None, last_result={"trial_key": key, "family": "nlstm-d2", **result})


def test_a_log_gets_one_line_per_trial_end_and_a_final_summary():
    log = io.StringIO()
    stopped: set[str] = set()
    progress = ProgressLine(lambda phase: (12, 2), stopped, stream=log, summary_every_s=3600)
    trials = [trial(f"nlstm-d2-search-{i:03d}") for i in range(10)]
    for i, t in enumerate(trials):
        progress.on_trial_start(0, trials, t)
        for epoch in range(1, 6):  # many results, none of which may print in a log
            t.last_result |= {"epoch": epoch, "best_valid_bpc": 3.0 - epoch / 10}
            progress.on_trial_result(0, trials, t, t.last_result)
            progress.on_step_end(0, trials)
        t.last_result["finished"] = i % 2 == 0
        if i % 2:
            stopped.add(t.trial_id)  # the scheduler's decision
        progress.on_trial_complete(0, trials, t)  # Tune calls it while the trial's status still says RUNNING
        t.status = "TERMINATED"
    progress.end_phase("search")
    lines = log.getvalue().splitlines()
    assert len(lines) == 11, lines
    assert lines[0] == "  [search] nlstm-d2-search-000 completed after 5 epoch(s), best 2.500 bpc"
    assert lines[1] == "  [search] nlstm-d2-search-001 stopped early (pruned) after 5 epoch(s), best 2.500 bpc"
    # 2 trials had ended before this driver: 12 in all
    assert lines[-1].startswith("[search] 12/12 done (5 pruned) | 0 running | 0 pending | best 2.500 bpc")
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_a_log_gets_a_periodic_summary_while_trials_run():
    log = io.StringIO()
    progress = ProgressLine(lambda phase: (2, 0), stream=log, summary_every_s=0.0)
    trials = [trial("nlstm-d2-s1-evaluate-aa", "evaluate"), trial("nlstm-d2-s2-evaluate-aa", "evaluate", "PENDING")]
    progress.on_trial_start(0, trials, trials[0])
    assert log.getvalue().splitlines() == ["[evaluate] 0/2 done | 1 running | 1 pending | 0:00"]


def test_an_interrupted_trial_is_never_called_pruned_in_any_phase():
    """Tune marks the trials it stops on Ctrl+C/SIGTERM TERMINATED, as it marks pruned ones: only the
    scheduler's own decisions are pruned, in the search as in evaluate."""
    for phase in ("search", "evaluate"):
        log = io.StringIO()
        progress = ProgressLine(lambda p: (3, 0), set(), stream=log, summary_every_s=3600)
        trials = [trial(f"k{i}", phase, epoch=1, best_valid_bpc=2.0) for i in (1, 2, 3)]
        progress.on_trial_start(0, trials, trials[0])
        trials[0].last_result["finished"] = True
        progress.on_trial_complete(0, trials, trials[0])
        trials[0].status = "TERMINATED"
        progress.on_trial_complete(0, trials, trials[1])  # stopped mid-run by the interruption
        trials[1].status = "TERMINATED"
        progress.end_phase(phase)
        lines = log.getvalue().splitlines()
        assert lines[1] == f"  [{phase}] k2 stopped (interrupted) after 1 epoch(s), best 2.000 bpc", lines
        assert lines[-1].startswith(f"[{phase}] 2/3 done (1 interrupted) | 1 running | 0 pending"), lines


def test_a_resumed_study_names_the_best_of_its_whole_record():
    """After a resume the line's best is the study's, earlier drivers' trials included, until a trial of this
    driver beats it."""
    log = io.StringIO()
    progress = ProgressLine(lambda p: (4, 2), set(), stream=log, summary_every_s=0.0,
                            recorded_best=lambda p: (2.1, "single-d1-search-000") if p == "search" else None)
    trials = [trial("nlstm-d2-search-001", best_valid_bpc=2.5), trial("nlstm-d2-search-002", "search", "PENDING")]
    progress.on_trial_start(0, trials, trials[0])
    assert log.getvalue().splitlines()[-1].startswith("[search] 2/4 done | 1 running | 1 pending | "
                                                      "best 2.100 bpc single-d1-search-000 |")
    trials[0].last_result["best_valid_bpc"] = 2.0
    progress.on_trial_result(0, trials, trials[0], trials[0].last_result)
    progress.on_step_end(0, trials)
    assert "best 2.000 bpc nlstm-d2-search-001" in log.getvalue().splitlines()[-1]
