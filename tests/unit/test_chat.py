"""`tunesmith chat` on the tiny random Llama: streaming, the interactive loop, adapters, and errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO
from tunesmith import cli
from tunesmith.chat.command import add_arguments, chat_loop, inference_config
from tunesmith.chat.engine import ChatEngine, Message, load_chat_engine
from tunesmith.config.inference import GenerationSection, load_inference_config
from tunesmith.config.sections import ModelSection
from tunesmith.errors import ModelError

# Greedy, so replies are reproducible; the repetition penalty keeps the random model from repeating one token.
GREEDY = GenerationSection(max_new_tokens=24, do_sample=False, repetition_penalty=2.0)
GREEDY_FLAGS = ["--no-do-sample", "--repetition-penalty", "2.0", "--max-new-tokens", "24"]
HELLO: list[Message] = [{"role": "user", "content": "Hello there"}]


def chat_engine(
    model: str | Path | None = None, adapter: str | Path | None = None, *, template: str | None = None, **model_keys
) -> ChatEngine:
    """load_chat_engine with only the model keys given set, as a config file or the flags would set them."""
    keys = {"model_name_or_path": model, "adapter_name_or_path": adapter}
    section = ModelSection(**{key: str(value) for key, value in keys.items() if value}, **model_keys)
    return load_chat_engine(section, template)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> ChatEngine:
    return chat_engine(tiny_model_dir)


@pytest.fixture(scope="module")
def lora(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A saved random LoRA adapter on the tiny model, and the in-memory PeftModel it was saved from."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # init_lora_weights=False makes B non-zero, so the adapter changes the logits.
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    config.init_lora_weights = False
    peft_model = get_peft_model(base, config).eval()
    adapter_dir = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(adapter_dir)
    return adapter_dir, peft_model


def copy_adapter(adapter_dir: Path, target: Path, base_model: str | None) -> Path:
    """A copy of the adapter whose adapter_config.json names `base_model` (None: names none)."""
    shutil.copytree(adapter_dir, target)
    config_file = target / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_model
    config_file.write_text(json.dumps(config))
    return target


def greedy_decode(model: torch.nn.Module, engine: ChatEngine, messages: list[Message]) -> str:
    """The reference: a plain, non-streaming `model.generate` with the same settings."""
    inputs = engine.encode(messages)
    output = model.generate(
        **inputs,
        **GREEDY.generate_kwargs(),
        eos_token_id=engine.tokenizer.eos_token_id,
        pad_token_id=engine.tokenizer.pad_token_id,
    )
    return engine.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def run_cli(argv: list[str], monkeypatch) -> int:
    # Only the chat command in the table, so these tests do not depend on the other commands importing cleanly.
    monkeypatch.setattr(cli, "COMMANDS", {"chat": cli.COMMANDS["chat"]})
    return cli.main(["chat", *argv])


def lines_from(inputs: list[str]) -> Callable[[str], str]:
    """A stand-in for `input`: returns each line in turn, then raises EOFError as Ctrl-D does."""
    remaining = iter(inputs)

    def read_line(prompt: str) -> str:
        print(prompt, end="")
        try:
            return next(remaining)
        except StopIteration:
            raise EOFError from None

    return read_line


class RecordingEngine:
    """Records the messages of each call and replies `reply 1`, `reply 2`, ...; the loop needs only `stream`."""

    def __init__(self, interrupt_on_call: int | None = None) -> None:
        self.calls: list[list[Message]] = []
        self.interrupt_on_call = interrupt_on_call

    def stream(self, messages: list[Message], options: GenerationSection) -> Iterator[str]:
        self.calls.append([dict(message) for message in messages])
        yield "reply "
        if len(self.calls) == self.interrupt_on_call:
            raise KeyboardInterrupt
        yield str(len(self.calls))


# --- streaming -------------------------------------------------------------------------------------------------


def test_prompt_renders_with_the_tokenizer_chat_template(engine):
    prompt = engine.render(HELLO)
    assert prompt.endswith("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
    ids = engine.encode(HELLO)["input_ids"][0].tolist()
    assert ids == engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert engine.stop_token_ids()[0] == engine.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_stream_yields_pieces_that_join_to_the_greedy_reply(engine):
    chunks = list(engine.stream(HELLO, GREEDY))
    assert len(chunks) > 1, "the reply should arrive in several pieces"
    assert all(isinstance(chunk, str) and chunk for chunk in chunks)
    expected = greedy_decode(engine.model, engine, HELLO)
    assert expected.strip(), "the reference reply is empty; the comparison would prove nothing"
    assert "".join(chunks) == expected


def test_temperature_zero_is_greedy(engine):
    sampled_flag_but_zero_temperature = GenerationSection(
        max_new_tokens=24, temperature=0, do_sample=True, repetition_penalty=2.0
    )
    assert sampled_flag_but_zero_temperature.generate_kwargs()["do_sample"] is False
    assert engine.reply(HELLO, sampled_flag_but_zero_temperature) == engine.reply(HELLO, GREEDY)


def test_sampling_options_reach_generate(engine):
    """Sampling really samples (a seeded reply repeats, and differs from the greedy one), and top_k and top_p reach
    `generate`: keeping only the most likely token makes a sampled reply the greedy one."""
    import torch

    def sampled_reply(**options) -> str:
        torch.manual_seed(0)
        return engine.reply(HELLO, GenerationSection(max_new_tokens=24, repetition_penalty=2.0, **options))

    greedy = engine.reply(HELLO, GREEDY)
    free = sampled_reply(temperature=1.0, top_p=1.0, top_k=0)
    assert free == sampled_reply(temperature=1.0, top_p=1.0, top_k=0)
    assert free != greedy
    assert sampled_reply(temperature=1.0, top_p=1.0, top_k=1) == greedy
    assert sampled_reply(temperature=1.0, top_p=1e-6, top_k=0) == greedy


def test_closing_the_stream_stops_generation(engine):
    forward_calls = []
    hook = engine.model.register_forward_hook(lambda *args: forward_calls.append(1))
    try:
        stream = engine.stream(HELLO, GenerationSection(max_new_tokens=1000, do_sample=False, repetition_penalty=2.0))
        next(stream)
        stream.close()  # what Ctrl-C or a consumer that stops reading does
    finally:
        hook.remove()
    assert len(forward_calls) < 200, f"generation ran on for {len(forward_calls)} steps after the stream was closed"


def test_an_error_in_the_generation_thread_reaches_the_caller(engine, monkeypatch):
    def broken_generate(**kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(engine.model, "generate", broken_generate)
    with pytest.raises(RuntimeError, match="generation failed"):
        list(engine.stream(HELLO, GREEDY))


# --- the command -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("greedy_flag", [["--no-do-sample"], ["--temperature", "0"]])
def test_prompt_mode_prints_only_the_reply(engine, tiny_model_dir, capsys, monkeypatch, greedy_flag):
    expected = engine.reply([{"role": "system", "content": "Be brief."}, *HELLO], GREEDY)
    argv = ["--model", str(tiny_model_dir), "--system", "Be brief.", "--prompt", "Hello there"]
    argv += ["--repetition-penalty", "2.0", "--max-new-tokens", "24", *greedy_flag]
    assert run_cli(argv, monkeypatch) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert f"model {tiny_model_dir} on cpu (float32)" in captured.err


def test_loop_keeps_history_and_clear_empties_it(capsys):
    recorder = RecordingEngine()
    lines = lines_from(["hello", "", "again", "/clear", "fresh", "/exit", "never read"])
    assert chat_loop(recorder, GREEDY, "Be brief.", read_line=lines) == 0

    system = {"role": "system", "content": "Be brief."}
    assert recorder.calls == [
        [system, {"role": "user", "content": "hello"}],
        [
            system,
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "reply 1"},
            {"role": "user", "content": "again"},
        ],
        [system, {"role": "user", "content": "fresh"}],
    ]
    captured = capsys.readouterr()
    assert "Assistant: reply 1\n" in captured.out
    assert "Assistant: reply 3\n" in captured.out
    assert "(history cleared)" in captured.err
    assert "cleared" not in captured.out


def test_loop_ends_on_end_of_input_and_ignores_unknown_commands(capsys):
    recorder = RecordingEngine()
    assert chat_loop(recorder, GREEDY, None, read_line=lines_from(["/help", "hi"])) == 0
    assert recorder.calls == [[{"role": "user", "content": "hi"}]]
    assert "unknown command /help" in capsys.readouterr().err


def test_ctrl_c_stops_the_reply_but_not_the_session(capsys):
    recorder = RecordingEngine(interrupt_on_call=1)
    assert chat_loop(recorder, GREEDY, None, read_line=lines_from(["first", "second"])) == 0
    assert recorder.calls[1] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply "},  # as far as it got
        {"role": "user", "content": "second"},
    ]
    assert "[stopped]" in capsys.readouterr().out


def test_loop_sends_the_history_to_the_real_model(engine, capsys):
    assert chat_loop(engine, GREEDY, None, read_line=lines_from(["Hello there", "And then?"])) == 0
    first = engine.reply(HELLO, GREEDY)
    second = engine.reply(
        [*HELLO, {"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}], GREEDY
    )
    assert first != second
    assert capsys.readouterr().out == f"User: Assistant: {first}\nUser: Assistant: {second}\nUser: \n"


# --- models, adapters, tokenizers --------------------------------------------------------------------------------


def test_adapter_gives_the_logits_and_reply_of_the_in_memory_peft_model(lora, tiny_model_dir, engine):
    adapter_dir, peft_model = lora
    with_adapter = chat_engine(tiny_model_dir, adapter_dir)
    inputs = with_adapter.encode(HELLO)
    with torch.no_grad():
        logits = with_adapter.model(**inputs).logits
        expected = peft_model(**inputs).logits
        base = engine.model(**inputs).logits
    assert not torch.allclose(expected, base, atol=1e-3), "the adapter changes nothing; the test would prove nothing"
    torch.testing.assert_close(logits, expected)
    assert with_adapter.reply(HELLO, GREEDY) == greedy_decode(peft_model, with_adapter, HELLO)


def test_base_model_comes_from_tunesmith_config_then_adapter_config(lora, tiny_model_dir, tmp_path):
    adapter_dir, _ = lora
    # tunesmith_config.yaml wins over adapter_config.json, which here names a model that does not exist.
    with_config = copy_adapter(adapter_dir, tmp_path / "with_config", base_model="/no/such/model")
    (with_config / "tunesmith_config.yaml").write_text(f"model_name_or_path: {tiny_model_dir}\nlora_rank: 4\n")
    assert chat_engine(adapter=with_config).model_name == str(tiny_model_dir)

    # Without tunesmith_config.yaml, peft's adapter_config.json names the base model.
    assert chat_engine(adapter=adapter_dir).model_name == str(tiny_model_dir)

    named_elsewhere = copy_adapter(adapter_dir, tmp_path / "elsewhere", base_model="/no/such/model")
    with pytest.raises(ModelError, match="/no/such/model"):
        chat_engine(adapter=named_elsewhere)


def test_tokenizer_and_template_come_from_the_adapter_dir(lora, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from tunesmith.data.templates import install_chat_format, resolve_chat_format

    adapter_dir = copy_adapter(lora[0], tmp_path / "adapter", base_model=str(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    install_chat_format(tokenizer, resolve_chat_format("alpaca", tokenizer))  # as training with template: alpaca does
    tokenizer.save_pretrained(adapter_dir)

    chat = chat_engine(adapter=adapter_dir)
    assert chat.render(HELLO).endswith("### Instruction:\nHello there\n\n### Response:\n")
    # The adapter's own tokenizer is used even when --model names the base explicitly.
    assert "### Instruction:" in chat_engine(tiny_model_dir, adapter_dir).render(HELLO)


def test_template_flag_overrides_the_tokenizer_template(tiny_model_dir):
    chat = chat_engine(tiny_model_dir, template="llama2")
    assert chat.render(HELLO).endswith("[INST] Hello there [/INST]")


# --- errors ------------------------------------------------------------------------------------------------------


def one_line_error(capsys) -> str:
    """The one `error:` line the CLI printed (progress bars from loading may share stderr), and no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "-1"], "`temperature`: got '-1'; Input should be greater than or equal to 0"),
        (["--top-p", "0"], "`top_p`: got '0'; Input should be greater than 0"),
        (["--top_p", "1.5"], "`top_p`: got '1.5'; Input should be less than or equal to 1"),
        (["--top-k", "-1"], "`top_k`: got '-1'; Input should be greater than or equal to 0"),
        (["--max_new_tokens", "0"], "`max_new_tokens`: got '0'; Input should be greater than or equal to 1"),
        (["--repetition-penalty", "0"], "`repetition_penalty`: got '0'; Input should be greater than 0"),
        (["--prompt", "  "], "--prompt is empty"),
        (["learning_rate=1e-4"], "`learning_rate` is a training key, which inference does not use"),
        (["max_new_token=4"], "unknown inference key `max_new_token`; did you mean max_new_tokens"),
        (["num_beams=4"], "`num_beams: 4` is not supported yet (beam search"),
        (["infer_backend=vllm"], "`infer_backend: 'vllm'` is not supported yet"),
        (["--adapter", "a,b", "quantization_bit=4"], "`quantization_bit: 4` takes one adapter"),
        (["create_new_adapter=true"], "`create_new_adapter` is not used for inference"),
    ],
)
def test_bad_generation_options_exit_2_before_loading(flags, message, capsys, monkeypatch):
    # A model that does not exist: the flags must be refused before any loading is tried.
    assert run_cli(["--model", "/no/such/model", *flags], monkeypatch) == 2
    assert message in one_line_error(capsys)


def test_missing_adapter_dir_exits_2(tmp_path, capsys, monkeypatch):
    assert run_cli(["--adapter", str(tmp_path / "missing"), "--prompt", "hi"], monkeypatch) == 2
    assert f"adapter directory {tmp_path / 'missing'} does not exist" in one_line_error(capsys)


def test_full_model_passed_as_adapter_points_to_model_flag(tiny_model_dir, capsys, monkeypatch):
    assert run_cli(["--adapter", str(tiny_model_dir), "--prompt", "hi"], monkeypatch) == 2
    assert (
        f"holds a full model, not an adapter; give it as the model (model_name_or_path / --model {tiny_model_dir})"
        in one_line_error(capsys)
    )


def test_adapter_without_a_known_base_model_exits_2(lora, tmp_path, capsys, monkeypatch):
    adapter_dir = copy_adapter(lora[0], tmp_path / "adapter", base_model=None)
    assert run_cli(["--adapter", str(adapter_dir), "--prompt", "hi"], monkeypatch) == 2
    assert "cannot tell which model the adapter" in one_line_error(capsys)


def test_adapter_for_another_model_exits_2(lora, tiny_model_dir, tmp_path, capsys, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 64, 128  # the adapter's matrices are for hidden size 32
    other = tmp_path / "other"
    LlamaForCausalLM(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    assert run_cli(["--model", str(other), "--adapter", str(lora[0]), "--prompt", "hi"], monkeypatch) == 2
    message = one_line_error(capsys)
    assert f"the adapter in {lora[0]} was trained on {tiny_model_dir} and does not fit model {other}: layer" in message


# --- the inference config: LLaMA-Factory's YAML, key=value, flags in both spellings ------------------------------

LLAMAFACTORY_INFERENCE = sorted((REPO / "tests" / "fixtures" / "llamafactory" / "inference").glob("*.yaml"))
EXAMPLE = REPO / "examples" / "inference" / "smollm2_lora.yaml"


@pytest.mark.parametrize("example", [*LLAMAFACTORY_INFERENCE, EXAMPLE], ids=lambda path: path.name)
def test_inference_yaml_is_read_as_llamafactory_writes_it(example):
    raw = yaml.safe_load(example.read_text())
    config = load_inference_config(example)
    assert config.model.model_name_or_path == raw["model_name_or_path"]
    assert config.model.adapter_name_or_path == [raw["adapter_name_or_path"]]
    assert config.prompt.template == raw.get("template")
    assert config.model.trust_remote_code is raw.get("trust_remote_code", False)
    assert config.generation.max_new_tokens == raw.get("max_new_tokens", 512)


def test_example_inference_yaml_chats_with_key_value_and_flags(lora, tiny_model_dir, capsys, monkeypatch):
    adapter_dir, peft_model = lora
    expected = greedy_decode(peft_model, chat_engine(tiny_model_dir, adapter_dir), HELLO)
    argv = [str(EXAMPLE), f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={adapter_dir}"]
    # the file samples 256 tokens; key=value and the flags (both spellings) make it the 24-token greedy reply
    argv += ["do_sample=false", "--max_new_tokens", "24", "--repetition-penalty", "2.0", "--prompt", "Hello there"]
    assert run_cli(argv, monkeypatch) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert f"+ adapter {adapter_dir}" in captured.err


def parsed(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return inference_config(parser.parse_args(argv))


def test_flags_win_over_key_value_which_wins_over_the_file(tmp_path):
    path = tmp_path / "chat.yaml"
    path.write_text("temperature: 0.3\ntop_k: 5\nmax_new_tokens: 10\ngeneration: {top_p: 0.4}\n")
    config = parsed([str(path), "top_k=7", "max_new_tokens=20", "--max_new_tokens", "30", "--no-do-sample"])
    generation = config.generation
    assert (generation.temperature, generation.top_k, generation.max_new_tokens) == (0.3, 7, 30)
    assert (generation.top_p, generation.do_sample) == (0.4, False)


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "m", "--adapter", "a,b", "--max-new-tokens", "9", "--top-p", "0.5", "--system", "S"],
        [
            *("--model_name_or_path", "m", "--adapter_name_or_path", "a,b", "--max_new_tokens", "9", "--top_p", "0.5"),
            *("--default_system", "S"),
        ],
        ["model_name_or_path=m", "adapter_name_or_path=a,b", "max_new_tokens=9", "top_p=0.5", "default_system=S"],
    ],
    ids=["dashes", "underscores", "key=value"],
)
def test_every_spelling_sets_the_same_keys(argv):
    config = parsed(argv)
    assert (config.model.model_name_or_path, config.model.adapter_name_or_path) == ("m", ["a", "b"])
    assert (config.generation.max_new_tokens, config.generation.top_p, config.prompt.default_system) == (9, 0.5, "S")
    assert config.model_given


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--do-sample"], True),
        (["--do_sample", "false"], False),
        (["--no_do_sample"], False),
        (["--no-do-sample"], False),
        (["do_sample=true", "--no-do-sample"], False),
    ],
)
def test_do_sample_spellings(argv, expected):
    assert parsed(argv).generation.do_sample is expected


def test_a_list_of_adapters_merges_all_but_the_last(lora, tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    first_dir, _ = lora
    torch.manual_seed(2)
    second_config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["k_proj", "o_proj"])
    second_config.init_lora_weights = False
    second = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), second_config)
    second.save_pretrained(tmp_path / "second")

    chat = chat_engine(tiny_model_dir, f"{first_dir},{tmp_path / 'second'}")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(first_dir))
    reference = PeftModel.from_pretrained(merged.merge_and_unload(), str(tmp_path / "second")).eval()
    only_second = chat_engine(tiny_model_dir, tmp_path / "second")
    inputs = chat.encode(HELLO)
    with torch.no_grad():
        logits, expected = chat.model(**inputs).logits, reference(**inputs).logits
        without_first = only_second.model(**inputs).logits
    assert not torch.allclose(without_first, expected, atol=1e-3), "the first adapter changes nothing"
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert chat.adapters == [str(first_dir), str(tmp_path / "second")]


def test_quantization_bit_loads_the_model_in_4_bits(wide_tiny_model_dir):
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    chat = chat_engine(wide_tiny_model_dir, quantization_bit=4)
    assert any(isinstance(module, Linear4bit) for module in chat.model.modules())
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    reference = AutoModelForCausalLM.from_pretrained(
        wide_tiny_model_dir, dtype=torch.float32, quantization_config=quantization, device_map={"": "cpu"}
    )
    inputs = chat.encode(HELLO)
    with torch.no_grad():
        torch.testing.assert_close(chat.model(**inputs).logits, reference(**inputs).logits)


def test_enable_thinking_reaches_the_chat_template(tiny_model_dir):
    chat = load_chat_engine(ModelSection(model_name_or_path=str(tiny_model_dir)), enable_thinking=False)
    chat.tokenizer.chat_template = (
        "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}{{ messages[-1]['content'] }}"
    )
    assert chat.render(HELLO) == "<no-think>Hello there"
