"""tlray's speed benchmarks, each against a baseline measured in the same run.

    python jobs/benchmark.py train            # Ray Train + Ray Data loop vs a plain PyTorch loop
    python jobs/benchmark.py sweep            # the MNIST sweep with vs without the feature cache
    python jobs/benchmark.py ingest           # Ray Data ingest vs a plain pyarrow read

Same as `tlray benchmark ...`; every option of those works here (e.g. `train --json`).
"""

from __future__ import annotations

import sys

from tlray.cli.exit import exit_now
from tlray.cli.main import main

if __name__ == "__main__":
    exit_now(main(["benchmark", *sys.argv[1:]]))
