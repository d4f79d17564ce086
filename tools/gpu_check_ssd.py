"""GPU check of the Pallas SSD kernels, in stages that each fit a short `timeout`
(tools/gpu_check_ssd.sh runs them all in one device call):

    check      bf16 y, final state and every gradient of impl="pallas" vs the float64
               per-step reference (initial state, D, segments, G < H), chunks 64 and 256
    bench      fwd and fwd+bwd times of pallas (chunks 256, 128, 64) and xla (chunk 64)
    nan        y, final state and every gradient finite at T = 65536 bf16 (pallas)
    baselines  mamba_ssm's mamba_chunk_scan_combined (chunk 256) and fla's chunk_simple_gla
    tune       (not in the .sh) pallas fwd and fwd+bwd under other launch parameters

Shapes are those of BENCHMARKS.md "Kernels: SSD": H = 32, P = 64, N = 128, G = 8, bf16
x, B, C, f32 dt and A. Each stage writes ssd_<stage>.json to --out as it goes and
appends markdown rows to ssd_rows.md, so a stage killed by its timeout still leaves
what it measured. SSD_BLOCKS='{"grads_warps": 4}' overrides pallas_kernels.ssd.gpu.BLOCKS.

    python tools/gpu_check_ssd.py STAGE [--out DIR] [--seqlen 8192 16384] [--budget S]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels._common import rel_rms  # noqa: E402
from bench_kernels import (SSD_GROUPS, _ssd_jax_fns, _ssd_torch_fns, _to_torch, check_ssd,  # noqa: E402
                           median_time, ssd_flops, ssd_inputs, torch_times)

H, P, N = 32, 64, 128


class Report:
    """One stage's JSON (rewritten after every record) and the shared markdown rows."""

    def __init__(self, out, stage):
        self.out, self.stage = out, stage
        self.data = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "stage": stage}
        from pallas_kernels.ssd import gpu

        gpu.BLOCKS.update(json.loads(os.environ.get("SSD_BLOCKS", "{}")))
        self.data["blocks"] = dict(gpu.BLOCKS)
        self.save()

    def save(self):
        with open(os.path.join(self.out, f"ssd_{self.stage}.json"), "w") as f:
            json.dump(self.data, f, indent=1)

    def add(self, key, value):
        self.data[key] = value
        self.save()

    def fail(self, what, e):
        text = str(e)
        if len(text) > 1200:  # compiler errors put the cause at the end
            text = text[:400] + " ... " + text[-800:]
        msg = f"{what} failed: {type(e).__name__}: {text}"
        traceback.print_exc()
        print(msg, flush=True)
        self.data.setdefault("failures", []).append(msg)
        self.save()

    def timing(self, impl, chunk, mode, b, t, seconds, note=""):
        flops = ssd_flops(b, t, H, P, N, chunk) * (3 if mode == "fwd+bwd" else 1)
        rec = dict(impl=impl, chunk=chunk, mode=mode, B=b, T=t, ms=seconds * 1e3,
                   tflops=flops / seconds / 1e12, note=note)
        self.data.setdefault("results", []).append(rec)
        self.save()
        line = (f"| {impl} | {chunk} | {mode} | {b} | {t} | {rec['ms']:.3f} ms | {rec['tflops']:.2f} | "
                f"{self.data['device']} | {note} |")
        with open(os.path.join(self.out, "ssd_rows.md"), "a") as f:
            f.write(line + "\n")
        print(line, flush=True)


def _vjp_fn(impl, chunk, ids):
    """jit(args, cotangents) -> (y, final state, grads of x, dt, A, B, C, D, h0)."""
    from pallas_kernels.ssd import ssd, ssd_reference

    def f(x, dt, A, B, C, D, h0):
        kw = dict(D=D, initial_state=h0, output_final_state=True, segment_ids=ids)
        if impl == "reference":
            return ssd_reference(x, dt, A, B, C, **kw)
        return ssd(x, dt, A, B, C, chunk_size=chunk, impl=impl, **kw)

    def run(args, cts):
        (y, s), vjp = jax.vjp(f, *args)
        return y, s, vjp(cts)

    return jax.jit(run)


def stage_check(args, rep):
    """bf16, B=1, T=1000, H=4, P=64, N=128, G=2 with initial state, D and a few segments."""
    b, t, h, g = 1, 1000, 4, 2
    x, dt, A, B, C, dy = ssd_inputs(b, t, h, P, N, g, seed=3)
    ks = jax.random.split(jax.random.key(7), 4)
    h0 = jax.random.normal(ks[0], (b, h, P, N), jnp.float32)
    D = jax.random.normal(ks[1], (h,), jnp.float32)
    ids = jnp.cumsum(jax.random.uniform(ks[2], (b, t)) < 0.004, axis=1).astype(jnp.int32)
    ds = jax.random.normal(ks[3], (b, h, P, N), jnp.float32)
    inputs = (x, dt, A, B, C, D, h0)
    names = ("y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0")
    with jax.enable_x64(True):
        a64 = tuple(z.astype(jnp.float64) for z in inputs)
        y, s, grads = _vjp_fn("reference", None, ids)(a64, (dy.astype(jnp.float64), ds.astype(jnp.float64)))
        ref = [jax.device_get(z) for z in (y, s, *grads)]
    for impl, chunk in (("pallas", 256), ("pallas", 64)):
        try:
            y, s, grads = _vjp_fn(impl, chunk, ids)(inputs, (dy, ds))
            errs = {k: rel_rms(jnp.asarray(a, jnp.float32), r) for k, a, r in zip(names, (y, s, *grads), ref)}
            errs["ok(<=2e-2)"] = bool(all(e <= 2e-2 for e in errs.values()))
        except Exception as e:  # noqa: BLE001 - report and go on
            rep.fail(f"check {impl} chunk {chunk}", e)
            continue
        print(f"check {impl} chunk {chunk} (bf16 vs f64 reference, rel-RMS): {json.dumps(errs)}", flush=True)
        rep.add(f"{impl}_chunk{chunk}", errs)


def stage_bench(args, rep):
    """In priority order, so that a short budget still compares the likely best of each."""
    deadline = time.perf_counter() + args.budget
    first, rest = args.seqlen[:1], args.seqlen[1:]
    configs = [(impl, chunk, t) for t in first for impl, chunk in (("pallas", 256), ("xla", 64))]
    configs += [(impl, chunk, t) for t in rest for impl, chunk in (("pallas", 256), ("xla", 64))]
    configs += [("pallas", chunk, t) for chunk in (128, 64) for t in args.seqlen]
    inputs = {}
    for impl, chunk, t in configs:
        if time.perf_counter() > deadline:
            print(f"budget spent: skipped {impl} chunk {chunk} T={t}", flush=True)
            continue
        if t not in inputs:
            inputs[t] = ssd_inputs(1, t, H, P, N, SSD_GROUPS)
        x, dt, A, B, C, dy = inputs[t]
        try:
            fwd, fwd_bwd = _ssd_jax_fns(impl, chunk)
            t0 = time.perf_counter()
            fwd = fwd.lower(x, dt, A, B, C).compile()
            rep.timing(impl, chunk, "fwd", 1, t, median_time(fwd, x, dt, A, B, C),
                       f"compiled in {time.perf_counter() - t0:.1f} s")
            t0 = time.perf_counter()
            fwd_bwd = fwd_bwd.lower(x, dt, A, B, C, dy).compile()
            rep.timing(impl, chunk, "fwd+bwd", 1, t, median_time(fwd_bwd, x, dt, A, B, C, dy),
                       f"compiled in {time.perf_counter() - t0:.1f} s")
        except Exception as e:  # noqa: BLE001 - report and go on with the next config
            rep.fail(f"{impl} chunk {chunk} T={t}", e)


def stage_nan(args, rep):
    t = args.nan_seqlen
    x, dt, A, B, C, dy = ssd_inputs(1, t, H, P, N, SSD_GROUPS)
    fwd, fwd_bwd = _ssd_jax_fns("pallas", args.chunk)
    outs = (*fwd(x, dt, A, B, C), *fwd_bwd(x, dt, A, B, C, dy))
    finite = {name: bool(jnp.isfinite(z.astype(jnp.float32)).all())
              for name, z in zip(("y", "final_state", "dx", "ddt", "dA", "dB", "dC"), outs)}
    print(f"pallas chunk {args.chunk} B=1 T={t} bf16 finite: {json.dumps(finite)}", flush=True)
    rep.add(f"finite_T{t}", finite)
    rep.timing("pallas", args.chunk, "fwd", 1, t, median_time(fwd, x, dt, A, B, C, samples=3, warmup=0))
    rep.timing("pallas", args.chunk, "fwd+bwd", 1, t,
               median_time(fwd_bwd, x, dt, A, B, C, dy, samples=3, warmup=0))


def stage_baselines(args, rep):
    deadline = time.perf_counter() + args.budget
    fns = _ssd_torch_fns(256)  # mamba_ssm's default chunk; fla's chunk_simple_gla uses its own, 64
    rep.add("check", check_ssd(fns))  # their outputs and gradients vs our float64 reference first
    for name, chunk in (("mamba_ssm", 256), ("fla", 64)):
        fn = fns.get(name)
        if fn is None:
            rep.add(name, "not importable")
            continue
        import torch

        for t in args.seqlen:
            x, dt, A, B, C, dy = ssd_inputs(1, t, H, P, N, SSD_GROUPS)
            tx = [_to_torch(z, True) for z in (x, dt, A, B, C)]
            tdy = _to_torch(dy)
            for mode in ("fwd", "fwd+bwd"):
                if time.perf_counter() > deadline:
                    print(f"budget spent: skipped {name} {mode} T={t}", flush=True)
                    continue
                try:
                    call = ((lambda tx=tx: fn(*tx)) if mode == "fwd"
                            else (lambda tx=tx, tdy=tdy: fn(*tx)[0].backward(tdy)))
                    bench, piped = torch_times(call, grad=mode == "fwd+bwd")
                    rep.timing(name, chunk, mode, 1, t, bench)
                    rep.timing(f"{name}-piped", chunk, mode, 1, t, piped)
                except Exception as e:  # noqa: BLE001
                    rep.fail(f"{name} {mode} T={t}", e)
            tx = tdy = None
            torch.cuda.empty_cache()


def stage_tune(args, rep):
    """Sweep the launch parameters of our kernels at the first --seqlen and chunk --chunk."""
    from pallas_kernels.ssd import gpu

    deadline = time.perf_counter() + args.budget
    t = args.seqlen[0]
    x, dt, A, B, C, dy = ssd_inputs(1, t, H, P, N, SSD_GROUPS)
    base = dict(gpu.BLOCKS)
    sweep = [dict(tile=tile, outputs_warps=ow, grads_warps=gw)
             for tile in (64, 32) for gw in (8, 4) for ow in (4, 8)]
    sweep += [dict(outputs_stages=2, grads_stages=2), dict(pass_block=256), dict(pass_block=2048)]
    for change in sweep:
        if time.perf_counter() > deadline:
            print(f"budget spent: skipped {change}", flush=True)
            continue
        gpu.BLOCKS.clear()
        gpu.BLOCKS.update(base, **change)
        jax.clear_caches()
        try:
            fwd, fwd_bwd = _ssd_jax_fns("pallas", args.chunk)
            note = json.dumps(change)
            rep.timing("pallas", args.chunk, "fwd", 1, t, median_time(fwd, x, dt, A, B, C), note)
            rep.timing("pallas", args.chunk, "fwd+bwd", 1, t, median_time(fwd_bwd, x, dt, A, B, C, dy), note)
        except Exception as e:  # noqa: BLE001
            rep.fail(json.dumps(change), e)
    gpu.BLOCKS.clear()
    gpu.BLOCKS.update(base)


STAGES = {"check": stage_check, "bench": stage_bench, "nan": stage_nan, "baselines": stage_baselines,
          "tune": stage_tune}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--seqlen", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--chunk", type=int, default=256, help="pallas chunk of the nan and tune stages")
    p.add_argument("--nan-seqlen", type=int, default=65536)
    p.add_argument("--budget", type=float, default=1e9, help="seconds; later configs are skipped")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rep = Report(args.out, args.stage)
    STAGES[args.stage](args, rep)


if __name__ == "__main__":
    main()
