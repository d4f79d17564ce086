"""Data pipeline (hylo_jax.distill.data) and local corpora (hylo_jax.eval.corpus).

All text is real (pydoc_data.topics prose, CPython stdlib files); the tokenizer is
the SmolLM2 teacher's, read from its GGUF (cached on disk after the first load).
"""

import json
import os
import sysconfig

import numpy as np
import pytest

from hylo_jax.convert.hub import load_tokenizer
from hylo_jax.distill import data
from hylo_jax.eval import corpus


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def topics():
    """A handful of real documents (the held-out pydoc topics), sorted by name."""
    docs = corpus.documents("pydoc_topics", "heldout")
    assert 3 <= len(docs) <= 20
    return [d.text for d in docs]


def _cfg(**overrides):
    cfg = data.default_config()
    cfg.kind, cfg.name, cfg.split = "corpus", "pydoc_topics", "heldout"
    cfg.num_threads = 1
    cfg.update(overrides)
    return cfg


def _stream(tokenizer, texts):
    """Independent expectation: every document's tokens then EOS, concatenated."""
    out = []
    for t in texts:
        out += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


def _rows(it):
    return [{k: v[i] for k, v in b.items()} for b in it for i in range(len(b["input_ids"]))]


def _check_row(row, eos_id):
    """Layout invariants of one packed row, checked element by element."""
    ids, seg, pos, mask = row["input_ids"], row["segment_ids"], row["positions"], row["loss_mask"]
    assert ids.dtype == seg.dtype == pos.dtype == np.int32 and mask.dtype == np.float32
    n = len(ids)
    real = int((seg != 0).sum())
    assert (seg[:real] != 0).all() and (seg[real:] == 0).all(), "padding only at the end"
    assert (ids[real:] == 0).all() and (pos[real:] == 0).all()
    expected_seg, expected_pos = 1, 0
    for t in range(real):
        if t > 0 and seg[t] != seg[t - 1]:
            assert ids[t - 1] == eos_id, "a segment that ends inside the row ends with EOS"
            expected_seg, expected_pos = expected_seg + 1, 0
        assert seg[t] == expected_seg and pos[t] == expected_pos
        expected_pos += 1
    for t in range(n):
        target_same_doc = t + 1 < n and seg[t] != 0 and seg[t + 1] == seg[t]
        assert mask[t] == float(target_same_doc)


def _pieces(rows):
    """Non-padding tokens of all rows, in order."""
    return [int(x) for r in rows for x in r["input_ids"][r["segment_ids"] != 0]]


def test_packing_reconstructs_documents(tokenizer, topics):
    cfg = _cfg(shuffle=False, num_epochs=1)
    rows = _rows(data.make_dataset(cfg, tokenizer, seq_len=96, batch_size=2, seed=0, shard=(0, 1), drop_remainder=False))
    for row in rows:
        _check_row(row, tokenizer.eos_token_id)
    assert _pieces(rows) == _stream(tokenizer, topics)
    # Rows are full except the last one (finite run).
    assert all((r["segment_ids"] != 0).all() for r in rows[:-1])


def test_tokenize_matches_tokenizer_call(tokenizer, topics):
    out = data.Tokenize(tokenizer, 7).map(topics[0])["input_ids"]
    assert out.dtype == np.int32
    assert out.tolist() == tokenizer(topics[0], add_special_tokens=False)["input_ids"] + [7]


@pytest.mark.parametrize("skip", [0, 1, 4, 9])
def test_resume_is_exact_after_json_round_trip(tokenizer, skip):
    cfg = _cfg(split="train")

    def make():
        return data.make_dataset(cfg, tokenizer, seq_len=64, batch_size=3, seed=5, shard=(0, 1))

    it = make()
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(6)]
    resumed = make()
    resumed.set_state(state)
    for e, g in zip(expected, [next(resumed) for _ in range(6)]):
        for k in e:
            np.testing.assert_array_equal(e[k], g[k])


def test_shuffle_is_seeded_and_epochs_differ(tokenizer, topics):
    def first_tokens(seed, n):
        cfg = _cfg(num_epochs=2)
        it = data.make_dataset(cfg, tokenizer, seq_len=512, batch_size=1, seed=seed, shard=(0, 1), drop_remainder=False)
        return _pieces(_rows(it))[:n]

    total = len(_stream(tokenizer, topics))
    a, b, c = first_tokens(0, 2 * total), first_tokens(0, 2 * total), first_tokens(1, 2 * total)
    assert a == b
    assert a != c
    # Each epoch is a permutation of the same documents, ordered differently.
    assert sorted(a[:total]) == sorted(a[total:]) == sorted(_stream(tokenizer, topics))
    assert a[:total] != a[total:]


def test_shards_are_disjoint_and_cover(tokenizer, topics):
    cfg = _cfg(shuffle=False, num_epochs=1)
    streams = []
    for index in range(2):
        it = data.make_dataset(cfg, tokenizer, seq_len=128, batch_size=1, seed=0, shard=(index, 2), drop_remainder=False)
        streams.append(_pieces(_rows(it)))
    assert streams[0] == _stream(tokenizer, topics[0::2])
    assert streams[1] == _stream(tokenizer, topics[1::2])


def _build_tfds(data_dir, texts):
    """A real TFDS dataset (ArrayRecord files + metadata), built locally; no download."""
    import tensorflow_datasets as tfds

    class HyloTestDocs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"body": tfds.features.Text(), "idx": np.int32})
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, t in enumerate(texts):
                yield i, {"body": t, "idx": i}

    HyloTestDocs(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "hylo_test_docs"


def test_sources_yield_the_same_documents(tmp_path, topics):
    from array_record.python import array_record_module

    (tmp_path / "txt" / "sub").mkdir(parents=True)
    for i, t in enumerate(topics):
        # Sorted names keep the document order; one in a subfolder checks recursion.
        folder = tmp_path / "txt" / ("sub" if i == 1 else "")
        (folder / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    with open(tmp_path / "a.jsonl", "w") as f:
        for t in topics[:2]:
            f.write(json.dumps({"body": t, "other": 1}) + "\n\n")  # blank lines are skipped
    with open(tmp_path / "b.jsonl", "w") as f:
        for t in topics[2:]:
            f.write(json.dumps({"body": t}) + "\n")
    for name, payloads in [("raw", [t.encode() for t in topics]), ("json", [json.dumps({"body": t}).encode() for t in topics])]:
        writer = array_record_module.ArrayRecordWriter(str(tmp_path / f"{name}.array_record"), "group_size:1")
        for p in payloads:
            writer.write(p)
        writer.close()
    tfds_name = _build_tfds(tmp_path / "tfds", topics)

    def texts(**kw):
        return [src[i] for src in [data.document_source(_cfg(**kw))] for i in range(len(src))]

    assert texts(kind="text", path=str(tmp_path / "txt")) == [topics[0], *topics[2:], topics[1]]
    assert texts(kind="text", path=f"{tmp_path}/txt/0*.txt,{tmp_path}/txt/sub/*.txt") == [topics[0], *topics[2:], topics[1]]
    assert texts(kind="jsonl", path=str(tmp_path / "*.jsonl"), field="body") == topics
    assert texts(kind="array_record", path=str(tmp_path / "raw.array_record"), field="") == topics
    assert texts(kind="array_record", path=str(tmp_path / "json.array_record"), field="body") == topics
    # TFDS stores examples in its own (shuffled) order; compare as sets.
    got = texts(kind="tfds", name=tfds_name, split="train", data_dir=str(tmp_path / "tfds"), field="body")
    assert sorted(got) == sorted(topics)


def test_source_errors_name_the_problem(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="unknown data kind"):
        data.document_source(_cfg(kind="parquet"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        data.document_source(_cfg(kind="text", path=str(tmp_path / "nothing*.txt")))
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "a"}) + "\n")
    src = data.document_source(_cfg(kind="jsonl", path=str(tmp_path / "x.jsonl"), field="text"))
    with pytest.raises(KeyError, match="no field 'text'"):
        src[0]
    with pytest.raises(ValueError, match="fewer than the 99 shards"):
        data.make_dataset(_cfg(), tokenizer, seq_len=8, batch_size=1, seed=0, shard=(0, 99))


# ------------------------------------------------------------------ corpus
@pytest.mark.parametrize("name", ["pydoc_topics", "python_stdlib"])
def test_corpus_split_is_a_deterministic_partition(name):
    train, held, every = (corpus.documents(name, s) for s in ("train", "heldout", "all"))
    assert {d.name for d in train}.isdisjoint(d.name for d in held)
    assert sorted(d.name for d in train + held) == [d.name for d in every]
    assert 0.02 < len(held) / len(every) < 0.25
    assert [d.name for d in held] == [d.name for d in corpus.documents(name, "heldout")]
    assert all(corpus.split_of(name, d.name) == "heldout" for d in held)


def test_corpus_text_is_the_real_file():
    docs = {d.name: d.text for d in corpus.documents("python_stdlib", "all")}
    root = sysconfig.get_paths()["stdlib"]
    with open(os.path.join(root, "textwrap.py"), encoding="utf-8") as f:
        assert docs["textwrap.py"] == f.read()
    assert not any(n.startswith("test/") for n in docs)
    from pydoc_data.topics import topics

    held = corpus.documents("pydoc_topics", "heldout")
    assert all(d.text == topics[d.name] for d in held)
    with pytest.raises(ValueError, match="unknown corpus"):
        corpus.documents("wikipedia")


def test_corpus_source_mixes_comma_separated_corpora():
    mixed = data.document_source(_cfg(name="pydoc_topics, python_stdlib"))
    parts = [[d.text for d in corpus.documents(n, "heldout")] for n in ("pydoc_topics", "python_stdlib")]
    assert list(mixed) == parts[0] + parts[1]
    with pytest.raises(ValueError, match="corpus names"):
        data.document_source(_cfg(name=" , "))
