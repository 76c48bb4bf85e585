from pathlib import Path

import pytest

from tests.conftest import REPO
from tunesmith.config import load_config
from tunesmith.config.load import KEY_TO_SECTION, parse_overrides
from tunesmith.config.sections import SECTIONS
from tunesmith.errors import ConfigError, NotSupportedYet

# The LLaMA-Factory keys issue 2 lists; each must be accepted as it is.
LLAMAFACTORY_KEYS = [
    "model_name_or_path",
    "template",
    "stage",
    "do_train",
    "finetuning_type",
    "lora_target",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "dataset",
    "dataset_dir",
    "cutoff_len",
    "max_samples",
    "val_size",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "output_dir",
    "overwrite_output_dir",
    "overwrite_cache",
    "plot_loss",
    "bf16",
    "fp16",
    "report_to",
    "resume_from_checkpoint",
    "seed",
    "preprocessing_num_workers",
    "trust_remote_code",
]


def test_every_llamafactory_key_is_accepted():
    missing = [key for key in LLAMAFACTORY_KEYS if key not in KEY_TO_SECTION]
    assert missing == []


def test_each_key_lives_in_exactly_one_section():
    seen: dict[str, str] = {}
    for section, model in SECTIONS.items():
        for key in model.model_fields:
            assert key not in seen, f"{key} is in both {seen[key]} and {section}"
            seen[key] = section


def test_override_wins_over_file(tmp_path: Path):
    path = tmp_path / "cfg.yaml"
    path.write_text("dataset: identity\nlearning_rate: 1.0e-4\nlora_target: q_proj,v_proj\n")
    config = load_config(path, ["learning_rate=3e-4", "name=Tunesmith", "author=the tunesmith team"])
    assert config.train.learning_rate == pytest.approx(3e-4)
    assert config.method.lora_target == ["q_proj", "v_proj"]
    assert (config.data.name, config.data.author) == ("Tunesmith", "the tunesmith team")


def test_nested_sections_dotted_keys_and_aliases(tmp_path: Path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  learning_rate: 0.01\ndata:\n  dataset: [a, b]\n")
    config = load_config(path, ["method.lora_rank=4", "lora_r=16", "micro_batch_size=2"])
    assert config.train.learning_rate == 0.01
    assert config.data.dataset == ["a", "b"]
    assert config.method.lora_rank == 16  # the later alias wins over the dotted key
    assert config.train.per_device_train_batch_size == 2


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key `learning_rat`.*did you mean learning_rate"):
        load_config(None, ["dataset=x", "learning_rat=1e-4"])


def test_bad_value_names_field_value_and_valid_choices():
    with pytest.raises(ConfigError, match=r"`finetuning_type`: got 'qlora'; expected 'lora', 'full' or 'freeze'"):
        load_config(None, ["dataset=x", "finetuning_type=qlora"])
    with pytest.raises(ConfigError, match=r"`lora_rank`: got 0"):
        load_config(None, ["dataset=x", "lora_rank=0"])


@pytest.mark.parametrize(
    ("override", "feature"), [("rope_scaling=linear", "RoPE scaling"), ("do_train=false", "do_train")]
)
def test_later_features_are_refused_not_ignored(override, feature):
    with pytest.raises(NotSupportedYet, match=feature):
        load_config(None, ["dataset=x", override])


def test_override_values_are_typed():
    assert parse_overrides(["a=1e-4", "b=true", "c=3", "d=x,y", "e=", "f=[1, 2]"]) == {
        "a": 1e-4,
        "b": True,
        "c": 3,
        "d": "x,y",
        "e": "",
        "f": [1, 2],
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["learning_rate"])


def test_override_text_stays_text_and_broken_yaml_is_refused():
    typed = [
        "name=Tunesmith",
        'author="the tunesmith team"',  # the quotes reached us: YAML removes them
        "lora_target=q_proj,v_proj",
        "template=llama3",
        "default_system=Answer: yes",  # YAML would read a mapping
        "a=*bold* @home",  # YAML would refuse an alias and a reserved character
        "column_map={prompt: instruction}",
    ]
    assert parse_overrides(typed) == {
        "name": "Tunesmith",
        "author": "the tunesmith team",
        "lora_target": "q_proj,v_proj",
        "template": "llama3",
        "default_system": "Answer: yes",
        "a": "*bold* @home",
        "column_map": {"prompt": "instruction"},
    }
    for broken in ("x=[1,2", 'x="a b', "x={a: 1"):
        with pytest.raises(ConfigError, match=r"`x=.*` is not valid YAML \(.*\): a value that starts with \["):
            parse_overrides([broken])


def test_val_size_fraction_or_count():
    assert load_config(None, ["dataset=x", "val_size=0.1"]).data.val_size == 0.1
    assert load_config(None, ["dataset=x", "val_size=20"]).data.val_size == 20
    with pytest.raises(ConfigError, match="val_size"):
        load_config(None, ["dataset=x", "val_size=2.5"])


def test_loggers_are_checked_before_anything_loads():
    assert load_config(None, ["dataset=x", "report_to=tensorboard"]).train.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"`report_to`: .*unknown logger 'tensorbaord'"):
        load_config(None, ["dataset=x", "report_to=tensorbaord"])


def test_do_train_false_is_refused_not_ignored():
    with pytest.raises(NotSupportedYet, match="do_train: false"):
        load_config(None, ["dataset=x", "do_train=false"])


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda path: path.name)
def test_every_example_config_is_valid(example):
    """Each is also run: identity_lora.yaml by e2e/test_identity.py, qlora_alpaca.yaml by e2e/test_quantized_smollm2,
    the `tunesmith export` configs (they hold export_dir) by unit/test_export_examples.py, tang_qlora.yaml and the
    `tunesmith predict` config predict_tang.yaml by unit/test_tang_examples.py."""
    from tunesmith.config.export import load_export_config
    from tunesmith.config.load import read_yaml
    from tunesmith.config.predict import load_predict_config

    if "export_dir" in read_yaml(example):
        assert load_export_config(example).inference.model.adapter_name_or_path
        return
    if read_yaml(example).get("do_predict") and "dataset" not in read_yaml(example):
        assert load_predict_config(example).predict.datasets
        return
    config = load_config(example, ["name=Tunesmith", "author=us"])
    assert config.data.dataset


def test_eval_strategy_no_survives_yaml_reading_it_as_false():
    assert load_config(None, ["dataset=x", "eval_strategy=no"]).train.eval_strategy == "no"
    with pytest.raises(ConfigError, match="eval_strategy"):
        load_config(None, ["dataset=x", "eval_strategy=true"])


# A key each finetuning_type's code reads beside its own: what makes the one-type key read (sft.apply_method).
ENABLING_KEYS = {
    "pissa_iter": {"pissa_init": True},
    "loraplus_lr_embedding": {"loraplus_lr_ratio": 16.0},
    "create_new_adapter": {"adapter_name_or_path": ["outputs/earlier"]},
}


def method_only_keys() -> list[tuple[str, str]]:
    from tunesmith.config.sections import METHOD_ONLY_KEYS

    return [(owner, key) for owner, keys in METHOD_ONLY_KEYS.items() for key in keys]


@pytest.mark.parametrize(("owner", "key"), method_only_keys())
def test_a_key_of_another_finetuning_type_is_refused_when_set(owner, key):
    """Set even to its default value, a key the chosen type never reads is refused (LLaMA-Factory ignores it)."""
    from tunesmith.config.load import build_config
    from tunesmith.config.sections import MethodSection

    value = MethodSection().model_dump()[key]
    for finetuning_type in {"lora", "full", "freeze"} - {owner}:
        with pytest.raises(ConfigError, match=rf"{key} needs finetuning_type: {owner} \(got {finetuning_type}\); "):
            build_config({"dataset": ["x"], "finetuning_type": finetuning_type, key: value})
        # not set: nothing to refuse
        assert build_config({"dataset": ["x"], "finetuning_type": finetuning_type}).method.finetuning_type
    config = build_config({"dataset": ["x"], "finetuning_type": owner, key: value, **ENABLING_KEYS.get(key, {})})
    assert getattr(config.method, key) == value


def test_a_pasted_full_config_with_lora_keys_names_them_all_and_the_way_out(tmp_path: Path):
    path = tmp_path / "full.yaml"
    path.write_text(
        "stage: sft\nfinetuning_type: full\nlora_rank: 8  # Not used in full\nlora_target: all\ndataset: x\n"
    )
    message = (
        r"lora_rank, lora_target need finetuning_type: lora \(got full\); remove them, or set finetuning_type: lora"
    )
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    assert load_config(path, ["finetuning_type=lora"]).method.lora_rank == 8  # a LoRA key with lora still works
    # the keys every type reads are accepted with full
    full = load_config(None, ["dataset=x", "finetuning_type=full", "neftune_noise_alpha=5", "chunked_loss=false"])
    assert (full.method.neftune_noise_alpha, full.method.chunked_loss) == (5, False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pissa_iter=4"], "pissa_iter is read only with pissa_init: true; remove pissa_iter, or set pissa_init"),
        (["loraplus_lr_embedding=1e-5"], "loraplus_lr_embedding is read only with loraplus_lr_ratio"),
        (["finetuning_type=full", "galore_rank=4"], "galore_rank is read only with use_galore: true"),
        (["create_new_adapter=false"], "`create_new_adapter: false` .* none is set; remove create_new_adapter"),
    ],
)
def test_a_key_whose_switch_is_off_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["dataset=x", *overrides])
