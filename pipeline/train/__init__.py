"""Training jobs on Ray Train: the job config, the driver, the per-worker loop, batches,
checkpoints and the placement-group reaper."""
