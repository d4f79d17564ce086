"""Pre-tokenized documents on disk: what `python -m hylo_jax.distill.prepare` writes and
the "tokens" data source (hylo_jax.distill.data) reads back through grain.

A prepared directory holds::

    manifest.json                       sources, splits, counts, tokenizer, settings
    <source>/<split>.array_record       one record per document (ArrayRecord, zstd)

A record is ``b"HYT1"``, the length of a JSON header (uint32, little endian), the
header, then the document's token ids (int32, little endian; no separator: the
reader appends one). The header is the document's provenance: ``source``, ``name``
(its id in the source), ``split``, and what the source adds (``group``, the ``pieces``
of an assembled long document, the prompt and sampling settings of generated text).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Iterable

import numpy as np

MAGIC = b"HYT1"
FORMAT = "hylo_jax.tokens/1"
MANIFEST = "manifest.json"
WRITER_OPTIONS = "group_size:1,zstd:3"  # one record per chunk: random access reads one document


def encode_record(header: dict[str, Any], tokens: np.ndarray) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + np.asarray(tokens, "<i4").tobytes()


def decode_record(record: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """(header, int32 token ids) of one record."""
    if record[:4] != MAGIC:
        raise ValueError("not a hylo_jax token record (written by python -m hylo_jax.distill.prepare)")
    (n,) = struct.unpack("<I", record[4:8])
    header = json.loads(record[8: 8 + n])
    return header, np.frombuffer(record, "<i4", offset=8 + n).astype(np.int32)


def shard_path(root: str, source: str, split: str) -> str:
    return os.path.join(root, source, f"{split}.array_record")


def write_shard(path: str, records: Iterable[tuple[dict[str, Any], np.ndarray]]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = ArrayRecordWriter(path, WRITER_OPTIONS)
    try:
        for header, tokens in records:
            writer.write(encode_record(header, tokens))
    finally:
        writer.close()


def read_shard(path: str) -> list[tuple[dict[str, Any], np.ndarray]]:
    """Every record of one shard, in order (for tests and inspection; training reads through grain)."""
    import grain

    source = grain.sources.ArrayRecordDataSource([path])
    return [decode_record(source[i]) for i in range(len(source))]


def read_manifest(root: str) -> dict[str, Any]:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: data.path must be a directory written by "
            f"`python -m hylo_jax.distill.prepare --config.data.prepare.out_dir=DIR`"
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; prepare the data again")
    return manifest


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary: shards are only read with the tokenizer that wrote them."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]
