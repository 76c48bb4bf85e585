"""Images for vision-language models: rows with `images` → ids with the image tokens expanded, and pixel values.

The run's model decides what a row with media may do (`ModelMedia`):

- a text-only model (no processor): a row with images, videos or audios is refused, naming the model and the row,
  so that nothing trains on the literal text `<image>`;
- a vision-language model (its `AutoProcessor` has an image processor): every conversation is rendered with the
  model's own chat template, its contents as typed parts (`{"type": "image"}` where the row has `<image>`,
  `{"type": "text", ...}` around it), which is the form those templates take. `encode.encode_conversation` turns the
  rendering into ids and labels as for any model, with one placeholder token per image (the processor's
  `image_token`). Each placeholder is then replaced by the ids the processor makes of it for that image (Qwen2-VL:
  one `<|image_pad|>` per merged patch; LLaVA: one `<image>` per patch; Gemma 3: `<start_of_image>`, 256 soft
  tokens, `<end_of_image>`), all labelled -100: image tokens are never trained, even with `train_on_prompt`.
  Expanding ids rather than text keeps the masking where it is decided (encode.py). Replacements that are pure
  special tokens (Qwen2-VL, LLaVA) give exactly the ids of the processor's own text expansion (a test checks);
  Gemma 3's newlines around an image may tokenize differently next to the user's text.
- cutoff_len never cuts an image: a row that would end inside an image block ends before it, and drops the images
  that no longer fit.

Pixel values are not stored in the tokenized data: the rows keep their image paths, and `MediaBatches` (the
collator) loads and processes the images of each batch, in the order of their tokens, adding what the model's
forward takes (pixel_values; image_grid_thw for Qwen2-VL; token type ids where the processor makes them: Qwen2-VL's
`mm_token_type_ids` for its 3D positions, Gemma 3's `token_type_ids` for bidirectional attention over an image).

Packing with a vision-language model is refused: a packed row would need the images of all its examples, in order,
and each model's own positions (Qwen2-VL's 3D rope) and image attention (Gemma 3) restarted per example.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith.config.sections import ModelSection
from tunesmith.data.encode import IGNORE_INDEX, encode_conversation
from tunesmith.data.formats import MEDIA_MARKERS, Conversation, Example
from tunesmith.errors import ConfigError, DataError, NotSupportedYet

_NO_LIMIT = 1 << 62
IMAGE_MARKER = MEDIA_MARKERS["images"]
TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")  # Qwen2-VL's name, Gemma 3's name


@dataclass(frozen=True)
class ImageSize:
    """LLaMA-Factory's `image_max_pixels` / `image_min_pixels`: images are scaled into this range before processing."""

    max_pixels: int = 768 * 768
    min_pixels: int = 32 * 32


@dataclass(frozen=True)
class ModelMedia:
    """What the run's model takes besides text: its processor (None: a text-only model), named for messages."""

    model_name: str
    processor: Any | None = None
    image_size: ImageSize = field(default_factory=ImageSize)

    @classmethod
    def of(cls, model: ModelSection, processor) -> ModelMedia:
        """The run's model (`model_name_or_path`, the image sizes) with its processor (None: text-only)."""
        size = ImageSize(model.image_max_pixels, model.image_min_pixels)
        return cls(model.model_name_or_path, processor, size)

    @property
    def takes_images(self) -> bool:
        return self.processor is not None

    def check_stage(self, stage: str) -> None:
        """A vision-language model's template takes typed parts, which only sft (and pt's plain text) are built for."""
        if self.processor is not None and stage not in ("sft", "pt"):
            raise NotSupportedYet(
                f"stage {stage} with a vision-language model ({self.model_name}) is not supported yet; sft is"
            )

    def check(self, example: Example, stage: str) -> None:
        """Refuse media this model or stage cannot train on (a text-only model, videos, audios, stages but sft)."""
        kinds = [kind for kind in ("images", "videos", "audios") if getattr(example, kind)]
        if not kinds:
            return
        if self.processor is None:
            raise DataError(
                f"has {' and '.join(kinds)}, but the model {self.model_name} is text-only and would train on the "
                f"literal {MEDIA_MARKERS[kinds[0]]} text; use a vision-language model (Qwen2-VL, LLaVA, Gemma 3) or "
                "remove the media rows"
            )
        unsupported = [kind for kind in kinds if kind != "images"]
        if unsupported:
            raise DataError(f"has {' and '.join(unsupported)}, which are not supported yet (images are)")
        if stage != "sft":
            raise DataError(f"has images, which stage {stage} does not support yet (sft does)")

    def cache_key(self) -> dict[str, Any] | None:
        """What changes the expanded ids besides the tokenizer and template: the image processor and the sizes."""
        if self.processor is None:
            return None
        settings = json.dumps(self.processor.image_processor.to_dict(), sort_keys=True, default=str)
        return {
            "image_processor": hashlib.sha256(settings.encode()).hexdigest(),
            "image_token": self.processor.image_token,
            "image_size": [self.image_size.max_pixels, self.image_size.min_pixels],
        }

    def encode_sft(
        self,
        tokenizer,
        chat_template: str,
        example: Example,
        messages: Conversation,
        tools,
        cutoff_len: int,
        train_on_prompt: bool,
        mask_history: bool,
    ) -> dict[str, Any]:
        """One conversation's columns (input_ids, labels, images, ...) with each image's tokens in place."""
        placeholder = self.processor.image_token
        placeholder_id = tokenizer.convert_tokens_to_ids(placeholder)
        encoded = encode_conversation(
            tokenizer, chat_template, as_parts(messages), _NO_LIMIT, train_on_prompt, tools, mask_history
        )
        found = encoded.input_ids.count(placeholder_id)
        if found != len(example.images):
            raise DataError(
                f"the chat template wrote {found} image placeholder(s) ({placeholder}) for {len(example.images)} "
                "image(s); the model's own chat template must write one per image part"
            )
        blocks = [self.image_ids(path) for path in example.images]
        input_ids, labels, spans = expand(encoded.input_ids, encoded.labels, placeholder_id, blocks, tokenizer)
        whole = len(input_ids)
        input_ids, labels, kept = cut_outside_images(input_ids, labels, spans, cutoff_len)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "images": example.images[:kept],
            "videos": [],
            "audios": [],
            "truncated": len(input_ids) < whole,
            "supervised": sum(label != IGNORE_INDEX for label in labels),
        }

    def image_ids(self, path: str) -> list[int]:
        """The ids the processor puts where one image's placeholder was."""
        features = self.processor(
            text=[self.processor.image_token], images=[self.load_image(path)], add_special_tokens=False
        )
        return list(features["input_ids"][0])

    def load_image(self, path: str):
        return load_image(path, self.image_size)


def load_image(path: str, size: ImageSize):
    """An RGB image scaled (aspect ratio kept) so that its pixel count lies within `size`."""
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    pixels = image.width * image.height
    if pixels > size.max_pixels or pixels < size.min_pixels:
        scale = ((size.max_pixels if pixels > size.max_pixels else size.min_pixels) / pixels) ** 0.5
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    return image


def as_parts(messages: Conversation) -> Conversation:
    """Each message's content as typed parts: `<image>` markers become image parts, the text between them text."""
    converted = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str):
            converted.append(message)
            continue
        parts: list[dict[str, str]] = []
        for index, text in enumerate(content.split(IMAGE_MARKER)):
            if index:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        converted.append({**message, "content": parts})
    return converted


def expand(
    input_ids: list[int], labels: list[int], placeholder_id: int, blocks: list[list[int]], tokenizer=None
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Each placeholder (in order) replaced by its image's block of ids, labelled -100; also each block's span.

    With a `tokenizer`, a block that starts or ends with plain text (Gemma 3's newlines) is tokenized together with
    its untrained neighbours, as the processor's text expansion would tokenize it ("\n" + "\n\n" is one token).
    """
    out_ids: list[int] = []
    out_labels: list[int] = []
    spans: list[tuple[int, int]] = []
    images = iter(blocks)
    index = 0
    while index < len(input_ids):
        token = input_ids[index]
        if token != placeholder_id:
            out_ids.append(token)
            out_labels.append(labels[index])
            index += 1
            continue
        block = next(images)
        right = index + 1 < len(input_ids) and labels[index + 1] == IGNORE_INDEX
        right = right and input_ids[index + 1] != placeholder_id
        left = bool(out_ids) and out_labels[-1] == IGNORE_INDEX and (not spans or spans[-1][1] < len(out_ids))
        if tokenizer is not None and (left or right):
            neighbours = ([out_ids[-1]] if left else [], [input_ids[index + 1]] if right else [])
            merged = _tokenized_together(tokenizer, neighbours[0], block, neighbours[1])
            if merged is not None:
                del out_ids[len(out_ids) - len(neighbours[0]) :], out_labels[len(out_labels) - len(neighbours[0]) :]
                block, index = merged, index + len(neighbours[1])
        spans.append((len(out_ids), len(out_ids) + len(block)))
        out_ids += block
        out_labels += [IGNORE_INDEX] * len(block)
        index += 1
    return out_ids, out_labels, spans


def _tokenized_together(tokenizer, left: list[int], block: list[int], right: list[int]) -> list[int] | None:
    """The ids of left + block + right tokenized as one text, if that differs from the parts and decodes back."""
    text = tokenizer.decode([*left, *block, *right])
    together = tokenizer(text, add_special_tokens=False)["input_ids"]
    if together == [*left, *block, *right] or tokenizer.decode(together) != text:
        return None
    return together


def cut_outside_images(
    input_ids: list[int], labels: list[int], spans: list[tuple[int, int]], cutoff_len: int
) -> tuple[list[int], list[int], int]:
    """Cut to cutoff_len, or before the image block the cut would split; returns the ids, labels and images kept."""
    end = min(len(input_ids), cutoff_len)
    kept = len(spans)
    for index, (start, stop) in enumerate(spans):
        if stop > end:
            end, kept = min(end, start), index
            break
    return input_ids[:end], labels[:end], kept


class MediaBatches:
    """A collator that adds each batch's images (pixel values and what else the model takes) to a text collator."""

    def __init__(self, text_collator, media: ModelMedia) -> None:
        self.text_collator = text_collator
        self.media = media
        processor = media.processor
        names = processor.model_input_names if getattr(processor, "return_mm_token_type_ids", False) else []
        self.token_type_key = next((key for key in TOKEN_TYPE_KEYS if key in names), None)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.text_collator(examples)
        processor = self.media.processor
        paths = [path for example in examples for path in example.get("images") or []]
        if paths:
            features = processor(
                text=[processor.image_token * len(paths)],
                images=[self.media.load_image(path) for path in paths],
                return_tensors="pt",
            )
            text_keys = ("input_ids", "attention_mask", *TOKEN_TYPE_KEYS)  # of the placeholder text: not the batch's
            batch |= {key: value for key, value in features.items() if key not in text_keys}
        if self.token_type_key:
            ids = batch["input_ids"].tolist()
            batch[self.token_type_key] = torch.tensor(processor.create_mm_token_type_ids(ids), dtype=torch.long)
        return batch


def refuse_packing(media: ModelMedia) -> None:
    """Packing keeps only ids and labels and restarts 1D positions: a vision-language model's rows would lose their
    images, Qwen2-VL its 3D positions and Gemma 3 its image attention."""
    if media.takes_images:
        raise ConfigError(
            f"packing: true with a vision-language model ({media.model_name}) is not supported yet: packed rows "
            "would need every example's images and the model's own image positions; set packing: false "
            "(and neat_packing: false)"
        )


def frozen_parts(model, freeze_vision_tower: bool, freeze_projector: bool) -> list[str]:
    """Module names (from the model's top) of the vision tower and the projector that stay frozen; [] for text models.

    Everything beside the language model and the output head belongs to vision: `vision_tower` (LLaVA, Gemma 3),
    `visual` (Qwen2-VL), whose `merger` is its projector; `multi_modal_projector` (LLaVA, Gemma 3).
    """
    base_prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, base_prefix, None)
    if base is None or not hasattr(base, "language_model"):
        return []
    parts = []
    for name, module in base.named_children():
        path = f"{base_prefix}.{name}"
        if name == "language_model":
            continue
        if name == "multi_modal_projector":
            parts += [path] if freeze_projector else []
        elif hasattr(module, "merger"):  # Qwen2-VL: the tower and its projector (`merger`) are one module
            tower = [f"{path}.{child}" for child, _ in module.named_children() if child != "merger"]
            parts += (tower if freeze_vision_tower else []) + ([f"{path}.merger"] if freeze_projector else [])
        elif freeze_vision_tower:
            parts.append(path)
    return parts


def freeze(model, parts: list[str]) -> None:
    """Stop gradients to every parameter under `parts`."""
    for name, parameter in model.named_parameters():
        if any(name.startswith(part + ".") for part in parts):
            parameter.requires_grad_(False)


def targets_outside(targets: list[str], parts: list[str]) -> str:
    """peft `target_modules` as a regex: the named linear layers, except those under the frozen `parts`."""
    import re

    excluded = "|".join(re.escape(part) for part in parts)
    names = "|".join(re.escape(target) for target in targets)
    return rf"^(?!(?:{excluded})\.)(?:.*\.)?(?:{names})$"
