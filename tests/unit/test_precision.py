"""The precision decision (model/precision.py) for every device and key, and that a run keeps to it."""

import pytest
import torch

from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.model.precision import ComputeDevice, choose_precision, cpu_bf16_feature, upcast_trainable_parameters

GPU = ComputeDevice("cuda", bf16=True, bf16_feature="NVIDIA H100")
OLD_GPU = ComputeDevice("cuda", bf16=False, bf16_feature="Tesla V100")
BF16_CPU = ComputeDevice("cpu", bf16=True, bf16_feature="avx512_bf16")
PLAIN_CPU = ComputeDevice("cpu", bf16=False)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def decided(device, method="lora", bf16=None, fp16=False, pure_bf16=False):
    p = choose_precision(bf16, fp16, pure_bf16, method, device)
    return p.dtype, p.bf16, p.fp16, p.upcast_trainable


@pytest.mark.parametrize(
    "device, method, expected",
    [
        # full fine-tuning on a GPU: float32 master weights under bf16 autocast, never pure bf16 by default
        (GPU, "full", (torch.float32, True, False, False)),
        (GPU, "lora", (torch.bfloat16, True, False, False)),  # frozen base in bf16, peft keeps adapters float32
        (GPU, "freeze", (torch.bfloat16, True, False, True)),  # trained layers upcast to float32
        (OLD_GPU, "full", (torch.float32, False, True, False)),
        (BF16_CPU, "lora", (torch.float32, True, False, False)),
        (BF16_CPU, "full", (torch.float32, True, False, False)),
        (PLAIN_CPU, "lora", (torch.float32, False, False, False)),
    ],
)
def test_the_default_for_each_device(device, method, expected):
    assert decided(device, method) == expected
    precision = choose_precision(None, False, False, method, device)
    autocast = torch.bfloat16 if expected[1] else torch.float16 if expected[2] else torch.float32
    assert precision.compute_dtype == autocast  # what the attention kernel is chosen for


@pytest.mark.parametrize("device", [GPU, OLD_GPU, BF16_CPU, PLAIN_CPU])
@pytest.mark.parametrize("method", ["full", "lora", "freeze"])
def test_bf16_false_is_float32_everywhere(device, method):
    assert decided(device, method, bf16=False) == (torch.float32, False, False, False)


@pytest.mark.parametrize("device", [GPU, BF16_CPU, PLAIN_CPU])
def test_pure_bf16_is_the_explicit_opt_in(device):
    precision = choose_precision(None, False, True, "full", device)
    assert (precision.dtype, precision.bf16, precision.pure_bf16) == (torch.bfloat16, True, True)
    assert (precision.note is None) == device.bf16  # an emulating CPU is told it will be slow


def test_pure_bf16_needs_bf16_on_a_gpu_and_no_contradiction():
    with pytest.raises(ConfigError, match="V100"):
        choose_precision(None, False, True, "full", OLD_GPU)
    with pytest.raises(ConfigError, match=r"pure_bf16: true .* bf16: false"):
        load_config(None, ["pure_bf16=true", "bf16=false"])


def test_asking_a_cpu_for_what_it_emulates_is_obeyed_with_a_note():
    precision = choose_precision(True, False, False, "lora", PLAIN_CPU)
    assert precision.bf16 and "emulated" in precision.note
    fp16 = choose_precision(None, True, False, "lora", BF16_CPU)  # fp16 is a GPU setting: the CPU's best instead
    assert (fp16.bf16, fp16.fp16) == (True, False) and "fp16: true" in fp16.note


def test_the_cpu_feature_comes_from_the_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert cpu_bf16_feature(cpuinfo) is None
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert cpu_bf16_feature(cpuinfo) == "avx512_bf16"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu amx_bf16 amx_tile\n")
    assert cpu_bf16_feature(cpuinfo) == "amx_bf16"


def test_upcast_casts_only_what_trains():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    assert upcast_trainable_parameters(model) == 2
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32


def trained(tiny_model_dir, identity_data, tmp_path, monkeypatch, *keys):
    """Train 2 steps; return the trainer as it was when the run saved."""
    import tunesmith.train.sft as sft

    config = load_config(
        None,
        [
            f"model_name_or_path={tiny_model_dir}",
            f"dataset_dir={identity_data}",
            "dataset=identity",
            "name=T",
            "author=A",
            "max_samples=8",
            "max_steps=2",
            "plot_loss=false",
            "overwrite_output_dir=true",
            f"output_dir={tmp_path / 'out'}",
            *keys,
        ],
    )
    kept = {}
    original = sft.save_outputs

    def keep(trainer, *args, **kwargs):
        kept["trainer"] = trainer
        return original(trainer, *args, **kwargs)

    monkeypatch.setattr(sft, "save_outputs", keep)
    sft.run_sft(config)
    return kept["trainer"]


def test_a_cpu_run_follows_the_decision(tiny_model_dir, identity_data, tmp_path, monkeypatch, capsys):
    trainer = trained(tiny_model_dir, identity_data, tmp_path, monkeypatch, "finetuning_type=full")
    expected = choose_precision(None, False, False, "full")  # this machine's CPU decides
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights
    assert trainer.args.bf16 == expected.bf16
    assert f"precision: {expected.description}" in capsys.readouterr().out
    trainer = trained(tiny_model_dir, identity_data, tmp_path, monkeypatch, "finetuning_type=full", "bf16=false")
    assert not trainer.args.bf16


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "keys, trainable, frozen, autocast",
    [
        (["finetuning_type=full"], {torch.float32}, set(), True),
        (["finetuning_type=full", "pure_bf16=true"], {torch.bfloat16}, set(), True),
        (["finetuning_type=full", "bf16=false"], {torch.float32}, set(), False),
        (["finetuning_type=lora"], {torch.float32}, {torch.bfloat16}, True),
        (["finetuning_type=freeze", "freeze_trainable_layers=1"], {torch.float32}, {torch.bfloat16}, True),
    ],
)
def test_gpu_runs_keep_master_weights_as_decided(
    tiny_model_dir, identity_data, tmp_path, monkeypatch, keys, trainable, frozen, autocast
):
    trainer = trained(tiny_model_dir, identity_data, tmp_path, monkeypatch, *keys)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == trainable
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == frozen
    states = {v.dtype for s in trainer.optimizer.state.values() for v in s.values() if v.dim() > 0}
    assert states == trainable  # Adam's moments in the master weights' dtype
    assert trainer.args.bf16 == autocast


def test_the_estimate_follows_the_decision():
    from tests.unit.test_estimate import run_estimate

    params, linear = 134_515_008, 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    full = run_estimate("finetuning_type=full", device="cuda")
    assert full.weights == 4 * params + 2 * linear  # float32 master weights + autocast's bfloat16 copies
    assert full.gradients == 4 * params and full.optimizer == 2 * 4 * params
    pure = run_estimate("finetuning_type=full", "pure_bf16=true", device="cuda")
    assert (pure.weights, pure.gradients) == (2 * params, 2 * params)
    plain = run_estimate("finetuning_type=full", "bf16=false", device="cuda")
    assert plain.weights == 4 * params and plain.activations > 1.5 * full.activations
    cpu_float32 = run_estimate("bf16=false")
    cpu_default = run_estimate()
    if choose_precision(None, False, False, "lora").bf16:  # this CPU autocasts: 16-bit activations and copies
        assert cpu_default.activations < 0.75 * cpu_float32.activations
        assert cpu_default.weights == cpu_float32.weights + 2 * linear
    else:
        assert cpu_default.total_bytes == cpu_float32.total_bytes


def test_threads_follow_the_physical_cores(tmp_path):
    from tunesmith.train.threads import physical_cores

    def cpu(processor, core, package=0):
        return f"processor\t: {processor}\nphysical id\t: {package}\ncore id\t\t: {core}\nflags\t\t: fpu\n"

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("\n".join(cpu(p, p % 4) for p in range(8)))  # 4 cores, 2 hardware threads each
    assert physical_cores(cpuinfo, allowed=set(range(8))) == 4
    assert physical_cores(cpuinfo, allowed={0, 4}) == 1  # a CPU set of both threads of one core
    cpuinfo.write_text("\n".join(cpu(p, p % 2, package=p // 2) for p in range(4)))  # 2 packages x 2 cores
    assert physical_cores(cpuinfo, allowed=set(range(4))) == 4
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu\n")  # no topology
    assert physical_cores(cpuinfo, allowed={0}) is None
