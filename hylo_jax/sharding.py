"""Device mesh, the one logical-axis rules table, and sharding of NNX model state.

Layers name each parameter axis logically (``out_sharding=("embed", "mlp")`` metadata
from ``layers.linear.make_param``, see docs/ARCHITECTURE.md); this module alone maps those names onto a mesh with
axes ``("data", "fsdp", "tensor")``:

- "data": pure data parallelism (parameters replicated),
- "fsdp": data parallelism with parameters and optimizer state sharded (ZeRO-3 style),
- "tensor": Megatron-style splitting of heads / MLP / vocab.

The same code runs on one CPU, one GPU, a multi-GPU host and a multi-host pod; only the
mesh shape in the config changes. ``assert_params_sharded`` is the guard MaxText keeps
(``utils/sharding.py``): a wrong rule silently replicating the model would otherwise
only show up as an out-of-memory error at scale.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated).
# The single source of truth: layers never name mesh axes.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),  # activations / data batches
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),  # any fused heads*dim axis
    ("kv_heads", "tensor"),
    ("latent", None),  # MLA ranks are small; sharding them only adds collectives
    ("norm", None),
    ("conv", None),
    ("state", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)


def maybe_initialize_distributed(dist: Mapping[str, Any] | None) -> None:
    """Start multi-host JAX when the config names a coordinator (else do nothing).

    ``dist`` holds ``coordinator_address`` ("host:port"), ``num_processes`` and
    ``process_id``; on managed clusters (SLURM, TPU pods) ``auto: True`` lets JAX
    detect them. Must run before anything touches a device.
    """
    if not dist:
        return
    if dist.get("auto"):
        jax.distributed.initialize()
    elif dist.get("coordinator_address"):
        jax.distributed.initialize(
            coordinator_address=dist["coordinator_address"],
            num_processes=int(dist["num_processes"]),
            process_id=int(dist["process_id"]),
            initialization_timeout=int(dist.get("timeout_s", 300)),
        )
    else:
        return
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor). One entry may be -1: "all remaining devices".

    ``shape`` is a mapping {"data": d, "fsdp": f, "tensor": t} (missing axes are 1) or a
    3-sequence; None puts every device on "fsdp".
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if shape is None:
        sizes = [1, -1, 1]
    elif isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
        sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh shape {tuple(sizes)} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} does not divide {n} devices")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n or min(sizes) < 1:
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {n} are present"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array with logical axis ``names`` under the rules table.

    A dimension that the mapped mesh axes do not divide stays replicated (a 9-head
    model on 2 tensor devices still runs; ``assert_params_sharded`` reports the cost).
    A mesh axis is used at most once per array.
    """
    if not names:
        return PartitionSpec()
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match an array of shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        if name is not None and name not in _RULES:
            raise ValueError(
                f"logical axis {name!r} has no rule; known: {sorted(_RULES)} (hylo_jax/sharding.py)"
            )
        target = None if name is None else _RULES[name]
        axes = () if target is None else (target if isinstance(target, tuple) else (target,))
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def _variable_names(var: nnx.Variable) -> tuple | None:
    meta = var.get_metadata()
    return meta.get("out_sharding") or meta.get("sharding_names")


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding for every leaf of an NNX state, from its variables' logical names."""

    def one(var):
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        return var.replace(NamedSharding(mesh, logical_to_spec(_variable_names(var), var.shape, mesh)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def put_global(x, sharding: NamedSharding) -> jax.Array:
    """Place a value that every process holds in full onto a (possibly multi-host) sharding.
    An array already laid out that way is returned as it is."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if isinstance(x, jax.Array) and x.is_fully_addressable and sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_state(state, shardings):
    """``put_global`` over matching trees of values and shardings."""
    return jax.tree.map(put_global, state, shardings)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.State:
    """Shard an NNX model's state in place by its params' logical names; returns the shardings."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    nnx.update(model, shard_state(state, shardings))
    return shardings


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input: batch over data x fsdp, everything else replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), (0,) * ndim, mesh))


def put_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from a batch that every process holds in full (global batch dim)."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, value.ndim)
        spec_batch = sharding.spec[0]
        ways = 1 if spec_batch is None else math.prod(
            mesh.shape[a] for a in (spec_batch if isinstance(spec_batch, tuple) else (spec_batch,))
        )
        if value.shape[0] % ways:
            raise ValueError(
                f"batch[{key!r}] has batch size {value.shape[0]}, not divisible by the "
                f"{ways} data-parallel shards of mesh {dict(mesh.shape)}"
            )
        out[key] = put_global(value, sharding)
    return out


def assert_params_sharded(state, mesh: Mesh, tolerance: float = 0.05) -> None:
    """Fail unless per-device parameter bytes are close to total / (fsdp * tensor).

    Replicated leftovers (norms, dims the mesh does not divide) are allowed up to
    ``tolerance`` of the ideal per-device size; the message names the largest ones.
    """
    model_ways = mesh.shape["fsdp"] * mesh.shape["tensor"]
    leaves = jax.tree_util.tree_leaves_with_path(state)
    total = per_device = 0
    replicated = []
    for path, leaf in leaves:
        nbytes = leaf.size * leaf.dtype.itemsize
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        shard_bytes = math.prod(shard_shape) * leaf.dtype.itemsize
        total += nbytes
        per_device += shard_bytes
        if shard_bytes == nbytes and model_ways > 1:
            replicated.append((nbytes, jax.tree_util.keystr(path)))
    ideal = total / model_ways
    if per_device > ideal * (1 + tolerance):
        worst = ", ".join(f"{name} ({b} B)" for b, name in sorted(replicated, reverse=True)[:5])
        raise AssertionError(
            f"parameters are not sufficiently sharded over mesh {dict(mesh.shape)}: "
            f"{per_device} bytes per device vs ideal {ideal:.0f} (tolerance {tolerance:.0%}); "
            f"largest replicated: {worst or 'none'}"
        )
