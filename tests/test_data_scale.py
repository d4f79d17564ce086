"""Data at scale: corpora discovered on disk, prepared token shards, mixtures, long documents.

A tiny corpus is built in a tmp dir (a site-packages tree and a man tree of real-looking
text, each document tagged with a unique word), prepared with the real teacher
tokenizer, and read back through grain. References are independent: the tokenizer
called on each file's text, and the split rule applied to each group by hand.
"""

import gzip
import json
import os
import re
import shutil
import subprocess
import types

import numpy as np
import pytest
from flax import nnx

from hylo_jax.config import ModelConfig
from hylo_jax.convert.hub import load_tokenizer
from hylo_jax.distill import data, prepare, shards
from hylo_jax.eval import corpus, roff
from hylo_jax.inference import generate
from hylo_jax.models import CausalLM

HELDOUT_FRACTION = 0.5
LONG_MIN = 700


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _groups(n_train, n_heldout, corpus_name, prefix, suffix=""):
    """Group names with a known split under HELDOUT_FRACTION (found by the split rule itself)."""
    train, held, i = [], [], 0
    while len(train) < n_train or len(held) < n_heldout:
        name = f"{prefix}{i}{suffix}"
        side = train if corpus.split_of(corpus_name, name, HELDOUT_FRACTION) == "train" else held
        if len(side) < (n_train if side is train else n_heldout):
            side.append(name)
        i += 1
    return train, held


def _module_text(tag, k):
    body = "\n".join(f"    total_{k}_{j} = compute_{j}(value, {j})  # step {j} of {tag}" for j in range(12))
    return f'"""Module {k} of {tag}: helpers."""\n\nTAG = "{tag}"\n\n\ndef run_{k}(value):\n{body}\n    return value\n'


def _tiny_teacher(vocab_size):
    """A random 1-layer model over the real tokenizer's vocabulary: it writes the generated source."""
    config = ModelConfig(
        model_type="llama", vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
    )
    return CausalLM(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """A prepared tiny corpus with generated text: .root (out dir), .manifest, .split_of_tag,
    .texts {(source, name): text}, .dup (the kept copy of a duplicated file), .model, .generate."""
    root = tmp_path_factory.mktemp("tiny")
    site, man = root / "site", root / "man"
    expected_split, texts = {}, {}
    train_pk, held_pk = _groups(2, 2, "site_packages", "pkg")
    for pkg in train_pk + held_pk:
        # Two levels: pkg/a.py ... and pkg/sub/... (both in group "pkg" / "pkg/sub").
        for rel, k in [("__init__.py", 0), ("core.py", 1), ("util.py", 2), ("sub/deep.py", 3)]:
            tag = f"uniq{pkg}x{k}"
            path = site / pkg / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_module_text(tag, k))
            group = pkg if "/" not in rel else f"{pkg}/sub"
            expected_split[tag] = corpus.split_of("site_packages", group, HELDOUT_FRACTION)
            texts["site_packages", f"{pkg}/{rel}"] = path.read_text()
        (site / pkg / "README.md").write_text(f"# {pkg}\n\nThis package holds the helpers that the tests read back in order.\n")
        texts["site_packages", f"{pkg}/README.md"] = (site / pkg / "README.md").read_text()
        (site / pkg / "table.txt").write_text("\n".join(f"{i} {i * 7} {i * 13}" for i in range(200)))  # data
    # The same text in a train and a held-out package: it must be held out, once.
    dup = _module_text("uniqduplicate", 9)
    for pkg in (train_pk[0], held_pk[0]):
        (site / pkg / "copy.py").write_text(dup)
    texts["site_packages", f"{held_pk[0]}/copy.py"] = dup
    expected_split["uniqduplicate"] = "heldout"
    (site / "hylo_jax").mkdir()
    (site / "hylo_jax" / "x.py").write_text("SELF = 'uniqourselves'\n")  # never read

    (man / "man1").mkdir(parents=True)
    (man / "fr" / "man1").mkdir(parents=True)  # a translation: skipped
    train_pages, held_pages = _groups(2, 1, "man_pages", "man1/tool", ".1")  # a page's name: man1/ls.1
    for page in train_pages + held_pages:
        stem = page.split("/")[1][:-2]
        tag = f"uniq{stem}"
        src = f'.TH {stem.upper()} 1\n.SH NAME\n{stem} \\- does {tag}\n.SH DESCRIPTION\n' + "".join(
            f".PP\nParagraph {j}: \\fB{tag}\\fR reads the \\fIinput\\fP and writes it, line {j}.\n" for j in range(40)
        )
        (man / "man1" / f"{stem}.1.gz").write_bytes(gzip.compress(src.encode()))
        expected_split[tag] = corpus.split_of("man_pages", page, HELDOUT_FRACTION)
        texts["man_pages", page] = roff.roff_to_text(src)
    (man / "man1" / "alias.1").write_text(f".so {train_pages[0]}\n")
    os.symlink(man / f"{train_pages[0]}.gz", man / "man1" / "link.1.gz")

    cfg = data.default_config()
    cfg.heldout_fraction = HELDOUT_FRACTION
    cfg.prepare.update(
        out_dir=str(root / "out"), sources="site_packages,man_pages,long_code,long_docs", num_workers=2,
        long_min_tokens=LONG_MIN, site_packages_dirs=str(site), man_dirs=str(man),
    )
    cfg.prepare.generate.update(num_prompts=4, heldout_prompts=2, prompt_tokens=64, max_new_tokens=6, batch_size=2,
                                temperature=1.0, top_p=0.9, seed=7)
    model = _tiny_teacher(len(tokenizer))
    manifest = prepare.prepare(cfg, tokenizer, teacher=model, teacher_name="tiny", progress=False)
    return types.SimpleNamespace(root=str(root / "out"), manifest=manifest, split_of_tag=expected_split, texts=texts,
                                 dup=f"{held_pk[0]}/copy.py", model=model, generate=cfg.prepare.generate)


def _records(root, source, split):
    return shards.read_shard(shards.shard_path(root, source, split))


def _tags(text):
    return set(re.findall(r"uniq\w+?(?=\W|$)", text))


def _tokens_cfg(root, **kw):
    cfg = data.default_config()
    cfg.update(kind="tokens", path=root, num_threads=1, **kw)
    return cfg


def _stream(it):
    """Every non-padding token of every row, in order."""
    return [int(x) for b in it for ids, seg in zip(b["input_ids"], b["segment_ids"]) for x in ids[seg != 0]]


def test_prepare_splits_dedupes_and_filters(tiny, tokenizer):
    root, manifest, expected_split, texts = tiny.root, tiny.manifest, tiny.split_of_tag, tiny.texts
    seen = {}
    for source in ("site_packages", "man_pages", "long_code", "long_docs"):
        for split in corpus.SPLITS:
            for header, tokens in _records(root, source, split):
                assert header["source"] == source and header["split"] == split
                for tag in _tags(tokenizer.decode(tokens)):
                    assert expected_split[tag] == split, (tag, source)
                    seen.setdefault(tag, set()).add(source)
    assert set(seen) == set(expected_split)  # every document somewhere, data files and ourselves nowhere
    # The duplicated text is held out and stored once (its train-side copy is gone).
    copies = [(h["name"], s) for s in corpus.SPLITS for h, _ in _records(root, "site_packages", s) if "copy" in h["name"]]
    assert copies == [(tiny.dup, "heldout")]
    sp = manifest["dropped"]["site_packages"]
    assert sp["duplicates"] == 1 and sp["not_text"] == 4  # the four numeric tables
    assert manifest["dropped"]["man_pages"]["not_text"] == 1  # the .so alias; the symlink is not even listed
    # The stored tokens are the tokenizer's on the file's text.
    for source in ("site_packages", "man_pages"):
        for split in corpus.SPLITS:
            for header, tokens in _records(root, source, split):
                ref = tokenizer(texts[source, header["name"]], add_special_tokens=False)["input_ids"]
                assert tokens.tolist() == ref
    counts = manifest["sources"]["site_packages"]
    assert counts["train"]["tokens"] == sum(len(t) for _, t in _records(root, "site_packages", "train"))


def test_heldout_never_reaches_a_training_batch(tiny, tokenizer):
    root, expected_split = tiny.root, tiny.split_of_tag

    def tags_in(it):
        rows = [tokenizer.decode(ids[seg != 0]) for b in it for ids, seg in zip(b["input_ids"], b["segment_ids"])]
        return {t for row in rows for t in _tags(row) if t in expected_split}  # (a tag cut by a row end is partial)

    every = "site_packages:1,man_pages:1,long_code:1,long_docs:1,generated:1"
    it = data.make_dataset(_tokens_cfg(root, mixture=every, num_epochs=1), tokenizer, seq_len=64, batch_size=3,
                           seed=1, shard=(0, 1), drop_remainder=False)
    seen = tags_in(it)
    assert seen and all(expected_split[t] == "train" for t in seen)
    # Source by source, one epoch in order reads back exactly the train shard (tokens + EOS).
    for source in ("site_packages", "man_pages", "long_code", "long_docs", "generated"):
        cfg = _tokens_cfg(root, mixture=source, num_epochs=1, shuffle=False)
        make = lambda: data.make_dataset(cfg, tokenizer, seq_len=128, batch_size=2, seed=0, shard=(0, 1),  # noqa: E731
                                         drop_remainder=False)
        want = [x for _, t in _records(root, source, "train") for x in [*t.tolist(), tokenizer.eos_token_id]]
        assert _stream(make()) == want
        seen |= tags_in(make())
    assert seen == {t for t, split in expected_split.items() if split == "train"}
    # The default mixture reads the short sources only, in proportion to their tokens.
    info = data.mixture_info(_tokens_cfg(root), tokenizer)
    assert set(info) == {"site_packages", "man_pages", "generated"}
    tokens = {s: tiny.manifest["sources"][s]["train"]["tokens"] for s in info}
    for s in info:
        assert info[s]["share"] == pytest.approx(tokens[s] / sum(tokens.values()), rel=0.02)


def test_long_documents_have_the_length_and_order_claimed(tiny, tokenizer):
    root, manifest, texts = tiny.root, tiny.manifest, tiny.texts
    for long_source, base, with_header in [("long_code", "site_packages", True), ("long_docs", "man_pages", False)]:
        by_group = {}
        for split in corpus.SPLITS:
            for header, tokens in _records(root, long_source, split):
                assert len(tokens) >= LONG_MIN
                want = []
                for name in header["pieces"]:
                    if with_header:
                        want += tokenizer(f"# {name}\n", add_special_tokens=False)["input_ids"]
                    want += tokenizer(texts[base, name], add_special_tokens=False)["input_ids"]
                    want += tokenizer("\n", add_special_tokens=False)["input_ids"]
                assert tokens.tolist() == want
                by_group.setdefault(header["group"], []).append(header)
        assert by_group, long_source
        for group, headers in by_group.items():
            # A group's documents, in order, hold all its kept files in path order.
            pieces = [p for h in sorted(headers, key=lambda h: int(h["name"].split("#")[1])) for p in h["pieces"]]
            kept = sorted(h["name"] for s in corpus.SPLITS for h, _ in _records(root, base, s) if h["group"] == group)
            assert pieces == kept
    # A subpackage here (one module) is shorter than LONG_MIN: counted, not written.
    assert manifest["sources"]["long_code"]["groups_too_short"] > 0


def test_generated_text_is_the_teachers_and_respects_the_split(tiny, tokenizer):
    root, g = tiny.root, tiny.generate
    stored = {split: _records(root, "generated", split) for split in corpus.SPLITS}
    assert [len(stored["train"]), len(stored["heldout"])] == [g.num_prompts, g.heldout_prompts]
    docs = {(h["source"], h["name"]): (split, t) for src in ("site_packages", "man_pages")
            for split in corpus.SPLITS for h, t in _records(root, src, split)}
    batches = {}
    for split, recs in stored.items():
        for h, t in recs:
            assert h["split"] == split and h["prompt_tokens"] == g.prompt_tokens and h["teacher"] == "tiny"
            # The prompt is cut from a document of the same split, at the recorded start.
            doc_split, doc_tokens = docs[h["prompt_from"]["source"], h["prompt_from"]["name"]]
            assert doc_split == split
            start, prompt = h["prompt_from"]["start"], t[: g.prompt_tokens]
            if h["kind"] == "continuation":
                np.testing.assert_array_equal(prompt, doc_tokens[start: start + g.prompt_tokens])
            else:
                text = tokenizer.decode(prompt)
                assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
                assert tokenizer.decode(doc_tokens[start: start + 8]) in text
            batches.setdefault(h["seed"], []).append((h["batch_row"], t))
    assert {h["kind"] for recs in stored.values() for h, _ in recs} == {"chat", "continuation"}
    # Each batch generated again from the stored prompts with the recorded seed: the same tokens.
    for seed, rows in batches.items():
        rows = [t for _, t in sorted(rows, key=lambda r: r[0])]
        out = generate(tiny.model, np.stack([t[: g.prompt_tokens] for t in rows]), g.max_new_tokens,
                       temperature=g.temperature, top_p=g.top_p, seed=seed, eos_token_id=tokenizer.eos_token_id)
        for t, new, num in zip(rows, out.tokens, out.num_tokens):
            new = new[:num]
            new = new[:-1] if len(new) and new[-1] == tokenizer.eos_token_id else new
            np.testing.assert_array_equal(t[g.prompt_tokens:], new)
    stats = tiny.manifest["sources"]["generated"]["generation"]
    assert stats["prompts"] == 6 and stats["tokens_per_s"] > 0


def _fake_prepared(root, sizes, lengths):
    """A prepared directory with sources whose tokens are in disjoint ranges (source i: 100 i + ...)."""

    class Tok:
        eos_token_id = 1

        def get_vocab(self):
            return {f"t{i}": i for i in range(1000)}

    rng = np.random.default_rng(0)
    manifest = {"format": shards.FORMAT, "tokenizer": {"fingerprint": shards.tokenizer_fingerprint(Tok()), "name": "fake"},
                "sources": {}}
    for i, (name, n) in enumerate(sizes.items()):
        recs = [({"source": name, "name": f"d{j}", "split": "train"}, 100 * (i + 1) + rng.integers(0, 99, lengths))
                for j in range(n)]
        path = shards.shard_path(root, name, "train")
        shards.write_shard(path, recs)
        entry = {"documents": n, "tokens": n * lengths, "bytes": 0, "path": os.path.relpath(path, root)}
        manifest["sources"][name] = {"long": False, "train": entry, "heldout": {**entry, "documents": 0}}
    with open(os.path.join(root, shards.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return Tok()


def test_mixture_proportions_and_exact_resume(tmp_path):
    tok = _fake_prepared(str(tmp_path), {"a": 30, "b": 50, "c": 20}, lengths=37)
    cfg = _tokens_cfg(str(tmp_path), mixture="a:1,b:2.5,c:0.5", prefetch_buffer_size=2)

    def make():
        return data.make_dataset(cfg, tok, seq_len=16, batch_size=4, seed=3, shard=(0, 1))

    # Each row holds one source's tokens; over many batches the shares match the weights.
    it = make()
    counts = np.zeros(3)
    for _ in range(200):
        for row in next(it)["input_ids"]:
            real = row[(row != 1) & (row != 0)]
            counts[real[0] // 100 - 1] += 1
            assert (real // 100 == real[0] // 100).all()
    np.testing.assert_allclose(counts / counts.sum(), [1 / 4, 2.5 / 4, 0.5 / 4], atol=0.01)
    info = data.mixture_info(cfg, tok)
    assert [round(info[s]["share"], 3) for s in "abc"] == [0.25, 0.625, 0.125]

    for skip in (0, 3, 17):
        it = make()
        for _ in range(skip):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(8)]
        resumed = make()
        resumed.set_state(state)
        for e, g in zip(expected, [next(resumed) for _ in range(8)]):
            for k in e:
                np.testing.assert_array_equal(e[k], g[k])


def test_mixture_and_tokens_errors_name_the_fix(tmp_path, tokenizer):
    tok = _fake_prepared(str(tmp_path), {"a": 3}, lengths=5)
    with pytest.raises(ValueError, match="not in .* prepared sources with documents there: \\['a'\\]"):
        data.make_dataset(_tokens_cfg(str(tmp_path), mixture="zzz:1"), tok, 8, 1, 0, shard=(0, 1))
    with pytest.raises(ValueError, match="weights > 0"):
        data.parse_mixture("a:0")
    with pytest.raises(ValueError, match="not a number"):
        data.parse_mixture("a:x")
    with pytest.raises(ValueError, match="tokenized with fake"):
        data.make_dataset(_tokens_cfg(str(tmp_path)), tokenizer, 8, 1, 0, shard=(0, 1))
    with pytest.raises(FileNotFoundError, match="hylo_jax.distill.prepare"):
        data.make_dataset(_tokens_cfg(str(tmp_path / "nothing")), tok, 8, 1, 0, shard=(0, 1))
    cfg = data.default_config()
    cfg.prepare.out_dir = str(tmp_path)  # exists
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prepare.prepare(cfg, tokenizer)


# ------------------------------------------------------------------ corpora
def test_is_text_rejects_data_and_keeps_code_and_prose():
    code = open(corpus.__file__).read()
    assert corpus.is_text(code, prose=False)
    prose = "The packer splits long documents into rows; each row restarts its positions.\n" * 3
    assert corpus.is_text(prose, prose=True)
    assert not corpus.is_text("\n".join(f"{i}, {i * 0.5:.4f}, {i ** 2}" for i in range(300)), prose=False)
    assert not corpus.is_text("\n".join(f"label_{i}" for i in range(300)), prose=True)  # a label list
    assert not corpus.is_text("x = [" + ", ".join("0" for _ in range(3000)) + "]\n", prose=False)  # one huge line
    assert not corpus.is_text("def f():\n    return 1\n" * 2000, prose=False)  # machine repetition


def test_site_packages_listing_groups_and_exclusions(tmp_path):
    for rel in ["a.py", "pkg/__init__.py", "pkg/m.py", "pkg/s/t/u/v.py", "pkg/x.so", "pkg/__pycache__/m.py",
                "pkg-1.0.dist-info/METADATA.txt", "hylo_jax/y.py", "pallas_kernels/z.py", "big/b.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n" * (300 if rel.startswith("big") else 1))
    refs = corpus.listing("site_packages", roots=[str(tmp_path)], max_file_bytes=1000)
    assert [(r.name, r.group) for r in refs] == [
        ("a.py", "a.py"), ("pkg/__init__.py", "pkg"), ("pkg/m.py", "pkg"), ("pkg/s/t/u/v.py", "pkg/s/t"),
    ]


def test_man_pages_grouped_by_debian_package(tmp_path):
    (tmp_path / "man" / "man1").mkdir(parents=True)
    (tmp_path / "man" / "man8").mkdir()
    for page in ["man1/a.1.gz", "man1/b.1.gz", "man8/c.8"]:
        (tmp_path / "man" / page).write_bytes(b"x")
    (tmp_path / "info").mkdir()
    (tmp_path / "info" / "tools:amd64.list").write_text(f"{tmp_path}/man/man1/a.1.gz\n{tmp_path}/man/man8/c.8\n")
    refs = corpus.listing("man_pages", roots=[str(tmp_path / "man")], dpkg_info_dir=str(tmp_path / "info"))
    assert [(r.name, r.group) for r in refs] == [("man1/a.1", "tools"), ("man1/b.1", "man1/b.1"), ("man8/c.8", "tools")]


def test_roff_to_text_on_a_handwritten_page():
    src = r""".\" a comment
.TH DEMO 1 2024 "demo 1.0" "User Commands"
.ds Xx expanded
.de Ignored
.  B never shown
..
.SH NAME
demo \- show \fBbold\fR and \fIitalic\fP text
.SH OPTIONS
.TP
.BR \-v ", " \-\-verbose
Say more \(em much more, \*(lqquoted\*(rq and \*(Xx.
.IP \(bu 2
A bullet with a \[u00E9]l\('e.
.if n \{\
.  sp
hidden
.\}
.TS
tab(:);
l l.
key:value
.TE
.nf
line one \
continued
.fi
"""
    assert roff.roff_to_text(src) == (
        "DEMO(1)  User Commands\n\nNAME\ndemo - show bold and italic text\n\nOPTIONS\n\n-v, --verbose\n"
        "Say more \u2014 much more, \u201cquoted\u201d and expanded.\n\n\u2022\nA bullet with a \u00e9l\u00e9.\n"
        "key  value\nline one continued\n"
    )
    assert roff.roff_to_text(".so man1/other.1\n") == ""


@pytest.mark.skipif(shutil.which("groff") is None or not os.path.isdir("/usr/share/man/man1"),
                    reason="needs groff and man pages (the independent reference)")
def test_roff_keeps_the_words_groff_prints():
    import collections

    pages = [p for p in ("man1/ls.1.gz", "man1/bash.1.gz", "man1/git-config.1.gz") if os.path.exists(f"/usr/share/man/{p}")]
    assert pages
    for page in pages:
        src = gzip.decompress(open(f"/usr/share/man/{page}", "rb").read()).decode()
        ref = subprocess.run(["groff", "-man", "-t", "-Tutf8", "-rLL=300n", "-rHY=0", "-P-cbu"], input=src.encode(),
                             capture_output=True, check=True).stdout.decode()
        words = lambda t: collections.Counter(re.findall(r"[A-Za-z0-9_]{2,}", t))  # noqa: E731
        ours, theirs = words(roff.roff_to_text(src)), words(ref)
        common = sum((ours & theirs).values())
        # groff adds a page header and footer (title, date, version): a few words per page.
        assert common >= 0.98 * sum(theirs.values()) - 20, page
        assert common >= 0.995 * sum(ours.values()), page
