"""Packing: whole examples per row, deterministic; the packed loss and logits equal the unpacked ones; e2e run."""

import json
import random

import pytest
import torch
from datasets import Dataset

from tests.unit.test_train import train_args
from tunesmith.cli import main
from tunesmith.data.collate import PackedBatches, PadToLongest, attention_layout
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.data.packing import pack_dataset, pack_lengths
from tunesmith.errors import ConfigError

QUESTIONS = [
    ("Hi", "Hello! How can I help?"),
    ("What is two plus three?", "Two plus three is five."),
    ("Name a colour.", "Blue."),
    ("Write one sentence about the sea.", "The sea is wide, salty and never quite still, even on the calmest day."),
    ("Who are you?", "I am a small assistant trained to answer short questions politely and briefly."),
    ("Count to five.", "One, two, three, four, five."),
    ("Say yes.", "Yes."),
]
CUTOFF_LEN = 160


@pytest.fixture(scope="module")
def examples(tiny_model_dir) -> list[dict]:
    """Chat examples of unequal length, rendered with SmolLM2's template. Labels on the answer only, except every
    third example, trained on its prompt too (train_on_prompt): its first token has a label that packing must drop."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = []
    for question, answer in QUESTIONS:
        prompt = [{"role": "user", "content": question}]
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
        full = [*prompt, {"role": "assistant", "content": answer}]
        input_ids = tokenizer.apply_chat_template(full, return_dict=False)
        assert input_ids[: len(prompt_ids)] == prompt_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :]
        if len(encoded) % 3 == 1:
            labels = list(input_ids)
        encoded.append({"input_ids": input_ids, "labels": labels})
    return encoded


@pytest.fixture(scope="module")
def packed(examples) -> Dataset:
    dataset, _ = pack_dataset(Dataset.from_list(examples), CUTOFF_LEN, seed=0)
    return dataset


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=request.param).eval()


def unpack(row: dict) -> list[list[int]]:
    """The examples of a packed row, cut by its seq_lens."""
    pieces, start = [], 0
    for length in row["seq_lens"]:
        pieces.append(row["input_ids"][start : start + length])
        start += length
    return pieces


def test_rows_hold_whole_examples_within_cutoff_len_and_packing_is_deterministic():
    lengths = [random.Random(i).randint(1, 100) for i in range(300)]
    rows = pack_lengths(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(300))  # every example exactly once
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 128) * 11 // 9 + 1  # best-fit decreasing: near the lower bound
    assert rows == pack_lengths(lengths, 128)
    with pytest.raises(ValueError, match="example 1 has 129 tokens"):
        pack_lengths([5, 129], 128)


def test_packed_dataset_keeps_every_example_intact(examples, packed):
    dataset = Dataset.from_list(examples)
    again, stats = pack_dataset(dataset, CUTOFF_LEN, seed=0)
    assert again.to_list() == packed.to_list()
    assert stats.examples == len(examples) and stats.rows == len(packed) < len(examples)
    assert stats.tokens == sum(len(e["input_ids"]) for e in examples)
    assert "7 examples → " in stats.summary()
    rebuilt = sorted(piece for row in packed for piece in unpack(row))
    assert rebuilt == sorted(e["input_ids"] for e in examples)
    assert all(len(row["input_ids"]) <= CUTOFF_LEN and len(row["labels"]) == len(row["input_ids"]) for row in packed)
    assert max(len(row["seq_lens"]) for row in packed) >= 3  # several examples share a row
    with pytest.raises(ConfigError, match="streamed"):
        pack_dataset(dataset.to_iterable_dataset(), CUTOFF_LEN, seed=0)


def test_positions_restart_and_no_label_crosses_a_boundary():
    row = {"input_ids": [11, 12, 13, 21, 22, 31, 32, 33, 34], "labels": [-100, 12, 13, 21, 22, 31, 32, 33, 34]}
    row["seq_lens"] = [3, 2, 4]
    short = {"input_ids": [41, 42], "labels": [41, 42], "seq_lens": [2]}
    batch = PackedBatches(pad_token_id=0, layout="bool_mask")([row, short])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 0, 0, 0, 0, 0, 0, 0]]
    # the first token of each example is never a target: the last token of one example does not learn the next
    assert batch["labels"].tolist() == [
        [-100, 12, 13, -100, 22, -100, 32, 33, 34],
        [-100, 42, -100, -100, -100, -100, -100, -100, -100],
    ]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 9, 9) and mask.dtype == torch.bool
    blocks = torch.block_diag(torch.ones(3, 3), torch.ones(2, 2), torch.ones(4, 4)).bool().tril()
    assert torch.equal(mask[0, 0], blocks)
    # the second row: its example, then padding that attends only to itself
    assert torch.equal(mask[1, 0], torch.block_diag(torch.ones(2, 2).tril(), torch.eye(7)).bool())

    additive = PackedBatches(pad_token_id=0, layout="float_mask")([row])["attention_mask"]
    assert additive.dtype == torch.float32
    assert torch.equal(additive[0, 0] == 0, blocks) and additive.min() == torch.finfo(torch.float32).min


def test_flash_attention_gets_one_flat_row_with_restarting_positions():
    """The varlen layout of transformers' DataCollatorWithFlattening. No GPU here: the layout is checked, not run."""
    rows = [
        {"input_ids": [11, 12, 13, 21, 22], "labels": [11, 12, 13, 21, 22], "seq_lens": [3, 2]},
        {"input_ids": [31, 32], "labels": [-100, 32], "seq_lens": [2]},
    ]
    batch = PackedBatches(pad_token_id=0, layout="varlen")(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no mask: flash-attention reads the positions
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, 32]]


def test_layout_follows_the_attention_implementation():
    assert attention_layout("sdpa") == "bool_mask"
    assert attention_layout("eager") == "float_mask"
    assert attention_layout("flash_attention_2") == "varlen"
    assert attention_layout("kernels-community/flash-attn2") == "varlen"
    with pytest.raises(ConfigError, match="packing supports the sdpa, eager and flash attention"):
        attention_layout("flex_attention")


def supervised_targets(labels: torch.Tensor) -> int:
    """Tokens the shifted causal-LM loss is taken on: what Trainer passes as num_items_in_batch."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def test_packed_loss_equals_the_unpacked_loss(model, examples, packed):
    """One packed batch (several rows, padding) vs. the same examples unpacked, as one padded batch and one by one.

    All three are means over every supervised token (token-weighted), which is what Trainer's num_items_in_batch
    normalisation computes over a batch: so the loss and the supervised-token count must both match.
    """
    pad_token_id = model.config.pad_token_id
    packed_batch = PackedBatches.for_model(pad_token_id, model)(packed.to_list())
    unpacked_batch = PadToLongest(pad_token_id)(examples)
    assert packed_batch["input_ids"].shape[0] < len(examples)
    assert supervised_targets(packed_batch["labels"]) == supervised_targets(unpacked_batch["labels"])
    with torch.no_grad():
        packed_loss = model(**packed_batch).loss.item()
        unpacked_loss = model(**unpacked_batch).loss.item()
        one_by_one = [
            (model(**PadToLongest(pad_token_id)([e])).loss.item(), supervised_targets(torch.tensor(e["labels"])))
            for e in examples
        ]
    token_weighted = sum(loss * count for loss, count in one_by_one) / sum(count for _, count in one_by_one)
    assert abs(packed_loss - unpacked_loss) <= 1e-4
    assert abs(packed_loss - token_weighted) <= 1e-4


def logits_by_example(model, batch: dict, rows: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = model(**batch).logits
    pieces = []
    for r, row in enumerate(rows):
        start = 0
        for length in row["seq_lens"]:
            pieces.append(logits[r, start : start + length])
            start += length
    return pieces


def test_every_packed_example_has_the_logits_it_has_alone(model, packed):
    rows = packed.to_list()
    batch = PackedBatches.for_model(model.config.pad_token_id, model)(rows)
    assert (batch["input_ids"] == model.config.pad_token_id).any()  # padding is there, and must not matter
    examples = [piece for row in rows for piece in unpack(row)]
    for example, in_pack in zip(examples, logits_by_example(model, batch, rows), strict=True):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([example])).logits[0]
        assert (in_pack - alone).abs().max().item() < 1e-5

    # control: with restarted positions but a plain causal mask, a later example of a row does see the earlier ones,
    # and the comparison above catches it
    leaky = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    row = max(range(len(rows)), key=lambda r: len(rows[r]["seq_lens"]))
    second = sum(len(rows[r]["seq_lens"]) for r in range(row)) + 1
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([examples[second]])).logits[0]
    assert (logits_by_example(model, leaky, rows)[second] - alone).abs().max().item() > 1e-3


def test_changing_one_example_leaves_the_others_unchanged(model, packed):
    rows = packed.to_list()
    collate = PackedBatches.for_model(model.config.pad_token_id, model)
    before = logits_by_example(model, collate(rows), rows)
    for changed in range(len(rows[0]["seq_lens"])):  # each example of the first row in turn, first to last
        start = sum(rows[0]["seq_lens"][:changed])
        edited = [dict(row) for row in rows]
        edited[0]["input_ids"] = list(rows[0]["input_ids"])
        for i in range(start, start + rows[0]["seq_lens"][changed]):
            edited[0]["input_ids"][i] = (edited[0]["input_ids"][i] * 7 + 13) % 1000 + 100
        after = logits_by_example(model, collate(edited), edited)
        for index, (old, new) in enumerate(zip(before, after, strict=True)):
            if index == changed:
                assert (old - new).abs().max().item() > 1e-3
            else:
                assert (old - new).abs().max().item() <= 1e-6


@pytest.mark.parametrize("key", ["packing", "neat_packing"])
def test_train_with_packing_runs(tmp_path, tiny_model_dir, identity_data, capsys, key):
    assert main(train_args(tmp_path, tiny_model_dir, identity_data, f"{key}=true", "val_size=4", "eval_steps=2")) == 0
    out = capsys.readouterr().out
    assert "packing: 12 examples → " in out
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any("eval_loss" in r and torch.isfinite(torch.tensor(r["eval_loss"])) for r in records)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
