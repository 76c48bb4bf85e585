"""Vision-language training on tiny random-weight LLaVA and Gemma 3 models with LLaMA-Factory's mllm_demo rows.

Each tiny model reuses SmolLM2's tokenizer with the family's image tokens added, a PIL image processor built from its
class (no download) and the family's published chat template (tests/fixtures/multimodal). Images are 28x28 after
processing, so a LLaVA image is 4 tokens and a Gemma 3 image 4 soft tokens between its markers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, logged_losses
from tunesmith.cli import main
from tunesmith.data.encode import IGNORE_INDEX

FIXTURES = REPO / "tests" / "fixtures" / "multimodal"
FAMILIES = ("llava", "gemma3")


def _smollm2_tokenizer(**options):
    from transformers import AutoTokenizer

    from tunesmith.model.resolve import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"), **options)


def _text_config(tokenizer) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_llava(target: Path) -> Path:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _smollm2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 28,
            "patch_size": 14,
            "projection_dim": 32,
        },
        text_config={"model_type": "llama", **_text_config(tokenizer)},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(target)
    LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops again
        chat_template=(FIXTURES / "llava.jinja").read_text(),
    ).save_pretrained(target)
    return target


def build_gemma3(target: Path) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    markers = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = _smollm2_tokenizer(extra_special_tokens=markers)
    config = Gemma3Config(
        text_config={**_text_config(tokenizer), "head_dim": 8, "sliding_window": 64},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 28,
            "patch_size": 14,
        },
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.image_token_id,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    # Gemma 3 initialises its projection to zeros, which would make every image embedding zero
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    model.save_pretrained(target)
    Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 28, "width": 28}),
        tokenizer=tokenizer,
        image_seq_length=4,
        chat_template=(FIXTURES / "gemma3.jinja").read_text(),
    ).save_pretrained(target)
    return target


@pytest.fixture(scope="module", params=FAMILIES)
def vlm_dir(request, tmp_path_factory) -> Path:
    build = {"llava": build_llava, "gemma3": build_gemma3}[request.param]
    return build(tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture
def mllm_data(tmp_path) -> Path:
    """A dataset_dir with the first three mllm_demo rows, their images and the registry entry."""
    data_dir = tmp_path / "data"
    shutil.copytree(FIXTURES, data_dir, ignore=shutil.ignore_patterns("*.jinja", "README.md"))
    return data_dir


def load_media_data(model_dir: Path, data_dir: Path, *overrides: str):
    from tunesmith.config import load_config
    from tunesmith.data.dataset import load_sft_data
    from tunesmith.data.multimodal import ModelMedia
    from tunesmith.data.templates import use_chat_format
    from tunesmith.model.load import load_processor, load_tokenizer

    config = load_config(
        None, [f"model_name_or_path={model_dir}", f"dataset_dir={data_dir}", "dataset=mllm_demo", *overrides]
    )
    processor = load_processor(str(model_dir))
    tokenizer = load_tokenizer(str(model_dir))
    chat_format = use_chat_format(tokenizer, None, processor)
    media = ModelMedia.of(config.model, processor)
    data = load_sft_data(config.data, tokenizer, chat_format.jinja, 42, cache_dir=str(data_dir / "cache"), media=media)
    return data, tokenizer, chat_format, media


def _blank():
    from PIL import Image

    return Image.new("RGB", (28, 28))


def test_images_are_expanded_in_place_and_never_trained(vlm_dir, mllm_data):
    from tunesmith.data.encode import render
    from tunesmith.data.multimodal import as_parts

    data, tokenizer, chat_format, media = load_media_data(vlm_dir, mllm_data)
    processor = media.processor
    feature_id = processor.image_token_ids[0]  # the tokens the image features replace: 4 per image here
    rows = json.loads((mllm_data / "mllm_demo.json").read_text())
    assert len(data.train) == len(rows)
    for example, row in zip(data.train, rows, strict=True):
        assert [Path(path).name for path in example["images"]] == [Path(path).name for path in row["images"]]
        assert example["input_ids"].count(feature_id) == 4 * len(row["images"])
        pairs = zip(example["input_ids"], example["labels"], strict=True)
        image_labels = [label for token, label in pairs if token == feature_id]
        assert set(image_labels) == {IGNORE_INDEX}
        assert any(label != IGNORE_INDEX for label in example["labels"])
        # the same ids as the processor's own expansion of the rendered conversation
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        text = render(tokenizer, chat_format.jinja, as_parts(messages), add_generation_prompt=False)
        pictures = [media.load_image(path) for path in example["images"]]
        expected = processor(text=[text], images=pictures, add_special_tokens=False)["input_ids"][0]
        assert example["input_ids"] == list(expected)

    # train_on_prompt trains every token but the images' own
    block = processor(text=[processor.image_token], images=pictures[:1], add_special_tokens=False)["input_ids"][0]
    everything, *_ = load_media_data(vlm_dir, mllm_data, "train_on_prompt=true")
    for example, row in zip(everything.train, rows, strict=True):
        untrained = [label for label in example["labels"] if label == IGNORE_INDEX]
        assert len(untrained) == len(block) * len(row["images"])


def test_pixel_values_reach_the_model_and_the_chunked_loss_matches(vlm_dir, mllm_data):
    from transformers import AutoModelForImageTextToText

    from tunesmith.data.collate import PadToLongest
    from tunesmith.data.multimodal import MediaBatches
    from tunesmith.train.loss import chunked_causal_lm_loss

    data, tokenizer, _, media = load_media_data(vlm_dir, mllm_data)
    batch = MediaBatches(PadToLongest(tokenizer.pad_token_id), media)(list(data.train))
    assert batch["pixel_values"].shape[0] == 4  # the rows' 2 + 1 + 1 images, in token order
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir).eval()
    with torch.no_grad():
        own = model(**batch)
        blank = model(**{**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])})
        chunked = chunked_causal_lm_loss(model, batch, chunk_size=7)
    assert torch.isfinite(own.loss)
    assert (own.logits - blank.logits).abs().max() > 1e-4  # the images change the output
    assert torch.allclose(chunked, own.loss, atol=1e-5)


def train_args(tmp_path: Path, model: Path, data: Path, *overrides: str) -> list[str]:
    return [
        "train",
        f"model_name_or_path={model}",
        f"dataset_dir={data}",
        "dataset=mllm_demo",
        f"output_dir={tmp_path / 'out'}",
        "per_device_train_batch_size=3",
        "max_steps=6",
        "logging_steps=1",
        "learning_rate=5e-3",
        "gradient_checkpointing=false",
        "plot_loss=false",
        *overrides,
    ]


def test_full_training_trains_the_vision_tower_and_the_loss_falls(tmp_path, vlm_dir, mllm_data):
    from safetensors.torch import load_file

    args = train_args(tmp_path, vlm_dir, mllm_data, "finetuning_type=full", "freeze_vision_tower=false")
    assert main(args) == 0
    losses = logged_losses(tmp_path / "out")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    before, after = load_file(vlm_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    vision = [name for name in before if "vision_tower" in name and name.endswith("weight")]
    assert vision and any(not torch.equal(before[name], after[name]) for name in vision)
    assert (tmp_path / "out" / "processor_config.json").is_file()  # the output loads with AutoProcessor


def test_freeze_trains_the_last_language_layer_and_never_the_frozen_vision_tower(tmp_path, vlm_dir, mllm_data):
    from safetensors.torch import load_file

    args = train_args(tmp_path, vlm_dir, mllm_data, "finetuning_type=freeze", "freeze_trainable_layers=1")
    assert main(args) == 0
    before, after = load_file(vlm_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("language_model" in name and ".layers.1." in name for name in changed)


def test_lora_leaves_the_vision_tower_alone_by_default(tmp_path, vlm_dir, mllm_data):
    from safetensors.torch import load_file

    assert main(train_args(tmp_path, vlm_dir, mllm_data, "lora_target=all")) == 0
    losses = logged_losses(tmp_path / "out")
    assert losses[-1] < losses[0]
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert adapter and not [name for name in adapter if "vision_tower" in name or "projector" in name]
    assert any("language_model" in name for name in adapter)


def test_packing_with_a_vision_language_model_is_refused(tmp_path, mllm_data, capsys):
    model = build_llava(tmp_path / "llava")
    assert main(train_args(tmp_path, model, mllm_data, "packing=true")) == 2
    assert f"packing: true with a vision-language model ({model}) is not supported yet" in capsys.readouterr().err


def test_other_stages_with_a_vision_language_model_are_refused_before_loading_data():
    from tunesmith.data.multimodal import ModelMedia
    from tunesmith.data.stages import Encoder, EncodeSettings
    from tunesmith.errors import NotSupportedYet

    with pytest.raises(NotSupportedYet, match="stage dpo with a vision-language model"):
        Encoder(None, "", EncodeSettings(stage="dpo", cutoff_len=64), ModelMedia("tiny-vlm", processor=object()))


def test_a_text_only_model_refuses_media_rows_naming_the_model_and_row(tmp_path, tiny_model_dir, mllm_data, capsys):
    assert main(train_args(tmp_path, tiny_model_dir, mllm_data)) == 2
    error = capsys.readouterr().err
    assert f"the model {tiny_model_dir} is text-only" in error
    assert "mllm_demo.json row 1" in error
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_data_preview_shows_the_image_tokens_untrained(tmp_path, mllm_data, capsys):
    model = build_llava(tmp_path / "llava")
    args = ["data", "preview", f"model_name_or_path={model}", f"dataset_dir={mllm_data}", "dataset=mllm_demo"]
    assert main([*args, "--json", "-n", "1"]) == 0
    row = next(json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{"))
    image_id = 49152  # <image>, the first token added to SmolLM2's vocabulary
    assert row["input_ids"].count(image_id) == 2 * 4
    image_labels = [label for token, label in zip(row["input_ids"], row["labels"], strict=True) if token == image_id]
    assert set(image_labels) == {IGNORE_INDEX}
    assert main([*args, "-n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "USER: <image>×4\nWho are they? ASSISTANT:[[ They're Kane" in shown
    assert "ASSISTANT:[[ They are celebrating on the soccer field. ]]" in shown


def test_a_cut_never_splits_an_image():
    from tunesmith.data.multimodal import cut_outside_images, expand

    ids, labels, spans = expand([1, 9, 2, 9, 3], [-100, -100, 2, -100, 3], 9, [[9, 9, 9], [9, 9]])
    assert ids == [1, 9, 9, 9, 2, 9, 9, 3] and labels == [-100, -100, -100, -100, 2, -100, -100, 3]
    assert spans == [(1, 4), (5, 7)]
    assert cut_outside_images(ids, labels, spans, 6) == ([1, 9, 9, 9, 2], labels[:5], 1)
    assert cut_outside_images(ids, labels, spans, 8) == (ids, labels, 2)


def qwen2_vl_parts():
    """A tiny Qwen2-VL and its processor. transformers refuses to construct Qwen2VLProcessor without torchvision
    (for its video processor, unused here), so it is assembled from its parts: the real class, image processor and
    tokenizer, only without the constructor's class check. A run loads it with AutoProcessor (needs torchvision)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = _smollm2_tokenizer()
    markers = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
    tokenizer.chat_template = (FIXTURES / "qwen2_vl.jinja").read_text()
    ids = dict(zip(markers, tokenizer.convert_tokens_to_ids(markers), strict=True))
    config = Qwen2VLConfig(
        text_config={**_text_config(tokenizer), "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    processor = object.__new__(Qwen2VLProcessor)
    processor.image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)
    processor.tokenizer, processor.video_processor = tokenizer, None
    processor.chat_template = tokenizer.chat_template
    processor.image_token, processor.image_token_id = "<|image_pad|>", ids["<|image_pad|>"]
    processor.video_token, processor.video_token_id = "<|video_pad|>", ids["<|video_pad|>"]
    return model, processor


def test_qwen2_vl_images_reach_the_model_through_its_3d_positions(tmp_path, mllm_data):
    from tunesmith.config import load_config
    from tunesmith.data.collate import PadToLongest
    from tunesmith.data.dataset import load_sft_data
    from tunesmith.data.encode import render
    from tunesmith.data.multimodal import MediaBatches, ModelMedia, as_parts
    from tunesmith.train.loss import chunked_causal_lm_loss

    model, processor = qwen2_vl_parts()
    tokenizer = processor.tokenizer
    config = load_config(None, [f"dataset_dir={mllm_data}", "dataset=mllm_demo"])
    media = ModelMedia("tiny-qwen2-vl", processor)
    data = load_sft_data(config.data, tokenizer, tokenizer.chat_template, 42, cache_dir=str(tmp_path), media=media)
    rows = json.loads((mllm_data / "mllm_demo.json").read_text())
    for example, row in zip(data.train, rows, strict=True):
        text = render(tokenizer, tokenizer.chat_template, as_parts(row["messages"]), add_generation_prompt=False)
        pictures = [media.load_image(path) for path in example["images"]]
        assert example["input_ids"] == processor(text=[text], images=pictures)["input_ids"][0]
        pairs = zip(example["input_ids"], example["labels"], strict=True)
        assert {label for token, label in pairs if token == processor.image_token_id} == {IGNORE_INDEX}

    batch = MediaBatches(PadToLongest(tokenizer.pad_token_id), media)(list(data.train))
    assert batch["image_grid_thw"].shape == (4, 3)  # the rows' 2 + 1 + 1 images
    assert batch["mm_token_type_ids"].sum() == (batch["input_ids"] == processor.image_token_id).sum()
    with torch.no_grad():
        blank = model(**{**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}).logits
    own = model(**batch)
    assert (own.logits.detach() - blank).abs().max() > 1e-4  # the images change the output
    assert torch.allclose(chunked_causal_lm_loss(model, batch, chunk_size=7), own.loss, atol=1e-5)

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(5):
        loss = chunked_causal_lm_loss(model, batch)
        loss.backward()
        assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0  # gradient reaches the vision tower
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_llamafactory_multimodal_keys_are_used_or_refused():
    from tunesmith.config import load_config
    from tunesmith.errors import TunesmithError

    keys = ["image_max_pixels=262144", "image_min_pixels=1024", "freeze_vision_tower=false"]
    config = load_config(None, ["dataset=mllm_demo", *keys, "freeze_multi_modal_projector=false"])
    assert (config.model.image_max_pixels, config.model.freeze_vision_tower) == (262144, False)
    with pytest.raises(TunesmithError, match="`video_max_pixels: 16384` is not supported yet"):
        load_config(None, ["dataset=mllm_demo", "video_max_pixels=16384"])


def test_images_are_scaled_into_the_pixel_range():
    from tunesmith.data.multimodal import ImageSize, load_image

    path = FIXTURES / "mllm_demo_data" / "1.jpg"  # 300 x 168
    small = load_image(str(path), ImageSize(max_pixels=100 * 56, min_pixels=1))
    large = load_image(str(path), ImageSize(max_pixels=10**6, min_pixels=600 * 336))
    assert small.mode == "RGB" and small.size == (100, 56) and large.size == (600, 336)
