"""torchtune recipe configs (nested `_component_` keys) → tunesmith's flat keys, each key mapped consciously.

`tunesmith train 8B_lora_single_device.yaml checkpointer.checkpoint_dir=... key=value` reads a torchtune config as
`tune run` would: dotted overrides (and `~key` to delete one) are applied to the nested tree first, then `${a.b}`
references are filled in, then every key is translated here. What has a tunesmith meaning is mapped; what changes
nothing in tunesmith is accepted with a note that says why; a component or key we cannot honour is refused with its
name. A top-level key that torchtune does not have but tunesmith does (`max_steps=3`, `nproc_per_node=2`) is taken as
tunesmith's own.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError

COMPONENT = "_component_"

# torchtune model family (the module under torchtune.models) → the Hugging Face model_type of its checkpoints
FAMILIES: dict[str, set[str]] = {
    "llama2": {"llama"},
    "code_llama2": {"llama"},
    "llama3": {"llama"},
    "llama3_1": {"llama"},
    "llama3_2": {"llama"},
    "llama3_3": {"llama"},
    "mistral": {"mistral"},
    "qwen2": {"qwen2"},
    "qwen2_5": {"qwen2"},
    "qwen3": {"qwen3"},
    "gemma": {"gemma"},
    "gemma2": {"gemma2"},
}
# torchtune's names of the attention projections → the Hugging Face names of these families
ATTENTION_MODULES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]  # torchtune's w1, w3, w2

OPTIMIZERS = {
    "torch.optim.AdamW": "adamw_torch",
    "torch.optim.SGD": "sgd",
    "bitsandbytes.optim.PagedAdamW8bit": "paged_adamw_8bit",
    "bitsandbytes.optim.PagedAdamW": "paged_adamw_32bit",
    "bitsandbytes.optim.AdamW8bit": "adamw_8bit",
    "torchao.optim.AdamW8bit": "adamw_8bit",
}
LOSSES = {  # each computes cross-entropy over the supervised tokens only; ours does that a chunk at a time
    "torchtune.modules.loss.CEWithChunkedOutputLoss",
    "torchtune.modules.loss.LinearCrossEntropyLoss",
    "torch.nn.CrossEntropyLoss",
}
LOGGERS = {
    "torchtune.training.metric_logging.DiskLogger": None,  # our metrics.jsonl is the disk log
    "torchtune.training.metric_logging.StdoutLogger": None,  # the progress line is
    "torchtune.training.metric_logging.TensorBoardLogger": "tensorboard",
    "torchtune.training.metric_logging.WandBLogger": "wandb",
    "torchtune.training.metric_logging.MLFlowLogger": "mlflow",
}
PROMPT_TEMPLATES = {"torchtune.data.SummarizeTemplate": "summarize"}
FILE_SOURCES = {"json", "csv", "parquet", "text", "arrow"}
SPLIT_SLICE = re.compile(r"^train\[(?P<start>\d*)%?:(?P<end>\d*)%?\]$")
REFERENCE = re.compile(r"\$\{([^}]+)\}")


def is_torchtune_config(raw: Mapping[str, Any]) -> bool:
    """A torchtune config names its parts by `_component_`, which no LLaMA-Factory or tunesmith key uses."""
    return any(isinstance(value, Mapping) and COMPONENT in value for value in raw.values())


def apply_overrides(
    raw: Mapping[str, Any], overrides: Iterable[str], parse_value: Callable[[str, str], Any]
) -> dict[str, Any]:
    """`tune run`'s overrides on the nested tree: `a.b=value` sets, `~a.b` deletes."""
    tree = copy.deepcopy(dict(raw))
    for pair in overrides:
        if pair.startswith("~"):
            *parents, last = pair[1:].split(".")
            node = _walk(tree, parents, pair)
            if last not in node:
                raise ConfigError(f"override {pair!r}: the config has no key {pair[1:]!r} to delete")
            del node[last]
            continue
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} is not of the form key=value (for example optimizer.lr=1e-4)")
        *parents, last = key.strip().lstrip("-").split(".")
        _walk(tree, parents, pair, create=True)[last] = parse_value(key, text)
    return tree


def _walk(tree: dict, parents: list[str], pair: str, create: bool = False) -> dict:
    node = tree
    for part in parents:
        if create and part not in node:
            node[part] = {}
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"override {pair!r}: {part!r} is not a section of the config")
        node = node[part]
    return node


def resolve_references(tree: dict[str, Any]) -> dict[str, Any]:
    """`${output_dir}/logs` → the value of output_dir followed by /logs (OmegaConf's interpolation, as torchtune)."""

    def lookup(path: str) -> Any:
        node: Any = tree
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ConfigError(f"`${{{path}}}` refers to a key the config does not have")
            node = node[part]
        return fill(node)

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            whole = REFERENCE.fullmatch(value)
            if whole:
                return lookup(whole[1])
            return REFERENCE.sub(lambda match: str(lookup(match[1])), value)
        if isinstance(value, Mapping):
            return {key: fill(inner) for key, inner in value.items()}
        if isinstance(value, list):
            return [fill(inner) for inner in value]
        return value

    return fill(tree)


def translate(
    raw: Mapping[str, Any],
    overrides: Iterable[str],
    parse_value: Callable[[str, str], Any],
    our_keys: Iterable[str],
    note: Callable[[str], None] = print,
) -> dict:
    """A torchtune config (and `tune run` overrides) → tunesmith's flat keys (`our_keys`), not validated yet.

    `parse_value(key, text)` reads an override's value as `key=value` does for tunesmith keys."""
    tree = resolve_references(apply_overrides(raw, overrides, parse_value))
    translation = Translation(note, set(our_keys))
    translation.run(tree)
    return translation.values


class Translation:
    """One pass over a torchtune tree: each top-level key has one handler; what no handler takes is refused."""

    def __init__(self, note: Callable[[str], None], our_keys: set[str]) -> None:
        self.values: dict[str, Any] = {}
        self.note = note
        self.our_keys = our_keys

    def run(self, tree: dict[str, Any]) -> None:
        handlers: dict[str, Callable[[Any], None]] = {
            "output_dir": self.set_to("output_dir"),
            "model": self.model,
            "tokenizer": lambda value: None,  # after checkpointer: it is checked against checkpoint_dir
            "checkpointer": self.checkpointer,
            "resume_from_checkpoint": lambda value: self.set("resume_from_checkpoint", bool(value) or None),
            "save_adapter_weights_only": self.save_adapter_weights_only,
            "dataset": self.dataset,
            "dataset_val": lambda value: None,  # with dataset: it is read against dataset's split
            "run_val_every_n_steps": lambda value: None,
            "batch_size_val": self.set_to("per_device_eval_batch_size"),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.set_to("per_device_train_batch_size"),
            "optimizer": self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            "loss": self.loss,
            "epochs": self.set_to("num_train_epochs"),
            "max_steps_per_epoch": lambda value: None,  # after epochs: max_steps = epochs x this
            "gradient_accumulation_steps": self.set_to("gradient_accumulation_steps"),
            "clip_grad_norm": lambda value: None,  # below: absent and null both mean no clipping
            "compile": self.set_to("torch_compile"),
            "metric_logger": self.metric_logger,
            "log_every_n_steps": self.set_to("logging_steps"),
            "log_peak_memory_stats": self.accepted("log_peak_memory_stats", "`tunesmith estimate` predicts peaks"),
            "log_level": self.accepted("log_level", "tunesmith's own detail is `--verbose`"),
            "device": self.device,
            "dtype": self.dtype,
            "enable_activation_checkpointing": lambda value: None,  # below, with offloading
            "enable_activation_offloading": lambda value: None,
            "profiler": self.profiler,
            "custom_sharded_layers": self.accepted("custom_sharded_layers", "FSDP shards each decoder layer"),
            "fsdp_cpu_offload": self.set_to("fsdp_offload"),
            "fsdp_reshard_after_forward": self.reshard_after_forward,
            "low_cpu_ram": self.refused_when_true("low_cpu_ram", "loading on rank 0 alone is not built"),
        }
        for key, value in tree.items():
            if key in handlers:
                handlers[key](value)
            elif key in self.our_keys:
                self.values[key] = value  # a tunesmith key added to the torchtune config
            else:
                raise ConfigError(f"torchtune key `{key}` has no tunesmith meaning; remove it (~{key})")
        self.tokenizer(tree.get("tokenizer") or {})
        checkpointer = tree.get("checkpointer") or {}
        self.check_family(Path(str(checkpointer.get("checkpoint_dir", ""))), checkpointer.get("model_type"))
        self.validation(tree.get("dataset"), tree.get("dataset_val"), tree.get("run_val_every_n_steps"))
        self.steps(tree)
        self.max_grad_norm(tree.get("clip_grad_norm"))
        self.checkpointing(tree.get("enable_activation_checkpointing"), tree.get("enable_activation_offloading"))

    # helpers
    def set(self, key: str, value: Any) -> None:
        if value is not None:
            self.values[key] = value

    def set_to(self, key: str) -> Callable[[Any], None]:
        return lambda value: self.set(key, value)

    def accepted(self, key: str, meaning: str) -> Callable[[Any], None]:
        """A key that changes nothing here: taken, and the note says why."""
        return lambda value: self.note(f"torchtune `{key}: {value}`: {meaning}")

    def refused_when_true(self, key: str, reason: str) -> Callable[[Any], None]:
        def check(value: Any) -> None:
            if value:
                raise ConfigError(f"torchtune `{key}: {value!r}`: {reason}; remove it")

        return check

    @staticmethod
    def component(section: str, value: Any) -> tuple[str, dict[str, Any]]:
        if not isinstance(value, Mapping) or COMPONENT not in value:
            raise ConfigError(f"torchtune `{section}` must be a mapping with a `_component_`, got {value!r}")
        arguments = {key: inner for key, inner in value.items() if key != COMPONENT}
        return str(value[COMPONENT]), arguments

    @staticmethod
    def unused(section: str, component: str, arguments: Mapping[str, Any], known: Iterable[str]) -> None:
        extra = sorted(set(arguments) - set(known))
        if extra:
            raise ConfigError(
                f"torchtune `{section}` ({component}): {', '.join(extra)} cannot be mapped to tunesmith; "
                f"remove {' '.join('~' + section + '.' + key for key in extra)}"
            )

    # model
    def model(self, value: Any) -> None:
        component, arguments = self.component("model", value)
        match = re.fullmatch(r"torchtune\.models\.(?P<family>\w+)\.(?P<kind>lora_|qlora_)?(?P<builder>\w+)", component)
        if not match or match["family"] not in FAMILIES:
            families = ", ".join(sorted(FAMILIES))
            raise ConfigError(f"torchtune model `{component}` cannot be mapped; tunesmith maps the families {families}")
        self.family = match["family"]
        size = match["builder"].removeprefix(match["family"] + "_")
        self.note(
            f"torchtune model {component}: family {self.family}, size {size}; the checkpoint's config.json gives "
            "the shape"
        )
        if match["kind"] is None:
            self.values["finetuning_type"] = "full"
            self.unused("model", component, arguments, ())
            return
        self.values["finetuning_type"] = "lora"
        if match["kind"] == "qlora_" or arguments.get("quantize_base"):
            self.values["quantization_bit"] = 4
        self.unused(
            "model",
            component,
            arguments,
            (
                "lora_attn_modules",
                "apply_lora_to_mlp",
                "apply_lora_to_output",
                "lora_rank",
                "lora_alpha",
                "lora_dropout",
                "use_dora",
                "quantize_base",
            ),
        )
        targets = []
        for module in arguments.get("lora_attn_modules", ["q_proj", "v_proj"]):
            if module not in ATTENTION_MODULES:
                raise ConfigError(
                    f"torchtune `model.lora_attn_modules`: {module!r} is not one of {list(ATTENTION_MODULES)}"
                )
            if ATTENTION_MODULES[module] not in targets:  # torchtune configs sometimes list one twice
                targets.append(ATTENTION_MODULES[module])
        if arguments.get("apply_lora_to_mlp"):
            targets += MLP_MODULES
        if arguments.get("apply_lora_to_output"):
            raise ConfigError(
                "torchtune `model.apply_lora_to_output: True` (LoRA on the output head) is not built; set it False, "
                "or train the head in full with additional_target=lm_head"
            )
        self.values["lora_target"] = targets
        for ours, theirs in (("lora_rank", "lora_rank"), ("lora_dropout", "lora_dropout"), ("use_dora", "use_dora")):
            self.set(ours, arguments.get(theirs))
        alpha = arguments.get("lora_alpha")
        if alpha is not None:
            if float(alpha) != int(alpha):
                raise ConfigError(f"torchtune `model.lora_alpha: {alpha}`: tunesmith takes a whole number")
            self.values["lora_alpha"] = int(alpha)

    # checkpointer and tokenizer
    def checkpointer(self, value: Any) -> None:
        component, arguments = self.component("checkpointer", value)
        if component != "torchtune.training.FullModelHFCheckpointer":
            raise ConfigError(
                f"torchtune checkpointer `{component}` cannot be mapped: tunesmith reads Hugging Face checkpoints "
                "(torchtune.training.FullModelHFCheckpointer, a folder with config.json)"
            )
        self.unused(
            "checkpointer",
            component,
            arguments,
            (
                "checkpoint_dir",
                "checkpoint_files",
                "recipe_checkpoint",
                "output_dir",
                "model_type",
                "adapter_checkpoint",
            ),
        )
        if "checkpoint_dir" not in arguments:
            raise ConfigError("torchtune `checkpointer.checkpoint_dir` is missing: the folder of the model")
        directory = Path(str(arguments["checkpoint_dir"])).expanduser()
        self.checkpoint_dir = directory
        self.values["model_name_or_path"] = str(directory)
        check_checkpoint_files(directory, arguments.get("checkpoint_files"))
        if arguments.get("recipe_checkpoint"):
            raise ConfigError(
                "torchtune `checkpointer.recipe_checkpoint` is torchtune's optimizer state, which tunesmith cannot "
                "read; resume a tunesmith run with resume_from_checkpoint=true"
            )
        if arguments.get("adapter_checkpoint"):
            self.values["adapter_name_or_path"] = [str(directory / str(arguments["adapter_checkpoint"]))]

    def check_family(self, directory: Path, model_type: Any) -> None:
        config_file = directory.expanduser() / "config.json"
        family = getattr(self, "family", None)
        if family is None or not config_file.is_file():
            return  # no model component yet, or no folder: resolving the model says what is missing
        found = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        if found not in FAMILIES[family]:
            raise ConfigError(
                f"torchtune model family {family} expects a {'/'.join(sorted(FAMILIES[family]))} checkpoint, but "
                f"{config_file} says model_type {found!r}; fix the model component or checkpointer.checkpoint_dir"
            )
        if model_type is not None and not str(model_type).lower().startswith(family.split("_")[0].rstrip("0123456789")):
            raise ConfigError(f"torchtune `checkpointer.model_type: {model_type}` does not match the family {family}")

    def tokenizer(self, value: Any) -> None:
        if not value:
            return
        component, arguments = self.component("tokenizer", value)
        family = component.removeprefix("torchtune.models.").split(".")[0]
        if family not in FAMILIES:
            raise ConfigError(f"torchtune tokenizer `{component}` cannot be mapped")
        self.unused("tokenizer", component, arguments, ("path", "max_seq_len", "prompt_template", "merges_file"))
        directory = getattr(self, "checkpoint_dir", None)
        for key in ("path", "merges_file"):
            if key in arguments and directory is not None:
                path = Path(str(arguments[key])).expanduser().resolve()
                if directory.resolve() not in path.parents:
                    raise ConfigError(
                        f"torchtune `tokenizer.{key}: {arguments[key]}` is outside checkpointer.checkpoint_dir "
                        f"{directory}: tunesmith loads the tokenizer saved with the model there; point it inside"
                    )
        self.set("cutoff_len", arguments.get("max_seq_len"))
        if arguments.get("max_seq_len") is None:
            self.note("torchtune `tokenizer.max_seq_len: null`: tunesmith still cuts examples at cutoff_len (2048)")
        template = arguments.get("prompt_template")
        if template is not None:
            if template not in PROMPT_TEMPLATES:
                raise ConfigError(
                    f"torchtune prompt template `{template}` cannot be mapped; known: {', '.join(PROMPT_TEMPLATES)}"
                )
            self.values["template"] = PROMPT_TEMPLATES[template]

    def save_adapter_weights_only(self, value: Any) -> None:
        if not value:
            self.note(
                "torchtune `save_adapter_weights_only: False`: tunesmith saves the adapter; merge it into the "
                "model with `tunesmith export`"
            )

    # data
    def dataset(self, value: Any) -> None:
        parts = value if isinstance(value, list) else [value]
        for part in parts:
            self.one_dataset(part)

    def one_dataset(self, value: Any) -> None:
        component, arguments = self.component("dataset", value)
        name = component.rpartition(".")[2]
        defaults = {
            "alpaca_dataset": "tatsu-lab/alpaca",
            "alpaca_cleaned_dataset": "yahma/alpaca-cleaned",
            "instruct_dataset": None,
            "chat_dataset": None,
        }
        if not component.startswith("torchtune.datasets.") or name not in defaults:
            raise ConfigError(
                f"torchtune dataset `{component}` cannot be mapped; save the data as a file and use "
                "torchtune.datasets.instruct_dataset (source: json, data_files: FILE, column_map)"
            )
        known = ["source", "data_files", "column_map", "split", "train_on_input", "packed"]
        known += ["conversation_column", "conversation_style"] if name == "chat_dataset" else []
        self.unused("dataset", component, arguments, known)
        source = arguments.get("source", defaults[name])
        if source not in FILE_SOURCES:
            raise ConfigError(
                f"torchtune `dataset.source: {source}` is a hub dataset, which tunesmith reads through a "
                "dataset_info.json entry; download it as a file and set dataset.source=json dataset.data_files=FILE"
            )
        files = arguments.get("data_files")
        if not files:
            raise ConfigError(f"torchtune `dataset.source: {source}` needs `data_files`: the file to read")
        self.values.setdefault("dataset", []).extend(files if isinstance(files, list) else [files])
        self.set("packing", arguments.get("packed"))
        train_on_input = arguments.get("train_on_input", name.startswith("alpaca"))  # alpaca's default is True
        self.values["train_on_prompt"] = bool(train_on_input)
        column_map = dict(arguments.get("column_map") or {})
        if name == "instruct_dataset":  # torchtune's `input` column is the prompt, which we call instruction
            column_map = {("instruction" if key == "input" else key): column for key, column in column_map.items()}
        if name == "chat_dataset":
            column_map = {"messages": arguments.get("conversation_column", "conversations")}
            style = arguments.get("conversation_style", "sharegpt")
            if style not in ("sharegpt", "openai"):
                raise ConfigError(
                    f"torchtune `dataset.conversation_style: {style}` cannot be mapped; use sharegpt or openai"
                )
            # either style is told apart from the rows themselves (data/formats.py), as the style would say
        if name.startswith("alpaca"):
            self.values["prompt_template_name"] = "alpaca"  # Alpaca-LoRA's file: torchtune's Alpaca prompt text
            self.note(
                "torchtune alpaca_dataset: the Alpaca prompt is the whole template here (Alpaca-LoRA's); torchtune "
                "also wraps it in the tokenizer's chat markers"
            )
        if column_map:
            self.values["column_map"] = column_map

    def validation(self, dataset: Any, dataset_val: Any, every: Any) -> None:
        """`split: train[:95%]` with `dataset_val: split: train[95%:]` is a held-out 5%: val_size 0.05."""
        if isinstance(dataset, list):
            splits = sorted({str(part.get("split", "train")) for part in dataset if isinstance(part, Mapping)})
            if splits not in ([], ["train"]) or dataset_val is not None:
                raise ConfigError(
                    f"torchtune datasets in a list with splits {splits} (or a dataset_val) cannot be mapped: "
                    "tunesmith reads whole files; remove the splits and set val_size"
                )
        split = dataset.get("split", "train") if isinstance(dataset, Mapping) else "train"
        if split == "train" and dataset_val is None:
            self.set("eval_steps", every)
            return
        match = SPLIT_SLICE.match(str(split))
        val_split = dataset_val.get("split") if isinstance(dataset_val, Mapping) else None
        if not match or match["start"] or not match["end"] or val_split != f"train[{match['end']}%:]":
            raise ConfigError(
                f"torchtune `dataset.split: {split}` (with dataset_val split {val_split}) cannot be mapped: "
                "tunesmith reads the whole file and holds out val_size of it; use ~dataset.split and val_size=0.05"
            )
        self.component("dataset_val", dataset_val)
        self.values["val_size"] = round(1 - int(match["end"]) / 100, 6)
        if every is None:
            self.values["eval_strategy"] = "no"  # held out and never evaluated, as torchtune does with null
        else:
            self.values["eval_steps"] = every

    def seed(self, value: Any) -> None:
        if value is None:
            self.note("torchtune `seed: null` (a random seed): tunesmith uses seed 42; set seed=N to change it")
        self.set("seed", value)

    def shuffle(self, value: Any) -> None:
        if not value:
            raise ConfigError("torchtune `shuffle: False`: tunesmith always shuffles training rows; remove it")

    # optimization
    def optimizer(self, value: Any) -> None:
        component, arguments = self.component("optimizer", value)
        if component not in OPTIMIZERS:
            raise ConfigError(f"torchtune optimizer `{component}` cannot be mapped; known: {', '.join(OPTIMIZERS)}")
        self.unused("optimizer", component, arguments, ("lr", "weight_decay", "fused"))
        optim = OPTIMIZERS[component]
        self.values["optim"] = "adamw_torch_fused" if optim == "adamw_torch" and arguments.get("fused") else optim
        self.set("learning_rate", arguments.get("lr"))
        self.set("weight_decay", arguments.get("weight_decay"))

    def lr_scheduler(self, value: Any) -> None:
        component, arguments = self.component("lr_scheduler", value)
        if component != "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup":
            raise ConfigError(f"torchtune lr_scheduler `{component}` cannot be mapped; use the cosine one")
        self.unused("lr_scheduler", component, arguments, ("num_warmup_steps", "num_cycles"))
        if arguments.get("num_cycles", 0.5) != 0.5:
            raise ConfigError("torchtune `lr_scheduler.num_cycles` other than 0.5 (half a cosine) cannot be mapped")
        self.values["lr_scheduler_type"] = "cosine"
        self.set("warmup_steps", arguments.get("num_warmup_steps"))

    def loss(self, value: Any) -> None:
        component, arguments = self.component("loss", value)
        if component not in LOSSES:
            raise ConfigError(f"torchtune loss `{component}` cannot be mapped; known: {', '.join(sorted(LOSSES))}")
        self.unused("loss", component, arguments, ("num_output_chunks",))  # chunk sizes: ours follow memory
        self.values["chunked_loss"] = True  # the same cross-entropy over supervised tokens, a chunk at a time

    def steps(self, tree: Mapping[str, Any]) -> None:
        per_epoch = tree.get("max_steps_per_epoch")
        if per_epoch is None:
            return
        epochs = int(tree.get("epochs", 1))
        self.values["max_steps"] = int(per_epoch) * epochs
        if epochs > 1:
            self.note(
                f"torchtune `max_steps_per_epoch: {per_epoch}` with {epochs} epochs: tunesmith stops after "
                f"max_steps={per_epoch * epochs} steps in all"
            )

    def max_grad_norm(self, value: Any) -> None:
        self.values["max_grad_norm"] = 0.0 if value is None else float(value)  # torchtune clips only when set

    def checkpointing(self, checkpointing: Any, offloading: Any) -> None:
        if offloading:
            self.values["gradient_checkpointing"] = "offload"
        elif checkpointing is not None:
            self.values["gradient_checkpointing"] = bool(checkpointing)

    def metric_logger(self, value: Any) -> None:
        component, arguments = self.component("metric_logger", value)
        if component not in LOGGERS:
            raise ConfigError(f"torchtune metric_logger `{component}` cannot be mapped; known: {', '.join(LOGGERS)}")
        if LOGGERS[component] is not None:
            self.values["report_to"] = [LOGGERS[component]]
        if LOGGERS[component] == "tensorboard" and "log_dir" in arguments:
            arguments = dict(arguments)
            self.values["logging_dir"] = str(arguments.pop("log_dir"))  # TensorBoard's event files go there
        settings = (
            f" ({', '.join(f'{key}: {value}' for key, value in arguments.items())} not used)" if arguments else ""
        )
        self.note(
            f"torchtune metric_logger {component.rpartition('.')[2]}{settings}: tunesmith writes metrics.jsonl and "
            "its loggers' files into output_dir; wandb reads WANDB_PROJECT and WANDB_NAME"
        )

    def device(self, value: Any) -> None:
        if value not in ("cuda", "cpu", "mps", "xpu", "npu"):
            raise ConfigError(f"torchtune `device: {value}` is not a device")
        self.note(f"torchtune `device: {value}`: tunesmith uses the GPUs it sees, else the CPU")

    def dtype(self, value: Any) -> None:
        if value == "bf16":
            self.values["pure_bf16"] = True  # torchtune keeps weights and optimizer state in bf16
        elif value == "fp32":
            self.values["bf16"] = False
        else:
            raise ConfigError(f"torchtune `dtype: {value}` cannot be mapped; use bf16 or fp32")

    def profiler(self, value: Any) -> None:
        _, arguments = self.component("profiler", value)
        if arguments.get("enabled"):
            raise ConfigError("torchtune `profiler.enabled: True`: the torch profiler is not built in; set it False")

    def reshard_after_forward(self, value: Any) -> None:
        if not value:
            raise ConfigError(
                "torchtune `fsdp_reshard_after_forward: False` keeps whole weights between passes: that is "
                "fsdp=shard_grad_op here; remove the key and add fsdp=shard_grad_op"
            )
        self.note("torchtune `fsdp_reshard_after_forward: True`: fsdp full_shard (tunesmith run ..._distributed)")


def check_checkpoint_files(directory: Path, files: Any) -> None:
    """The listed weight files must be the folder's weight files: a partial list would load a partial model."""
    if files is None:
        return
    if isinstance(files, Mapping):  # {filename_format: model-{}-of-{}.safetensors, max_filename: "00004"}
        last = str(files["max_filename"])
        files = [str(files["filename_format"]).format(str(i).zfill(len(last)), last) for i in range(1, int(last) + 1)]
    if not directory.is_dir():
        return  # resolving the model says that the folder is missing
    listed = {str(name) for name in files}
    present = {path.name for path in directory.iterdir() if path.suffix in (".safetensors", ".bin", ".pt")}
    present -= {"training_args.bin"}
    if listed != present:
        raise ConfigError(
            f"torchtune `checkpointer.checkpoint_files` lists {sorted(listed)}, but {directory} holds the weight "
            f"files {sorted(present)}; tunesmith loads the whole folder, so list exactly its files"
        )
