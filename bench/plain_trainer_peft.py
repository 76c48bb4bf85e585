"""The identity run written the way the tutorials write it: Transformers `Trainer` + peft, nothing of tunesmith.

Alpaca-LoRA / Hugging Face blog style: load the model, wrap it with `get_peft_model`, read the data with
`datasets.load_dataset`, tokenize every row to `max_length` (padding included), mask the prompt out of the labels
(`train_on_inputs=False`) and hand everything to `Trainer`. Same model, rows, chat template, LoRA and
hyperparameters as `examples/identity_lora.yaml`.

    python -m bench.plain_trainer_peft [--steps 20] [--model-dir DIR] [--json out.json]

`--data`, `--rows`, `--lr`, `--epochs`, `--batch-size`, `--max-length` run other work the same way
(bench.compare: the first rows of alpaca_en_demo.json). The only additions to the tutorial recipe are the
measurements (bench.probe), marked below.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from bench.probe import build_messages, measure_training, read_rows

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_LENGTH = 512


def tokenize_row(
    row: dict[str, Any], tokenizer, name: str, author: str, max_length: int, pad_to_max_length: bool = True
) -> dict[str, list[int]]:
    messages = build_messages(row, name, author)
    full_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    user_prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    padding = "max_length" if pad_to_max_length else False  # False: the collator pads each batch to its longest
    tokenized = tokenizer(
        full_prompt, padding=padding, max_length=max_length, truncation=True, add_special_tokens=False
    )
    user_prompt_len = len(tokenizer(user_prompt, add_special_tokens=False)["input_ids"])
    labels = list(tokenized["input_ids"])
    labels[:user_prompt_len] = [-100] * user_prompt_len  # train_on_inputs=False
    # Padding masked by the attention mask: this tokenizer pads with <|im_end|>, which also ends the answer, so
    # the tutorials' `labels[labels == pad_token_id] = -100` would drop the end-of-turn label as well.
    labels = [label if keep else -100 for label, keep in zip(labels, tokenized["attention_mask"], strict=True)]
    return {"input_ids": tokenized["input_ids"], "attention_mask": tokenized["attention_mask"], "labels": labels}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="Hugging Face model directory (default: tunesmith's converted SmolLM2)")
    parser.add_argument("--data", default="data/identity.json")
    parser.add_argument("--name", default="Tunesmith")
    parser.add_argument("--author", default="the tunesmith team")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps; -1: num_train_epochs decides")
    parser.add_argument("--rows", type=int, help="train on the first N rows of --data (default: all)")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="rows are truncated to this length")
    parser.add_argument(
        "--padding",
        choices=["max_length", "dynamic"],
        default="max_length",
        help="max_length: every row padded to --max-length when tokenized; dynamic: the collator pads each batch "
        "to its longest row (DataCollatorForSeq2Seq(padding=True), the other tutorial recipe)",
    )
    parser.add_argument("--eval-rows", type=int, help="after training, score the model on the first N rows of --data")
    parser.add_argument("--output-dir", help="Trainer output_dir (default: a temporary directory)")
    parser.add_argument("--json", help="write the measurement to this JSON file")
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    model_dir = args.model_dir
    if model_dir is None:  # the same local copy tunesmith trains; converted from GGUF once, then cached
        from tunesmith.model.resolve import resolve_model

        model_dir = resolve_model("smollm2-135m-instruct")

    set_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    lora_config = LoraConfig(
        r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora_config)
    model.print_trainable_parameters()

    data = load_dataset("json", data_files=args.data)["train"]
    if args.rows is not None:
        data = data.select(range(min(args.rows, len(data))))
    train_data = data.map(
        lambda row: tokenize_row(
            row, tokenizer, args.name, args.author, args.max_length, pad_to_max_length=args.padding == "max_length"
        ),
        remove_columns=data.column_names,
    )

    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=args.output_dir or scratch,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=0.1,  # transformers 5: a float below 1 is a ratio (warmup_ratio is gone)
            num_train_epochs=args.epochs,
            max_steps=args.steps,
            seed=42,
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=train_data,
            data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
            processing_class=tokenizer,  # (the tutorials pass it as tokenizer=; the bench scores rows with it)
        )
        eval_rows = read_rows(args.data, args.eval_rows) if args.eval_rows else None
        # bench only: times train() and counts tokens, then scores eval_rows; see bench.probe
        with measure_training(eval_rows, args.max_length) as measurement:
            trainer.train()

    print(
        f"plain: {measurement.steps} steps in {measurement.train_seconds:.1f} s; {measurement.tokens} tokens "
        f"({measurement.padded_tokens} with padding), {measurement.supervised_tokens} supervised; "
        f"final loss {measurement.final_loss:.4f}; peak RSS {measurement.peak_rss_mib:.0f} MiB"
    )
    if args.json:
        measurement.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
