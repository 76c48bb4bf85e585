"""Length-grouped batching: each row once per epoch, less padding, a function of (seed, epoch), and a resumed run
reads the same batches as an uninterrupted one."""

import random

import pytest

from tests.conftest import logged_losses, write_rows
from tunesmith.data.length_groups import (
    LengthGroupedSampler,
    length_grouped_order,
    length_grouped_sampler,
    padded_positions,
    row_lengths,
)
from tunesmith.errors import ConfigError


def lengths_of(count: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 500) for _ in range(count)]


@pytest.mark.parametrize("count, batch_size", [(1, 4), (7, 4), (96, 4), (1000, 8), (333, 3)])
def test_every_row_exactly_once_per_epoch(count, batch_size):
    lengths = lengths_of(count)
    for epoch in range(3):
        order = length_grouped_order(lengths, batch_size, seed=42, epoch=epoch)
        assert sorted(order) == list(range(count))


def test_the_order_is_a_function_of_seed_and_epoch():
    lengths = lengths_of(200)
    first = length_grouped_order(lengths, 4, seed=42, epoch=0)
    assert length_grouped_order(lengths, 4, seed=42, epoch=0) == first
    assert length_grouped_order(lengths, 4, seed=42, epoch=1) != first  # epochs differ
    assert length_grouped_order(lengths, 4, seed=7, epoch=0) != first  # seeds differ
    sampler = LengthGroupedSampler(lengths, 4, seed=42)
    sampler.set_epoch(1)
    assert list(sampler) == length_grouped_order(lengths, 4, seed=42, epoch=1)


def test_grouping_cuts_padding_and_starts_with_the_longest_batch():
    lengths = lengths_of(400)
    grouped = length_grouped_order(lengths, 4, seed=42, epoch=0)
    shuffled = list(range(400))
    random.Random(1).shuffle(shuffled)
    real = sum(lengths)
    assert padded_positions(lengths, grouped, 4) - real < 0.25 * (padded_positions(lengths, shuffled, 4) - real)
    assert max(lengths[i] for i in grouped[:4]) == max(lengths)
    batches = [tuple(sorted(grouped[i : i + 4])) for i in range(0, 400, 4)]
    other_epoch = length_grouped_order(lengths, 4, seed=42, epoch=1)
    assert batches != [tuple(sorted(other_epoch[i : i + 4])) for i in range(0, 400, 4)]  # batches are reshuffled


def test_lengths_come_from_the_arrow_column():
    from datasets import Dataset

    rows = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (3, 9, 1, 4)]
    dataset = Dataset.from_list(rows).select([3, 0, 2])  # an indices mapping, as train/eval splits make
    assert row_lengths(dataset) == [4, 3, 1]


def test_the_default_applies_to_unpacked_map_style_data_only(capsys):
    from datasets import Dataset

    dataset = Dataset.from_list([{"input_ids": [1] * n, "labels": [1] * n} for n in (3, 9, 1, 4, 8)])
    sampler = length_grouped_sampler(None, False, dataset, batch_size=2, seed=1)
    assert sorted(sampler) == [0, 1, 2, 3, 4]
    assert "padding positions per epoch" in capsys.readouterr().out
    assert length_grouped_sampler(None, True, dataset, 2, 1) is None  # packing: off
    assert length_grouped_sampler(False, False, dataset, 2, 1) is None
    with pytest.raises(ConfigError, match=r"group_by_length: true.*packing"):
        length_grouped_sampler(True, True, dataset, 2, 1)


def run_train(model_dir, data_file, output, *extra):
    from tunesmith.cli import main

    keys = [
        f"model_name_or_path={model_dir}",
        f"dataset={data_file}",
        "template=chatml",
        "cutoff_len=64",
        "finetuning_type=lora",
        "per_device_train_batch_size=2",
        "num_train_epochs=2",
        "learning_rate=1e-2",
        "logging_steps=1",
        "save_steps=3",
        "plot_loss=false",
        "seed=3",
        f"output_dir={output}",
        *extra,
    ]
    assert main(["train", *keys]) == 0


def test_a_run_resumed_mid_epoch_reads_the_same_batches(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """5 steps an epoch, 2 epochs; resumed from the checkpoint at step 3, the other 7 batches and losses are equal."""
    import shutil

    from tunesmith.train.trainer import TunesmithTrainer

    rows = [{"instruction": "word " * (3 + 5 * (i % 5)), "output": f"answer {i}"} for i in range(10)]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    seen: list[tuple[int, ...]] = []
    original_step = TunesmithTrainer.training_step

    def record(self, model, inputs, *args, **kwargs):
        seen.append(tuple(int(n) for n in inputs["attention_mask"].sum(1)))
        return original_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(TunesmithTrainer, "training_step", record)
    run_train(tiny_model_dir, data, tmp_path / "straight")
    assert "group_by_length:" in capsys.readouterr().out  # on by default, and said
    straight, seen[:] = list(seen), []
    assert len(straight) == 10 and len(set(straight[:5])) > 1

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(tmp_path / "straight" / "tunesmith_run.json", resumed)
    run_train(tiny_model_dir, data, resumed, "resume_from_checkpoint=true")
    assert seen == straight[3:]
    assert logged_losses(resumed) == pytest.approx(logged_losses(tmp_path / "straight")[3:], rel=1e-4)
