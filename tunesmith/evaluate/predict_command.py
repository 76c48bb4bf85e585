"""`tunesmith predict CONFIG.yaml [key=value ...]`: generate a reply for every row of a test file and score it.

Takes LLaMA-Factory's predict YAML (`do_predict: true`, `predict_with_generate: true`, `eval_dataset`, `max_samples`,
`per_device_eval_batch_size`, `output_dir`, the model and generation keys); see config/predict.py.

Under torchrun (`torchrun --nproc_per_node 2 -m tunesmith predict cfg.yaml`) every process loads the model, generates
its share of the rows and appends them to its own partial file; rank 0 then writes them all in input order.
"""

from __future__ import annotations

import argparse
import json

from tunesmith.config.predict import load_predict_config
from tunesmith.distributed import launch, process_group
from tunesmith.evaluate.predict import PREDICTIONS_FILE, RESULTS_FILE, run_predict

PROCESS_GROUP_TIMEOUT_S = 3 * 3600  # the slowest process's share of the rows must finish within it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="predict YAML (LLaMA-Factory's do_predict configs work)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that win over the file, e.g. max_samples=10")


def run(args: argparse.Namespace) -> int:
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # no file, only overrides
        config_path, overrides = None, [config_path, *overrides]
    config = load_predict_config(config_path, overrides)
    in_torchrun = launch.launched_by_torchrun()
    if in_torchrun:
        process_group.join(PROCESS_GROUP_TIMEOUT_S)  # ranks other than 0 print nothing from here
    results = run_predict(config)
    if in_torchrun:
        process_group.leave()
    print(json.dumps(results, indent=2))
    output = config.predict.output_dir
    print(f"predict: wrote {output}/{PREDICTIONS_FILE} and {output}/{RESULTS_FILE}")
    return 0
