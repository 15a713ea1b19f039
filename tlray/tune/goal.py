"""Stopping a sweep at a goal (`tune.goal`): good enough is good enough.

Once a trial's epoch reaches the goal on `train.monitor` (in its direction), that trial
stops training and is tested (the loop checks the same goal, `TrainingState.record`), the
trials still running finish their current epoch and stop, and no new trial starts. The
best completed trial is registered as usual; the summary says the goal stopped the sweep.
"""

from __future__ import annotations

from ray import tune

from tlray.track.metrics import reaches
from tlray.train.protocol import is_final


class Goal(tune.Callback, tune.Stopper):
    """A Tune callback and stopper in the sweep's driver; the scheduler asks it too
    (`tlray.tune.sweep.epoch_asha`) before starting a trial."""

    def __init__(self, metric: str, mode: str, goal: float | None):
        self.metric, self.mode, self.goal = metric, mode, goal
        self.trial: str | None = None  # the first trial to reach it
        self.done = False  # that trial has ended (tested, logged)
        self.stopped: set[str] = set()  # trials the goal stopped
        self._trials: list = []

    @property
    def reached(self) -> bool:
        return self.trial is not None

    def __getstate__(self) -> dict:  # Tune saves its experiment state: not the trials
        return {**self.__dict__, "_trials": []}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._trials = trials
        if self.reached or is_final(result) or not reaches(result.get(self.metric), self.goal,
                                                            self.mode):
            return
        self.trial = trial.trial_id
        print(f"sweep: trial {trial.trial_id} reached the goal ({self.metric} "
              f"{result[self.metric]:.4g}, tune.goal {self.goal:g}): it is tested next; the "
              f"other running trials stop after their current epoch and no new one starts",
              flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done = self.done or trial.trial_id == self.trial

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.on_trial_complete(iteration, trials, trial)

    def __call__(self, trial_id: str, result: dict) -> bool:
        """Stops another trial at its next epoch report, once the goal is reached."""
        stop = self.reached and trial_id != self.trial and not is_final(result)
        if stop:
            self.stopped.add(trial_id)
        return stop

    def stop_all(self) -> bool:
        """Ends the sweep (no new trials; pending ones never start) once the goal's trial
        has ended and no other trial is still finishing its epoch."""
        return self.done and not any(t.status == "RUNNING" for t in self._trials)
