"""Training data for distillation: documents -> tokens -> packed, sharded batches (grain).

    cfg = data.default_config(); cfg.kind = "corpus"; cfg.name = "pydoc_topics"
    it = data.make_dataset(cfg, tokenizer, seq_len=2048, batch_size=8, seed=0)
    batch = next(it)           # dict of numpy arrays, see below
    state = it.get_state()     # JSON-serialisable; it.set_state(state) resumes exactly

Pipeline (grain): a random-access source of documents -> this host's shard
(every `count`-th document from `index`) -> shuffle (seeded, reshuffled each
epoch) -> repeat -> tokenize with the teacher's tokenizer and append the separator
(EOS) -> concat-then-split packing into rows of `seq_len` tokens -> batches.

Each batch is a dict of numpy arrays, all [batch_size, seq_len]:

- ``input_ids``  int32  token ids; 0 on padding.
- ``segment_ids`` int32  1, 2, ... for the documents packed into the row, in order;
  0 on padding. A document longer than the row continues in the next row under a
  new segment id (and with positions starting again at 0).
- ``positions``  int32  position inside the document piece, restarting at 0 at each
  new segment; 0 on padding.
- ``loss_mask``  float32  1.0 at position t iff token t+1 is the next token of the
  same document piece, i.e. iff segment_ids[t] != 0 and segment_ids[t+1] ==
  segment_ids[t]. The next-token target of position t is input_ids[t+1]; for
  distillation, the teacher/student distributions at position t are compared only
  where loss_mask[t] == 1. The last column is always 0 (its target is not in the
  row), and so is the separator at the end of a document (what follows it is an
  unrelated document).

Padding appears only in the last rows of a finite (num_epochs > 0) run.
`batch_size` is the per-host batch: with several processes, each one calls
make_dataset with its own shard and gets a disjoint set of documents.

Sources (cfg.kind): "text" (files matching cfg.path globs, one file = one
document), "jsonl" (one document per line, text in cfg.field), "array_record"
(records are UTF-8 text, or JSON objects when cfg.field is set), "tfds"
(tfds.data_source(cfg.name, split=cfg.split, data_dir=cfg.data_dir); prepared
datasets only, never downloads), "corpus" (hylo_jax.eval.corpus, split cfg.split),
"tokens" (documents tokenized beforehand by `python -m hylo_jax.distill.prepare`
into the directory cfg.path, split cfg.split: nothing is tokenized while training).
All but "tokens" tokenize in grain's reader threads.

Mixture (cfg.mixture = "source:weight,..."; "tokens" and "corpus" kinds): each
source is shuffled, repeated and packed into rows on its own, and grain's mixer
interleaves the rows deterministically in the proportions of the weights (a missing
weight is 1), so the share of training tokens of each source is its weight over the
sum, and the iterator's state (every source's position and the mixer's) restores
exactly. Sources are the prepared ones (see the manifest) or corpus names. Without
a mixture, "tokens" mixes every prepared source that is not a long one (long_code,
long_docs: name them for the long-context stage) in proportion to its tokens, and
"corpus" concatenates the corpora of cfg.name. The mixture, each source's tokens
and documents are logged when the dataset is built (`mixture_info`). A finite run
(num_epochs > 0) of a mixture stops when its first source runs out.
"""

from __future__ import annotations

import bisect
import glob
import json
import logging
import os
import pathlib
import zlib
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from hylo_jax.distill import prepare, shards
from hylo_jax.eval import corpus

SOURCE_KINDS = ("text", "jsonl", "array_record", "tfds", "corpus", "tokens")

log = logging.getLogger("hylo_jax.distill.data")


def default_config() -> ml_collections.ConfigDict:
    """Data settings; every field can be overridden with --config.data.<field>=..."""
    cfg = ml_collections.ConfigDict()
    cfg.kind = "corpus"  # one of SOURCE_KINDS
    cfg.path = ""  # text / jsonl / array_record: glob(s), comma separated; tokens: the prepared directory
    cfg.mixture = ""  # "source:weight,..." (tokens: prepared sources; corpus: corpus names); "" = see above
    cfg.field = "text"  # jsonl / tfds: text field; array_record: JSON field ("" = raw text)
    cfg.name = "python_stdlib"  # tfds dataset name, or corpus name(s), comma separated (mixed)
    cfg.split = "train"  # tfds split, or corpus split ("train" / "heldout")
    cfg.data_dir = ""  # tfds data_dir ("" = tfds default)
    cfg.heldout_fraction = 0.1  # corpus only
    cfg.separator_token_id = -1  # appended after every document; -1 = tokenizer.eos_token_id
    cfg.shuffle = True
    cfg.num_epochs = 0  # 0 = repeat forever
    cfg.num_threads = 2  # grain reader threads (tokenization runs in them)
    cfg.prefetch_buffer_size = 16
    # `python -m hylo_jax.distill.prepare` (writes what kind "tokens" reads; uses heldout_fraction above).
    cfg.prepare = prepare.default_config()
    return cfg


# ----------------------------------------------------------------- sources
class TextFilesSource:
    """Random access over text files: element i is the whole text of file i."""

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> str:
        return pathlib.Path(self._paths[index]).read_text(encoding="utf-8")


class JsonlSource:
    """Random access over JSON-lines files without loading them: a byte-offset
    index of the non-empty lines is built once; element i is line i's `field`."""

    def __init__(self, paths: Sequence[str], field: str):
        self._paths = list(paths)
        self._field = field
        self._offsets: list[np.ndarray] = []
        for path in self._paths:
            offsets, pos = [], 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        offsets.append(pos)
                    pos += len(line)
            self._offsets.append(np.asarray(offsets, np.int64))
        self._starts = np.cumsum([0] + [len(o) for o in self._offsets]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> str:
        f = bisect.bisect_right(self._starts, index) - 1
        with open(self._paths[f], "rb") as fh:
            fh.seek(int(self._offsets[f][index - self._starts[f]]))
            line = fh.readline()
        record = json.loads(line)
        if self._field not in record:
            raise KeyError(
                f"{self._paths[f]}: line {index - self._starts[f]} has no field {self._field!r} "
                f"(fields: {sorted(record)}); set cfg.field"
            )
        return record[self._field]


class _FieldSource:
    """Maps a random-access source of records (bytes or dicts) to document texts."""

    def __init__(self, source, field: str, json_records: bool):
        self._source = source
        self._field = field
        self._json = json_records

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        record = self._source[index]
        if self._json:
            record = json.loads(record)
        if self._field:
            if self._field not in record:
                raise KeyError(f"record {index} has no field {self._field!r} (fields: {sorted(record)}); set cfg.field")
            record = record[self._field]
        return record.decode("utf-8") if isinstance(record, bytes) else str(record)


def _expand(path: str) -> list[str]:
    patterns = [p.strip() for p in path.split(",") if p.strip()]
    if not patterns:
        raise ValueError("cfg.path is empty; give one or more comma-separated file globs")
    files = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            pattern = os.path.join(pattern, "**", "*")
        matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matched:
            raise FileNotFoundError(f"no files match {pattern!r}")
        files.extend(matched)
    return files


def _names(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError("cfg.name is empty; give one or more comma-separated corpus names")
    return names


def document_source(cfg: ml_collections.ConfigDict):
    """A random-access sequence of document texts (str) described by `cfg`."""
    if cfg.kind == "text":
        return TextFilesSource(_expand(cfg.path))
    if cfg.kind == "jsonl":
        return JsonlSource(_expand(cfg.path), cfg.field)
    if cfg.kind == "array_record":
        return _FieldSource(grain.sources.ArrayRecordDataSource(_expand(cfg.path)), cfg.field, bool(cfg.field))
    if cfg.kind == "tfds":
        import tensorflow_datasets as tfds

        source = tfds.data_source(cfg.name, split=cfg.split, data_dir=cfg.data_dir or None, download=False)
        return _FieldSource(source, cfg.field, json_records=False)
    if cfg.kind == "corpus":
        return _corpus_texts(_names(cfg.name), cfg)
    if cfg.kind == "tokens":
        raise ValueError('kind "tokens" holds token ids, not texts; read it with make_dataset')
    raise ValueError(f"unknown data kind {cfg.kind!r}; choose from {SOURCE_KINDS}")


def _corpus_texts(names: list[str], cfg) -> list[str]:
    texts = [d.text for name in names for d in corpus.documents(name, cfg.split, cfg.heldout_fraction)]
    if not texts:
        raise ValueError(f"corpus {','.join(names)!r} has no documents in split {cfg.split!r} on this machine")
    return texts


class Tokenize(grain.transforms.Map):
    """text -> {"input_ids": int32 [n + 1]}: the document's tokens, then the separator."""

    def __init__(self, tokenizer, separator_token_id: int):
        self._tokenizer = tokenizer
        # A fast tokenizer's Rust backend is called directly: transformers' __call__
        # resets truncation/padding state on every call, which races across grain's
        # reader threads ("Already borrowed").
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._separator = separator_token_id

    def map(self, text: str) -> dict[str, np.ndarray]:
        if self._backend is not None:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        else:
            ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": np.asarray([*ids, self._separator], np.int32)}


class TokensOf(grain.transforms.Map):
    """A prepared record -> {"input_ids": int32 [n + 1]}: its tokens, then the separator."""

    def __init__(self, separator_token_id: int):
        self._separator = np.asarray([separator_token_id], np.int32)

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        return {"input_ids": np.concatenate([shards.decode_record(record)[1], self._separator])}


def parse_mixture(spec: str) -> dict[str, float]:
    """"a:3,b:1,c" -> {"a": 3.0, "b": 1.0, "c": 1.0}."""
    weights: dict[str, float] = {}
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        name, _, weight = (p.strip() for p in item.partition(":"))
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"data.mixture: weight {weight!r} of {name!r} is not a number (use source:weight,...)") from None
        if not name or name in weights or not w > 0:
            raise ValueError(f"data.mixture: bad item {item!r} (names once each, weights > 0; use source:weight,...)")
        weights[name] = w
    return weights


def _streams(cfg, tokenizer, separator: int) -> tuple[dict[str, grain.MapDataset], dict[str, dict[str, Any]]]:
    """name -> MapDataset of {"input_ids"} (one document's tokens + separator each), and
    name -> {"weight", "documents", "tokens"} (tokens: None where not known before tokenizing)."""
    weights = parse_mixture(cfg.mixture)
    if cfg.kind == "tokens":
        if not cfg.path:
            raise ValueError('data.kind="tokens" needs data.path: a directory written by python -m hylo_jax.distill.prepare')
        manifest = shards.read_manifest(cfg.path)
        made_with, using = manifest["tokenizer"]["fingerprint"], shards.tokenizer_fingerprint(tokenizer)
        if made_with != using:
            raise ValueError(
                f"{cfg.path} was tokenized with {manifest['tokenizer']['name'] or 'another tokenizer'} "
                f"(fingerprint {made_with}), not this teacher's ({using}); prepare it again with this teacher"
            )
        available = {s: e for s, e in manifest["sources"].items() if e[cfg.split]["documents"] > 0}
        if not weights:  # every short source, in proportion to its tokens
            weights = {s: float(e[cfg.split]["tokens"]) for s, e in available.items() if not e["long"]}
        missing = [s for s in weights if s not in available]
        if missing or not weights:
            raise ValueError(
                f"data.mixture: {missing or 'nothing'} not in {cfg.path} with split {cfg.split!r}; "
                f"prepared sources with documents there: {sorted(available)}"
            )
        streams, info = {}, {}
        for name in weights:
            entry = available[name][cfg.split]
            source = grain.sources.ArrayRecordDataSource([os.path.join(cfg.path, entry["path"])])
            streams[name] = grain.MapDataset.source(source).map(TokensOf(separator))
            info[name] = {"documents": entry["documents"], "tokens": entry["tokens"]}
    elif weights:
        if cfg.kind != "corpus":
            raise ValueError(f'data.mixture needs data.kind "tokens" or "corpus", not {cfg.kind!r}')
        streams, info = {}, {}
        for name in weights:
            texts = _corpus_texts([name], cfg)
            streams[name] = grain.MapDataset.source(texts).map(Tokenize(tokenizer, separator))
            info[name] = {"documents": len(texts), "tokens": None}
    else:
        source = document_source(cfg)
        streams = {"data": grain.MapDataset.source(source).map(Tokenize(tokenizer, separator))}
        weights, info = {"data": 1.0}, {"data": {"documents": len(source), "tokens": None}}
    for name in streams:
        info[name]["weight"] = weights[name]
    return streams, info


def _integer_weights(weights: dict[str, float]) -> dict[str, int]:
    """Weights as integers with the smallest at 100: grain's mixer keeps them exactly
    (it rescales floats to that form itself), so the logged shares are the real ones."""
    smallest = min(weights.values())
    return {k: max(1, round(100 * w / smallest)) for k, w in weights.items()}


def mixture_info(cfg: ml_collections.ConfigDict, tokenizer) -> dict[str, dict[str, Any]]:
    """source -> {"weight", "share" (of training rows and tokens), "documents", "tokens"} for cfg."""
    separator = cfg.separator_token_id if cfg.separator_token_id >= 0 else tokenizer.eos_token_id
    _, info = _streams(cfg, tokenizer, int(separator if separator is not None else 0))
    ints = _integer_weights({k: v["weight"] for k, v in info.items()})
    total = sum(ints.values())
    return {k: {**v, "share": ints[k] / total} for k, v in info.items()}


def _finish_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = packed["input_ids_segment_ids"].astype(np.int32)
    same_doc_next = np.zeros(segment_ids.shape, bool)
    same_doc_next[:-1] = (segment_ids[:-1] != 0) & (segment_ids[1:] == segment_ids[:-1])
    return {
        "input_ids": packed["input_ids"].astype(np.int32),
        "positions": packed["input_ids_positions"].astype(np.int32),
        "segment_ids": segment_ids,
        "loss_mask": same_doc_next.astype(np.float32),
    }


class _JsonStateIterator(grain.DatasetIterator):
    """Passes elements through; makes the state survive a JSON round trip.

    grain's concat-then-split packer keeps slices as tuples and tests an empty one
    with `slice != (-1, -1)`; after JSON they come back as lists, the test is
    always true, and a restored iterator silently drops a document. Lists are
    turned back into tuples before the state reaches grain.
    """

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._parent.get_state()))

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_tuple_slices(state))


def _tuple_slices(state):
    if isinstance(state, dict):
        return {
            k: {n: tuple(v) for n, v in val.items()} if k == "remainder_slices" else _tuple_slices(val)
            for k, val in state.items()
        }
    return state


class _JsonStateIterDataset(grain.IterDataset):
    def __iter__(self) -> grain.DatasetIterator:
        return _JsonStateIterator(self._parent.__iter__())


# ---------------------------------------------------------------- dataset
def make_dataset(
    cfg: ml_collections.ConfigDict,
    tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard: tuple[int, int] | None = None,
    *,
    drop_remainder: bool = True,
) -> grain.DatasetIterator:
    """An iterator of packed batches (see the module docstring for the batch layout).

    shard: (index, count) of this host; default (jax.process_index(), jax.process_count()).
    The iterator's get_state() / set_state() (JSON-serialisable dicts) resume exactly;
    hylo_jax.checkpoint saves it with the model.
    """
    return iter(make_iter_dataset(cfg, tokenizer, seq_len, batch_size, seed, shard, drop_remainder=drop_remainder))


def make_iter_dataset(
    cfg: ml_collections.ConfigDict,
    tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard: tuple[int, int] | None = None,
    *,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """The grain IterDataset behind make_dataset (iterate it for a fresh iterator)."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (a row needs a token and its target)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if shard is None:
        import jax

        shard = (jax.process_index(), jax.process_count())
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in [0, {count})")
    separator = cfg.separator_token_id if cfg.separator_token_id >= 0 else tokenizer.eos_token_id
    if separator is None:
        raise ValueError("the tokenizer has no eos_token_id; set cfg.separator_token_id")

    streams, info = _streams(cfg, tokenizer, int(separator))
    ints = _integer_weights({k: v["weight"] for k, v in info.items()})
    packed = {}
    for name, ds in streams.items():
        if len(ds) < count:
            raise ValueError(f"source {name!r} ({cfg.kind}) has {len(ds)} documents, fewer than the {count} shards")
        ds = ds[index::count]
        if cfg.shuffle:
            # Seeded by (seed, shard, source): hosts and sources shuffle independently.
            ds = ds.shuffle(seed=int(np.random.SeedSequence([seed, index, count, zlib.crc32(name.encode())]).generate_state(1)[0]))
        ds = ds.repeat(cfg.num_epochs if cfg.num_epochs > 0 else None)
        it_ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size)
        )
        packed[name] = grain.experimental.ConcatThenSplitIterDataset(it_ds, length_struct={"input_ids": seq_len})
    total = sum(ints.values())
    log.info(
        "data (%s, split %s, rows of %d): %s", cfg.kind, cfg.split, seq_len,
        "; ".join(
            f"{k} {100 * ints[k] / total:.1f} % of rows (weight {v['weight']:g}, {v['documents']:,} documents"
            + (f", {v['tokens']:,} tokens" if v["tokens"] is not None else "") + ")"
            for k, v in info.items()
        ),
    )
    it_ds = next(iter(packed.values())) if len(packed) == 1 else grain.IterDataset.mix(packed, ints)
    it_ds = it_ds.map(_finish_row)
    return _JsonStateIterDataset(it_ds.batch(batch_size, drop_remainder=drop_remainder))
