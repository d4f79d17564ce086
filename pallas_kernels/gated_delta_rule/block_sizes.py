"""Launch parameters of the gated delta rule's Pallas kernels: one frozen value, passed as
a static argument from `chunk_gated_delta_rule_pallas(..., block_sizes=...)` down to every
kernel. The defaults are the committed tuning; the sweeps that chose them, and their
timings, are in BENCHMARKS.md ("Kernels: gated delta rule"), run by
`python -m tools.bench kernels --op gdn --tune`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Warps per program and column blocks of each GDN kernel (GPU: Triton; TPU: Mosaic).

    The walks (gdn_recurrence_states, gdn_recurrence_bwd) load the next chunk's tiles
    themselves, so Triton's pipelining is off (one stage) in every GPU kernel.
    """

    # GPU state walks (gpu_recurrence.py). One program walks every chunk of one
    # (batch*head, block of V columns); narrower blocks give more programs, each of which
    # loads the K-wide tiles (w, kg) again. None: the widest power-of-two fraction of V
    # (down to 16) that gives at least `walk_programs` programs, or the narrowest if none does.
    walk_block_v: int | None = None
    walk_programs: int = 128  # about one per SM of an H100 or H200 (132)
    walk_warps: int = 4
    # V columns per program of the output kernels (gdn_recurrence_output, gdn_output) and
    # per step of gdn_recurrence_grads' loop over V: a [K, 64] state block stays a register
    # tile at K = 256 (the whole [K, V] state would not at V = 512).
    output_block_v: int = 64
    recurrence_output_warps: int = 4
    grads_block_k: int = 64  # rows of K per program of gdn_recurrence_grads
    grads_warps: int = 4
    # GPU chunk-local kernels (gpu_chunk_local.py).
    aqk_qg_warps: int = 4
    wy_warps: int = 2
    output_warps: int = 4
    # None: 4 up to head width max(K, V) = 64, 8 above (at 128 the kernel spills far less
    # with 8; tools/bench resources).
    prepare_bwd_warps: int | None = None
    # TPU state walks (tpu_recurrence.py): V columns per program, V itself or a multiple of 128.
    tpu_block_v: int = 128

    def prepare_bwd_warps_at(self, width: int) -> int:
        """Warps of gdn_prepare_bwd at head width max(K, V)."""
        if self.prepare_bwd_warps is not None:
            return self.prepare_bwd_warps
        return 4 if width <= 64 else 8
