"""Per-epoch metrics to MLflow from a training worker (rank 0), buffered so that a tracking
outage loses nothing."""

from __future__ import annotations

import math
import sys
import time


class EpochLogger:
    """Per-epoch metrics to MLflow from rank 0, buffered so a tracking outage loses nothing.

    A failed write (e.g. the MLflow server restarting) keeps the rows and retries them with
    the next epoch and, finally, with a few pauses at the end of the run.
    """

    def __init__(self, run_id: str | None, tracking_uri: str | None, enabled: bool):
        self.enabled = enabled and run_id is not None
        self.run_id, self.pending = run_id, []
        if self.enabled:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def log(self, values: dict, step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in values.items()
                         if isinstance(v, (int, float)) and math.isfinite(float(v))]
        self.flush()

    def tag(self, key: str, value: str) -> None:
        """A run tag, e.g. the Ray nodes the workers ran on; best effort."""
        if self.enabled:
            try:
                self.client.set_tag(self.run_id, key, value)
            except Exception as e:  # noqa: BLE001 - a tag is not worth failing a run for
                sys.stderr.write(f"could not set MLflow tag {key} ({type(e).__name__})\n")

    def get_tag(self, key: str) -> str | None:
        """A run tag's value (None if unset, empty or unreadable); best effort."""
        if not self.enabled:
            return None
        try:
            return self.client.get_run(self.run_id).data.tags.get(key) or None
        except Exception:  # noqa: BLE001 - the caller goes on without it
            return None

    def log_missing(self, history: list[dict], extra=lambda row: {}) -> None:
        """Logs the epochs of `history` that the run lacks: a restarted run's checkpoint
        may hold an epoch whose metrics were never written (killed in between), and
        logging one twice would show it twice. Judged by `val_loss`, logged every epoch."""
        if not self.enabled or not history:
            return
        try:
            logged = {m.step for m in self.client.get_metric_history(self.run_id, "val_loss")}
        except Exception:  # noqa: BLE001 - unknown: leave the history as it is
            return
        for row in history:
            if row["epoch"] not in logged:
                self.log({**row, **extra(row)}, row["epoch"])

    def flush(self) -> bool:
        try:
            for start in range(0, len(self.pending), 500):
                self.client.log_batch(self.run_id, metrics=self.pending[start:start + 500])
        except Exception as e:  # noqa: BLE001 - any tracking failure is retried later
            sys.stderr.write(f"MLflow unavailable ({type(e).__name__}: {e}); keeping "
                             f"{len(self.pending)} metric value(s) to retry\n")
            return False
        self.pending = []
        return True

    def close(self, attempts: int = 10, pause: float = 3.0) -> None:
        for _ in range(attempts):
            if not self.enabled or not self.pending or self.flush():
                return
            time.sleep(pause)

