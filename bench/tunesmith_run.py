"""`python -m bench.tunesmith_run --json OUT [--eval-data F --eval-rows N] -- train CONFIG key=value ...`.

Runs `tunesmith.cli.main` unchanged inside `measure_training()` (after the allocator re-execution that `tunesmith
train` does as a program) and writes the measurement as JSON; with
`--eval-data`, the trained model is then scored on the first `--eval-rows` rows of that file (bench.probe).
"""

from __future__ import annotations

import argparse

from bench.probe import measure_training, read_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", required=True, help="where to write the measurement")
    parser.add_argument("--eval-data", help="alpaca JSON file whose first rows score the trained model")
    parser.add_argument("--eval-rows", type=int, default=32, help="how many rows of --eval-data")
    parser.add_argument("--max-length", type=int, default=512, help="truncation of the scored rows")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="arguments for `tunesmith`, after --")
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv

    from tunesmith.cli import main as tunesmith_main
    from tunesmith.train.command import use_fast_cpu_allocator

    use_fast_cpu_allocator()  # as `tunesmith train` does when run as a program; this process runs it in-process

    eval_rows = read_rows(args.eval_data, args.eval_rows) if args.eval_data else None
    with measure_training(eval_rows, args.max_length) as measurement:
        status = tunesmith_main(argv)
    if status == 0:
        measurement.write(args.json)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
