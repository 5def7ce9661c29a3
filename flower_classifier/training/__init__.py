"""Training: the run's configuration, what an epoch iterates over (tasks), the optimiser, the
epoch loop and the whole run."""
