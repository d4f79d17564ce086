"""Gated delta rule (Gated DeltaNet's recurrence): per-step reference, chunked
pure-JAX form, Pallas GPU/TPU kernels and the public op with a custom VJP."""

from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes
from pallas_kernels.gated_delta_rule.ops import chunk_gated_delta_rule, chunk_gated_delta_rule_pallas
from pallas_kernels.gated_delta_rule.reference import (
    fused_recurrent_gated_delta_rule,
    gated_delta_rule_step,
)
from pallas_kernels.gated_delta_rule.xla import chunk_gated_delta_rule_xla

__all__ = [
    "BlockSizes",
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_pallas",
    "chunk_gated_delta_rule_xla",
    "fused_recurrent_gated_delta_rule",
    "gated_delta_rule_step",
]
