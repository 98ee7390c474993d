"""Weight quantization of qwen35-jax parameter trees: quantized leaf types, recipes, quantizers, I/O.

    import quant
    qparams = quant.quantize_params(params, "int8-g32-text")       # or a quant.Recipe
    logits = qwen35_jax.forward(cfg, qparams, input_ids)            # linear layers dispatch on the leaf
    quant.save("/ckpt/int8", qparams); qparams = quant.load("/ckpt/int8")
    print(quant.average_bits(qparams).quantized_bits_per_weight)
"""

from quant.leaves import BitsSummary, QuantizedWeight, average_bits, dequantize, is_quantized
from quant.recipes import (
    METHODS,
    PRESETS,
    TEXT_LINEARS,
    Method,
    Recipe,
    RecipeError,
    Rule,
    get_recipe,
    linear_weight_problem,
    plan,
    register_method,
)
from quant.rtn import find_params, rtn_quantize
from quant.quantize import dequantize_params, quantize_params
from quant.io import load, read_meta, register_leaf_type, save
from quant.gptq import GPTQInfo, GPTQWarning, HessianAccumulator, gptq_quantize, hessian, output_error
from quant.eora import eigen_basis, eora, eora_factors
from quant.recipes import CALIBRATED_PRESETS
from quant.calibration import gptq_quantize_model

__all__ = [
    # leaves
    "QuantizedWeight", "dequantize", "is_quantized", "average_bits", "BitsSummary",
    # recipes
    "Rule", "Recipe", "RecipeError", "PRESETS", "TEXT_LINEARS", "get_recipe", "plan", "linear_weight_problem",
    "Method", "METHODS", "register_method",
    # quantizers and transforms
    "rtn_quantize", "find_params", "quantize_params", "dequantize_params",
    # GPTQ, EoRA, calibration
    "gptq_quantize", "GPTQInfo", "GPTQWarning", "HessianAccumulator", "hessian", "output_error", "eora",
    "eora_factors", "eigen_basis", "gptq_quantize_model", "CALIBRATED_PRESETS",
    # I/O
    "save", "load", "read_meta", "register_leaf_type",
]
