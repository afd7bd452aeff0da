"""The progress output of a study in a log file (not a terminal): one line per trial end and a
periodic summary, not a line per change."""

from __future__ import annotations

import io
from types import SimpleNamespace

from study.progress import ProgressLine


def trial(key: str, status: str = "RUNNING", **result) -> SimpleNamespace:
    return SimpleNamespace(trial_id=key, status=status, config={"trial_key": key}, error_file=None, error_msg=None,
                           last_result={"trial_key": key, "family": "nlstm-d2", **result})


def test_a_log_gets_one_line_per_trial_end_and_a_final_summary():
    log = io.StringIO()
    progress = ProgressLine("search", total=10, stream=log, summary_every_s=3600)
    trials = [trial(f"search-{i:04d}") for i in range(10)]
    for i, t in enumerate(trials):
        progress.on_trial_start(0, trials, t)
        for epoch in range(1, 6):  # many results, none of which may print in a log
            t.last_result |= {"epoch": epoch, "best_valid_bpc": 3.0 - epoch / 10}
            progress.on_trial_result(0, trials, t, t.last_result)
            progress.on_step_end(0, trials)
        t.status = "TERMINATED"
        t.last_result["finished"] = i % 2 == 0
        progress.on_trial_complete(0, trials, t)
    progress.on_experiment_end(trials)
    lines = log.getvalue().splitlines()
    assert len(lines) == 11, lines
    assert lines[0] == "  [search] search-0000 nlstm-d2 completed after 5 epoch(s), best 2.500 bpc"
    assert lines[1] == "  [search] search-0001 nlstm-d2 stopped early (pruned) after 5 epoch(s), best 2.500 bpc"
    assert lines[-1].startswith("[search] 10/10 done (5 pruned) | 0 running | 0 pending | best 2.500 bpc")
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_a_log_gets_a_periodic_summary_while_trials_run():
    log = io.StringIO()
    progress = ProgressLine("evaluate", total=2, stream=log, summary_every_s=0.0)
    trials = [trial("evaluate-a-s1"), trial("evaluate-a-s2", status="PENDING")]
    progress.on_step_end(0, trials)
    assert log.getvalue().splitlines() == ["[evaluate] 0/2 done | 1 running | 1 pending | 0:00"]


def test_a_trial_stopped_in_a_phase_that_cannot_prune_was_interrupted():
    """Tune marks the trials it stops on Ctrl+C/SIGTERM TERMINATED, as it marks pruned ones: in an
    evaluate phase (no scheduler) they were interrupted, and the log must not call them pruned."""
    log = io.StringIO()
    progress = ProgressLine("evaluate", total=3, stream=log, summary_every_s=3600, can_prune=False)
    trials = [trial(f"evaluate-a-s{i}", epoch=1, best_valid_bpc=2.0) for i in (1, 2, 3)]
    trials[0].status, trials[0].last_result["finished"] = "TERMINATED", True
    progress.on_trial_complete(0, trials, trials[0])
    trials[1].status = "TERMINATED"  # stopped mid-run by the interruption
    progress.on_trial_complete(0, trials, trials[1])
    progress.on_experiment_end(trials)
    lines = log.getvalue().splitlines()
    assert lines[1] == "  [evaluate] evaluate-a-s2 nlstm-d2 stopped (interrupted) after 1 epoch(s), best 2.000 bpc"
    assert lines[-1].startswith("[evaluate] 2/3 done (1 interrupted) | 1 running | 0 pending")
    assert "pruned" not in log.getvalue()
