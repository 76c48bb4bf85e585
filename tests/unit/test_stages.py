"""The stages trained through TRL (dpo and its losses, orpo, simpo, kto, grpo) on a tiny random Llama: the shipped
examples run, our ids reach TRL, the reference model is the one the log names, refusals come before loading."""

import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DEMO_DATA, REPO, at_once, example_for
from tests.unit.test_distributed import TWO_PROCESSES, needs_deepspeed, run_tunesmith
from tunesmith.cli import main
from tunesmith.config import load_config


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def example_args(example: str | Path, model: Path, output: Path, *overrides: str) -> list[str]:
    """`tunesmith train` on examples/`example` (or on the config file `example`, a path), a short run."""
    return [
        "train",
        str(REPO / "examples" / example),
        f"model_name_or_path={model}",
        f"dataset_dir={DEMO_DATA}",
        f"output_dir={output}",
        "max_steps=2",
        "max_samples=8",
        "cutoff_len=128",
        "logging_steps=1",
        "gradient_accumulation_steps=1",
        "learning_rate=1e-3",
        *overrides,
    ]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A full reward model as stage: rm saves one: a sequence classifier with one label, and the tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(3)
    target = tmp_path_factory.mktemp("tiny-rm")
    LlamaForSequenceClassification(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    return target


REWARDS = f"{REPO}/examples/grpo_rewards.py:answer_overlap,{REPO}/examples/grpo_rewards.py:brevity"
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@pytest.mark.parametrize(
    ("example", "overrides", "metrics"),
    [
        pytest.param("dpo_lora.yaml", (), PAIR_METRICS, id="dpo"),
        pytest.param("orpo_lora.yaml", (), (*PAIR_METRICS, "log_odds_ratio", "nll_loss"), id="orpo"),
        pytest.param("simpo_lora.yaml", (), PAIR_METRICS, id="simpo"),
        pytest.param("kto_lora.yaml", (), ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"), id="kto"),
        pytest.param(
            "grpo_lora.yaml",
            (f"reward_funcs={REWARDS}", "max_new_tokens=6", "per_device_train_batch_size=4"),
            ("reward", "rewards/answer_overlap/mean", "rewards/brevity/mean"),
            id="grpo",
        ),
    ],
)
def test_each_stage_example_trains_and_logs_its_metrics(
    example, overrides, metrics, tmp_path, tiny_model_dir, reward_model_dir, capsys
):
    if example == "grpo_lora.yaml":
        overrides = (*overrides, f"reward_model={reward_model_dir}")
        metrics = (*metrics, f"rewards/{reward_model_dir.name}/mean")
    output = tmp_path / "out"
    assert main(example_args(example, tiny_model_dir, output, *overrides)) == 0
    logged = [record for record in records(output) if "loss" in record]
    assert [record["step"] for record in logged] == [1, 2]
    missing = [name for name in metrics if name not in logged[0]]
    assert missing == [], sorted(logged[0])
    assert (output / "training_loss.png").is_file()
    adapter = load_file(output / "adapter_model.safetensors")
    assert any("lora_B" in name and tensor.abs().max() > 0 for name, tensor in adapter.items())  # it trained
    assert not (output / "ref").exists()  # TRL's frozen reference adapter is not part of the output
    if example in ("dpo_lora.yaml", "kto_lora.yaml"):
        assert "reference: the base model" in capsys.readouterr().out
    if example == "dpo_lora.yaml":  # plain peft loads the adapter as saved
        from peft import PeftModel, get_peft_model_state_dict
        from transformers import AutoModelForCausalLM

        reloaded = get_peft_model_state_dict(
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), output)
        )
        assert reloaded.keys() == adapter.keys()
        assert all(torch.equal(reloaded[name], adapter[name]) for name in adapter)


def test_preference_rows_reach_trl_as_our_ids_with_only_the_answers_in_the_loss(tiny_model_dir):
    """TRL's collator marks as completion exactly the tokens our data step supervised, for chosen and rejected."""
    import inspect

    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tunesmith.data.templates import use_chat_format
    from tunesmith.model.load import load_tokenizer
    from tunesmith.train.preference import load_dpo_rows, load_pairs

    # TRL tokenizes text rows in this method, which preference.py overrides: if TRL stops calling it, we must know
    assert "self._prepare_dataset(" in inspect.getsource(DPOTrainer.__init__)
    config = load_config(
        None, ["stage=dpo", "dataset=dpo_en_demo", f"dataset_dir={DEMO_DATA}", "max_samples=4", "cutoff_len=256"]
    )
    tokenizer = load_tokenizer(str(tiny_model_dir))
    template = use_chat_format(tokenizer, None, None).jinja
    ours = load_pairs(config, tokenizer, template).train
    rows = load_dpo_rows(config, tokenizer, template).train
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])
    count = len(rows)
    for index in range(count):
        for side, half in (("chosen", 0), ("rejected", 1)):
            ids, labels = ours[index][f"{side}_input_ids"], ours[index][f"{side}_labels"]
            row = half * count + index
            assert batch["input_ids"][row, : len(ids)].tolist() == ids
            assert batch["completion_mask"][row, : len(ids)].tolist() == [int(label != -100) for label in labels]
            assert sum(batch["completion_mask"][row].tolist()) == sum(label != -100 for label in labels)


def test_dpo_on_an_sft_adapter_takes_that_adapter_as_the_reference(tmp_path, tiny_model_dir, capsys):
    """At the first step the policy is the reference, so every implicit reward is 0; were the reference the bare base
    model, the adapter's non-zero weights would make them differ from 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    sft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    )
    sft.save_pretrained(tmp_path / "sft")
    output = tmp_path / "dpo"
    args = [
        "train",
        "stage=dpo",
        f"model_name_or_path={tiny_model_dir}",
        f"adapter_name_or_path={tmp_path / 'sft'}",
        "dataset=dpo_en_demo",
        f"dataset_dir={DEMO_DATA}",
        f"output_dir={output}",
        "per_device_train_batch_size=2",
        "cutoff_len=128",
        "max_steps=1",
        "logging_steps=1",
        "bf16=false",
    ]
    assert main(args) == 0
    assert "reference: the adapter this run continues" in capsys.readouterr().out
    first = records(output)[0]
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert first["logps/chosen"] != 0.0

    # the same adapter named as ref_model_adapters, under a new adapter on the bare base: the rewards move from 0
    args = [arg for arg in args if not arg.startswith(("adapter_name_or_path=", "output_dir="))]
    reference = [f"ref_model={tiny_model_dir}", f"ref_model_adapters={tmp_path / 'sft'}"]
    assert main([*args, *reference, f"output_dir={tmp_path / 'ref'}"]) == 0
    assert f"reference: {tiny_model_dir} with {tmp_path / 'sft'} merged (ref_model)" in capsys.readouterr().out
    assert records(tmp_path / "ref")[0]["rewards/chosen"] != 0.0


def test_full_dpo_with_precomputed_reference_log_probs_trains_as_with_a_second_copy(tmp_path, tiny_model_dir, capsys):
    common = ("bf16=false", "max_steps=2")
    config = example_for("dpo_lora.yaml", "full", tmp_path)
    assert main([*example_args(config, tiny_model_dir, tmp_path / "copy", *common)]) == 0
    assert "reference: a second, frozen copy" in capsys.readouterr().out
    precomputed = ("precompute_ref_log_probs=true",)
    assert main([*example_args(config, tiny_model_dir, tmp_path / "pre", *common, *precomputed)]) == 0
    assert "computed once, no second copy" in capsys.readouterr().out
    for copy, pre in zip(records(tmp_path / "copy"), records(tmp_path / "pre"), strict=True):
        for name in ("loss", "rewards/chosen", "rewards/rejected"):
            if name in copy:
                assert copy[name] == pytest.approx(pre[name], abs=1e-5), name
    weights = load_file(tmp_path / "pre" / "model.safetensors")
    before = load_file(tiny_model_dir / "model.safetensors")
    assert max((weights[name] - before[name]).abs().max().item() for name in before) > 1e-4


def test_dpo_batch_in_passes_of_one_pair_gives_the_gradient_of_one_pass(tmp_path, tiny_model_dir, capsys):
    """pairs_per_forward: auto (1 on a CPU) against the whole batch of 4 in one pass, as TRL runs it: float32, the
    same weights after 2 steps and the same logged loss, gradient norm (a wrong scale would show) and rewards."""
    common = ("max_steps=2", "max_samples=8", "bf16=false", "per_device_train_batch_size=4", "warmup_ratio=0")
    assert main(example_args("dpo_lora.yaml", tiny_model_dir, tmp_path / "one", *common, "pairs_per_forward=4")) == 0
    assert "runs as 1 forward/backward pass(es)" in capsys.readouterr().out
    assert main(example_args("dpo_lora.yaml", tiny_model_dir, tmp_path / "passes", *common)) == 0
    assert "pairs_per_forward: 1 (auto): each batch of 4 pair(s) runs as 4 forward/backward" in capsys.readouterr().out
    expected = load_file(tmp_path / "one" / "adapter_model.safetensors")
    got = load_file(tmp_path / "passes" / "adapter_model.safetensors")
    assert max((expected[name] - got[name]).abs().max().item() for name in expected) <= 1e-5
    assert max(tensor.abs().max().item() for name, tensor in got.items() if "lora_B" in name) > 1e-3
    for one, passes in zip(records(tmp_path / "one"), records(tmp_path / "passes"), strict=True):
        for name in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies"):
            if name in one:
                assert one[name] == pytest.approx(passes[name], abs=1e-5), name


def test_memory_estimate_counts_the_reference_copy_unless_precomputed(tiny_model_dir):
    from tunesmith.estimate.memory import estimate_peak_memory

    model_config = json.loads((tiny_model_dir / "config.json").read_text())

    def estimate(*overrides: str, device: str = "cpu"):
        config = load_config(None, ["dataset=dpo_en_demo", "bf16=false", *overrides])
        return estimate_peak_memory(config, model_config, device=device, gradient_checkpointing=False)

    sft = estimate("stage=sft", "finetuning_type=full")
    dpo = estimate("stage=dpo", "finetuning_type=full")
    precomputed = estimate("stage=dpo", "finetuning_type=full", "precompute_ref_log_probs=true")
    lora = estimate("stage=dpo")
    parameters = sum(load_file(tiny_model_dir / "model.safetensors")[n].numel() for n in ["model.embed_tokens.weight"])
    assert dpo.reference >= parameters * 4  # float32 weights, embeddings included
    assert precomputed.reference == lora.reference == sft.reference == 0
    two_rows = estimate("stage=sft", "finetuning_type=full", "per_device_train_batch_size=2")
    assert dpo.activations == two_rows.activations > sft.activations  # a pair's chosen and rejected rows in one batch
    assert dpo.total_bytes - precomputed.total_bytes == dpo.reference

    # pairs_per_forward: auto holds one pair's activations on a CPU and the whole batch's on a GPU
    four = ("stage=dpo", "per_device_train_batch_size=4")
    assert estimate(*four).activations == lora.activations < estimate(*four, "pairs_per_forward=4").activations
    on_gpu = estimate(*four, device="cuda").activations
    assert on_gpu == estimate(*four, "pairs_per_forward=4", device="cuda").activations


def test_reward_model_loads_as_a_full_model_or_a_lora_adapter(tmp_path, tiny_model_dir, reward_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from tunesmith.train.grpo import load_reward_model

    config = load_config(
        None, ["stage=grpo", "dataset=x", "reward_funcs=x.py:f", "num_generations=2", "per_device_train_batch_size=2"]
    )
    precision = SimpleNamespace(dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    full, _ = load_reward_model(str(reward_model_dir), config, precision)
    expected = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, expected(ids).logits)

    torch.manual_seed(1)
    lora = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(reward_model_dir),
        LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"], init_lora_weights=False),
    )
    lora.save_pretrained(tmp_path / "rm-lora")
    merged, tokenizer = load_reward_model(str(tmp_path / "rm-lora"), config, precision)
    with torch.no_grad():
        want = lora.eval()(ids).logits
        assert torch.allclose(merged(ids).logits, want, atol=1e-5)
        assert not torch.allclose(want, expected(ids).logits)  # the adapter changed the scores
    assert tokenizer.pad_token_id is not None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage=ppo"], "use stage: grpo"),
        (["stage=kto"], "per_device_train_batch_size of 2 or more"),
        (["stage=dpo", "dpo_label_smoothing=0.1"], "no cDPO"),
        (["stage=dpo", "pref_loss=kto_pair"], "use stage: kto"),
        (["stage=sft", "pref_beta=0.2"], "`pref_beta` is not used by stage: sft"),
        (["stage=dpo", "pref_loss=orpo", "ref_model=x"], "`ref_model` is not used by stage: dpo with pref_loss: orpo"),
        (["stage=kto", "per_device_train_batch_size=2", "pref_ftx=0.1"], "`pref_ftx` is not used by stage: kto"),
        (["stage=dpo", "packing=true"], "`packing` with stage: dpo"),
        (["stage=kto", "per_device_train_batch_size=2", "pairs_per_forward=1"], "`pairs_per_forward` is not used"),
        (["stage=dpo", "per_device_train_batch_size=4", "pairs_per_forward=3"], "must divide"),
        (["stage=grpo"], "needs a reward"),
        (["stage=grpo", "reward_funcs=rewards:fn"], "path/to/file.py:function_name"),
        (["stage=grpo", "reward_funcs=r.py:fn", "num_generations=3"], "a multiple of it"),
    ],
)
def test_stage_settings_that_cannot_work_are_refused_before_loading(overrides, message, tmp_path, capsys):
    args = ["train", "model_name_or_path=/nonexistent", "dataset=dpo_en_demo", f"output_dir={tmp_path}", *overrides]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_grpo_reward_function_that_is_not_there_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "rewards.py").write_text("def other(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    args = ["train", "stage=grpo", "model_name_or_path=/nonexistent", "dataset=identity", f"output_dir={tmp_path}"]
    assert (
        main(
            [
                *args,
                f"reward_funcs={tmp_path / 'rewards.py'}:missing",
                "num_generations=2",
                "per_device_train_batch_size=2",
            ]
        )
        == 2
    )
    assert "has no function missing" in capsys.readouterr().err


def test_data_check_reads_each_stage_as_its_recipe_does(tiny_model_dir, capsys):
    """kto takes preference pairs (unpaired in the recipe) besides kto_tag rows; grpo takes SFT rows."""
    common = [f"model_name_or_path={tiny_model_dir}", f"dataset_dir={DEMO_DATA}", "per_device_train_batch_size=2"]
    assert main(["data", "check", "stage=kto", "dataset=dpo_en_demo,kto_en_demo", *common]) == 0
    assert "40 rows, 0 bad" in capsys.readouterr().out
    grpo = ["stage=grpo", "dataset=alpaca_en_demo", "reward_funcs=r.py:f", "num_generations=2"]
    assert main(["data", "check", *grpo, *common]) == 0
    assert "0 bad" in capsys.readouterr().out


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param((), id="ddp"),
        pytest.param(("deepspeed=ds_z2",), marks=needs_deepspeed, id="zero2"),
        pytest.param(("fsdp=full_shard auto_wrap",), id="fsdp"),
    ],
)
def test_two_process_dpo_matches_one_process_with_the_same_global_batch(engine, tmp_path, tiny_model_dir):
    # float32 and 3 steps of 4 rows: the weights agree to 1e-5 only if both runs saw the same pairs in each step
    common = ("max_steps=3", "max_samples=12", "bf16=false", "optim=adamw_torch", "lr_scheduler_type=linear")
    one, two = tmp_path / "one", tmp_path / "two"
    one_args = example_args("dpo_lora.yaml", tiny_model_dir, one, *common, "per_device_train_batch_size=4")
    args = example_args("dpo_lora.yaml", tiny_model_dir, two, *common, "per_device_train_batch_size=2")
    # the 1-process run in this process while the 2-process job starts up
    exit_code, result = at_once(partial(main, one_args), partial(run_tunesmith, [*args, "nproc_per_node=2", *engine]))
    assert exit_code == 0
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert TWO_PROCESSES in result.stdout
    if "fsdp" in " ".join(engine):
        assert "fsdp: FSDP2 over 2 process(es)" in result.stdout  # sharded, not a silent fallback to DDP
    expected, got = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    worst = max((expected[name] - got[name]).abs().max().item() for name in expected)
    assert worst <= 1e-5, worst
    assert max(tensor.abs().max().item() for name, tensor in got.items() if "lora_B" in name) > 1e-3
    steps = [record["step"] for record in records(two) if "loss" in record]
    assert steps == [1, 2, 3]  # rank 0 alone writes metrics.jsonl


def test_dpo_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """The LoRA reference ("ref" adapter) is rebuilt from the starting adapter, not from the checkpoint's."""
    import shutil

    settings = ("max_steps=4", "save_steps=2", "bf16=false", "lr_scheduler_type=linear", "warmup_ratio=0")
    straight = tmp_path / "straight"
    assert main(example_args("dpo_lora.yaml", tiny_model_dir, straight, *settings)) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(straight / "tunesmith_run.json", resumed)
    resume = ("resume_from_checkpoint=true", "overwrite_output_dir=false")
    assert main(example_args("dpo_lora.yaml", tiny_model_dir, resumed, *settings, *resume)) == 0
    expected = load_file(straight / "adapter_model.safetensors")
    got = load_file(resumed / "adapter_model.safetensors")
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6
    at_step_2 = load_file(straight / "checkpoint-2" / "adapter_model.safetensors")
    assert max((expected[k] - at_step_2[k]).abs().max().item() for k in expected) > 1e-4
    first_resumed = next(record for record in records(resumed) if "rewards/margins" in record)
    assert first_resumed["step"] == 3


def test_precompute_auto_turns_on_only_when_the_second_copy_would_not_fit(tiny_model_dir, monkeypatch):
    from tunesmith.estimate import memory

    config = load_config(None, ["stage=dpo", "dataset=x", "finetuning_type=full", "precompute_ref_log_probs=auto"])
    monkeypatch.setattr(memory, "available_memory", lambda device: 64 * memory.GiB)
    assert memory.auto_precompute(config, str(tiny_model_dir), "cpu")[0] is False
    monkeypatch.setattr(memory, "available_memory", lambda device: memory.GiB // 2)
    enabled, reason = memory.auto_precompute(config, str(tiny_model_dir), "cpu")
    assert enabled and "second copy as the reference" in reason


def test_ctrl_c_during_dpo_saves_a_whole_checkpoint_that_resumes(tmp_path, tiny_model_dir, monkeypatch):
    """The TRL stage trainers share SFT's Ctrl-C handling and write checkpoints the same whole way."""
    import os
    import signal

    from transformers import TrainerCallback

    from tunesmith.train import trl_stage

    class CtrlCAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # as a person pressing Ctrl-C during step 2

    shared_callbacks = trl_stage.run_callbacks
    monkeypatch.setattr(trl_stage, "run_callbacks", lambda config: [CtrlCAtStep2(), *shared_callbacks(config)])
    output = tmp_path / "out"
    args = example_args("dpo_lora.yaml", tiny_model_dir, output, "max_steps=4", "save_steps=100")
    assert main(args) == 130
    assert [path.name for path in output.iterdir() if "checkpoint" in path.name] == ["checkpoint-2"]
    assert (output / "checkpoint-2" / "tunesmith_run.json").is_file()  # the run's fingerprint, written before rename
    assert not (output / "adapter_model.safetensors").exists()

    monkeypatch.setattr(trl_stage, "run_callbacks", shared_callbacks)
    assert main([*args, "resume_from_checkpoint=true", "overwrite_output_dir=false"]) == 0
    # steps 1-2 from the interrupted run, 3-4 from the resumed one (a fresh start would log 1 and 2 again)
    assert [record["step"] for record in records(output) if "rewards/margins" in record] == [1, 2, 3, 4]
    assert (output / "adapter_model.safetensors").is_file()


def test_freeze_dpo_trains_only_the_last_layers(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "out"
    args = example_args(
        example_for("dpo_lora.yaml", "freeze", tmp_path), tiny_model_dir, output, "freeze_trainable_layers=1"
    )
    assert main(args) == 0
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(output).state_dict()
    last = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.num_hidden_layers - 1
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(f"layers.{last}." in name for name in changed)
