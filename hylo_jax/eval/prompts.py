"""Long-context prompts assembled in tokens, so their length is exact.

A prompt is  [chat prefix + instruction] [context] [question + chat suffix + answer
prefix]: the frame is tokenised once, and the context (a haystack of real text with
pieces inserted, or a task's own list) gets exactly the tokens that remain.

The haystack is real text from `hylo_jax.eval.corpus`, by default the held-out split
(text no student trained on): documents in a seeded random order per sample, each
followed by a blank line, cut to the length needed. Changelogs are left out: they are
lists of version numbers and commit ids, look-alikes of numeric needles. Pieces
(needles) are whole lines inserted at line starts of the haystack, at the line start
nearest to the requested depth, so no word of the haystack is cut.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from hylo_jax.eval import corpus as corpus_lib
from hylo_jax.inference import text as text_lib

DEFAULT_HAYSTACK_CORPORA = ("debian_docs", "pydoc_topics", "python_stdlib")

_line_ends: dict[int, tuple[object, np.ndarray]] = {}


def line_end_ids(tokenizer) -> np.ndarray:
    """bool [vocab]: the tokens whose text ends with a newline (cached per tokenizer)."""
    key = id(tokenizer)
    if key not in _line_ends:
        ends = np.array([tokenizer.decode([i]).endswith("\n") for i in range(len(tokenizer))])
        _line_ends[key] = (tokenizer, ends)  # the tokenizer is held so its id stays unique
    return _line_ends[key][1]


def ids_of(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


class Haystack:
    """Real text to hide pieces in: documents tokenised once, drawn in a seeded order."""

    def __init__(self, tokenizer, texts: Sequence[str], description: str = "given texts"):
        self.docs = [ids_of(tokenizer, t.strip("\n") + "\n\n") for t in texts if t.strip()]
        self.tokens = int(sum(len(d) for d in self.docs))
        self.description = description
        if not self.docs:
            raise ValueError(f"the haystack ({description}) has no text")

    @classmethod
    def from_corpora(cls, tokenizer, corpora: Sequence[str] = DEFAULT_HAYSTACK_CORPORA, split: str = "heldout"):
        texts = []
        for name in corpora:
            texts += [d.text for d in corpus_lib.documents(name, split) if "changelog" not in d.name.lower()]
        return cls(tokenizer, texts, f"{split} split of {','.join(corpora)}")

    def draw(self, rng: np.random.Generator, n_tokens: int) -> np.ndarray:
        """n_tokens of the documents in a random order, concatenated."""
        if n_tokens > self.tokens:
            raise ValueError(
                f"a context of {n_tokens} tokens needs more text than the haystack ({self.description}) holds: "
                f"{self.tokens} tokens; add corpora or use a larger split (--config.haystack_split=all)"
            )
        out, n = [], 0
        for i in rng.permutation(len(self.docs)):
            out.append(self.docs[i])
            n += len(self.docs[i])
            if n >= n_tokens:
                break
        return np.concatenate(out)[:n_tokens]


def insert_lines(context: np.ndarray, pieces: Sequence[np.ndarray], depths: Sequence[float], line_end: np.ndarray):
    """Inserts each piece (whole lines) at the line start of `context` nearest to its
    relative depth. -> (ids, start of each piece in ids, in the order given)."""
    starts = np.concatenate([[0], np.nonzero(line_end[context])[0] + 1])
    at = [int(starts[np.argmin(np.abs(starts - d * len(context)))]) for d in depths]
    order = sorted(range(len(pieces)), key=lambda i: (at[i], i))
    out, pos, offset, where = [], 0, 0, [0] * len(pieces)
    for i in order:
        out.append(context[pos : at[i]])
        offset += at[i] - pos
        where[i] = offset
        out.append(pieces[i])
        offset += len(pieces[i])
        pos = at[i]
    out.append(context[pos:])
    return np.concatenate(out).astype(np.int32), where


@dataclasses.dataclass(frozen=True)
class Frame:
    """The token ids around a context: head (chat prefix + instruction) and tail
    (question, chat suffix, start of the answer)."""

    head: np.ndarray
    tail: np.ndarray

    def budget(self, length: int) -> int:
        n = length - len(self.head) - len(self.tail)
        if n < 0:
            raise ValueError(f"length={length} is too short: the prompt's frame alone takes {len(self.head) + len(self.tail)} tokens")
        return n

    def wrap(self, context: np.ndarray) -> tuple[np.ndarray, int, int]:
        """-> (input_ids, context start, context end)."""
        ids = np.concatenate([self.head, context, self.tail]).astype(np.int32)
        return ids, len(self.head), len(self.head) + len(context)


def frame(tokenizer, instruction: str, question: str, answer_prefix: str, *, chat_template: bool) -> Frame:
    """The instruction, then (after the context) the question as the user's message;
    the answer prefix starts the assistant's turn. Without a chat template (or when the
    tokenizer has none) the text is plain, with the BOS the tokenizer adds itself."""
    if chat_template and text_lib.has_chat_template(tokenizer):
        before, after = text_lib.chat_pieces(tokenizer)
        head = ids_of(tokenizer, before + instruction + "\n\n")
        return Frame(head, ids_of(tokenizer, "\n\n" + question + after + answer_prefix))
    head = np.asarray(tokenizer(instruction + "\n\n")["input_ids"], np.int32)
    return Frame(head, ids_of(tokenizer, "\n\n" + question + "\n" + answer_prefix))


def vocabulary(min_len: int = 4, max_len: int = 10) -> list[str]:
    """Lower-case English words of the Python reference prose (pydoc topics, both
    splits; each word seen at least twice), sorted: keys, word values and list words."""
    counts: dict[str, int] = {}
    for doc in corpus_lib.documents("pydoc_topics", "all"):
        for w in re.findall(r"(?<![\w.'])[a-z]+(?![\w'])", doc.text):
            if min_len <= len(w) <= max_len:
                counts[w] = counts.get(w, 0) + 1
    return sorted(w for w, c in counts.items() if c >= 2 and len(set(w)) > 2)
