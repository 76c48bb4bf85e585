"""`tunesmith predict CONFIG.yaml [key=value ...]`: generate a reply for every row of a test file and score it.

Takes LLaMA-Factory's predict YAML (`do_predict: true`, `predict_with_generate: true`, `eval_dataset`, `max_samples`,
`per_device_eval_batch_size`, `output_dir`, the model and generation keys); see config/predict.py.
"""

from __future__ import annotations

import argparse
import json

from tunesmith.config.predict import load_predict_config
from tunesmith.evaluate.predict import PREDICTIONS_FILE, RESULTS_FILE, run_predict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="predict YAML (LLaMA-Factory's do_predict configs work)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that win over the file, e.g. max_samples=10")


def run(args: argparse.Namespace) -> int:
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # no file, only overrides
        config_path, overrides = None, [config_path, *overrides]
    config = load_predict_config(config_path, overrides)
    results = run_predict(config)
    print(json.dumps(results, indent=2))
    output = config.predict.output_dir
    print(f"predict: wrote {output}/{PREDICTIONS_FILE} and {output}/{RESULTS_FILE}")
    return 0
