"""`kernels --op ssd`: the SSD (Mamba2) scan (pallas_kernels.ssd) on one device, in stages
that each fit a short timeout (tools/gpu/ssd.sh runs them in one device call):

    check      bf16 y, final state and every gradient of impl="pallas" vs the float64
               per-step reference (initial state, D, segments, G < H), chunks 256 and 64
    bench      fwd and fwd+bwd times of each --impls (pallas at each of --chunks, the
               others at chunk 64), in priority order under --time-budget
    nan        y, final state and every gradient finite at T = --nan-seqlen (pallas)
    baselines  our and the torch kernels' accuracy (check_baselines), then the times of
               mamba_ssm's mamba_chunk_scan_combined (chunk 256) and fla's chunk_simple_gla
    tune       pallas fwd and fwd+bwd under other launch parameters (BlockSizes)

Shapes: x [B, T, H, P], B and C [B, T, G, N] (--heads, --dv, --groups, --dk); bf16 x, B,
C, float32 dt and A (Mamba2's init ranges).
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from tools.bench.harness import Column, Report, jit_fwd_and_fwd_bwd, median_time, rel_rms, to_torch, torch_times

XLA_CHUNK = 64  # chunk of every form but pallas in the bench stage
COLUMNS = (Column("impl", "impl"), Column("chunk", "chunk"), Column("pass", "pass"), Column("B", "B"),
           Column("T", "T"), Column("H", "H"), Column("P", "P"), Column("N", "N"), Column("ms", "ms", "{:.3f}"),
           Column("tflops", "TFLOP/s", "{:.2f}"), Column("note", "note"))
STAGES = ("check", "bench", "nan", "baselines", "tune")


def flops(b, t, h, p, n, c):
    """Forward FLOPs of the chunked SSD per token and head: 2C(N + P) (C B^T, scores x)
    + 4PN (chunk state, state read-out). Forward+backward is counted as 3x forward."""
    return 2 * b * t * h * (c * (n + p) + 2 * p * n)


def inputs(b, t, h, p, n, g, seed=0):
    """bf16 x, B, C; f32 dt log-uniform in [1e-3, 0.1] and A = -U(1, 16) (Mamba2's init)."""
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (b, t, h, p), jnp.bfloat16)
    dt = jnp.exp(jax.random.uniform(ks[1], (b, t, h), minval=np.log(1e-3), maxval=np.log(0.1)))
    A = -jax.random.uniform(ks[2], (h,), minval=1.0, maxval=16.0)
    B = (jax.random.normal(ks[3], (b, t, g, n)) / np.sqrt(n)).astype(jnp.bfloat16)
    C = jax.random.normal(ks[4], (b, t, g, n), jnp.bfloat16)
    dy = jax.random.normal(ks[5], (b, t, h, p), jnp.bfloat16)
    return x, dt, A, B, C, dy


def op_fns(impl, chunk, block_sizes=None):
    """(jit fwd, jit fwd+bwd) of one form of the op, the Pallas one under `block_sizes`."""
    from pallas_kernels.ssd import ssd, ssd_pallas

    if impl == "pallas":
        fn = lambda x, dt, A, B, C: ssd_pallas(x, dt, A, B, C, output_final_state=True, chunk_size=chunk,
                                               block_sizes=block_sizes)
    else:
        fn = lambda x, dt, A, B, C: ssd(x, dt, A, B, C, output_final_state=True, chunk_size=chunk, impl=impl)
    return jit_fwd_and_fwd_bwd(fn)


def torch_ops(chunk):
    """{name: fwd over torch tensors} for mamba_ssm and fla, where importable."""
    fns = {}
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        fns["mamba_ssm"] = lambda x, dt, A, B, C: mamba_chunk_scan_combined(x, dt, A, B, C, chunk,
                                                                           return_final_states=True)
    except Exception as e:  # noqa: BLE001 - any import failure means: not here
        print(f"mamba_ssm not available: {type(e).__name__}: {e}", flush=True)
    try:
        import fla.ops.common.chunk_o as chunk_o
        import torch
        from fla.ops.simple_gla import chunk_simple_gla

        # Its gated backward refuses on Hopper with Triton < 3.7.1 (fla issue #640); bypass the
        # gate to measure it, and check its gradients first (check_baselines).
        chunk_o.TRITON_ABOVE_3_7_1 = True

        def fla_fwd(x, dt, A, B, C):
            # q = C, k = B, v = dt x, g = dt A; fla has no groups, so B, C are per head.
            rep = x.shape[2] // B.shape[2]
            k, q = (torch.repeat_interleave(z, rep, dim=2) for z in (B, C))
            v = (x.float() * dt[..., None]).to(x.dtype)
            return chunk_simple_gla(q, k, v, g=dt * A, scale=1.0, output_final_state=True)

        fns["fla"] = fla_fwd
    except Exception as e:  # noqa: BLE001
        print(f"fla not available: {type(e).__name__}: {e}", flush=True)
    return fns


def check_baselines(torch_fns, h=4, p=64, n=128, g=2, t=1000):
    """Our Pallas form and each torch kernel on one bf16 problem vs our float64 reference:
    rel-RMS of y and of dx, ddt, dA, dB, dC (final-state gradient zero)."""
    from pallas_kernels.ssd import ssd, ssd_reference

    x, dt, A, B, C, dy = inputs(1, t, h, p, n, g, seed=3)
    names = ("y", "dx", "ddt", "dA", "dB", "dC")
    with jax.enable_x64(True):
        a64 = [z.astype(jnp.float64) for z in (x, dt, A, B, C)]
        y_ref, vjp = jax.vjp(lambda *a: ssd_reference(*a)[0], *a64)
        ref = (y_ref, *vjp(dy.astype(jnp.float64)))
    out = {}
    y, vjp = jax.vjp(lambda *a: ssd(*a, impl="pallas")[0], x, dt, A, B, C)
    out["pallas"] = {k: rel_rms(a, r) for k, a, r in zip(names, (y, *vjp(dy)), ref)}
    for name, fn in torch_fns.items():
        try:
            tx = [to_torch(z, True) for z in (x, dt, A, B, C)]
            res = fn(*tx)
            res[0].backward(to_torch(dy))
            got = [res[0].detach()] + [z.grad for z in tx]
            out[name] = {k: rel_rms(a.float().cpu().numpy(), r) for k, a, r in zip(names, got, ref)}
        except Exception as e:  # noqa: BLE001
            out[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    return out


def _vjp_fn(impl, chunk, ids, block_sizes):
    """jit(args, cotangents) -> (y, final state, grads of x, dt, A, B, C, D, h0)."""
    from pallas_kernels.ssd import ssd_pallas, ssd_reference

    def f(x, dt, A, B, C, D, h0):
        kw = dict(D=D, initial_state=h0, output_final_state=True, segment_ids=ids)
        if impl == "reference":
            return ssd_reference(x, dt, A, B, C, **kw)
        return ssd_pallas(x, dt, A, B, C, chunk_size=chunk, block_sizes=block_sizes, **kw)

    def run(args, cts):
        (y, s), vjp = jax.vjp(f, *args)
        return y, s, vjp(cts)

    return jax.jit(run)


class _Stages:
    """One stage per method; `timing` writes a row."""

    def __init__(self, args, report, block_sizes):
        self.args, self.report, self.block_sizes = args, report, block_sizes
        self.h, self.p, self.n, self.g = args.heads, args.dv, args.dk, args.groups

    def timing(self, impl, chunk, mode, b, t, seconds, note=""):
        fl = flops(b, t, self.h, self.p, self.n, chunk) * (3 if mode == "fwd+bwd" else 1)
        self.report.row(**{"impl": impl, "chunk": chunk, "pass": mode}, B=b, T=t, H=self.h, P=self.p, N=self.n,
                        ms=seconds * 1e3, tflops=fl / seconds / 1e12, note=note)

    def check(self):
        """bf16, B=1, T=1000, H=4, G=2 with initial state, D and a few segments."""
        b, t, h, g = 1, 1000, 4, 2
        x, dt, A, B, C, dy = inputs(b, t, h, self.p, self.n, g, seed=3)
        ks = jax.random.split(jax.random.key(7), 4)
        h0 = jax.random.normal(ks[0], (b, h, self.p, self.n), jnp.float32)
        D = jax.random.normal(ks[1], (h,), jnp.float32)
        ids = jnp.cumsum(jax.random.uniform(ks[2], (b, t)) < 0.004, axis=1).astype(jnp.int32)
        ds = jax.random.normal(ks[3], (b, h, self.p, self.n), jnp.float32)
        xs = (x, dt, A, B, C, D, h0)
        names = ("y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0")
        with jax.enable_x64(True):
            a64 = tuple(z.astype(jnp.float64) for z in xs)
            y, s, grads = _vjp_fn("reference", None, ids, None)(a64, (dy.astype(jnp.float64), ds.astype(jnp.float64)))
            ref = [jax.device_get(z) for z in (y, s, *grads)]
        for chunk in (256, 64):
            try:
                y, s, grads = _vjp_fn("pallas", chunk, ids, self.block_sizes)(xs, (dy, ds))
                errs = {k: rel_rms(jnp.asarray(a, jnp.float32), r) for k, a, r in zip(names, (y, s, *grads), ref)}
                errs["ok(<=2e-2)"] = bool(all(e <= 2e-2 for e in errs.values()))
            except Exception as e:  # noqa: BLE001 - report and go on
                self.report.fail(f"check pallas chunk {chunk}", e)
                continue
            self.report.add(f"pallas_chunk{chunk}", errs)

    def bench(self):
        """Each (B, T) with pallas at the first chunk and the other impls at XLA_CHUNK, then
        pallas at the other chunks: a short budget still compares the likely best of each."""
        a = self.args
        deadline = time.perf_counter() + a.time_budget
        first = [(impl, a.chunks[0] if impl == "pallas" else XLA_CHUNK) for impl in a.impls]
        configs = [(impl, chunk, b, t) for b in a.batch for t in a.seqlen for impl, chunk in first]
        if "pallas" in a.impls:
            configs += [("pallas", c, b, t) for c in a.chunks[1:] for b in a.batch for t in a.seqlen]
        data = {}
        for impl, chunk, b, t in configs:
            if time.perf_counter() > deadline:
                print(f"budget spent: skipped {impl} chunk {chunk} B={b} T={t}", flush=True)
                continue
            if (b, t) not in data:
                data[b, t] = inputs(b, t, self.h, self.p, self.n, self.g)
            x, dt, A, B, C, dy = data[b, t]
            try:
                fwd, fwd_bwd = op_fns(impl, chunk, self.block_sizes)
                t0 = time.perf_counter()
                fwd = fwd.lower(x, dt, A, B, C).compile()
                self.timing(impl, chunk, "fwd", b, t, median_time(fwd, x, dt, A, B, C),
                            f"compiled in {time.perf_counter() - t0:.1f} s")
                t0 = time.perf_counter()
                fwd_bwd = fwd_bwd.lower(x, dt, A, B, C, dy).compile()
                self.timing(impl, chunk, "fwd+bwd", b, t, median_time(fwd_bwd, x, dt, A, B, C, dy),
                            f"compiled in {time.perf_counter() - t0:.1f} s")
            except Exception as e:  # noqa: BLE001 - report and go on with the next config
                self.report.fail(f"{impl} chunk {chunk} B={b} T={t}", e)

    def nan(self):
        t, chunk = self.args.nan_seqlen, self.args.chunks[0]
        x, dt, A, B, C, dy = inputs(1, t, self.h, self.p, self.n, self.g)
        fwd, fwd_bwd = op_fns("pallas", chunk, self.block_sizes)
        outs = (*fwd(x, dt, A, B, C), *fwd_bwd(x, dt, A, B, C, dy))
        self.report.add(f"finite_T{t}", {name: bool(jnp.isfinite(z.astype(jnp.float32)).all())
                                         for name, z in zip(("y", "final_state", "dx", "ddt", "dA", "dB", "dC"), outs)})
        self.timing("pallas", chunk, "fwd", 1, t, median_time(fwd, x, dt, A, B, C, samples=3, warmup=0))
        self.timing("pallas", chunk, "fwd+bwd", 1, t, median_time(fwd_bwd, x, dt, A, B, C, dy, samples=3, warmup=0))

    def baselines(self):
        deadline = time.perf_counter() + self.args.time_budget
        fns = torch_ops(256)  # mamba_ssm's default chunk; fla's chunk_simple_gla uses its own, 64
        self.report.add("check", check_baselines(fns))  # outputs and gradients vs our float64 reference first
        for name, chunk in (("mamba_ssm", 256), ("fla", 64)):
            fn = fns.get(name)
            if fn is None:
                self.report.add(name, "not importable")
                continue
            import torch

            for t in self.args.seqlen:
                x, dt, A, B, C, dy = inputs(1, t, self.h, self.p, self.n, self.g)
                tx = [to_torch(z, True) for z in (x, dt, A, B, C)]
                tdy = to_torch(dy)
                calls = {"fwd": lambda: fn(*tx), "fwd+bwd": lambda: fn(*tx)[0].backward(tdy)}
                for mode, call in calls.items():
                    if time.perf_counter() > deadline:
                        print(f"budget spent: skipped {name} {mode} T={t}", flush=True)
                        continue
                    try:
                        bench, piped = torch_times(call, grad=mode == "fwd+bwd")
                        self.timing(name, chunk, mode, 1, t, bench)
                        self.timing(f"{name}-piped", chunk, mode, 1, t, piped)
                    except Exception as e:  # noqa: BLE001
                        self.report.fail(f"{name} {mode} T={t}", e)
                del tx, tdy, calls
                torch.cuda.empty_cache()

    def tune(self):
        """Sweep the kernels' launch parameters at the first --seqlen and --chunks."""
        deadline = time.perf_counter() + self.args.time_budget
        t, chunk = self.args.seqlen[0], self.args.chunks[0]
        x, dt, A, B, C, dy = inputs(1, t, self.h, self.p, self.n, self.g)
        sweep = [dict(tile=tile, outputs_warps=ow, grads_warps=gw)
                 for tile in (64, 32) for gw in (8, 4) for ow in (4, 8)]
        sweep += [dict(outputs_stages=2, grads_stages=2), dict(pass_block=256), dict(pass_block=2048)]
        for change in sweep:
            if time.perf_counter() > deadline:
                print(f"budget spent: skipped {change}", flush=True)
                continue
            try:
                fwd, fwd_bwd = op_fns("pallas", chunk, dataclasses.replace(self.block_sizes, **change))
                note = json.dumps(change)
                self.timing("pallas", chunk, "fwd", 1, t, median_time(fwd, x, dt, A, B, C), note)
                self.timing("pallas", chunk, "fwd+bwd", 1, t, median_time(fwd_bwd, x, dt, A, B, C, dy), note)
            except Exception as e:  # noqa: BLE001
                self.report.fail(json.dumps(change), e)


def run(args):
    from pallas_kernels.ssd import BlockSizes

    block_sizes = BlockSizes(**args.block_sizes)
    report = Report(COLUMNS, args.json, args.markdown, stage=args.stage, block_sizes=dataclasses.asdict(block_sizes))
    getattr(_Stages(args, report, block_sizes), args.stage)()
