"""RULER-style long-context tasks over real text, and their scoring.

Each task turns (length, number of samples, seed) into `Sample`s: a prompt of exactly
`length` tokens (hylo_jax.eval.prompts) and its ground truth. The haystack is real
held-out text; what is hidden in it is synthetic, as in RULER (Hsieh et al. 2024,
"RULER: What's the Real Context Size of Your Long-Context Language Models?"):

| task | hidden in real text | asked |
|---|---|---|
| niah_single_number / _word / _uuid | one line "One of the special magic numbers for {key} is: {value}." | the value of the key |
| niah_multikey | four such lines with different keys (three distractors) | the value of one key |
| niah_multivalue | four lines with the same key and four values | all four values |
| niah_multiquery | four lines with four keys | the values of all four keys |
| vt | two chains "VAR ABCDE = 41234" -> "VAR FGHIJ = VAR ABCDE" -> ... (one distractor chain) | every variable of one chain |
| cwe | (no haystack) a numbered list of words, ten of them much more frequent | the ten frequent words |
| qa | one real function of a held-out CPython module, among the code of other held-out modules | the function's name, given its docstring's first line |
| passkey | the original passkey task (hylo_jax.eval.passkey): repeated filler, not real text | the 5-digit key |

`qa` measures reading real code at length: the question quotes the first line of a
docstring that occurs once in the context, and the answer (the name in the `def` line
above it) is in that one place; names defined in more than one held-out module are
never asked. It uses CPython's own code, so a model may have seen a function during
pretraining; a model that ignores the context is scored too (see the tests).

Keys and word values are English words of the Python reference prose
(`prompts.vocabulary`); numbers have 7 digits, UUIDs are version-4. The first piece of
evidence of sample i of n sits at relative depth (i + u) / n with u uniform, so the
depths of a run cover the context evenly; the other pieces are at uniform depths.

Scoring follows RULER: each expected answer counts when it occurs in the generated
text, case-insensitively; a sample scores the fraction of its answers found (all
tasks here ask for every answer; `qa` has one). Unlike RULER, an answer must occur
as a whole word ("1234567" does not count inside "12345678"). The passkey task keeps
its own rule (the first number generated must be the key).

A task is `samples(env, length, n, seed) -> [Sample]` and `score(prediction, sample)`;
`env` (`TaskEnv`) holds what samples are built from (tokenizer, chat template use,
haystack, vocabulary). The same seed gives the same samples.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
import textwrap
import uuid
import zlib
from typing import Callable, Sequence

import numpy as np

from hylo_jax.eval import corpus as corpus_lib
from hylo_jax.eval import prompts


@dataclasses.dataclass(frozen=True)
class Sample:
    input_ids: np.ndarray  # int32 [length]
    answers: tuple[str, ...]  # what the generated text must contain
    depth: float | None  # relative depth of the (first) evidence in the context; None: spread
    context: tuple[int, int]  # [start, end) of the context in input_ids


class TaskEnv:
    """What tasks build their samples from, for one tokenizer. The haystack and the
    code pool are made on first use (tokenising the held-out text takes seconds)."""

    def __init__(self, tokenizer, *, chat_template: bool = True, haystack: prompts.Haystack | None = None,
                 code: "CodePool | None" = None, haystack_corpora: Sequence[str] = prompts.DEFAULT_HAYSTACK_CORPORA,
                 haystack_split: str = "heldout", code_split: str = "heldout"):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._haystack, self._code = haystack, code
        self.haystack_corpora, self.haystack_split, self.code_split = tuple(haystack_corpora), haystack_split, code_split

    @property
    def haystack(self) -> prompts.Haystack:
        if self._haystack is None:
            self._haystack = prompts.Haystack.from_corpora(self.tokenizer, self.haystack_corpora, self.haystack_split)
        return self._haystack

    @functools.cached_property
    def line_end(self) -> np.ndarray:
        return prompts.line_end_ids(self.tokenizer)

    @functools.cached_property
    def words(self) -> list[str]:
        return prompts.vocabulary()

    @property
    def code(self) -> "CodePool":
        if self._code is None:
            self._code = CodePool.from_corpus(self.tokenizer, self.code_split)
        return self._code

    def ids(self, text: str) -> np.ndarray:
        return prompts.ids_of(self.tokenizer, text)

    def frame(self, instruction: str, question: str, answer_prefix: str) -> prompts.Frame:
        return prompts.frame(self.tokenizer, instruction, question, answer_prefix, chat_template=self.chat_template)


def found(answer: str, prediction: str) -> bool:
    """`answer` occurs in `prediction` as a whole word, ignoring case."""
    return re.search(rf"(?<!\w){re.escape(answer.lower())}(?!\w)", prediction.lower()) is not None


class Task:
    name: str
    max_new_tokens: int

    def build(self, env: TaskEnv, length: int, rng: np.random.Generator, depth: float) -> Sample:
        raise NotImplementedError

    def samples(self, env: TaskEnv, length: int, n: int, seed: int) -> list[Sample]:
        rng = np.random.default_rng([seed, zlib.crc32(self.name.encode()), length])
        depths = (np.arange(n) + rng.uniform(size=n)) / n
        out = [self.build(env, length, rng, float(d)) for d in depths]
        for s in out:
            assert len(s.input_ids) == length, (self.name, len(s.input_ids), length)
        return out

    def score(self, prediction: str, sample: Sample) -> float:
        return sum(found(a, prediction) for a in sample.answers) / len(sample.answers)


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class Needles(Task):
    """Needle(s) in a real-text haystack: `keys` keys with `values` values each; the
    first `queries` keys are asked (RULER's niah_single / multikey / multivalue /
    multiquery)."""

    KINDS = {"number": "number", "word": "word", "uuid": "UUID"}

    def __init__(self, name: str, value: str, *, keys: int = 1, values: int = 1, queries: int = 1):
        self.name, self.value, self.keys, self.values, self.queries = name, value, keys, values, queries
        n_answers = queries * values
        self.max_new_tokens = {"number": 8, "word": 6, "uuid": 28}[value] * n_answers + 8

    def _value(self, env: TaskEnv, rng) -> str:
        if self.value == "number":
            return str(int(rng.integers(1_000_000, 10_000_000)))
        if self.value == "word":
            return str(rng.choice(env.words))
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))

    def build(self, env, length, rng, depth):
        kind = self.KINDS[self.value]
        words = rng.choice(env.words, size=2 * self.keys, replace=False)
        keys = [f"{words[2 * i]}-{words[2 * i + 1]}" for i in range(self.keys)]
        values, used = [], set(words)
        for _ in range(self.keys):
            row = []
            while len(row) < self.values:
                v = self._value(env, rng)
                if v not in used:
                    used.add(v)
                    row.append(v)
            values.append(row)
        lines = [f"One of the special magic {kind}s for {k} is: {v}.\n" for k, vs in zip(keys, values) for v in vs]
        pieces = [env.ids(line) for line in lines]
        depths = [depth] + list(rng.uniform(size=len(pieces) - 1))
        asked = keys[: self.queries]
        many = self.queries * self.values > 1
        if many:
            question = f"What are all the special magic {kind}s for {_join(asked)} mentioned in the text above?"
            prefix = f"The special magic {kind}s for {_join(asked)} mentioned in the text above are"
        else:
            question = f"What is the special magic {kind} for {asked[0]} mentioned in the text above?"
            prefix = f"The special magic {kind} for {asked[0]} mentioned in the text above is"
        frame = env.frame(
            f"Special magic {kind}s are hidden in the text below. Memorize them: "
            f"you will be asked about them after the text.",
            question, prefix,
        )
        n_hay = frame.budget(length) - sum(len(p) for p in pieces)
        context, _ = prompts.insert_lines(env.haystack.draw(rng, n_hay), pieces, depths, env.line_end)
        ids, start, end = frame.wrap(context)
        answers = tuple(v for vs in values[: self.queries] for v in vs)
        return Sample(ids, answers, depth, (start, end))


class VariableTracking(Task):
    """Chains of variable assignments in a real-text haystack (RULER's vt): one chain
    is asked, another with a different value distracts."""

    name = "vt"

    def __init__(self, hops: int = 4, chains: int = 2):
        self.hops, self.chains = hops, chains
        self.max_new_tokens = 6 * (hops + 1) + 8

    def build(self, env, length, rng, depth):
        letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
        names: list[str] = []
        while len(names) < self.chains * (self.hops + 1):
            name = "".join(rng.choice(letters, size=5))
            if name not in names:
                names.append(name)
        values = [str(v) for v in rng.choice(np.arange(10_000, 100_000), size=self.chains, replace=False)]
        pieces, depths = [], []
        for c in range(self.chains):
            chain = names[c * (self.hops + 1) : (c + 1) * (self.hops + 1)]
            lines = [f"VAR {chain[0]} = {values[c]}\n"] + [f"VAR {b} = VAR {a}\n" for a, b in zip(chain, chain[1:])]
            first = depth if c == 0 else float(rng.uniform())
            pieces += [env.ids(line) for line in lines]
            depths += [first] + sorted(rng.uniform(first, 1.0, size=self.hops))
        frame = env.frame(
            "Memorize the variable assignments hidden in the text below: you will be asked "
            "which variables end up with a given value.",
            f"Find all variables that are assigned the value {values[0]} in the text above.",
            f"Following the chain of assignments in the text above, {self.hops + 1} variables are "
            f"assigned the value {values[0]}. They are:",
        )
        n_hay = frame.budget(length) - sum(len(p) for p in pieces)
        context, _ = prompts.insert_lines(env.haystack.draw(rng, n_hay), pieces, depths, env.line_end)
        ids, start, end = frame.wrap(context)
        return Sample(ids, tuple(names[: self.hops + 1]), depth, (start, end))


class CommonWords(Task):
    """A numbered list of words in which `common` words occur `c` times each and the
    others `u` < c times (RULER's cwe); the list fills the context (no haystack)."""

    name = "cwe"

    def __init__(self, common: int = 10):
        self.common = common
        self.max_new_tokens = 4 * common + 8

    def build(self, env, length, rng, depth):
        frame = env.frame(
            "Below is a numbered list of words. A few words occur many times, the others rarely.",
            f"What are the {self.common} most common words in the list above?",
            f"The {self.common} most common words in the list above are:",
        )
        budget = frame.budget(length)
        words = env.words
        n_entries = max(budget // 5, 1)  # a line "123. word\n" is about five tokens
        u = max(1, -(-(n_entries - 3 * self.common) // (len(words) - self.common)))
        c = max(3 * u, min(30, budget // 150))
        n_uncommon = min(len(words) - self.common, max(0, (n_entries - c * self.common) // u))
        while True:
            chosen = list(rng.choice(words, size=self.common + n_uncommon, replace=False))
            entries = chosen[: self.common] * c + chosen[self.common :] * u
            order = rng.permutation(len(entries))
            lines = [env.ids(f"{i + 1}. {entries[j]}\n") for i, j in enumerate(order)]
            if sum(len(x) for x in lines) <= budget:
                break
            n_uncommon = max(0, n_uncommon - max(1, n_uncommon // 20))
            if n_uncommon == 0 and sum(len(x) for x in lines) > budget:
                raise ValueError(f"length={length} is too short for {self.common} words repeated {c} times")
        # Fill what is left with words that occur once, then blank lines.
        used, spare = set(chosen), [w for w in words if w not in set(chosen)]
        rest = budget - sum(len(x) for x in lines)
        for w in rng.permutation(spare):
            line = env.ids(f"{len(lines) + 1}. {w}\n")
            if len(line) > rest:
                break
            lines.append(line)
            rest -= len(line)
        newline = env.ids("\n")
        lines += [newline] * (rest // len(newline))
        context = np.concatenate(lines)
        ids, start, end = frame.wrap(context)
        if len(ids) != length:  # a multi-token newline cannot fill an odd remainder
            raise ValueError(f"cannot fill a cwe prompt to exactly {length} tokens with this tokenizer")
        return Sample(ids, tuple(str(w) for w in chosen[: self.common]), None, (start, end))


@dataclasses.dataclass(frozen=True)
class CodeFunction:
    name: str
    first_line: str  # of its docstring
    source: str
    module: int  # index of its module in CodePool.modules


class CodePool:
    """Functions of held-out CPython modules that `qa` can ask about, and the modules'
    code as haystack (the asked function's own module is left out of its haystack)."""

    def __init__(self, tokenizer, docs: Sequence[corpus_lib.Document], description: str = "given modules"):
        self.modules = [prompts.ids_of(tokenizer, d.text.strip("\n") + "\n\n") for d in docs]
        self.tokens = int(sum(len(m) for m in self.modules))
        defined: dict[str, int] = {}
        candidates = []
        for i, doc in enumerate(docs):
            try:
                tree = ast.parse(doc.text)
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                defined[node.name] = defined.get(node.name, 0) + 1
                fn = self._function(doc.text, node, i)
                if fn is not None:
                    candidates.append(fn)
        # A name defined twice (anywhere in the split) would have two right answers.
        self.functions = [f for f in candidates if defined[f.name] == 1]
        self.description = description

    @classmethod
    def from_corpus(cls, tokenizer, split: str = "heldout") -> "CodePool":
        return cls(tokenizer, corpus_lib.documents("python_stdlib", split), f"{split} split of python_stdlib")

    @staticmethod
    def _function(text: str, node, module: int) -> CodeFunction | None:
        doc = ast.get_docstring(node)
        if not doc or node.name.startswith("__") or len(node.name) < 6:
            return None
        first = doc.strip().splitlines()[0].strip()
        source = ast.get_source_segment(text, node, padded=True)
        if not (4 <= len(first.split()) <= 20) or node.name.lower() in first.lower() or source is None:
            return None
        source = textwrap.dedent(source)
        if first not in source or '"' in first:
            return None
        return CodeFunction(node.name, first, source, module)

    def draw(self, rng, n_tokens: int, exclude: int) -> np.ndarray:
        order = [i for i in rng.permutation(len(self.modules)) if i != exclude]
        total = sum(len(self.modules[i]) for i in order)
        if n_tokens > total:
            raise ValueError(
                f"qa at {n_tokens} context tokens needs more code than the {self.description} "
                f"holds ({total} tokens); use --config.code_split=all"
            )
        out, n = [], 0
        for i in order:
            out.append(self.modules[i])
            n += len(self.modules[i])
            if n >= n_tokens:
                break
        return np.concatenate(out)[:n_tokens]


class DocstringQA(Task):
    """Which function has this docstring? (see the module docstring)."""

    name = "qa"
    max_new_tokens = 16

    def build(self, env, length, rng, depth):
        pool = env.code
        if not pool.functions:
            raise ValueError(f"no function of the {pool.description} qualifies for qa")
        for _ in range(100):
            fn = pool.functions[int(rng.integers(len(pool.functions)))]
            frame = env.frame(
                "Below is Python source code from several modules. Read it: you will be asked "
                "about one of its functions.",
                f'Which function in the code above has a docstring that starts with "{fn.first_line}"? '
                f"Answer with the name of the function.",
                "The function is named",
            )
            piece = env.ids(fn.source.rstrip("\n") + "\n\n")
            hay = pool.draw(rng, frame.budget(length) - len(piece), exclude=fn.module)
            if fn.first_line not in env.tokenizer.decode(hay.tolist()):
                break
        else:
            raise ValueError("could not find a qa function whose docstring occurs once in its context")
        context, _ = prompts.insert_lines(hay, [piece], [depth], env.line_end)
        ids, start, end = frame.wrap(context)
        return Sample(ids, (fn.name,), depth, (start, end))


def _registry() -> dict[str, Callable[[], Task]]:
    from hylo_jax.eval.passkey import Passkey

    return {
        "niah_single_number": lambda: Needles("niah_single_number", "number"),
        "niah_single_word": lambda: Needles("niah_single_word", "word"),
        "niah_single_uuid": lambda: Needles("niah_single_uuid", "uuid"),
        "niah_multikey": lambda: Needles("niah_multikey", "number", keys=4),
        "niah_multivalue": lambda: Needles("niah_multivalue", "number", values=4),
        "niah_multiquery": lambda: Needles("niah_multiquery", "number", keys=4, queries=4),
        "vt": VariableTracking,
        "cwe": CommonWords,
        "qa": DocstringQA,
        "passkey": Passkey,
    }


TASKS = (
    "niah_single_number", "niah_single_word", "niah_single_uuid", "niah_multikey", "niah_multivalue",
    "niah_multiquery", "vt", "cwe", "qa", "passkey",
)


def get_task(name: str) -> Task:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(registry)}")
    return registry[name]()
