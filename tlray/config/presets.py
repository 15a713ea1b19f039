"""Named default settings shared by a job script and the benchmark that times it.

`MNIST_SWEEP` is `jobs/tune_mnist.py`'s default sweep (and what `tlray benchmark sweep` runs
with and without the feature cache). It is sized for a 2-core laptop, where it takes 1.5-4
minutes (3.5-4 on this project's 2-core box in December 2026): two trials at a time (0.75 CPU each, one thread each, each in its own Tune trial
process), half a CPU left for Ray Data; 48 px inputs and freeze depths 0-3, which reach ~99%
test accuracy on the built-in digits (deeper freezing costs accuracy on digits: ~98.7% at
depth 6, ~97% at 7, ~91% for a linear probe, all at 48 px; 40 px lost 0.8% in one run).
Five epochs, as in the original experiment; ASHA may stop a trial after its second epoch.
"""

from __future__ import annotations

MNIST_SWEEP = ["--data.image_size=48", "--data.batch_size=64", "--train.epochs=5",
               "--train.monitor=val_acc", "--optim.name=adamw", "--tune.num_samples=4",
               "--tune.lr_min=1e-3", "--tune.lr_max=6e-3", "--tune.freeze=0,1,3",
               "--tune.grace_period=2", "--scaling.num_workers=1",
               "--scaling.cpus_per_worker=0.75"]
