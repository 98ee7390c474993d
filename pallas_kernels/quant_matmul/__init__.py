"""Weight-only quantized matmul (int2/3/4/8 codes, group scales, optional zero points).

``quant_matmul`` is the entry point (Pallas kernels on GPU, the plain-jnp reference elsewhere);
``dequantize`` and ``quant_matmul_reference`` are the reference the kernels are checked against;
``layout`` defines the packed format.
"""

from pallas_kernels.quant_matmul import layout
from pallas_kernels.quant_matmul.api import dequantize_then_dot, quant_matmul
from pallas_kernels.quant_matmul.reference import dequantize, quant_matmul_reference

__all__ = ["layout", "quant_matmul", "dequantize", "quant_matmul_reference", "dequantize_then_dot"]
