"""MLflow: runs that never stay RUNNING (`runs`), per-epoch metrics from a worker
(`epoch_log`), the registry and its `@champion` (`registry`), plots and metrics."""
