"""Launch parameters of the SSD's Pallas GPU kernels (gpu.py): one frozen value, passed as
a static argument from `ssd_pallas(..., block_sizes=...)` down to every kernel. The
defaults are the committed values (untuned guesses until measured; sweeps and timings
in BENCHMARKS.md, "Kernels: SSD", run by `python -m tools.bench kernels --op ssd --stage tune`).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per program, and warps and pipeline stages of each GPU kernel."""

    # Rows of a chunk one program holds in registers (bt = min(chunk, tile)): the chunk and
    # the tile are separate, so a long chunk costs no registers.
    tile: int = 64
    states_warps: int = 4  # ssd_chunk_states
    states_stages: int = 1
    outputs_warps: int = 4  # ssd_chunk_outputs
    outputs_stages: int = 1
    grads_warps: int = 8  # ssd_chunk_grads
    grads_stages: int = 1
    pass_block: int = 512  # ssd_state_pass(_rev): elements of the flat [P * N] state per program
    pass_warps: int = 4
    pass_stages: int = 2
