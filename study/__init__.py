"""Studies: one YAML file -> Ray Tune trials sampled by Optuna -> runs tracked in MLflow.

    python study/run.py --space search_spaces/smoke.yaml

Data flows one way, one concern per module:

- the study file: ``schema`` (the pydantic models) <- ``spec`` (safe YAML reading, ``load_spec``)
  with ``checks`` (what a schema cannot say) and ``spec_errors`` (``SpecError``, one line);
  ``smoke`` shrinks a study for ``--smoke``; ``catalog`` finds the built-in ones by name.
- planning: ``space`` (trial configurations, widths solved from the parameter budget), ``plan``
  (budgets against this machine, the dry-run plan and its estimates).
- running: ``phases`` (search, evaluate, ablation on Ray Tune; ``searcher``, ``optuna_store``),
  ``trial`` (one training run inside a Tune worker), ``progress`` (the progress line), ``cluster``
  (code and storage for other machines), ``cache`` (the study folder belongs to one MLflow record),
  ``processes`` (the private Ray's processes, stopped later).
- tracking in MLflow: ``layout`` (the names of docs/mlflow-layout.md, shared with ``dashboards``;
  imports nothing heavy), ``tracking`` (the driver), ``trial_run`` (a trial's run, in its worker),
  ``tracking_callback`` (what the driver records for trials that could not), ``lease``, ``store``.
- commands: ``run`` (``nlstm-study``), ``write_report`` (``nlstm-report``), ``ui`` (``nlstm-ui``).

Ray and MLflow appear only in this package, never in ``nlstm``.
"""
