"""Teacher-generated text: prompts cut from the prepared real text, continued by the
teacher with sampling, written as the prepared source ``generated``.

`hylo_jax.distill.prepare` calls `generate_records` when
``data.prepare.generate.num_prompts`` (train) or ``heldout_prompts`` is above 0. Two
kinds of prompt, all exactly ``prompt_tokens`` tokens long (one compiled prefill
and decode shape for the whole run):

- ``continuation``: a window of a real document, starting at a line start, fed as
  plain text; the teacher writes what comes next.
- ``chat``: the teacher's chat template around an instruction formed from real text:
  "Explain what this code does:" and a window of a Python file starting at a ``def``
  or ``class`` line where there is one, or "Summarize the following text:" and a
  window of a prose document; the teacher answers as the assistant.

Train prompts come only from train documents and make the train split of
``generated``; held-out prompts come from held-out documents and make its held-out
split, which is never trained on. A record is the prompt's tokens followed by the
teacher's (its closing EOS dropped: the reader appends the separator), with the
prompt's document, window start, kind and the sampling settings, seed and batch
row as provenance. Generation runs on the default device with the JAX caches
(hylo_jax.inference.generate), one batch of ``batch_size`` prompts at a time, each
batch with its own seed (``seed`` + batch index).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ml_collections
import numpy as np

log = logging.getLogger("hylo_jax.distill.teacher_text")

INSTRUCTIONS = {"code": "Explain what this code does:\n\n", "prose": "Summarize the following text:\n\n"}


def default_config() -> ml_collections.ConfigDict:
    """--config.data.prepare.generate.<field>=..."""
    cfg = ml_collections.ConfigDict()
    cfg.num_prompts = 0  # prompts from train documents (0 with heldout_prompts 0: no generated source)
    cfg.heldout_prompts = 0  # prompts from held-out documents -> the held-out split of "generated"
    cfg.chat_fraction = 0.5  # share of chat-template instructions; the rest are plain continuations
    cfg.prompt_tokens = 128  # every prompt has exactly this many tokens
    cfg.max_new_tokens = 256
    cfg.temperature = 0.8
    cfg.top_p = 0.95
    cfg.top_k = 0  # 0 = off
    cfg.batch_size = 32  # prompts decoded together
    cfg.decode_block = 16  # tokens per compiled decode call
    cfg.seed = 0
    return cfg


def generate_records(cfg, docs, model, tokenizer, *, teacher_name: str = "", progress: bool = True):
    """-> ({split: [(header, tokens, bytes)]}, stats) for the `generated` source.

    docs: the prepared documents, objects with .ref (hylo_jax.eval.corpus.DocRef),
    .split and .tokens (int32); prompts are cut from them.
    """
    from tqdm import tqdm

    from hylo_jax.inference import generate
    from hylo_jax.inference.text import chat_pieces, has_chat_template

    if cfg.prompt_tokens < 8:
        raise ValueError(f"data.prepare.generate.prompt_tokens={cfg.prompt_tokens} must be >= 8")
    if not 0.0 <= cfg.chat_fraction <= 1.0:
        raise ValueError(f"data.prepare.generate.chat_fraction={cfg.chat_fraction} must be in [0, 1]")
    chat = None
    if cfg.chat_fraction > 0:
        if not has_chat_template(tokenizer):
            raise ValueError("the teacher's tokenizer has no chat template; set data.prepare.generate.chat_fraction=0")
        chat = tuple(_ids(tokenizer, piece) for piece in chat_pieces(tokenizer))
    line_starts = _line_start_ids(tokenizer)
    eos = int(tokenizer.eos_token_id)

    out: dict[str, list] = {"train": [], "heldout": []}
    # generated_tokens: up to each row's EOS; row_steps: rows x decode steps run (a batch
    # decodes until its longest row ends), the work the accelerator did.
    stats = {"prompts": 0, "generated_tokens": 0, "row_steps": 0, "generate_s": 0.0, "first_batch_s": 0.0,
             "first_batch_tokens": 0}
    bar = tqdm(total=cfg.num_prompts + cfg.heldout_prompts, desc="generate", unit="prompt", disable=not progress)
    for split, n in (("train", cfg.num_prompts), ("heldout", cfg.heldout_prompts)):
        if n <= 0:
            continue
        pool = [d for d in docs if d.split == split and d.tokens is not None and len(d.tokens) > cfg.prompt_tokens]
        if not pool:
            raise ValueError(f"no {split} document is longer than prompt_tokens={cfg.prompt_tokens} to cut prompts from")
        rng = np.random.default_rng([cfg.seed, split == "heldout"])
        prompts = [_prompt(rng, pool, cfg, chat, line_starts, tokenizer) for _ in range(n)]
        for b, lo in enumerate(range(0, n, cfg.batch_size)):
            batch = prompts[lo: lo + cfg.batch_size]
            seed = cfg.seed + b + (1 << 20) * (split == "heldout")
            t = time.perf_counter()
            gen = generate(
                model, np.stack([p["ids"] for p in batch]), cfg.max_new_tokens, temperature=cfg.temperature,
                top_p=cfg.top_p, top_k=cfg.top_k, seed=seed, eos_token_id=eos, pad_token_id=eos,
                decode_block=cfg.decode_block,
            )
            dt = time.perf_counter() - t
            if not stats["first_batch_s"]:  # it includes compiling
                stats["first_batch_s"], stats["first_batch_tokens"] = dt, int(gen.num_tokens.sum())
            stats["generate_s"] += dt
            stats["row_steps"] += len(batch) * int(gen.num_tokens.max())
            for row, (p, new, num) in enumerate(zip(batch, gen.tokens, gen.num_tokens)):
                new = new[:num]
                new = new[:-1] if len(new) and new[-1] == eos else new
                header = {
                    "source": "generated", "name": f"{split}-{lo + row:06d}", "split": split, "kind": p["kind"],
                    "prompt_from": p["from"], "prompt_tokens": len(p["ids"]), "new_tokens": int(len(new)),
                    "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                    "max_new_tokens": cfg.max_new_tokens, "seed": seed, "batch_row": row, "teacher": teacher_name,
                }
                tokens = np.concatenate([p["ids"], new]).astype(np.int32)
                out[split].append((header, tokens, len(tokenizer.decode(tokens).encode())))
                stats["generated_tokens"] += int(num)
            stats["prompts"] += len(batch)
            bar.update(len(batch))
    bar.close()
    stats["tokens_per_s"] = stats["generated_tokens"] / max(stats["generate_s"], 1e-9)
    if stats["generate_s"] > stats["first_batch_s"]:  # after the first batch: no compiling
        stats["steady_tokens_per_s"] = (stats["generated_tokens"] - stats["first_batch_tokens"]) / (
            stats["generate_s"] - stats["first_batch_s"])
    stats = {k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()}
    log.info("generated %d tokens for %d prompts in %.1f s (%.1f tokens/s; first batch %.1f s with compiling; "
             "after it %s tokens/s)", stats["generated_tokens"], stats["prompts"], stats["generate_s"],
             stats["tokens_per_s"], stats["first_batch_s"], stats.get("steady_tokens_per_s", "-"))
    return out, stats


def _ids(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


def _line_start_ids(tokenizer) -> np.ndarray:
    """bool [vocab]: the token's text ends with a newline, so the next token starts a line."""
    return np.asarray([t.endswith("\n") for t in tokenizer.batch_decode([[i] for i in range(len(tokenizer))])])


def _prompt(rng, pool, cfg, chat, line_starts, tokenizer) -> dict[str, Any]:
    """One prompt of exactly cfg.prompt_tokens tokens from a random document of `pool`
    (chosen in proportion to its tokens, so prompts follow the text the pool holds)."""
    sizes = np.asarray([len(d.tokens) for d in pool], np.float64)
    doc = pool[rng.choice(len(pool), p=sizes / sizes.sum())]
    kind = "chat" if chat is not None and rng.random() < cfg.chat_fraction else "continuation"
    body_len = cfg.prompt_tokens
    if kind == "chat":
        style = "code" if doc.ref.name.endswith(".py") else "prose"
        prefix = np.concatenate([chat[0], _ids(tokenizer, INSTRUCTIONS[style])])
        body_len -= len(prefix) + len(chat[1])
        if body_len < 8:
            raise ValueError(f"data.prepare.generate.prompt_tokens={cfg.prompt_tokens} leaves no room for text "
                             f"after the chat template ({len(prefix) + len(chat[1])} tokens)")
    tokens = doc.tokens
    # Window starts at line starts (position 0 or after a newline token), with room for the body.
    starts = np.flatnonzero(np.concatenate([[True], line_starts[tokens[:-1]]])[: len(tokens) - body_len + 1])
    if len(starts) == 0:
        starts = np.arange(len(tokens) - body_len + 1)
    if kind == "chat" and style == "code":
        defs = [s for s in starts[:4096] if tokenizer.decode(tokens[s: s + 3]).lstrip().startswith(("def ", "class ", "async def "))]
        starts = np.asarray(defs) if defs else starts
    start = int(starts[rng.integers(len(starts))])
    body = tokens[start: start + body_len]
    ids = np.concatenate([prefix, body, chat[1]]) if kind == "chat" else body
    return {"ids": ids.astype(np.int32), "kind": kind,
            "from": {"source": doc.ref.corpus, "name": doc.ref.name, "start": start}}
