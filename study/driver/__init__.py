"""Driving a study: the phases in one Tune experiment, the progress line, the cluster and storage, the driver's
processes."""
