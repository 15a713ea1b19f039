"""One training run on Ray Train: the driver's preflight plan, the typed protocol between the
driver and its workers, the per-worker loop, launching it, and logging the finished run."""
