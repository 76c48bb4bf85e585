"""Rows/s of `tunesmith predict` (batched, left-padded, length-sorted) against a plain one-row-at-a-time loop.

    python -m bench.predict_speed [--model smollm2-135m-instruct] [--rows 32] [--batch-size 8] [--max-new-tokens 64]

Both generate greedily for the first `--rows` prompts of data/alpaca_en_demo.json with the same model (loaded once)
and the same stop tokens: the loop calls `model.generate` on one encoded prompt at a time; predict goes through
`run_predict` (which also writes its files and scores them; its scoring time is outside its measured seconds).
The replies must be identical; the script fails if they are not.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from tunesmith.chat import engine as chat_engine
from tunesmith.config.predict import load_predict_config
from tunesmith.evaluate import predict as predict_module
from tunesmith.evaluate.predict import read_prompt_rows, until_stop

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    output = Path(tempfile.mkdtemp(prefix="predict-speed-"))
    config = load_predict_config(
        None,
        [
            f"model_name_or_path={args.model}",
            f"eval_dataset={REPO / 'data' / 'alpaca_en_demo.json'}",
            f"max_samples={args.rows}",
            f"per_device_eval_batch_size={args.batch_size}",
            f"max_new_tokens={args.max_new_tokens}",
            "do_sample=false",
            f"output_dir={output}",
        ],
    )
    engine = chat_engine.load_chat_engine(config.inference.model)
    rows = read_prompt_rows(config.predict)

    started = time.perf_counter()
    loop_replies = []
    stop_ids = engine.stop_token_ids()
    for row in rows:
        encoded = engine.encode(row.messages)
        with torch.inference_mode():
            out = engine.model.generate(
                **encoded,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=engine.tokenizer.pad_token_id,
            )
        new = out[0, encoded["input_ids"].shape[1] :].tolist()
        loop_replies.append(engine.tokenizer.decode(until_stop(new, stop_ids), skip_special_tokens=True))
    loop_seconds = time.perf_counter() - started

    with mock.patch.object(predict_module, "load_chat_engine", return_value=engine):  # reuse the loaded model
        results = predict_module.run_predict(config)
    records = [json.loads(line) for line in (output / "generated_predictions.jsonl").read_text().splitlines()]
    same = sum(record["predict"] == reply for record, reply in zip(records, loop_replies, strict=True))
    report = {
        "model": args.model,
        "rows": len(rows),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "loop_rows_per_s": round(len(rows) / loop_seconds, 3),
        "predict_rows_per_s": results["predict_samples_per_second"],
        "speedup": round(results["predict_samples_per_second"] / (len(rows) / loop_seconds), 2),
        "identical_replies": f"{same}/{len(rows)}",
    }
    print(json.dumps(report, indent=2))
    if same != len(rows):
        raise SystemExit("batched replies differ from the one-row-at-a-time loop")


if __name__ == "__main__":
    main()
