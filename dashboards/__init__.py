"""dashboards: a study's MLflow runs -> pandas frames -> statistics, figures and a report.

Data flows one way: MLflow (written by ``study/``, layout in ``docs/mlflow-layout.md``) ->
:mod:`dashboards.load` (tidy frames) -> :mod:`dashboards.outcome` (did each run learn?) ->
:mod:`dashboards.stats` (protocols, intervals, paired/Welch tests, verdicts; with
:mod:`dashboards.improvement`, :mod:`dashboards.stop_reason`, :mod:`dashboards.machine_load` and
:mod:`dashboards.equal_time`) and :mod:`dashboards.expected_best` (tuning budget) -> :mod:`dashboards.figures`
(with :mod:`dashboards.importance`) -> :mod:`dashboards.report` (``report.html`` + ``report.md``), with the
tidy CSV tables of :mod:`dashboards.tables`.
Nothing here trains; torch is imported only through :mod:`nlstm.params`, to judge runs of a store that
records neither the corpus's entropy nor its vocabulary. The layout's names come from :mod:`study.record.layout`
(no Ray, MLflow or torch behind it). ``study/write_report.py`` (``nlstm-report``) is the command line.
"""

from dashboards.load import StoreError, StudyData, StudyNotFoundError, default_tracking_uri, load_study

__all__ = ["StoreError", "StudyData", "StudyNotFoundError", "default_tracking_uri", "load_study"]
