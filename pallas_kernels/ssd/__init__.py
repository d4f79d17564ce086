"""SSD (Mamba2) scan: per-step reference, chunked XLA form, Pallas GPU/TPU kernels.

`ssd(...)` is the public entry point (impl "auto" | "xla" | "pallas" | "reference");
`ssd_step(...)` advances the recurrence by one token for decoding.
"""

from pallas_kernels.ssd.block_sizes import BlockSizes
from pallas_kernels.ssd.ops import ssd, ssd_pallas
from pallas_kernels.ssd.reference import ssd_reference, ssd_step
from pallas_kernels.ssd.xla import ssd_xla

__all__ = ["BlockSizes", "ssd", "ssd_pallas", "ssd_reference", "ssd_step", "ssd_xla"]
