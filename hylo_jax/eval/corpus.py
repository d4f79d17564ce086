"""Real text corpora found on this machine, with a fixed train / held-out split.

Three corpora, all read from disk, none generated:

- ``python_stdlib``: the CPython standard library sources (``*.py`` under
  ``sysconfig.get_paths()["stdlib"]``, without ``test/``, ``idlelib/idle_test/``
  and ``site-packages/``). One file is one document.
- ``pydoc_topics``: the English reference prose shipped as ``pydoc_data.topics``.
  One topic is one document.
- ``debian_docs``: README / ``*.txt`` / ``*.md`` / ``*.rst`` files (gzipped or not)
  under ``/usr/share/doc``. Empty where the system has none.

The split is made per document from a hash of ``corpus:name``, so it does not
depend on listing order and a document never moves between splits when others
are added. Documents with identical text (licence boilerplate copied into many
packages) are kept once, so the same text cannot sit on both sides of the split.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pathlib
import sysconfig

CORPORA = ("python_stdlib", "pydoc_topics", "debian_docs")
SPLITS = ("train", "heldout")
DEFAULT_HELDOUT_FRACTION = 0.1

_STDLIB_SKIP_DIRS = ("test", "idle_test", "site-packages", "__pycache__")
_DEBIAN_DOC_DIR = pathlib.Path("/usr/share/doc")
_DEBIAN_SUFFIXES = (".txt", ".md", ".rst", ".markdown")


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # stable id inside its corpus (relative path or topic key)
    text: str


def split_of(corpus: str, name: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
    """'train' or 'heldout' for one document, from a hash of its corpus and name."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1]")
    digest = hashlib.sha256(f"{corpus}:{name}".encode()).digest()
    # 64 bits of the hash as a uniform number in [0, 1).
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "heldout" if u < heldout_fraction else "train"


def documents(
    corpus: str, split: str = "train", heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
) -> list[Document]:
    """The documents of `corpus` in `split` ('train', 'heldout' or 'all'), sorted by name."""
    if split not in SPLITS + ("all",):
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS + ('all',)}")
    readers = {"python_stdlib": _python_stdlib, "pydoc_topics": _pydoc_topics, "debian_docs": _debian_docs}
    if corpus not in readers:
        raise ValueError(f"unknown corpus {corpus!r}; choose from {CORPORA}")
    seen: set[bytes] = set()
    out = []
    for doc in sorted(readers[corpus](), key=lambda d: d.name):
        if not doc.text.strip():
            continue
        digest = hashlib.sha256(doc.text.encode()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        if split == "all" or split_of(corpus, doc.name, heldout_fraction) == split:
            out.append(doc)
    return out


def _python_stdlib() -> list[Document]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _STDLIB_SKIP_DIRS for part in rel.parts[:-1]):
            continue
        # A few stdlib files hold deliberately undecodable bytes (encoding tests).
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        docs.append(Document(str(rel), text))
    return docs


def _pydoc_topics() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(key, text) for key, text in topics.items()]


def _debian_docs() -> list[Document]:
    if not _DEBIAN_DOC_DIR.is_dir():
        return []
    docs = []
    for path in _DEBIAN_DOC_DIR.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        if not (name.startswith("README") or name.endswith(_DEBIAN_SUFFIXES)):
            continue
        try:
            raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue  # unreadable or not UTF-8 text: not a prose document
        docs.append(Document(str(path.relative_to(_DEBIAN_DOC_DIR)), text))
    return docs
