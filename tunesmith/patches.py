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
