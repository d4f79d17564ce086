"""Token shards for distillation, made on the machine that trains (no network needed).

    python -m hylo_jax.distill.prepare --config=configs/distill.py \\
        --config.data.prepare.out_dir=/tmp/hylo_data [--config.data.prepare.sources=...]

Finds the real text of this machine (the corpora of hylo_jax.eval.corpus: the Python
standard library, pydoc topics, Debian docs, every installed package's sources and
docs, man pages), tokenizes it with the teacher's tokenizer in parallel processes,
removes duplicates across sources, assembles long documents, and writes one
ArrayRecord shard per source and split plus manifest.json (format:
hylo_jax.distill.shards). Training reads them with ``data.kind="tokens"``,
``data.path=<out_dir>`` and optionally ``data.mixture="source:weight,..."``.

Sources (``data.prepare.sources``): the five corpora, and

- ``long_code``: each ``site_packages`` group (a package directory, e.g.
  ``torch/nn/modules``) read in path order, every file after a ``# <path>`` line, cut
  at file boundaries into documents of at least ``long_min_tokens`` tokens. One
  package is one reading: its modules import and call each other, so a name is often
  defined thousands of tokens before its use; the document is one segment.
- ``long_docs``: each ``man_pages`` group (the pages one Debian package installed, a
  manual) in section then name order, cut the same way; one segment for the same
  reason (pages of one manual share commands, options and terms). Without a dpkg
  database a group is a single page, and only pages of ``long_min_tokens`` or more
  make long documents.

Groups shorter than ``long_min_tokens`` give no long document. Nothing synthetic
(no needles, keys or passkeys) is ever written: hylo_jax evaluates with such tasks.

- ``generated`` (when ``data.prepare.generate.num_prompts`` or ``heldout_prompts`` is
  above 0): text the teacher samples from prompts cut from the prepared documents
  (hylo_jax.distill.teacher_text); held-out prompts make its held-out split.

Split and duplicates: a document's split is its group's (hylo_jax.eval.corpus). Texts
that occur more than once (in any sources, the evaluation corpora python_stdlib,
pydoc_topics and debian_docs always included) are kept once; the copy is held out if
any of its occurrences is held out, so no text held out anywhere (the evaluation's
held-out sets included) reaches a training shard.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from typing import Any

import ml_collections
import numpy as np

from hylo_jax.distill import shards, teacher_text
from hylo_jax.eval import corpus

log = logging.getLogger("hylo_jax.distill.prepare")

# Long sources: the corpus they assemble, and whether each piece starts with a "# <name>" line.
LONG_SOURCES = {"long_code": ("site_packages", True), "long_docs": ("man_pages", False)}
# Always read (and hashed), so that their held-out texts never train from another source.
EVAL_CORPORA = ("python_stdlib", "pydoc_topics", "debian_docs")
ALL_SOURCES = corpus.CORPORA + tuple(LONG_SOURCES)


def default_config() -> ml_collections.ConfigDict:
    """Preparation settings: --config.data.prepare.<field>=... (heldout_fraction is data's)."""
    cfg = ml_collections.ConfigDict()
    cfg.out_dir = ""  # where manifest.json and the shards go (required; written atomically)
    cfg.overwrite = False  # replace an existing out_dir
    cfg.sources = ",".join(ALL_SOURCES)  # any of ALL_SOURCES, comma separated
    cfg.num_workers = 0  # tokenizer processes; 0 = one per core of this machine
    cfg.max_file_bytes = corpus.DEFAULT_MAX_FILE_BYTES  # site_packages files above this are skipped
    cfg.long_min_tokens = 32768  # long documents have at least this many tokens
    cfg.site_packages_dirs = ""  # comma separated; "" = the running interpreter's site directories
    cfg.man_dirs = ""  # comma separated; "" = /usr/share/man,/usr/local/share/man
    cfg.generate = teacher_text.default_config()  # teacher-generated text: the source "generated"
    return cfg


@dataclasses.dataclass
class _Doc:
    ref: corpus.DocRef
    sha: bytes
    nbytes: int
    tokens: np.ndarray | None  # None for documents read only to find duplicates
    split: str = ""


def prepare(
    data_cfg: ml_collections.ConfigDict, tokenizer, *, teacher=None, teacher_name: str = "", progress: bool = True
) -> dict[str, Any]:
    """Writes `data_cfg.prepare.out_dir` (see the module docstring); returns the manifest.

    teacher: the model that writes the source "generated" (hylo_jax.distill.teacher_text),
    needed only when data.prepare.generate asks for prompts.
    """
    cfg = data_cfg.prepare
    if not cfg.out_dir:
        raise ValueError("data.prepare.out_dir is empty; set --config.data.prepare.out_dir=DIR")
    out_dir = os.path.abspath(os.path.expanduser(cfg.out_dir))
    if os.path.exists(out_dir) and not cfg.overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --config.data.prepare.overwrite=True to replace it")
    sources = [s.strip() for s in cfg.sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in ALL_SOURCES]
    if unknown or not sources:
        raise ValueError(f"data.prepare.sources: unknown {unknown or 'none given'}; choose from {ALL_SOURCES}")
    if cfg.long_min_tokens < 1:
        raise ValueError(f"data.prepare.long_min_tokens={cfg.long_min_tokens} must be >= 1")
    generating = cfg.generate.num_prompts > 0 or cfg.generate.heldout_prompts > 0
    if generating and teacher is None:
        raise ValueError("data.prepare.generate asks for prompts but no teacher model was given")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("preparing shards needs a fast (Rust) tokenizer; this one has no backend_tokenizer")

    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    tokenized = sorted({LONG_SOURCES[s][0] if s in LONG_SOURCES else s for s in sources}, key=corpus.CORPORA.index)
    hashed_only = [c for c in EVAL_CORPORA if c not in tokenized]
    refs = []
    for name in tokenized + hashed_only:
        refs += [(ref, name in tokenized) for ref in _listing(name, cfg)]
    timing["list_s"] = time.perf_counter() - t_start
    log.info("%d documents listed in %.1f s (%s)", len(refs), timing["list_s"],
             ", ".join(f"{c}: {sum(r.corpus == c for r, _ in refs)}" for c in tokenized + hashed_only))

    t = time.perf_counter()
    workers = cfg.num_workers or os.cpu_count() or 1
    docs, unreadable, worker_stats = _read_all(refs, backend.to_str(), workers, progress)
    timing["tokenize_s"] = time.perf_counter() - t
    timing["tokenize_cpu_s"] = worker_stats["cpu_s"]  # summed over workers: the work, whatever shares the cores

    t = time.perf_counter()
    kept, duplicates = _dedupe(docs, data_cfg.heldout_fraction)
    records: dict[tuple[str, str], list[tuple[dict, np.ndarray, int]]] = collections.defaultdict(list)
    for doc in kept:
        if doc.ref.corpus in sources and doc.tokens is not None:
            header = {"source": doc.ref.corpus, "name": doc.ref.name, "split": doc.split, "group": doc.ref.group}
            records[doc.ref.corpus, doc.split].append((header, doc.tokens, doc.nbytes))
    long_stats = {}
    for source in sources:
        if source in LONG_SOURCES:
            long_stats[source] = _assemble_long(source, kept, backend, cfg.long_min_tokens, records)
    timing["assemble_s"] = time.perf_counter() - t

    gen_stats = None
    if generating:
        t = time.perf_counter()
        generated, gen_stats = teacher_text.generate_records(
            cfg.generate, [d for d in kept if d.tokens is not None], teacher, tokenizer,
            teacher_name=teacher_name, progress=progress,
        )
        for split, recs in generated.items():
            records["generated", split] = recs
        sources = [*sources, "generated"]
        timing["generate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = _write(tmp, sources, records, tokenizer, data_cfg, long_stats)
        if gen_stats is not None:
            manifest["sources"]["generated"]["generation"] = {**gen_stats, "teacher": teacher_name}
        manifest["dropped"] = {
            c: {"listed": sum(r.corpus == c for r, _ in refs), "not_text": unreadable[c], "duplicates": duplicates[c]}
            for c in tokenized + hashed_only
        }
        timing["write_s"] = time.perf_counter() - t
        timing["total_s"] = time.perf_counter() - t_start
        manifest["timing"] = {k: round(v, 2) for k, v in timing.items()}
        manifest["workers"] = workers
        manifest["peak_rss_mb"] = {"main": _peak_rss_kb() / 1024, "largest_worker": worker_stats["max_rss_kb"] / 1024}
        with open(os.path.join(tmp, shards.MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s in %.1f s", out_dir, timing["total_s"])
    return manifest


def _peak_rss_kb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def _listing(name: str, cfg) -> list[corpus.DocRef]:
    roots = {"site_packages": cfg.site_packages_dirs, "man_pages": cfg.man_dirs}.get(name, "")
    roots = [r.strip() for r in roots.split(",") if r.strip()] or None
    return corpus.listing(name, roots=roots, max_file_bytes=cfg.max_file_bytes)


# ------------------------------------------------------------ read + tokenize
_WORKER_TOKENIZER = None


def _init_worker(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer

    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _read_task(task: list[tuple[int, corpus.DocRef, bool]]) -> list[tuple[int, bytes | None, int, np.ndarray | None]]:
    """[(index, sha256 of the text or None if not text, bytes, tokens or None)] for one task."""
    out = []
    for index, ref, tokenize in task:
        text = corpus.read(ref)
        if text is None:
            out.append((index, None, 0, None))
            continue
        data = text.encode()
        tokens = None
        if tokenize:
            tokens = np.asarray(_WORKER_TOKENIZER.encode(text, add_special_tokens=False).ids, np.int32)
        out.append((index, hashlib.sha256(data).digest(), len(data), tokens))
    return out


def _read_all(refs, tokenizer_json: str, workers: int, progress: bool):
    """Reads and tokenizes every document in `workers` processes (largest files first)."""
    from tqdm import tqdm

    sizes = [os.path.getsize(r.path) if r.path else 4096 for r, _ in refs]
    order = sorted(range(len(refs)), key=lambda i: -sizes[i])
    # Tasks of about 1/64 of a worker's share, so the pool stays balanced to the end.
    target = max(1, sum(sizes) // (workers * 64))
    tasks, cur, cur_bytes = [], [], 0
    for i in order:
        cur.append((i, refs[i][0], refs[i][1]))
        cur_bytes += sizes[i]
        if cur_bytes >= target or len(cur) >= 256:
            tasks.append((cur, cur_bytes))
            cur, cur_bytes = [], 0
    if cur:
        tasks.append((cur, cur_bytes))

    results: list = [None] * len(refs)
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="read+tokenize", disable=not progress, mininterval=2)

    stats = {"cpu_s": 0.0, "max_rss_kb": 0}

    def collect(result):
        out, nbytes, cpu_s, rss_kb = result
        for index, sha, n, tokens in out:
            results[index] = (sha, n, tokens)
        stats["cpu_s"] += cpu_s
        stats["max_rss_kb"] = max(stats["max_rss_kb"], rss_kb)
        bar.update(nbytes)

    if workers == 1:
        _init_worker(tokenizer_json)
        for task in tasks:
            collect(_sized_read_task(task))
    else:
        # Not fork: the caller may have started JAX's threads (a loaded teacher, a test
        # session), and a forked copy of a threaded process can deadlock. A fork server
        # is a fresh process that imports this module once; workers fork from it.
        if "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__ if __name__ != "__main__" else "hylo_jax.distill.prepare"])
        else:
            ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_json,)) as pool:
            for result in pool.imap_unordered(_sized_read_task, tasks):
                collect(result)
    bar.close()

    docs, unreadable = [], collections.Counter()
    for (ref, _), (sha, n, tokens) in zip(refs, results):
        if sha is None:
            unreadable[ref.corpus] += 1
        else:
            docs.append(_Doc(ref, sha, n, tokens))
    stats["cpu_s"] = round(stats["cpu_s"], 2)
    return docs, unreadable, stats


def _sized_read_task(args):
    """_read_task, with the task's size (for progress), its CPU time and the worker's peak RSS."""
    import resource

    task, nbytes = args
    cpu = time.process_time()
    out = _read_task(task)
    return out, nbytes, time.process_time() - cpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _dedupe(docs: list[_Doc], heldout_fraction: float) -> tuple[list[_Doc], collections.Counter]:
    """One document per distinct text, with its split (held out if any copy is).

    The copy kept is the first, in corpus order then name, among the copies whose own
    split is the final one, so a long document never holds a text held out elsewhere.
    """
    rank = {c: i for i, c in enumerate(corpus.CORPORA)}
    by_text: dict[bytes, list[_Doc]] = collections.defaultdict(list)
    for doc in sorted(docs, key=lambda d: (rank[d.ref.corpus], d.ref.name)):
        doc.split = corpus.split_of(doc.ref.corpus, doc.ref.group, heldout_fraction)
        by_text[doc.sha].append(doc)
    kept, duplicates = [], collections.Counter()
    for copies in by_text.values():
        split = "heldout" if any(d.split == "heldout" for d in copies) else "train"
        keep = next(d for d in copies if d.split == split)
        kept.append(keep)
        for d in copies:
            if d is not keep:
                duplicates[d.ref.corpus] += 1
    return kept, duplicates


# ------------------------------------------------------------ long documents
def _assemble_long(source: str, kept: list[_Doc], backend, min_tokens: int, records) -> dict[str, int]:
    """Documents of >= min_tokens from whole groups of the base corpus, in name order."""
    base, file_header = LONG_SOURCES[source]
    groups: dict[str, list[_Doc]] = collections.defaultdict(list)
    for doc in sorted((d for d in kept if d.ref.corpus == base), key=lambda d: d.ref.name):
        groups[doc.ref.group].append(doc)
    newline = np.asarray(backend.encode("\n", add_special_tokens=False).ids, np.int32)
    stats = collections.Counter()
    for group, docs in sorted(groups.items()):
        pieces = []
        for doc in docs:
            head = backend.encode(f"# {doc.ref.name}\n", add_special_tokens=False).ids if file_header else []
            pieces.append((doc, np.concatenate([np.asarray(head, np.int32), doc.tokens, newline])))
        chunks, cur, cur_len = [], [], 0
        for piece in pieces:
            cur.append(piece)
            cur_len += len(piece[1])
            if cur_len >= min_tokens:
                chunks.append(cur)
                cur, cur_len = [], 0
        if cur and chunks:
            chunks[-1] += cur  # a short tail joins the document before it
        if not chunks:
            stats["groups_too_short"] += 1
            continue
        stats["groups"] += 1
        split = docs[0].split  # every kept text of a group has the group's split (see _dedupe)
        for k, chunk in enumerate(chunks):
            header = {"source": source, "name": f"{group}#{k}", "split": split, "group": group,
                      "pieces": [d.ref.name for d, _ in chunk]}
            tokens = np.concatenate([t for _, t in chunk])
            records[source, split].append((header, tokens, sum(d.nbytes for d, _ in chunk)))
    return dict(stats)


# ------------------------------------------------------------------- output
def _write(root: str, sources, records, tokenizer, data_cfg, long_stats) -> dict[str, Any]:
    os.makedirs(root)
    manifest: dict[str, Any] = {
        "format": shards.FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "tokenizer": {
            "fingerprint": shards.tokenizer_fingerprint(tokenizer),
            "name": getattr(tokenizer, "name_or_path", ""),
            "vocab_size": len(tokenizer.get_vocab()),
            "eos_token_id": tokenizer.eos_token_id,
        },
        "heldout_fraction": data_cfg.heldout_fraction,
        "settings": data_cfg.prepare.to_dict(),
        "sources": {},
    }
    for source in sources:
        entry: dict[str, Any] = {"long": source in LONG_SOURCES}
        if source in LONG_SOURCES:
            entry["assembled_from"] = LONG_SOURCES[source][0]
            entry.update(long_stats.get(source, {}))
        for split in corpus.SPLITS:
            recs = sorted(records.get((source, split), []), key=lambda r: r[0]["name"])
            path = shards.shard_path(root, source, split)
            shards.write_shard(path, ((h, t) for h, t, _ in recs))
            entry[split] = {
                "documents": len(recs),
                "tokens": int(sum(len(t) for _, t, _ in recs)),
                "bytes": int(sum(b for _, _, b in recs)),
                "path": os.path.relpath(path, root),
            }
        manifest["sources"][source] = entry
    return manifest


def format_table(manifest: dict[str, Any]) -> str:
    """The per-source table: documents, bytes, tokens, and the train / held-out split."""
    rows = [("source", "documents", "MB", "tokens", "train tok", "heldout tok", "heldout %", "train docs", "heldout docs")]
    totals = np.zeros(6)
    for source, e in manifest["sources"].items():
        tr, he = e["train"], e["heldout"]
        docs, mb, tokens = tr["documents"] + he["documents"], (tr["bytes"] + he["bytes"]) / 1e6, tr["tokens"] + he["tokens"]
        rows.append((source + (" (long)" if e["long"] else ""), f"{docs:,}", f"{mb:,.1f}", f"{tokens:,}",
                     f"{tr['tokens']:,}", f"{he['tokens']:,}", f"{100 * he['tokens'] / max(tokens, 1):.1f}",
                     f"{tr['documents']:,}", f"{he['documents']:,}"))
        if not e["long"]:
            totals += [docs, mb, tokens, tr["tokens"], he["tokens"], 0]
    rows.append(("total (not long)", f"{int(totals[0]):,}", f"{totals[1]:,.1f}", f"{int(totals[2]):,}",
                 f"{int(totals[3]):,}", f"{int(totals[4]):,}", f"{100 * totals[4] / max(totals[2], 1):.1f}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value>")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = _CONFIG.value
    from hylo_jax.convert.hub import load_tokenizer, resolve

    try:
        teacher = resolve(cfg.teacher or None)
        model = None
        generate = cfg.data.prepare.generate
        if generate.num_prompts > 0 or generate.heldout_prompts > 0:
            import jax.numpy as jnp

            from hylo_jax.convert.loading import load_model

            model = load_model(teacher.path, dtype=jnp.dtype(cfg.dtype), progress=False)
        manifest = prepare(cfg.data, load_tokenizer(teacher), teacher=model, teacher_name=os.path.basename(teacher.path))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(format_table(manifest))
    print(json.dumps({"out_dir": os.path.abspath(cfg.data.prepare.out_dir), **manifest["timing"]}))


if __name__ == "__main__":
    from absl import app, flags

    from hylo_jax.config_files import define_config_flag, load_config

    _CONFIG = define_config_flag(
        "distill", "ml_collections config file with get_config() (default configs/distill.py); preparation "
        "reads cfg.teacher (its tokenizer) and cfg.data. Fields of cfg.data and defaults:\n"
        + str(load_config("distill").data)
    )
    flags.declare_key_flag("config")
    app.run(main)
