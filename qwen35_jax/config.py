"""Model configuration: small frozen dataclasses built from a Hugging Face ``config.json``.

Two layouts are read:

* ``Qwen3_5ForConditionalGeneration`` (``model_type: "qwen3_5"``): the text settings are nested under
  ``text_config`` and the vision tower's under ``vision_config``. This is how the public 27B
  checkpoints ship.
* ``Qwen3_5ForCausalLM`` (``model_type: "qwen3_5_text"``): the text settings are at the top level and
  there is no vision tower.

Parsing is strict: every key of ``config.json`` is either *handled* (it becomes a field, or is checked
against the one value we support) or explicitly *ignored* (training or serving knobs that do not change
the forward pass). Any other key raises :class:`ConfigError`, so a checkpoint of a variant we do not
implement fails loudly instead of loading into the wrong model. The facts behind every field are in
``shared/reference/qwen35_architecture.md`` (section 1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any, Literal

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"
LayerType = Literal["linear_attention", "full_attention"]


class ConfigError(ValueError):
    """A config.json (or a dataclass built by hand) that this library cannot represent faithfully."""


def make_layer_types(num_layers: int, full_attention_interval: int = 4) -> tuple[str, ...]:
    """The hybrid pattern: layer i is full attention iff (i + 1) % interval == 0 (3 GDN : 1 attention)."""
    if full_attention_interval < 1:
        raise ConfigError(f"full_attention_interval must be >= 1, got {full_attention_interval}")
    return tuple(
        FULL_ATTENTION if (i + 1) % full_attention_interval == 0 else LINEAR_ATTENTION
        for i in range(num_layers)
    )


# --------------------------------------------------------------------------------------------------
# Text decoder
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextConfig:
    """The hybrid Gated DeltaNet + gated attention decoder (HF ``Qwen3_5TextConfig``).

    Defaults are the 27B values. Attributes mirror the HF names, with ``rope_parameters`` flattened
    into ``rope_theta``, ``partial_rotary_factor`` and ``mrope_section``.
    """

    vocab_size: int = 248320
    hidden_size: int = 5120
    intermediate_size: int = 17408
    num_hidden_layers: int = 64
    layer_types: tuple[str, ...] = make_layer_types(64)
    # gated full attention (the q_proj is twice as wide: per head [query | gate])
    num_attention_heads: int = 24
    num_key_value_heads: int = 4
    head_dim: int = 256
    # Gated DeltaNet
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 48
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    # shared
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    tie_word_embeddings: bool = False
    # special tokens (informational; generation reads them)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # the multi-token-prediction head (HF ignores it; vLLM and our generation use it)
    mtp_num_hidden_layers: int = 0
    mtp_use_dedicated_embeddings: bool = False

    def __post_init__(self):
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.mrope_section, list):
            object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
            "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"text config: {name} must be a positive integer, got {value!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"text config: layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - {LINEAR_ATTENTION, FULL_ATTENTION})
        if unknown:
            raise ConfigError(
                f"text config: unknown layer type(s) {unknown}; expected '{LINEAR_ATTENTION}' or '{FULL_ATTENTION}'"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                f"text config: linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
                f"linear_num_key_heads={self.linear_num_key_heads}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"text config: hidden_act={self.hidden_act!r} is not supported (only 'silu')")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"text config: partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        rotary = self.rotary_dim
        if rotary % 2:
            raise ConfigError(f"text config: rotary dim head_dim*partial_rotary_factor = {rotary} must be even")
        if len(self.mrope_section) != 3:
            raise ConfigError(f"text config: mrope_section must have 3 entries (T, H, W), got {list(self.mrope_section)}")

    # derived sizes -------------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        """Dims of each attention head that RoPE rotates (64 of 256 in the 27B)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the depthwise conv: q, k and v (z, a and b bypass it)."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def num_full_attention_layers(self) -> int:
        return sum(t == FULL_ATTENTION for t in self.layer_types)

    @property
    def num_linear_attention_layers(self) -> int:
        return sum(t == LINEAR_ATTENTION for t in self.layer_types)


# --------------------------------------------------------------------------------------------------
# Vision tower (parameters only until the vision issue lands; kept so nothing in a checkpoint is lost)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """The ViT + patch merger (HF ``Qwen3_5VisionConfig``); defaults are the 27B values."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 5120
    num_position_embeddings: int = 2304
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                     "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "num_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"vision config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision config: hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}")
        side = math.isqrt(self.num_position_embeddings)
        if side * side != self.num_position_embeddings:
            raise ConfigError(
                f"vision config: num_position_embeddings={self.num_position_embeddings} is not a square grid"
            )
        if self.hidden_act != "gelu_pytorch_tanh":
            raise ConfigError(f"vision config: hidden_act={self.hidden_act!r} is not supported (only 'gelu_pytorch_tanh')")

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch vector (C x T x P x P)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merged_hidden_size(self) -> int:
        """Width of the merger's input: the 2x2 block of patch features concatenated."""
        return self.hidden_size * self.spatial_merge_size**2


# --------------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------------

CAUSAL_LM = "Qwen3_5ForCausalLM"
CONDITIONAL_GENERATION = "Qwen3_5ForConditionalGeneration"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything the model needs; hashable, so it is a static argument of jitted functions.

    ``architecture`` records the checkpoint layout (it decides the tensor names on disk):
    ``Qwen3_5ForConditionalGeneration`` (text + vision, names under ``model.language_model.``) or
    ``Qwen3_5ForCausalLM`` (text only, names under ``model.``). ``vision`` is None for the latter.
    """

    text: TextConfig = TextConfig()
    vision: VisionConfig | None = VisionConfig()
    architecture: str = CONDITIONAL_GENERATION
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054

    def __post_init__(self):
        if self.architecture not in (CAUSAL_LM, CONDITIONAL_GENERATION):
            raise ConfigError(
                f"architecture {self.architecture!r} is not supported; expected {CAUSAL_LM!r} or {CONDITIONAL_GENERATION!r}"
            )
        if self.architecture == CAUSAL_LM and self.vision is not None:
            raise ConfigError(f"{CAUSAL_LM} has no vision tower: vision must be None")
        if self.vision is not None and self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision out_hidden_size={self.vision.out_hidden_size} must equal the text hidden_size="
                f"{self.text.hidden_size} (the merger output replaces token embeddings)"
            )

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings


# --------------------------------------------------------------------------------------------------
# Parsing config.json
# --------------------------------------------------------------------------------------------------

# Keys PreTrainedConfig may write into any config.json. None of them changes the forward pass.
_GENERIC_IGNORED = frozenset({
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "initializer_range",
    "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "task_specific_params",
    "finetuning_task", "add_cross_attention", "tie_encoder_decoder", "decoder_start_token_id",
    "sep_token_id", "cross_attention_hidden_size", "pruned_heads", "tf_legacy_loss", "use_bfloat16",
    "torchscript", "_attn_implementation_autoset", "_commit_hash",
})

# Text-config keys that are read by other runtimes but do not change the math here (with the reason).
_TEXT_IGNORED = frozenset({
    "attention_dropout",      # training only
    "mamba_ssm_dtype",        # a serving hint; our recurrent state is always float32
    "full_attention_interval",  # only used to derive layer_types when those are absent (handled there)
    "architectures", "model_type",  # checked separately
})


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_keys(d: Mapping[str, Any], handled: set[str], ignored: frozenset[str], where: str) -> None:
    unknown = sorted(set(d) - handled - ignored - _GENERIC_IGNORED)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}. This library implements the dense Qwen3.5/3.6 "
            f"architecture; a key it does not know may change the model, so it refuses rather than guess. "
            f"If the key is harmless, add it to the ignored list in qwen35_jax/config.py."
        )


def text_config_from_dict(d: Mapping[str, Any], *, where: str = "text_config") -> TextConfig:
    """Build a :class:`TextConfig` from an HF text config dict (flat ``qwen3_5_text`` layout)."""
    model_type = d.get("model_type", "qwen3_5_text")
    _require(model_type == "qwen3_5_text",
             f"{where}: model_type {model_type!r} is not supported (expected 'qwen3_5_text'; MoE variants such as "
             f"'qwen3_5_moe_text' are a different architecture)")
    direct = {f.name for f in dataclasses.fields(TextConfig)} - {"rope_theta", "partial_rotary_factor", "mrope_section"}
    handled = set(direct) | {
        "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
        "attention_bias", "attn_output_gate", "mlp_only_layers", "output_gate_type",
        "head_dim",
    }
    _check_keys(d, handled, _TEXT_IGNORED, where)

    _require(not d.get("attention_bias", False),
             f"{where}: attention_bias=true is not supported (Qwen3.5 has no biases in the text stack)")
    # HF ignores `attn_output_gate` and always builds the gated q_proj; so do we (parity with the reference).
    _require(d.get("mlp_only_layers", []) in ([], None),
             f"{where}: mlp_only_layers={d.get('mlp_only_layers')} is an MoE setting; only [] is supported")
    _require(d.get("output_gate_type", "sigmoid") == "sigmoid",
             f"{where}: output_gate_type={d.get('output_gate_type')!r} is not supported (the attention output gate is a sigmoid)")

    # Fields given as null fall back to the dataclass default (HF does the same), except the token ids,
    # for which null is a meaningful value.
    token_ids = ("eos_token_id", "pad_token_id", "bos_token_id")
    kwargs: dict[str, Any] = {k: d[k] for k in direct if k in d and (d[k] is not None or k in token_ids)}

    # RoPE: HF v5 writes `rope_parameters`; older files used top-level `rope_theta` / `partial_rotary_factor`
    # and `rope_scaling`. Only the default (unscaled) rope type is implemented.
    rope = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling")
    if scaling:
        rope = {**scaling, **rope}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _require(rope_type == "default",
             f"{where}: rope_type {rope_type!r} is not supported (only 'default'; long-context YaRN is not implemented)")
    known_rope = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved"}
    extra_rope = sorted(set(rope) - known_rope)
    _require(not extra_rope, f"{where}: unknown rope_parameters key(s) {extra_rope}")
    _require(rope.get("mrope_interleaved", True) is True,
             f"{where}: mrope_interleaved=false is not supported (HF always applies the interleaved layout)")
    if "rope_theta" in rope:
        kwargs["rope_theta"] = float(rope["rope_theta"])
    elif "rope_theta" in d:
        kwargs["rope_theta"] = float(d["rope_theta"])
    else:
        kwargs["rope_theta"] = 10000.0  # HF's default when the file gives none
    # HF: `kwargs.setdefault("partial_rotary_factor", 0.25)` then rope_parameters wins.
    kwargs["partial_rotary_factor"] = float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25)))
    # HF's rotary embedding falls back to [11, 11, 10] when the file gives no section.
    kwargs["mrope_section"] = tuple(rope.get("mrope_section", (11, 11, 10)))

    num_layers = int(d.get("num_hidden_layers", TextConfig.num_hidden_layers))
    if d.get("layer_types") is None:
        kwargs["layer_types"] = make_layer_types(num_layers, int(d.get("full_attention_interval", 4)))
    if "mtp_num_hidden_layers" in d:
        kwargs["mtp_num_hidden_layers"] = int(d["mtp_num_hidden_layers"])
    try:
        return TextConfig(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the key check above
        raise ConfigError(f"{where}: {e}") from e


def vision_config_from_dict(d: Mapping[str, Any], *, where: str = "vision_config") -> VisionConfig:
    model_type = d.get("model_type", "qwen3_5_vision")
    # Early checkpoints wrote model_type "qwen3_5" here; HF rewrites it, so we accept it too.
    _require(model_type in ("qwen3_5_vision", "qwen3_5"),
             f"{where}: model_type {model_type!r} is not supported (expected 'qwen3_5_vision')")
    direct = {f.name for f in dataclasses.fields(VisionConfig)} - {"rope_theta"}
    handled = set(direct) | {"rope_parameters", "deepstack_visual_indexes", "num_hidden_layers", "num_attention_heads"}
    _check_keys(d, handled, frozenset({"model_type", "architectures"}), where)
    _require(not d.get("deepstack_visual_indexes"),
             f"{where}: deepstack_visual_indexes={d.get('deepstack_visual_indexes')} is a Qwen3-VL feature; "
             f"Qwen3.5 has no DeepStack (only [] is supported)")
    kwargs = {k: d[k] for k in direct if k in d}
    if "num_hidden_layers" in d:
        kwargs["depth"] = d["num_hidden_layers"]
    if "num_attention_heads" in d:
        kwargs["num_heads"] = d["num_attention_heads"]
    for k in ("patch_size", "temporal_patch_size"):
        if isinstance(kwargs.get(k), (list, tuple)):
            values = set(kwargs[k])
            _require(len(values) == 1, f"{where}: non-square {k}={kwargs[k]} is not supported")
            kwargs[k] = values.pop()
    rope = d.get("rope_parameters") or {}
    _require(rope.get("rope_type", "axial") == "axial", f"{where}: rope_type {rope.get('rope_type')!r} (expected 'axial')")
    if "rope_theta" in rope:
        kwargs["rope_theta"] = float(rope["rope_theta"])
    return VisionConfig(**kwargs)


def config_from_hf_dict(d: Mapping[str, Any], *, where: str = "config.json") -> ModelConfig:
    """Build a :class:`ModelConfig` from the parsed ``config.json`` of either layout."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if "quantization_config" in d:
        method = (d["quantization_config"] or {}).get("quant_method", "?")
        raise ConfigError(
            f"{where}: this checkpoint is quantized (quantization_config.quant_method={method!r}); "
            f"load_checkpoint reads float checkpoints only (readers of the quantized formats live in quant.formats)"
        )
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    _require(isinstance(archs, list), f"{where}: architectures must be a list, got {archs!r}")
    if model_type == "qwen3_5":
        _require(not archs or archs == [CONDITIONAL_GENERATION],
                 f"{where}: architectures {archs} with model_type 'qwen3_5' is not supported (expected [{CONDITIONAL_GENERATION!r}])")
        handled = {"text_config", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
                   "vision_end_token_id", "tie_word_embeddings", "architectures", "model_type"}
        _check_keys(d, handled, frozenset({"language_model_only", "pad_token_id", "bos_token_id", "eos_token_id"}), where)
        _require(isinstance(d.get("text_config"), Mapping), f"{where}: 'text_config' is missing or not an object")
        text = dict(d["text_config"])
        # In the nested layout HF ties lm_head to the embedding by the TOP-LEVEL flag (default False)
        # and ignores text_config.tie_word_embeddings (verified against transformers 5: a top-level
        # false with a nested true saves and uses a separate lm_head.weight).
        text["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", False))
        text_cfg = text_config_from_dict(text, where=f"{where}: text_config")
        vision_d = d.get("vision_config")
        vision_cfg = vision_config_from_dict(vision_d if vision_d is not None else {}, where=f"{where}: vision_config")
        kwargs = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id") if k in d}
        return ModelConfig(text=text_cfg, vision=vision_cfg, architecture=CONDITIONAL_GENERATION, **kwargs)
    if model_type == "qwen3_5_text":
        _require(not archs or archs == [CAUSAL_LM],
                 f"{where}: architectures {archs} with model_type 'qwen3_5_text' is not supported (expected [{CAUSAL_LM!r}])")
        return ModelConfig(text=text_config_from_dict(d, where=where), vision=None, architecture=CAUSAL_LM)
    raise ConfigError(
        f"{where}: model_type {model_type!r} is not supported; expected 'qwen3_5' "
        f"({CONDITIONAL_GENERATION}) or 'qwen3_5_text' ({CAUSAL_LM})"
    )


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(f"{file}: no config.json (a checkpoint directory needs one)")
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from e
    return config_from_hf_dict(d, where=file)


def config_to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The inverse of :func:`config_from_hf_dict`: a ``config.json`` that transformers loads."""
    t = cfg.text
    text = {
        "model_type": "qwen3_5_text",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "layer_types": list(t.layer_types),
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "linear_num_key_heads": t.linear_num_key_heads,
        "linear_num_value_heads": t.linear_num_value_heads,
        "linear_key_head_dim": t.linear_key_head_dim,
        "linear_value_head_dim": t.linear_value_head_dim,
        "linear_conv_kernel_dim": t.linear_conv_kernel_dim,
        "hidden_act": t.hidden_act,
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": t.rope_theta,
            "partial_rotary_factor": t.partial_rotary_factor,
            "mrope_section": list(t.mrope_section),
            "mrope_interleaved": True,
        },
        "attention_bias": False,
        "attn_output_gate": True,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "mtp_num_hidden_layers": t.mtp_num_hidden_layers,
        "mtp_use_dedicated_embeddings": t.mtp_use_dedicated_embeddings,
    }
    if cfg.architecture == CAUSAL_LM:
        return {"architectures": [CAUSAL_LM], **text}
    v = cfg.vision
    vision = {
        "model_type": "qwen3_5_vision",
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "hidden_act": v.hidden_act,
        "intermediate_size": v.intermediate_size,
        "num_heads": v.num_heads,
        "in_channels": v.in_channels,
        "patch_size": v.patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "temporal_patch_size": v.temporal_patch_size,
        "out_hidden_size": v.out_hidden_size,
        "num_position_embeddings": v.num_position_embeddings,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    return {
        "architectures": [CONDITIONAL_GENERATION],
        "model_type": "qwen3_5",
        "text_config": text,
        "vision_config": vision,
        "tie_word_embeddings": t.tie_word_embeddings,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
    }


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


def qwen35_27b() -> ModelConfig:
    """Qwen/Qwen3.5-27B and Qwen/Qwen3.6-27B (same architecture): text + vision, untied head."""
    return ModelConfig(
        text=TextConfig(eos_token_id=248044, mtp_num_hidden_layers=1),
        vision=VisionConfig(),
    )


def qwen35_27b_text() -> ModelConfig:
    """The 27B text decoder alone, in the ``Qwen3_5ForCausalLM`` layout."""
    return ModelConfig(text=TextConfig(eos_token_id=248044, mtp_num_hidden_layers=1), vision=None, architecture=CAUSAL_LM)


def tiny_text_config(**overrides: Any) -> TextConfig:
    """A few-kilobyte decoder with every structural feature of the 27B: 3:1 layer pattern, GQA,
    value heads = 3 x key heads in the DeltaNet, partial RoPE. Used by tests and examples."""
    base = dict(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        layer_types=make_layer_types(4), num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=16, linear_value_head_dim=16,
        rope_theta=10_000.0, partial_rotary_factor=0.25,
    )
    base.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        base["layer_types"] = make_layer_types(base["num_hidden_layers"])
    return TextConfig(**base)


def tiny_vision_config(**overrides: Any) -> VisionConfig:
    base = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                num_position_embeddings=64)
    base.update(overrides)
    return VisionConfig(**base)
