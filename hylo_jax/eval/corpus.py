"""Real text corpora found on this machine, with a fixed train / held-out split.

Five corpora, all read from disk, none generated; each is discovered when it is asked
for, so the same code finds what a different machine (the GPU image) has:

- ``python_stdlib``: the CPython standard library sources (``*.py`` under
  ``sysconfig.get_paths()["stdlib"]``, without ``test/``, ``idlelib/idle_test/``
  and ``site-packages/``). One file is one document.
- ``pydoc_topics``: the English reference prose shipped as ``pydoc_data.topics``.
  One topic is one document.
- ``debian_docs``: README / ``*.txt`` / ``*.md`` / ``*.rst`` files (gzipped or not)
  under ``/usr/share/doc``. Empty where the system has none.
- ``site_packages``: the ``*.py``, ``*.md``, ``*.rst`` and ``*.txt`` files of every
  installed package (the running interpreter's site directories, in ``sys.path``
  order; hylo_jax and pallas_kernels themselves are left out). Files over
  ``max_file_bytes`` and files that are data rather than text are skipped (see
  `is_text`). One file is one document.
- ``man_pages``: the English manual pages under ``/usr/share/man/man*`` (and
  ``/usr/local/share/man``), decompressed and turned into plain text by
  `hylo_jax.eval.roff`; aliases (``.so`` pages) and symlinks are skipped. Empty where
  the system has none.

The split is made per *group* from a hash of ``corpus:group``, so it does not depend on
listing order and a document never moves between splits when others are added. For
the first three corpora the group is the document itself. For ``site_packages`` it is
the package directory, cut at three levels (``torch/nn/modules``,
``transformers/models/llama``; a top-level module is its own group), and for
``man_pages`` the Debian package that installed the page (from ``/var/lib/dpkg/info``;
the page itself where that database is missing): long documents are assembled from
whole groups (hylo_jax.distill.prepare), so a held-out package or manual is held out
in every form. Documents with identical text (licence boilerplate copied into many
packages) are kept once, so the same text cannot sit on both sides of the split.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import lzma
import os
import pathlib
import re
import site
import sys
import sysconfig
import zlib
from typing import Sequence

CORPORA = ("python_stdlib", "pydoc_topics", "debian_docs", "site_packages", "man_pages")
SPLITS = ("train", "heldout")
DEFAULT_HELDOUT_FRACTION = 0.1
DEFAULT_MAX_FILE_BYTES = 1_000_000

_STDLIB_SKIP_DIRS = ("test", "idle_test", "site-packages", "__pycache__")
_DEBIAN_DOC_DIR = pathlib.Path("/usr/share/doc")
_DEBIAN_SUFFIXES = (".txt", ".md", ".rst", ".markdown")
_SITE_SUFFIXES = (".py", ".md", ".rst", ".txt")
_SITE_SKIP_TOP = ("hylo_jax", "pallas_kernels")  # this project: never train on ourselves
_MAN_DIRS = ("/usr/share/man", "/usr/local/share/man")
_DPKG_INFO_DIR = "/var/lib/dpkg/info"
_DECOMPRESS = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # stable id inside its corpus (relative path or topic key)
    text: str


@dataclasses.dataclass(frozen=True)
class DocRef:
    """Where one document is, before it is read (listing is cheap; reading is not)."""

    corpus: str
    name: str  # stable id inside its corpus
    group: str  # the unit of the train / held-out split
    path: str = ""  # the file to read; "" for a pydoc topic (its name is the key)


def split_of(corpus: str, name: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
    """'train' or 'heldout' for one document (or group), from a hash of its corpus and name."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1]")
    digest = hashlib.sha256(f"{corpus}:{name}".encode()).digest()
    # 64 bits of the hash as a uniform number in [0, 1).
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "heldout" if u < heldout_fraction else "train"


def listing(
    corpus: str,
    *,
    roots: Sequence[str] | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    dpkg_info_dir: str = _DPKG_INFO_DIR,
) -> list[DocRef]:
    """The documents of `corpus` on this machine, sorted by name, without reading them.

    roots: the directories to search for ``site_packages`` (default: the running
    interpreter's site directories) and ``man_pages`` (default: /usr/share/man,
    /usr/local/share/man); ignored by the other corpora.
    """
    if corpus == "python_stdlib":
        refs = _python_stdlib()
    elif corpus == "pydoc_topics":
        from pydoc_data.topics import topics

        refs = [DocRef(corpus, key, key) for key in topics]
    elif corpus == "debian_docs":
        refs = _debian_docs()
    elif corpus == "site_packages":
        refs = _site_packages(_site_roots() if roots is None else roots, max_file_bytes)
    elif corpus == "man_pages":
        refs = _man_pages(_MAN_DIRS if roots is None else roots, dpkg_info_dir)
    else:
        raise ValueError(f"unknown corpus {corpus!r}; choose from {CORPORA}")
    return sorted(refs, key=lambda r: r.name)


def read(ref: DocRef) -> str | None:
    """The text of one document; None where the file is not text (undecodable, or data)."""
    if ref.corpus == "pydoc_topics":
        from pydoc_data.topics import topics

        return topics[ref.name]
    path = pathlib.Path(ref.path)
    try:
        raw = path.read_bytes()
        if path.suffix in _DECOMPRESS:
            raw = _DECOMPRESS[path.suffix](raw)
    except (OSError, EOFError, lzma.LZMAError, ValueError):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        if ref.corpus != "man_pages":
            return None  # a few stdlib files hold deliberately undecodable bytes (encoding tests)
        text = raw.decode("latin-1")  # older pages predate UTF-8 man pages; Latin-1 decodes anything
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() reads
    if ref.corpus == "man_pages":
        from hylo_jax.eval.roff import roff_to_text

        text = roff_to_text(text)
    elif ref.corpus == "site_packages" and not is_text(text, prose=not ref.name.endswith(".py")):
        return None
    return text if text.strip() else None


def documents(
    corpus: str, split: str = "train", heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
) -> list[Document]:
    """The documents of `corpus` in `split` ('train', 'heldout' or 'all'), sorted by name.

    Reads every file of the corpus in this process: for ``site_packages`` and
    ``man_pages`` that takes a while; hylo_jax.distill.prepare reads them in parallel.
    """
    if split not in SPLITS + ("all",):
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS + ('all',)}")
    seen: set[bytes] = set()
    out = []
    for ref in listing(corpus):
        text = read(ref)
        if text is None:
            continue
        digest = hashlib.sha256(text.encode()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        if split == "all" or split_of(corpus, ref.group, heldout_fraction) == split:
            out.append(Document(ref.name, text))
    return out


def is_text(text: str, *, prose: bool) -> bool:
    """False for files that are data dressed as text: numeric tables, label lists,
    serialized blobs, machine-written repetition.

    Every file: no line over 1000 characters (serialized descriptors, minified data),
    at most 30 % digits among the non-space characters (tables of numbers), and it does
    not compress below 8 % of its size with zlib (machine-generated repetition; real
    code sits near 23 %). Prose formats (.md, .rst, .txt) also need at least 3
    whitespace-separated fields per non-empty line and 40 % of those fields plain words
    (label lists and checksum files fail this).
    """
    lines = text.splitlines()
    if not lines or max(map(len, lines)) > 1000:
        return False
    chars = re.sub(r"\s", "", text)
    if not chars or sum(c.isdigit() for c in chars) > 0.3 * len(chars):
        return False
    data = text.encode()
    if len(zlib.compress(data, 6)) < 0.08 * len(data):
        return False
    if prose:
        fields = text.split()
        nonempty = sum(1 for line in lines if line.strip())
        words = sum(1 for f in fields if re.fullmatch(r"\(?[A-Za-z][a-z]*[.,;:!?)]*", f))
        if len(fields) < 3 * nonempty or words < 0.4 * len(fields):
            return False
    return True


# ----------------------------------------------------------------- listings
def _python_stdlib() -> list[DocRef]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    refs = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _STDLIB_SKIP_DIRS for part in rel.parts[:-1]):
            continue
        refs.append(DocRef("python_stdlib", str(rel), str(rel), str(path)))
    return refs


def _debian_docs() -> list[DocRef]:
    if not _DEBIAN_DOC_DIR.is_dir():
        return []
    refs = []
    for path in _DEBIAN_DOC_DIR.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        if not (name.startswith("README") or name.endswith(_DEBIAN_SUFFIXES)):
            continue
        rel = str(path.relative_to(_DEBIAN_DOC_DIR))
        refs.append(DocRef("debian_docs", rel, rel, str(path)))
    return refs


def _site_roots() -> list[str]:
    """The running interpreter's site directories, in sys.path order (the one Python imports from first)."""
    candidates = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    order = {os.path.realpath(p): i for i, p in reversed(list(enumerate(sys.path)))}
    roots = {os.path.realpath(p) for p in candidates if os.path.isdir(p)}
    return sorted(roots, key=lambda p: (order.get(p, len(order)), p))


def _site_packages(roots: Sequence[str], max_file_bytes: int) -> list[DocRef]:
    refs: dict[str, DocRef] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            top = rel_dir == "."
            dirnames[:] = sorted(
                d for d in dirnames
                if d != "__pycache__" and not d.endswith((".dist-info", ".egg-info"))
                and not (top and d in _SITE_SKIP_TOP)
            )
            for filename in filenames:
                if not filename.endswith(_SITE_SUFFIXES) or filename.startswith("__editable__"):
                    continue
                if top and filename.split(".")[0] in _SITE_SKIP_TOP:
                    continue
                path = os.path.join(dirpath, filename)
                name = filename if top else f"{rel_dir}/{filename}".replace(os.sep, "/")
                if name in refs or os.path.islink(path):
                    continue  # an earlier root shadows this file, as it does for imports
                try:
                    if os.path.getsize(path) > max_file_bytes:
                        continue
                except OSError:
                    continue
                parts = name.split("/")
                group = "/".join(parts[: min(len(parts) - 1, 3)]) or name
                refs[name] = DocRef("site_packages", name, group, path)
    return list(refs.values())


def _man_pages(roots: Sequence[str], dpkg_info_dir: str) -> list[DocRef]:
    owner = _dpkg_owners(dpkg_info_dir)
    refs: dict[str, DocRef] = {}
    for root in roots:
        if not os.path.isdir(root):
            continue
        # man1 ... man9, mann: the English pages; the other folders are translations.
        for section in sorted(d for d in os.listdir(root) if re.fullmatch(r"man[1-9n]\w*", d)):
            folder = os.path.join(root, section)
            if not os.path.isdir(folder):
                continue
            for filename in sorted(os.listdir(folder)):
                path = os.path.join(folder, filename)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                stem, suffix = os.path.splitext(filename)
                name = f"{section}/{stem if suffix in _DECOMPRESS else filename}"
                if name in refs:
                    continue
                refs[name] = DocRef("man_pages", name, owner.get(os.path.realpath(path), name), path)
    return list(refs.values())


def _dpkg_owners(info_dir: str) -> dict[str, str]:
    """Man page path -> the Debian package that installed it ({} without a dpkg database)."""
    owners: dict[str, str] = {}
    if not os.path.isdir(info_dir):
        return owners
    for filename in sorted(os.listdir(info_dir)):
        if not filename.endswith(".list"):
            continue
        package = filename[: -len(".list")].split(":")[0]  # "libc6:amd64" -> "libc6"
        try:
            with open(os.path.join(info_dir, filename), encoding="utf-8", errors="replace") as f:
                for line in f:
                    if "/man/man" in line:
                        owners.setdefault(os.path.realpath(line.strip()), package)
        except OSError:
            continue
    return owners
