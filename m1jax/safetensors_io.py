"""A small, strict safetensors reader/writer (memory-mapped, bf16-aware, with truncation checks).

We read the format ourselves instead of through ``safetensors.numpy`` because numpy has no bfloat16 (the published
checkpoint is bf16) and because a truncated or corrupt shard must fail with a message naming the file and tensor.
Format: 8-byte little-endian header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets: [b, e]}}``,
then the data (offsets relative to the end of the header).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not match the model."""


class SafetensorsFile:
    """Lazy view of one .safetensors file: ``names()``, ``shape(name)``, ``get(name)`` (a read-only memmap view)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as fh:
                raw = fh.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{self.path}: truncated (no safetensors header)")
                (header_len,) = struct.unpack("<Q", raw)
                if header_len > size - 8:
                    raise CheckpointError(f"{self.path}: corrupt header length {header_len} for a {size}-byte file")
                header = json.loads(fh.read(header_len))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file not found: {self.path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = header
        for name, entry in header.items():
            dtype = _DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
            begin, end = entry["data_offsets"]
            expected = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(dtype).itemsize
            if end - begin != expected:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {end - begin} bytes, expected {expected}")
            if self._data_start + end > size:
                raise CheckpointError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                                      f"{self._data_start + end} but the file has {size}")
        self._mmap = None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin: self._data_start + end]
        return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def open_checkpoint_dir(path: str | os.PathLike) -> dict[str, SafetensorsFile]:
    """Map every tensor name of a checkpoint directory (sharded index or a single file) to its open file."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    index_path = os.path.join(path, "model.safetensors.index.json")
    if not files:
        pickled = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        if pickled:
            raise CheckpointError(
                f"{path} holds only pickled weights ({', '.join(pickled[:3])}); m1jax refuses pickle files because "
                "loading them can run arbitrary code. Convert them to safetensors first, e.g. in a trusted "
                "environment: `transformers.AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
                "safe_serialization=True)`.")
        raise CheckpointError(f"no .safetensors files in {path}")
    opened: dict[str, SafetensorsFile] = {}
    if os.path.exists(index_path):
        with open(index_path) as fh:
            weight_map = json.load(fh)["weight_map"]
        handles = {}
        for name, fname in weight_map.items():
            if fname not in handles:
                handles[fname] = SafetensorsFile(os.path.join(path, fname))
            if name not in handles[fname]._entries:
                raise CheckpointError(f"index says {name!r} is in {fname}, but that file does not hold it")
            opened[name] = handles[fname]
        return opened
    if len(files) > 1:
        raise CheckpointError(f"{path} has {len(files)} .safetensors files but no model.safetensors.index.json")
    f = SafetensorsFile(os.path.join(path, files[0]))
    return {name: f for name in f.names()}


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
    """Write a safetensors file atomically (temporary file + rename)."""
    header, offset, arrays = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        code = _CODES.get(arr.dtype)
        if code is None:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for arr in arrays:
            fh.write(arr.tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

