"""MLflow: where runs are stored (`store`), runs that never stay RUNNING (`runs`), what a run
records (`params`, `run_metrics`, `figures`, `datasets`), per-epoch metrics from a worker
(`epoch_log`), the registry and its `@champion` (`registry`), plots and metrics."""
