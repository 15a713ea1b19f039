"""Writes the cells stand-in (`tlray.bench.standins`) as the NIH malaria folder layout.

    python jobs/make_cells.py ~/cells --images 6000 --size 64
    python jobs/tune_mnist.py --data ~/cells --budget 2m     # the main job's recipe on cells

Blood cells segmented on black, half with one to three small dark ring-shaped parasites,
half with none but with pale smudges and stain specks: a microscopy set built offline, to
judge a recipe on something other than the digits it was tuned on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tlray.bench.standins import write_cells
from tlray.cli.exit import exit_now


def main(argv: list[str] | None = None) -> int:
    first, _, rest = __doc__.strip().partition("\n")
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=first, epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="the folder to write (Parasitized/, "
                                                "Uninfected/)")
    parser.add_argument("--images", type=int, default=6000, help="how many, half each class")
    parser.add_argument("--size", type=int, default=64, help="side in px")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_cells(args.dest, args.images, args.size, args.seed))
    return 0


if __name__ == "__main__":
    exit_now(main())
