"""The search and the order of a study's trials: the Optuna space and samplers, the Tune searcher that hands out
every phase's trials from the record, the per-family scheduler, the Optuna storage."""
