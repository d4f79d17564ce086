"""Streaming safetensors reader and writer, numpy only.

The reader parses the safetensors header itself so that it can check a file before
any tensor is used: a header that is not valid JSON, offsets that overlap or point
outside the data, or a file cut short all raise `CheckpointError` naming the file and
the tensor. Tensors are read one at a time (`get`), so memory stays at one tensor.

`CheckpointReader` presents a whole checkpoint directory as one name -> tensor
mapping: a single `model.safetensors`, or shards listed in
`model.safetensors.index.json` (the Hugging Face layout).

The writer takes tensor *specs* first (name, dtype, shape) and a callback that
produces one tensor at a time, so an exporter never has to hold a second copy of the
model. Checkpoints larger than `max_shard_bytes` are split into
`model-0000i-of-0000n.safetensors` files plus an index, as transformers writes them.
bfloat16 is stored through `ml_dtypes`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# A header larger than this is not a real checkpoint header but a corrupt length field.
_MAX_HEADER_BYTES = 100 * 1024**2

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or malformed."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def dtype_name(dtype) -> str:
    """numpy dtype -> safetensors dtype string (e.g. bfloat16 -> 'BF16')."""
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")
    return _DTYPE_NAMES[dtype]


def numpy_dtype(name: str) -> np.dtype:
    """'bfloat16' / 'float32' / np dtype -> numpy dtype (bfloat16 via ml_dtypes)."""
    if isinstance(name, str) and name.replace("torch.", "") == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name.replace("torch.", "") if isinstance(name, str) else name)


class SafetensorsFile:
    """One .safetensors file: header parsed and checked on open, tensors read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"safetensors file not found: {self.path}") from None
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{self.path}: corrupt safetensors header: header length field says "
                    f"{header_len} bytes but the file has {size} bytes"
                )
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not valid JSON: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._check_entry(name, entry, data_start, size)
        # Overlapping tensors mean the header was altered; real writers never produce them.
        spans = sorted((t.begin, t.end, t.name) for t in self.tensors.values() if t.end > t.begin)
        for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise CheckpointError(f"{self.path}: corrupt safetensors header: tensors {a!r} and {b!r} overlap")

    def _check_entry(self, name: str, entry, data_start: int, size: int) -> TensorInfo:
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header entry for tensor {name!r}: {entry!r} ({e!r})") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes:
            raise CheckpointError(
                f"{self.path}: corrupt safetensors header: tensor {name!r} of shape {shape} "
                f"{entry['dtype']} needs {nbytes} bytes but its offsets are [{begin}, {end})"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{self.path}: truncated safetensors file: tensor {name!r} needs bytes "
                f"[{data_start + begin}, {data_start + end}) but the file has only {size} bytes"
            )
        return TensorInfo(name, dtype, shape, data_start + begin, data_start + end)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        out = np.empty(info.shape, info.dtype)
        with open(self.path, "rb") as f:
            f.seek(info.begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != info.end - info.begin:  # the file shrank after the header was checked
            raise CheckpointError(f"{self.path}: truncated safetensors file while reading tensor {name!r}")
        return out


class CheckpointReader:
    """All tensors of a Hugging Face style directory (single file or sharded + index)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        index_path = os.path.join(self.directory, INDEX_FILE)
        single_path = os.path.join(self.directory, SINGLE_FILE)
        self._where: dict[str, SafetensorsFile] = {}
        if os.path.exists(index_path):
            self._open_index(index_path)
        elif os.path.exists(single_path):
            shard = SafetensorsFile(single_path)
            self._where = {name: shard for name in shard.keys()}
        else:
            files = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"{self.directory}: no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors file"
                )
            for file in files:
                shard = SafetensorsFile(os.path.join(self.directory, file))
                for name in shard.keys():
                    if name in self._where:
                        raise CheckpointError(f"tensor {name!r} appears in both {self._where[name].path} and {shard.path}")
                    self._where[name] = shard

    def _open_index(self, index_path: str) -> None:
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
        shards: dict[str, SafetensorsFile] = {}
        for name, file in weight_map.items():
            if file not in shards:
                path = os.path.join(self.directory, file)
                if not os.path.exists(path):
                    raise FileNotFoundError(f"{index_path} lists shard {file} (tensor {name!r}) but {path} does not exist")
                shards[file] = SafetensorsFile(path)
            if name not in shards[file].tensors:
                raise CheckpointError(f"{index_path} says tensor {name!r} is in {file}, but that shard does not contain it")
            self._where[name] = shards[file]

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)


# --------------------------------------------------------------------- writing
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_safetensors(
    path: str | os.PathLike,
    specs: Sequence[TensorSpec],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write one file: header from `specs`, then each tensor from `produce(name)`.

    `produce` must return an array of exactly the spec's dtype and shape; anything
    else raises, so a header never disagrees with its data.
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": dtype_name(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in specs:
            array = np.ascontiguousarray(produce(spec.name))
            if array.dtype != np.dtype(spec.dtype) or array.shape != tuple(spec.shape):
                raise CheckpointError(
                    f"tensor {spec.name!r}: produced {array.dtype}{list(array.shape)}, "
                    f"expected {np.dtype(spec.dtype)}{list(spec.shape)}"
                )
            f.write(memoryview(array.reshape(-1).view(np.uint8)))


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split specs, in order, into groups of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_checkpoint(
    directory: str | os.PathLike,
    specs: Sequence[TensorSpec],
    produce: Callable[[str], np.ndarray],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write `model.safetensors`, or shards + `model.safetensors.index.json`. Returns file names."""
    directory = os.fspath(directory)
    shards = plan_shards(specs, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(os.path.join(directory, SINGLE_FILE), shards[0], produce)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, group in zip(names, shards):
        write_safetensors(os.path.join(directory, file), group, produce)
        weight_map.update({spec.name: file for spec in group})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    return names + [INDEX_FILE]

