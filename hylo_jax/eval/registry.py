"""The evaluation suite's tasks by name: the RULER-style tasks over real text
(hylo_jax.eval.tasks) and the synthetic passkey (hylo_jax.eval.passkey)."""

from __future__ import annotations

from typing import Callable

from hylo_jax.eval.passkey import Passkey
from hylo_jax.eval.tasks import CommonWords, DocstringQA, Needles, Task, VariableTracking

_FACTORIES: dict[str, Callable[[], Task]] = {
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
TASKS = tuple(_FACTORIES)


def get_task(name: str) -> Task:
    if name not in _FACTORIES:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return _FACTORIES[name]()
