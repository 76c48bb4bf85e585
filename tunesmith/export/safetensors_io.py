"""Safetensors without holding a model: shard headers read alone, tensors read one at a time, shards written by
streaming each tensor's bytes after a header planned in advance.

The file format (https://huggingface.co/docs/safetensors): 8 bytes little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}} relative to the data that follows.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

from tunesmith.errors import ModelError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def weight_files(model_dir: Path) -> list[Path]:
    """The model's safetensors files in index order (one file, or the shards its index names)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [model_dir / name for name in dict.fromkeys(weight_map.values())]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")):
        raise ModelError(
            f"{model_dir} holds pickle .bin weights only; tunesmith reads safetensors (convert the model with "
            "transformers: from_pretrained(...).save_pretrained(...), which writes safetensors)"
        )
    raise ModelError(f"{model_dir} has no model.safetensors or {INDEX_FILE}")


def read_tensor_infos(files: list[Path]) -> list[TensorInfo]:
    """Names, shapes and dtypes from the headers; no tensor data is read."""
    infos = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                tensor_slice = handle.get_slice(name)
                dtype = DTYPES.get(tensor_slice.get_dtype())
                if dtype is None:
                    raise ModelError(f"{file}: tensor {name} has dtype {tensor_slice.get_dtype()}, not a plain one")
                infos.append(TensorInfo(name, file, tuple(tensor_slice.get_shape()), dtype))
    return infos


class TensorReader:
    """Reads tensors by name with plain file reads, keeping at most one shard open: callers ask in shard order.

    Not `safe_open(...).get_tensor`: it memory-maps the shard, and every page read stays resident until the file is
    closed, so resident memory would grow to a whole shard (5 GB for big models). A read holds one tensor.
    """

    def __init__(self) -> None:
        self._file: Path | None = None
        self._stream: BinaryIO | None = None
        self._header: dict[str, dict] = {}
        self._data_start = 0

    def get(self, info: TensorInfo) -> torch.Tensor:
        if info.file != self._file:
            self.close()
            self._stream = info.file.open("rb")
            (header_size,) = struct.unpack("<Q", self._stream.read(8))
            self._header = json.loads(self._stream.read(header_size))
            self._data_start = 8 + header_size
            self._file = info.file
        assert self._stream is not None
        entry = self._header[info.name]
        begin, end = entry["data_offsets"]
        self._stream.seek(self._data_start + begin)
        buffer = bytearray(end - begin)
        if self._stream.readinto(buffer) != len(buffer):
            raise ModelError(f"{info.file} is truncated: tensor {info.name} is incomplete")
        if not buffer:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(DTYPES[entry["dtype"]]).reshape(info.shape)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream, self._file, self._header = None, None, {}


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@contextmanager
def shard_writer(path: Path, tensors: list[PlannedTensor]) -> Iterator[ShardWriter]:
    """Write the header for `tensors`, then let the caller write each tensor's data in the same order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        size = nbytes(tensor.shape, tensor.dtype)
        header[tensor.name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with path.open("wb") as stream:
        stream.write(struct.pack("<Q", len(encoded)))
        stream.write(encoded)
        writer = ShardWriter(stream, tensors)
        yield writer
        writer.check_complete()


class ShardWriter:
    def __init__(self, stream: BinaryIO, tensors: list[PlannedTensor]) -> None:
        self._stream = stream
        self._pending = list(tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._pending.pop(0)
        if (name, tuple(tensor.shape), tensor.dtype) != (expected.name, expected.shape, expected.dtype):
            raise AssertionError(f"shard writer expected {expected}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._stream.write(memoryview(data.numpy()))

    def check_complete(self) -> None:
        if self._pending:
            raise AssertionError(f"shard closed with {len(self._pending)} tensors unwritten")
