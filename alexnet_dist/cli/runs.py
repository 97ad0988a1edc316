"""alexnet-runs DIR: a table of the finished runs under DIR (every results.json at any depth: a run
directory, a sweep, runs/ as a whole), a row per run with its command-line overrides, validation
top-1 and loss, training images per second and run directory; the same table a sweep ends with."""

import argparse
import sys
from pathlib import Path

from ..errors import DataError
from ..training.summary import RESULTS, finished_runs, table
from . import one_line_errors


class Parser(argparse.ArgumentParser):
    """argparse, answering a wrong argument in one `error:` line like the other commands."""

    def error(self, message):
        print(f"error: {message} (alexnet-runs --help shows the usage)", file=sys.stderr)
        sys.exit(2)


def runs(argv=None) -> None:
    p = Parser(prog="alexnet-runs", description=__doc__)
    p.add_argument("dir", type=Path, help="a folder of runs (searched at any depth), e.g. runs/ or runs/smoke/SWEEP")
    folder = p.parse_args(argv).dir
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; give the folder of a run, a sweep, or runs/")
    rows = finished_runs(folder)
    if not rows:
        raise DataError(
            f"{folder}: no finished run under it (no {RESULTS} at any depth); a run writes one when it ends"
        )
    print(table(rows), end="")


def main(argv=None) -> None:
    one_line_errors(runs)(argv)


if __name__ == "__main__":
    main()
