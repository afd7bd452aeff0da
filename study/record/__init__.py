"""The record of a study: the MLflow layout's names, the driver's runs, the store, the lease, the study folder,
the Tune callback that records how trials ended, and URLs without passwords."""
