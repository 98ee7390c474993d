"""Gated delta rule (the Gated DeltaNet recurrence of Qwen3.5's linear-attention layers).

`gated_delta_rule` is the entry point; the other names are the pure-JAX implementations it
dispatches to (and that the Pallas kernels are checked against).
"""

from pallas_kernels.gated_delta.api import gated_delta_rule
from pallas_kernels.gated_delta.reference import (
    chunk_gated_delta_rule,
    gated_delta_step,
    naive_recurrent_gated_delta_rule,
)

__all__ = [
    "gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
    "chunk_gated_delta_rule",
    "gated_delta_step",
]
