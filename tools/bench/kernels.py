"""Time the linear-recurrence kernels on one device: the gated delta rule (--op gdn) or
the SSD scan (--op ssd, in --stage steps), against their XLA forms and, where importable,
the Triton kernels of flash-linear-attention and mamba_ssm.

Defaults are the GDN layers of Llama-3.2-1B upcycled as here (H = 32 query heads,
K = V = 64) and, for SSD, H = 32, P = 64, N = 128, G = 8. fla's reference shape is
`--batch 1 --seqlen 16384 --heads 16 --dk 128 --dv 128`. On a CPU the Pallas forms run in
interpret mode and the torch baselines are skipped: tiny shapes only try the plumbing.
"""

from __future__ import annotations

import json

from tools.bench import gdn, ssd
from tools.bench.harness import add_report_arguments

EPILOG = ssd.__doc__

# Per-op defaults of the options given as None.
DEFAULTS = {
    "gdn": dict(batch=[1, 4], seqlen=[2048, 8192, 32768, 65536], dk=64, time_budget=300.0, stage=None),
    "ssd": dict(batch=[1], seqlen=[8192, 16384], dk=128, time_budget=1e9, stage="bench"),
}


def add_arguments(p):
    p.add_argument("--op", choices=sorted(DEFAULTS), default="gdn")
    p.add_argument("--batch", type=int, nargs="+", help="gdn default: 1 4; ssd: 1")
    p.add_argument("--seqlen", type=int, nargs="+", help="gdn default: 2048 8192 32768 65536; ssd: 8192 16384")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dk", type=int, help="gdn: key head dim K (default 64); ssd: state dim N (default 128)")
    p.add_argument("--dv", type=int, default=64, help="gdn: value head dim V; ssd: head dim P")
    p.add_argument("--impls", nargs="+", default=["pallas", "xla"],
                   help="gdn: pallas, xla, reference, pallas-xla-prepare; ssd: pallas, xla, reference")
    p.add_argument("--block-sizes", type=json.loads, default={}, metavar="JSON",
                   help='launch parameters of the Pallas kernels, fields of the op\'s BlockSizes, e.g. '
                        '\'{"walk_warps": 8}\' (gdn) or \'{"grads_warps": 4}\' (ssd); the rest keep their defaults')
    p.add_argument("--no-fla", action="store_true", help="skip the torch baselines (fla; for ssd also mamba_ssm)")
    p.add_argument("--no-check", action="store_true", help="gdn: skip the accuracy check of our Pallas form")
    p.add_argument("--time-budget", type=float,
                   help="seconds; later configurations are skipped (gdn default 300; ssd: none)")
    g = p.add_argument_group("gdn only")
    g.add_argument("--no-prepare", action="store_true", help="skip the rows that time the chunk-local preparation alone")
    g.add_argument("--tune", nargs="*", choices=["prepare", "recurrence"],
                   help="first sweep launch parameters at the first --batch: the chunk-local kernels' warps "
                        "(reported only), the walks' V block and warps (the fastest is kept for the rows), or "
                        "both (no argument)")
    s = p.add_argument_group("ssd only")
    s.add_argument("--stage", choices=ssd.STAGES, help="default bench; the stages are listed below")
    s.add_argument("--chunks", type=int, nargs="+", default=[256, 128, 64],
                   help="pallas chunk sizes of the bench stage; the first is also the nan and tune stages' chunk")
    s.add_argument("--nan-seqlen", type=int, default=65536, help="T of the nan stage")
    s.add_argument("--groups", type=int, default=8,
                   help="B and C groups G, dividing --heads (8: the KV heads of Llama-3.2-1B, B <- W_K, C <- W_Q)")
    add_report_arguments(p)


def run(args):
    for name, value in DEFAULTS[args.op].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.op == "gdn":
        if args.stage is not None:
            raise SystemExit("--stage is for --op ssd; --op gdn runs its rows in one pass")
        gdn.run(args)
    else:
        if args.heads % args.groups:
            raise SystemExit(f"--heads {args.heads} is not a multiple of --groups {args.groups}")
        ssd.run(args)
