"""Training checkpoints: Orbax CheckpointManager for model, optimizer, RNG and data state.

    ckpt = Checkpointer(workdir / "checkpoints", save_every=1000, keep=3)
    ckpt.install_preemption_handler()            # SIGTERM -> save at the next step
    restored = ckpt.restore(model=model, optimizer=optimizer, rng=rng, data_iter=it)
    step = restored.step if restored else 0      # model/optimizer/it updated in place
    rng = restored.rng if restored else rng
    while step < total:
        ...train step...; step += 1
        ckpt.save(step, model=model, optimizer=optimizer, rng=rng, data_iter=it)
        if ckpt.stop_requested:                  # pre-empted: the save above is final
            break
    ckpt.close()

One checkpoint is a step directory with the items
  model      nnx.state(model) (every variable, not only Params) - StandardSave
  optimizer  nnx.state(optimizer) (optax state and step count)   - StandardSave
  rng        the RNG key (typed or raw uint32)                   - StandardSave
  data       the data iterator's state, one JSON per process     - grain's handler
  meta       {"step": ..., "extra": {...}}                       - JSON
Saves are asynchronous: arrays are copied to host before save() returns, files are
written in the background, and the next save (or close/wait) waits for the last.
`model` / `optimizer` may be NNX objects (restored in place) or plain pytrees of
arrays (restored values returned in `Restored.trees`). Restore targets keep the
shardings of the live arrays, so a sharded model comes back sharded the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

_TREE_ITEMS = ("model", "optimizer", "rng")


@dataclasses.dataclass
class Restored:
    step: int
    rng: Any  # the restored key, or None if none was asked for
    extra: dict  # the JSON-able `extra` given to save()
    trees: dict  # restored plain pytrees by item name (NNX objects are updated in place)


class _StateSnapshot:
    """The data iterator's state frozen at save() time.

    grain's checkpoint handler writes `get_state()` of what it is given; with async
    saves it may run after training has moved the live iterator on, so it gets this
    snapshot (bytes, the form the handler writes verbatim) instead.
    """

    def __init__(self, state: dict):
        self._state = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


def _is_nnx(obj) -> bool:
    return isinstance(obj, nnx.Pytree)


def _tree_of(obj):
    return nnx.state(obj) if _is_nnx(obj) else obj


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under `directory`, one every `save_every` steps."""

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3, async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"save_every={save_every} must be >= 1")
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._preempt = threading.Event()
        self._stop = False
        self._previous_handlers: dict[int, Any] = {}

    # -------------------------------------------------------------- pre-emption
    def install_preemption_handler(self, signals=(signal.SIGTERM,)) -> None:
        """On any of `signals`, ask for a checkpoint at the next save() call (a step
        boundary) and set `stop_requested` after it. The handler only sets a flag:
        saving from inside a signal handler could interrupt a half-done step."""
        for sig in signals:
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        del signum, frame
        self._preempt.set()

    @property
    def preemption_requested(self) -> bool:
        return self._preempt.is_set()

    @property
    def stop_requested(self) -> bool:
        """True once the checkpoint requested by a pre-emption signal has been written."""
        return self._stop

    def _preempted_anywhere(self) -> bool:
        # Every process must take the same branch (a save is a collective), so with
        # several processes the flag is OR-ed across them.
        flag = self._preempt.is_set()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    # ------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        *,
        model=None,
        optimizer=None,
        rng=None,
        data_iter=None,
        extra: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Saves if `step` is a multiple of save_every, or `force`, or a pre-emption
        signal arrived (then waits for the write and sets stop_requested).
        Returns whether a checkpoint was started. Call it once per step."""
        preempted = self._preempted_anywhere()
        if not (force or preempted or step % self.save_every == 0):
            return False
        if step in self._manager.all_steps():
            if preempted:  # this step is already on disk: nothing more to save
                self._manager.wait_until_finished()
                self._stop = True
            return False
        items: dict[str, Any] = {}
        for name, obj in (("model", model), ("optimizer", optimizer)):
            if obj is not None:
                items[name] = ocp.args.StandardSave(_tree_of(obj))
        if rng is not None:
            items["rng"] = ocp.args.StandardSave({"key": rng})
        if data_iter is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(_StateSnapshot(data_iter.get_state()))
        items["meta"] = ocp.args.JsonSave({"step": int(step), "extra": dict(extra or {})})
        # The every-N decision is made above; force=True stops Orbax from applying its own.
        saved = self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        if preempted:
            self._manager.wait_until_finished()
            self._stop = True
        return saved

    # ---------------------------------------------------------------- restore
    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, *, model=None, optimizer=None, rng=None, data_iter=None, step: int | None = None) -> Restored | None:
        """Restores the items whose templates are given (NNX objects and the data
        iterator in place) from `step` (default: the latest). None if there is no
        checkpoint yet. `rng` is a template key of the saved key's shape and type."""
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                return None
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        saved_items = set(self._manager.item_metadata(step).keys())
        templates = {"model": model, "optimizer": optimizer, "rng": None if rng is None else {"key": rng}}
        args: dict[str, Any] = {"meta": ocp.args.JsonRestore()}
        for name, obj in templates.items():
            if obj is None:
                continue
            if name not in saved_items:
                raise KeyError(f"checkpoint {step} in {self.directory} has no {name!r} item (has {sorted(saved_items)})")
            args[name] = ocp.args.StandardRestore(_abstract(_tree_of(obj)))
        if data_iter is not None:
            if "data" not in saved_items:
                raise KeyError(f"checkpoint {step} in {self.directory} has no data iterator state")
            import grain

            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self._manager.restore(step, args=ocp.args.Composite(**args))
        trees = {}
        for name in ("model", "optimizer"):
            obj = templates[name]
            if obj is None:
                continue
            if _is_nnx(obj):
                nnx.update(obj, out[name])
            else:
                trees[name] = out[name]
        meta = out["meta"]
        return Restored(
            step=int(meta["step"]),
            rng=out["rng"]["key"] if rng is not None else None,
            extra=meta.get("extra", {}),
            trees=trees,
        )

    # -------------------------------------------------------------- lifecycle
    def wait(self) -> None:
        """Blocks until the last asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and puts back the signal handlers replaced."""
        self._manager.wait_until_finished()
        self._manager.close()
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
