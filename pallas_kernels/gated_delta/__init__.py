"""Gated delta rule (the Gated DeltaNet recurrence of Qwen3.5's linear-attention layers).

`gated_delta_rule` (a sequence: prefill, training) and `gated_delta_recurrent` (a few tokens from a
state: decode, speculative verification) are the entry points; they dispatch to the Pallas GPU
kernels (`kernel_chunked`, `kernel_decode`) or to the pure-JAX implementations below, which the
kernels are checked against.
"""

from pallas_kernels.gated_delta.api import (
    default_implementation,
    gated_delta_recurrent,
    gated_delta_rule,
)
from pallas_kernels.gated_delta.kernel_chunked import chunk_gated_delta_rule_pallas
from pallas_kernels.gated_delta.kernel_decode import gated_delta_recurrent_pallas
from pallas_kernels.gated_delta.reference import (
    chunk_gated_delta_rule,
    gated_delta_step,
    naive_recurrent_gated_delta_rule,
)

__all__ = [
    "gated_delta_rule",
    "gated_delta_recurrent",
    "default_implementation",
    "naive_recurrent_gated_delta_rule",
    "chunk_gated_delta_rule",
    "gated_delta_step",
    "chunk_gated_delta_rule_pallas",
    "gated_delta_recurrent_pallas",
]
