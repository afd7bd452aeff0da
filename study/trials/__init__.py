"""Running one trial on a Ray worker: the Tune trainable, its MLflow run, its checkpoints, its corpus
and where it runs."""
