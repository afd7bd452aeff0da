"""Studies: one YAML file -> Ray Tune trials sampled by Optuna -> runs tracked in MLflow.

    python study/run.py --space search_spaces/smoke.yaml

Data flows one way: ``spec`` (the validated YAML) -> ``space`` (trial configurations, widths
solved from the parameter budget) -> ``trial`` (one training run inside a Tune worker) ->
``tracking`` (MLflow, the layout of docs/mlflow-layout.md). ``phases`` runs search, evaluate and
ablation; ``run`` is the command line. Ray and MLflow appear only in this package, never in
``nlstm``.
"""
