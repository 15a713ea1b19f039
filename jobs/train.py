"""One training run: `python jobs/train.py [--config FILE] [--section.key VALUE ...]`.

The same as `tlray train`; handy with `ray job submit --working-dir . -- python jobs/train.py`.
"""

from tlray.cli.exit import exit_now
from tlray.cli.jobs import run_job

if __name__ == "__main__":
    exit_now(run_job("train", None, doc=__doc__))
