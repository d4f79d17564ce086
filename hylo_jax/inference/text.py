"""Text around generation: the checkpoint's tokenizer, its EOS/pad ids, chat prompts
and incremental detokenization for streaming.

A hylo_jax checkpoint, an HF directory and a GGUF file each carry their tokenizer
and their special ids: an HF-style directory in its tokenizer files and
`generation_config.json` (falling back to `config.json`), a GGUF file in its
`tokenizer.ggml.*` metadata (from which transformers builds its tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence


def load_tokenizer(path: str | os.PathLike | None = None):
    """The tokenizer of a checkpoint (HF dir | .gguf | hub id | hylo_jax dir; None:
    the default teacher). The one place generation and evaluation load it from."""
    from hylo_jax.convert.hub import resolve
    from hylo_jax.distill.data import load_tokenizer as _load

    return _load(resolve(path).path)


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Special ids a checkpoint declares for generation."""

    eos_token_id: tuple[int, ...]  # any of these ends a sequence (empty: none declared)
    pad_token_id: int | None


def as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def generation_defaults(path: str | os.PathLike | None = None, tokenizer=None) -> GenerationDefaults:
    """EOS and pad ids of a checkpoint: `generation_config.json`, else `config.json`
    (HF-style dirs), where they are not declared the tokenizer's; for a GGUF file the
    tokenizer's, which transformers builds from the file's `tokenizer.ggml.*` metadata
    (eos_token_id, padding_token_id)."""
    from hylo_jax.convert.hub import resolve

    source = resolve(path)
    declared = {}
    if source.kind == "gguf":
        tokenizer = tokenizer or load_tokenizer(source.path)
    else:
        for name in ("config.json", "generation_config.json"):  # the second wins
            file = os.path.join(source.path, name)
            if os.path.isfile(file):
                with open(file) as f:
                    declared.update({k: v for k, v in json.load(f).items() if v is not None})
    eos = as_ids(declared.get("eos_token_id"))
    pad = declared.get("pad_token_id")
    if tokenizer is not None:
        eos = eos or as_ids(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id if pad is None else pad
    if pad is None and eos:
        pad = eos[0]
    return GenerationDefaults(eos, None if pad is None else int(pad))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_pieces(tokenizer, system_prompt: str | None = None) -> tuple[str, str]:
    """(text before, text after) the user's message in the tokenizer's chat template,
    up to the assistant's turn. Prompts built in tokens put their content between the
    two pieces, so the template costs a known number of tokens."""
    marker = "\u2063HYLO_USER_MESSAGE\u2063"
    messages = [{"role": "user", "content": marker}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if text.count(marker) != 1:
        raise ValueError("the tokenizer's chat template does not place the user message once; use chat_template=False")
    before, after = text.split(marker)
    return before, after


def encode(tokenizer, text: str, *, chat_template: bool = True, system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt: inside the chat template (as the user's message) when
    `chat_template` and the tokenizer has one, else the text as is (with the BOS the
    tokenizer adds by itself)."""
    if chat_template and has_chat_template(tokenizer):
        before, after = chat_pieces(tokenizer, system_prompt)
        return list(tokenizer(before + text + after, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


class StreamDecoder:
    """Turns a growing list of token ids into the text to print next. Decoding the
    whole list each time (not token by token) keeps multi-token characters and
    tokenizer spacing right; text that ends in an incomplete character waits."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed :], len(text)
        return new
