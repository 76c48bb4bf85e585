"""`python -m bench.tunesmith_run --json OUT -- train CONFIG key=value ...`: the tunesmith CLI, measured.

Runs `tunesmith.cli.main` unchanged inside `measure_training()` and writes the measurement as JSON.
"""

from __future__ import annotations

import argparse

from bench.probe import measure_training


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", required=True, help="where to write the measurement")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="arguments for `tunesmith`, after --")
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv

    from tunesmith.cli import main as tunesmith_main

    with measure_training() as measurement:
        status = tunesmith_main(argv)
    if status == 0:
        measurement.write(args.json)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
