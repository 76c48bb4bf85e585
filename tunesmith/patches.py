"""Every change tunesmith makes to a library's behaviour, in one place: each with why, the library version that made
it necessary, when it can go, and the test that proves it.

A patch is applied by the code path that needs it (never on import) and acts only in the situation it names.

Private Trainer methods that `tunesmith.train.trainer.TunesmithTrainer` overrides (no monkey-patching: a subclass,
but it leans on internals all the same, so they are listed here):

- `Trainer._save_checkpoint` and `Trainer._get_output_dir` (transformers 5.24): Trainer writes `checkpoint-N` in
  place, so a process killed mid-write (SIGKILL, OOM killer, preemption) leaves a folder that looks like a checkpoint
  and breaks the resume. The override points `_get_output_dir` at `tmp-checkpoint-N/` while the original
  `_save_checkpoint` runs, then renames the folder it wrote (train/checkpoints.py `write_checkpoint`). No public
  hook names the folder a checkpoint is written to. Until: Trainer writes checkpoints atomically itself, or gives a
  public way to choose the folder; check on every transformers upgrade that `_save_checkpoint` still builds its
  folder as `os.path.join(self._get_output_dir(trial), f"checkpoint-{global_step}")`. Test:
  tests/unit/test_crash_safety.py (the staged write, the SIGKILL resume, the full disk).

Patches: `apply_fsdp_on_cpu_processes` (accelerate), `apply_tokenizer_save_raises_os_errors` (tokenizers).
"""

from __future__ import annotations

_applied: set[str] = set()


def apply_fsdp_on_cpu_processes() -> None:
    """Let accelerate run FSDP on CPU processes (gloo), as it does on GPUs.

    Why: accelerate 1.15.0's `AcceleratorState.__init__` turns a given `fsdp_plugin` on only inside its branch for
    GPU-like distributed types (MULTI_GPU, MULTI_XPU, MULTI_NPU, ...). Processes started with `use_cpu=True` are
    MULTI_CPU, so the plugin is dropped, `Trainer.is_fsdp_enabled` is False and the model is wrapped in plain DDP:
    `fsdp` would be ignored without a word. PyTorch's FSDP2 (`fully_shard`) itself works on CPU tensors over gloo.

    What: after the original `__init__`, a state that got an FSDP plugin but came out MULTI_CPU is set to FSDP with
    that plugin, the same assignments (and mixed-precision setting) accelerate's GPU branch makes; `offload` keeps
    its CPUOffloadPolicy but without pinned memory, which needs an accelerator. Nothing changes on GPUs or without
    a plugin.

    Until: accelerate applies `fsdp_plugin` for MULTI_CPU (state.py, the `distributed_type in [MULTI_GPU, ...]`
    branch); check on every accelerate upgrade. Test: tests/unit/test_fsdp.py, whose runs fail unless the model
    is really an FSDP2 module with DTensor parameters (tunesmith.distributed.fsdp.ShardingCheck).
    """
    if "fsdp_on_cpu" in _applied:
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import CPUOffloadPolicy

    original_init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            if isinstance(fsdp_plugin.cpu_offload, CPUOffloadPolicy) and fsdp_plugin.cpu_offload.pin_memory:
                fsdp_plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)  # pinning needs an accelerator
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__
    _applied.add("fsdp_on_cpu")


def apply_tokenizer_save_raises_os_errors() -> None:
    """Make `tokenizers.Tokenizer.save` (the writer of tokenizer.json) report a failed write as an OSError.

    Why: tokenizers 0.23's `Tokenizer.save` (Rust) turns any I/O error into a bare `Exception` whose only trace of the
    cause is its text ("No space left on device (os error 28)"). transformers 5.24 calls it for every checkpoint's
    tokenizer, so a disk that fills there ended the run with a traceback, where a full disk anywhere else in a
    checkpoint is one DiskFullError line (train/checkpoints.py recognises a full disk by the OSError's errno, never
    by an error's text). The first checkpoint has no earlier one to measure the room needed against, so the check
    made before writing cannot catch it.

    What: the tokenizer is serialised in memory by its own `to_str(pretty)` and written by Python, so the write fails
    with OSError(ENOSPC) like every other file. The bytes are the ones `save` writes (the test compares them).

    Until: tokenizers raises OSError (with errno) for I/O errors in `save`; check on every tokenizers upgrade. Test:
    tests/unit/test_crash_safety.py (the same bytes; a real ENOSPC while the first checkpoint's tokenizer is written).
    """
    if "tokenizer_save" in _applied:
        return
    from pathlib import Path

    from tokenizers import Tokenizer

    def save(self, path: str, pretty: bool = True) -> None:
        Path(path).write_bytes(self.to_str(pretty).encode("utf-8"))

    Tokenizer.save = save
    _applied.add("tokenizer_save")
