"""One training run: `python jobs/train.py [--config FILE] [--section.key=value ...]`.

The same as `tlray train`; handy with `ray job submit --working-dir . -- python jobs/train.py`.
"""

import sys

from tlray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
