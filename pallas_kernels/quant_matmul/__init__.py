"""Weight-only quantized matmul (int2/3/4/8 codes, group scales, optional zero points)."""

from pallas_kernels.quant_matmul import layout

__all__ = ["layout"]
