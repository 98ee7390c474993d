"""Image and video preprocessing for the Qwen3.5 vision tower (numpy + PIL, no torch), and the chat
helper that turns messages with images into model inputs.

The pipeline is the one of transformers 5.x (``AutoImageProcessor`` for ``qwen3_5`` is
``Qwen2VLImageProcessorPil`` when torchvision is absent, ``models/auto/image_processing_auto.py``; the
video processor is ``Qwen3VLVideoProcessor``; the processor is ``Qwen3VLProcessor``):

1. to RGB uint8 (``image_transforms.convert_to_rgb``, ``image_utils.load_image``);
2. resize with PIL bicubic to ``smart_resize``'s size: both sides multiples of ``patch * merge``
   (32), pixel count within [min_pixels, max_pixels], aspect ratio kept;
3. rescale by 1/255 and normalize with mean/std (0.5 / 0.5 for Qwen3.5: values in [-1, 1]);
4. patchify into rows of ``C * temporal_patch * P * P`` values in the vision tower's block-major
   order (2x2 merge blocks of consecutive rows, see :mod:`qwen35_jax.vision`); an image is one
   temporal patch whose frame is repeated ``temporal_patch_size`` times.

Shapes: one image of grid (1, h, w) gives ``h * w`` rows; a video of T frames gives
``ceil(T / temporal_patch) * h * w`` rows. ``pixel_values [sum(t*h*w), 3*2*16*16=1536]`` float32,
``image_grid_thw [n, 3]`` int64, the same for ``pixel_values_videos`` / ``video_grid_thw``.

Defaults (:class:`ProcessorConfig`) are Qwen3.5's ``preprocessor_config.json`` /
``video_preprocessor_config.json`` as published copies give them (the files themselves were not
available offline): images ``size = {shortest_edge: 65536, longest_edge: 16777216}``, videos
``{shortest_edge: 4096, longest_edge: 25165824}``, ``image_mean = image_std = [0.5, 0.5, 0.5]``,
``rescale_factor = 1/255``, bicubic. Geometry (patch 16, temporal patch 2, merge 2) always comes from
the model's :class:`~qwen35_jax.config.VisionConfig`; the processor files may only confirm it.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen35_jax.config import ModelConfig, VisionConfig
from qwen35_jax.tokenizer import read_json_object

__all__ = [
    "ChatInputs",
    "ImageProcessingError",
    "ProcessorConfig",
    "chat_inputs",
    "expand_vision_tokens",
    "preprocess_images",
    "preprocess_video",
    "preprocess_videos",
    "smart_resize",
    "smart_resize_video",
    "video_timestamps",
]

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
MAX_ASPECT_RATIO = 200  # smart_resize refuses anything longer (transformers and qwen-vl-utils)
DEFAULT_VIDEO_FPS = 24.0  # what Qwen3VLProcessor assumes for frames given without metadata


class ImageProcessingError(ValueError):
    """An image or video that cannot be turned into model inputs (unreadable, wrong shape or dtype,
    NaN, too small, too elongated) or a bad processor configuration."""


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessorConfig:
    """Preprocessing settings other than the patch geometry (which is the model's VisionConfig).

    min_pixels / max_pixels: the pixel budget of one image (``size.shortest_edge`` /
    ``size.longest_edge`` in ``preprocessor_config.json``; yes, HF stores pixel counts under those
    names). video_min_pixels / video_max_pixels: the budget of a whole video (frames x pixels, with
    the frame count rounded to the temporal patch). mean/std per RGB channel; rescale_factor maps
    uint8 to [0, 1].
    """

    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    video_min_pixels: int = 4096
    video_max_pixels: int = 25165824
    video_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    video_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    video_rescale_factor: float = 1 / 255

    def __post_init__(self):
        for lo, hi in (("min_pixels", "max_pixels"), ("video_min_pixels", "video_max_pixels")):
            a, b = getattr(self, lo), getattr(self, hi)
            for name, v in ((lo, a), (hi, b)):
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise ImageProcessingError(f"processor config: {name} must be a positive integer, got {v!r}")
            if a > b:
                raise ImageProcessingError(f"processor config: {lo}={a} is larger than {hi}={b}")
        for name in ("image_mean", "image_std", "video_mean", "video_std"):
            v = getattr(self, name)
            numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            if not isinstance(v, tuple) or len(v) != 3 or not numbers:
                raise ImageProcessingError(f"processor config: {name} must be a tuple of 3 finite numbers, got {v!r}")
            if name.endswith("std") and min(v) <= 0:
                raise ImageProcessingError(f"processor config: {name} must be positive, got {v!r}")
        for name in ("rescale_factor", "video_rescale_factor"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v > 0):
                raise ImageProcessingError(f"processor config: {name} must be a positive number, got {v!r}")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, vision: VisionConfig | None = None) -> ProcessorConfig:
        """Settings from a checkpoint directory's ``preprocessor_config.json`` and
        ``video_preprocessor_config.json`` (or the ``image_processor`` / ``video_processor`` entries of
        a combined ``processor_config.json``); defaults for a file that is absent.

        Strict like ``config.json`` parsing: a key that is neither read nor on the explicit ignore list
        raises naming it, and so does a setting this implementation does not follow (``do_resize:
        false``, a non-bicubic ``resample``, ``cap_pixels_per_frame: true``, ...). ``patch_size``,
        ``temporal_patch_size`` and ``merge_size`` must agree with ``vision`` (by default the
        directory's ``config.json`` vision config, when there is one)."""
        root = Path(path)
        if not root.is_dir():
            raise ImageProcessingError(f"checkpoint directory {root} does not exist (or is not a directory)")
        if vision is None and (root / "config.json").is_file():
            from qwen35_jax.config import load_config

            vision = load_config(root).vision
        sources: dict[str, tuple[Mapping, str]] = {}
        for name, file in (("image", "preprocessor_config.json"), ("video", "video_preprocessor_config.json")):
            data = _read_json(root / file)
            if data is not None:
                sources[name] = (data, str(root / file))
        combined = _read_json(root / "processor_config.json")
        for name in ("image", "video"):
            sub = (combined or {}).get(f"{name}_processor")
            if sub is not None and name not in sources:
                if not isinstance(sub, Mapping):
                    raise ImageProcessingError(f"{root / 'processor_config.json'}: {name}_processor must be an object")
                sources[name] = (sub, f"{root / 'processor_config.json'} [{name}_processor]")
        kwargs: dict[str, Any] = {}
        for name, (data, where) in sources.items():
            kwargs.update(_parse_processor_dict(data, where, vision=vision, video=name == "video"))
        try:
            return cls(**kwargs)
        except ImageProcessingError as e:
            raise ImageProcessingError(f"{' / '.join(w for _, w in sources.values())}: {e}") from e


def _read_json(file: Path) -> dict | None:
    return read_json_object(file, ImageProcessingError) if file.is_file() else None


# Keys of the HF processor files that do not change preprocessing here, with the reason.
_IGNORED_KEYS = frozenset({
    "image_processor_type", "video_processor_type", "processor_class", "feature_extractor_type",  # class names
    # frame sampling: callers hand us the frames they sampled (see preprocess_video)
    "fps", "num_frames", "min_frames", "max_frames", "do_sample_frames", "max_duration", "return_metadata",
    "max_video_tokens",  # only read together with cap_pixels_per_frame, which must be off
})
# Flags that must hold the value we implement.
_REQUIRED_VALUES = {
    "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
    "resample": 3,  # PIL.Image.BICUBIC
    "default_to_square": False,
    "cap_pixels_per_frame": (False, None),
}


def _parse_processor_dict(d: Mapping, where: str, *, vision: VisionConfig | None, video: bool) -> dict[str, Any]:
    handled = {"size", "min_pixels", "max_pixels", "image_mean", "image_std", "rescale_factor", "patch_size",
               "temporal_patch_size", "merge_size", *_REQUIRED_VALUES}
    unknown = sorted(set(d) - handled - _IGNORED_KEYS)
    if unknown:
        raise ImageProcessingError(
            f"{where}: unknown key(s) {unknown}; a key this implementation does not know may change the "
            "preprocessing, so it refuses rather than guess (harmless keys go on the ignore list in "
            "qwen35_jax/image_processing.py)")
    for key, want in _REQUIRED_VALUES.items():
        if key in d:
            ok = d[key] in want if isinstance(want, tuple) else (d[key] == want and type(d[key]) is type(want))
            if not ok:
                raise ImageProcessingError(f"{where}: {key}={d[key]!r} is not supported (only {want!r})")
    geometry = {"patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size",
                "merge_size": "spatial_merge_size"}
    for key, field in geometry.items():
        if key in d and vision is not None and d[key] != getattr(vision, field):
            raise ImageProcessingError(
                f"{where}: {key}={d[key]!r} disagrees with the model's vision config {field}={getattr(vision, field)}")
    prefix = "video_" if video else ""
    out: dict[str, Any] = {}
    size = d.get("size")
    if size is not None:
        if not isinstance(size, Mapping) or set(size) - {"shortest_edge", "longest_edge"}:
            raise ImageProcessingError(
                f"{where}: size must be {{'shortest_edge': min pixels, 'longest_edge': max pixels}}, got {size!r}")
        if "shortest_edge" in size:
            out[f"{prefix}min_pixels"] = size["shortest_edge"]
        if "longest_edge" in size:
            out[f"{prefix}max_pixels"] = size["longest_edge"]
    # the legacy top-level names win over size, as in Qwen2VLImageProcessor.__init__
    if "min_pixels" in d:
        out[f"{prefix}min_pixels"] = d["min_pixels"]
    if "max_pixels" in d:
        out[f"{prefix}max_pixels"] = d["max_pixels"]
    for key in ("image_mean", "image_std"):
        if key in d:
            v = d[key]
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = [v] * 3
            if not isinstance(v, list):
                raise ImageProcessingError(f"{where}: {key} must be a list of 3 numbers, got {v!r}")
            out[f"video_{key[len('image_'):]}" if video else key] = tuple(v)  # video_mean / video_std
    if "rescale_factor" in d:
        out[f"{prefix}rescale_factor"] = d["rescale_factor"]
    return out


# --------------------------------------------------------------------------------------------------
# Target sizes
# --------------------------------------------------------------------------------------------------


def _check_aspect(height: int, width: int, what: str) -> None:
    if min(height, width) <= 0:
        raise ImageProcessingError(f"{what} is empty ({height}x{width} pixels)")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageProcessingError(
            f"{what} of {height}x{width} pixels has an aspect ratio of {ratio:.1f}; Qwen's preprocessing "
            f"refuses ratios above {MAX_ASPECT_RATIO} (crop or pad it first)")


def smart_resize(height: int, width: int, *, factor: int = 32, min_pixels: int = 65536,
                 max_pixels: int = 16777216, what: str = "the image") -> tuple[int, int]:
    """The (height, width) an image is resized to: both multiples of ``factor``, the area within
    [min_pixels, max_pixels] where possible, the aspect ratio kept (rule of
    ``transformers/models/qwen2_vl/image_processing_pil_qwen2_vl.py::smart_resize``: round each side to
    the factor; if the area is too large, scale both by sqrt(area / max) and floor; if too small,
    scale up by sqrt(min / area) and ceil). Python's round (half to even), as there.

    Raises :class:`ImageProcessingError` for an aspect ratio above 200. No image is too small: the
    floor branch scales even a 1x1 image up to the pixel budget, as transformers does (the check for a
    result below ``factor`` only guards a ``min_pixels`` of 0)."""
    _check_aspect(height, width, what)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar < factor or w_bar < factor:
        raise ImageProcessingError(
            f"{what} of {height}x{width} pixels resizes to {h_bar}x{w_bar}, smaller than one {factor}x{factor} "
            f"merged patch (min_pixels={min_pixels} is too small for it)")
    return h_bar, w_bar


def smart_resize_video(num_frames: int, height: int, width: int, *, factor: int = 32, temporal_factor: int = 2,
                       min_pixels: int = 4096, max_pixels: int = 25165824, what: str = "the video") -> tuple[int, int]:
    """The frame size of a video (``transformers/models/qwen3_vl/video_processing_qwen3_vl.py::
    smart_resize``): frames smaller than ``factor`` are first scaled up (truncating) until both sides
    reach it, then the image rule applies with the budget counted over ``round(T / temporal_factor) *
    temporal_factor`` frames (the scale factor itself uses the real frame count, as there)."""
    if num_frames < temporal_factor:
        raise ImageProcessingError(
            f"{what} has {num_frames} frame(s); a video needs at least temporal_patch_size={temporal_factor} "
            "(pass a single frame as an image)")
    if min(height, width) <= 0:
        raise ImageProcessingError(f"{what} is empty ({height}x{width} pixels)")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_aspect(height, width, what)  # after the scale-up, as there
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar < factor or w_bar < factor:
        raise ImageProcessingError(f"{what}: frames resize to {h_bar}x{w_bar}, smaller than {factor}x{factor}")
    return h_bar, w_bar


# --------------------------------------------------------------------------------------------------
# Decoding inputs to RGB uint8 [H, W, 3]
# --------------------------------------------------------------------------------------------------


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError as e:  # pragma: no cover - pillow is a dependency
        raise ImageProcessingError("image preprocessing needs Pillow: pip install pillow") from e
    return Image, ImageOps


def _pil_to_rgb(img, what: str) -> np.ndarray:
    """A PIL image as RGB uint8, transparency composited onto white (``image_transforms.convert_to_rgb``:
    any image with an alpha band or a ``transparency`` entry goes through RGBA + alpha_composite)."""
    Image, _ = _pil()
    try:
        if img.width == 0 or img.height == 0:
            raise ImageProcessingError(f"{what} is empty ({img.height}x{img.width} pixels)")
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = img.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8)
    except ImageProcessingError:
        raise
    except Exception as e:  # a lazily opened image whose data turns out to be truncated or corrupt
        raise ImageProcessingError(f"could not decode {what} ({img.mode} {img.size}): {type(e).__name__}: {e}") from e


def _open_file(source: str | os.PathLike, what: str) -> np.ndarray:
    """A file path, ``file://`` URL or ``data:image/...;base64,`` string, read as transformers'
    ``load_image`` reads it: EXIF orientation applied, then ``convert("RGB")``. Note that this DROPS
    an alpha channel (no white background), unlike an already opened PIL image: both behaviours are
    transformers' (``image_utils.load_image`` then ``convert_to_rgb``)."""
    Image, ImageOps = _pil()
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = text.decode()
    if text.startswith(("http://", "https://")):
        raise ImageProcessingError(f"{what}: remote images are not downloaded here ({text}); save it to a file first")
    if text.startswith("data:image/"):
        try:
            data = base64.b64decode(text.split(",", 1)[1], validate=True)
            img = Image.open(io.BytesIO(data))
            img.load()
            return _pil_to_rgb(ImageOps.exif_transpose(img).convert("RGB"), what)
        except Exception as e:
            raise ImageProcessingError(
                f"{what}: could not decode the base64 image data: {type(e).__name__}: {e}") from e
    if text.startswith("file://"):
        text = text[len("file://"):]
    if not os.path.isfile(text):
        raise ImageProcessingError(f"{what}: image file {text!r} does not exist (or is not a file)")
    try:
        with Image.open(text) as img:
            img.load()  # PIL decodes lazily: force it here so a truncated file fails with its name
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ImageProcessingError(f"could not read image file {text!r}: {type(e).__name__}: {e}") from e
    # transformers then runs convert_to_rgb on the loaded image: a palette image's transparency entry
    # survives convert("RGB") as an RGB colour, and the pixels of that colour become white
    return _pil_to_rgb(rgb, f"image file {text!r}")


def _array_to_rgb(a: np.ndarray, what: str) -> np.ndarray:
    """A channels-last array as RGB uint8, following transformers' numpy path: grayscale is repeated,
    RGBA is blended onto white in the array's own dtype (integers rounded), then floats (which must be
    in [0, 1]) become bytes as ``to_pil_image`` makes them: ``(x * 255)`` in float64, cast to float32,
    then truncated to uint8. Integer arrays must hold values in [0, 255]."""
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ImageProcessingError(f"{what}: arrays must be uint8 (0..255) or float (0..1), got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ImageProcessingError(
            f"{what}: expected an array of shape (H, W) or (H, W, C) with C in 1, 3, 4 (channels last), "
            f"got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageProcessingError(f"{what} is empty (shape {a.shape})")
    floating = np.issubdtype(a.dtype, np.floating)
    if floating:
        finite = np.isfinite(a)
        if not finite.all():
            y, x, _ = np.argwhere(~finite)[0]
            raise ImageProcessingError(
                f"{what}: {int((~finite).sum())} NaN/inf value(s) in the float image (first at row {y}, column {x})")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageProcessingError(
                f"{what}: float images must hold values in [0, 1], got [{lo:g}, {hi:g}] (pass uint8 for 0..255)")
    else:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ImageProcessingError(f"{what}: integer images must hold values in [0, 255], got [{lo}, {hi}]")
    channels = a.shape[-1]
    if channels == 1:
        a = np.repeat(a, 3, axis=-1)
    elif channels == 4:
        white = 1.0 if floating else 255
        alpha = a[..., 3:4] / white
        blended = alpha * a[..., :3] + (1 - alpha) * white
        a = blended.astype(a.dtype) if floating else np.round(blended).astype(a.dtype)
    if floating:
        return (a.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    return a.astype(np.uint8)


def _to_rgb(image: Any, what: str) -> np.ndarray:
    """Any supported image (PIL image, path, ``file://`` / base64 string, numpy array) as [H, W, 3] uint8."""
    Image, _ = _pil()
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, what)
    if isinstance(image, (str, os.PathLike)):
        return _open_file(image, what)
    if isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        return _array_to_rgb(np.asarray(image), what)
    raise ImageProcessingError(
        f"{what}: expected a PIL image, a file path or a numpy array, got {type(image).__name__}")


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bicubic on uint8 (``image_transforms.resize``; PIL returns an exact copy for an unchanged size)."""
    Image, _ = _pil()
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), resample=Image.Resampling.BICUBIC))


# --------------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------------


def _patchify(frames: np.ndarray, temporal: int, patch: int, merge: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[T, H, W, C] float32 -> ([gt*gh*gw, C*temporal*patch*patch], (gt, gh, gw)).

    Frames are padded to a multiple of ``temporal`` by repeating the last one (a single image becomes
    ``temporal`` identical frames). Rows run over (t, block row, block col, row in block, col in
    block); each row is (C, temporal, patch row, patch col), the Conv3d weight's order. Same order as
    transformers' Qwen2-VL image ``patchify`` and Qwen3-VL video ``patchify``."""
    pad = -frames.shape[0] % temporal
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    T, H, W, C = frames.shape
    gt, gh, gw = T // temporal, H // patch, W // patch
    x = frames.reshape(gt, temporal, gh // merge, merge, patch, gw // merge, merge, patch, C)
    # axes: 0 gt, 1 temporal, 2 block row, 3 row in block, 4 patch row, 5 block col, 6 col in block,
    #       7 patch col, 8 channel
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, C * temporal * patch * patch), (gt, gh, gw)


def _geometry(vision: VisionConfig | None) -> tuple[int, int, int]:
    v = VisionConfig() if vision is None else vision
    if not isinstance(v, VisionConfig):
        raise ImageProcessingError(f"vision must be a qwen35_jax.VisionConfig, got {type(v).__name__}")
    if v.in_channels != 3:
        raise ImageProcessingError(f"the vision tower takes {v.in_channels} channels; preprocessing makes RGB (3)")
    return v.patch_size, v.temporal_patch_size, v.spatial_merge_size


def _as_list(items: Any, what: str) -> list:
    if isinstance(items, (list, tuple)):
        if not items:
            raise ImageProcessingError(f"no {what} given (an empty list)")
        return list(items)
    return [items]


def preprocess_images(images: Any, vision: VisionConfig | None = None,
                      config: ProcessorConfig = ProcessorConfig()) -> dict[str, np.ndarray]:
    """``{"pixel_values": [sum(h*w), C*T*P*P] float32, "image_grid_thw": [n, 3] int64}`` for one image
    or a list of images (PIL images, file paths, ``file://`` or ``data:image/...;base64,`` strings,
    numpy arrays (H, W) / (H, W, 1|3|4), uint8 or float in [0, 1]), in order. ``vision`` gives the
    patch geometry (default: the 27B's); the result goes straight into ``forward`` / ``generate``.

    Element for element what transformers' ``Qwen2VLImageProcessorPil`` returns for the same input and
    settings (float arrays: as with ``do_rescale=False``, since transformers would rescale them twice)."""
    patch, temporal, merge = _geometry(vision)
    factor = patch * merge
    mean = np.asarray(config.image_mean, np.float32)
    std = np.asarray(config.image_std, np.float32)
    rows, grids = [], []
    items = _as_list(images, "images")
    for i, image in enumerate(items):
        what = f"image {i}" if len(items) > 1 else "the image"
        rgb = _to_rgb(image, what)
        h, w = smart_resize(rgb.shape[0], rgb.shape[1], factor=factor, min_pixels=config.min_pixels,
                            max_pixels=config.max_pixels, what=what)
        # rescale in float64 then float32, normalize in float32 (image_transforms.rescale / normalize)
        x = (_resize(rgb, h, w).astype(np.float64) * config.rescale_factor).astype(np.float32)
        x = (x - mean) / std
        patches, grid = _patchify(x[None], temporal, patch, merge)
        rows.append(patches)
        grids.append(grid)
    return {"pixel_values": np.concatenate(rows), "image_grid_thw": np.asarray(grids, np.int64)}


def _video_frames(video: Any, what: str) -> np.ndarray:
    """A video as [T, H, W, 3] uint8: an array [T, H, W] / [T, H, W, C], or a list of frames (any image)."""
    if isinstance(video, (str, os.PathLike)):
        raise ImageProcessingError(
            f"{what}: video files are not decoded here ({os.fspath(video)!r}); sample the frames and pass "
            "them as a list of images or a [T, H, W, C] array")
    if isinstance(video, np.ndarray) or (hasattr(video, "__array__") and not isinstance(video, (list, tuple))):
        arr = np.asarray(video)
        if arr.ndim not in (3, 4):
            raise ImageProcessingError(
                f"{what}: expected frames of shape (T, H, W) or (T, H, W, C) (channels last), got shape {arr.shape}")
        frames = [_to_rgb(arr[t], f"{what}, frame {t}") for t in range(arr.shape[0])]
    elif isinstance(video, (list, tuple)):
        frames = [_to_rgb(f, f"{what}, frame {t}") for t, f in enumerate(video)]
    else:
        raise ImageProcessingError(
            f"{what}: expected a list of frames or a (T, H, W, C) array, got {type(video).__name__}")
    if not frames:
        raise ImageProcessingError(f"{what} has no frames")
    sizes = sorted({f.shape[:2] for f in frames})
    if len(sizes) > 1:
        raise ImageProcessingError(f"{what}: all frames must have the same size, got {sizes}")
    return np.stack(frames)


def preprocess_video(video: Any, vision: VisionConfig | None = None,
                     config: ProcessorConfig = ProcessorConfig()) -> dict[str, np.ndarray]:
    """``{"pixel_values_videos": [ceil(T/2)*h*w, C*T*P*P] float32, "video_grid_thw": [1, 3] int64}`` for
    one video given as its frames (a [T, H, W(, C)] array or a list of images of one size, T >= 2).

    Frame sampling is the caller's: every frame given is used, an odd count is padded by repeating the
    last frame (``Qwen3VLVideoProcessor.patchify``). Frames are resized with PIL bicubic, like images;
    transformers' video processor resizes with torchvision, i.e. torch's antialiased uint8 bicubic
    kernel, which is not bit-identical to PIL: on natural frames they differ by one grey level (1/127.5
    after normalization) in a fraction of the pixels (up to ~20% when one side shrinks while the other
    grows); on pixel noise, in that mixed case, by more. Without a resize the rows are identical.
    Normalization is transformers' fused form ``(x - mean*255) / (std*255)`` on the uint8 values."""
    patch, temporal, merge = _geometry(vision)
    frames = _video_frames(video, "the video")
    T, H, W, _ = frames.shape
    h, w = smart_resize_video(T, H, W, factor=patch * merge, temporal_factor=temporal,
                              min_pixels=config.video_min_pixels, max_pixels=config.video_max_pixels)
    resized = np.stack([_resize(f, h, w) for f in frames]).astype(np.float32)
    # TorchvisionBackend.rescale_and_normalize: mean and std divided by the rescale factor (float32)
    scale = np.float32(1.0 / config.video_rescale_factor)
    mean = np.asarray(config.video_mean, np.float32) * scale
    std = np.asarray(config.video_std, np.float32) * scale
    patches, grid = _patchify((resized - mean) / std, temporal, patch, merge)
    return {"pixel_values_videos": patches, "video_grid_thw": np.asarray([grid], np.int64)}


def preprocess_videos(videos: Sequence[Any], vision: VisionConfig | None = None,
                      config: ProcessorConfig = ProcessorConfig()) -> dict[str, np.ndarray]:
    """Several videos packed in order: rows concatenated, one grid row per video."""
    if not isinstance(videos, (list, tuple)) or not videos:
        raise ImageProcessingError("videos must be a non-empty list of videos (each a list of frames or an array)")
    outs = []
    for i, v in enumerate(videos):
        try:
            outs.append(preprocess_video(v, vision, config))
        except ImageProcessingError as e:
            raise ImageProcessingError(f"video {i}: {e}") from e
    return {"pixel_values_videos": np.concatenate([o["pixel_values_videos"] for o in outs]),
            "video_grid_thw": np.concatenate([o["video_grid_thw"] for o in outs])}


# --------------------------------------------------------------------------------------------------
# Prompt expansion and the chat helper
# --------------------------------------------------------------------------------------------------


def video_timestamps(num_frames: int, fps: float = DEFAULT_VIDEO_FPS, temporal_patch_size: int = 2,
                     frame_indices: Sequence[int] | None = None) -> list[float]:
    """Seconds of each temporal patch of a video (``Qwen3VLProcessor._calculate_timestamps``): frame
    indices (default 0..T-1) padded with the last one to a multiple of the temporal patch, divided by
    ``fps``, then the mean of the first and last frame of each group."""
    idx = list(range(num_frames)) if frame_indices is None else [int(i) for i in frame_indices]
    if len(idx) != num_frames:
        raise ImageProcessingError(f"{len(idx)} frame indices for {num_frames} frames")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ImageProcessingError(f"fps must be a positive number, got {fps!r}")
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    seconds = [i / fps for i in idx]
    groups = range(0, len(seconds), temporal_patch_size)
    return [(seconds[i] + seconds[i + temporal_patch_size - 1]) / 2 for i in groups]


def expand_vision_tokens(text: str, *, image_grid_thw=None, video_grid_thw=None, merge_size: int = 2,
                         temporal_patch_size: int = 2, timestamps: Sequence[Sequence[float]] | None = None) -> str:
    """Replace the i-th ``<|image_pad|>`` of ``text`` by ``t*h*w / merge**2`` of them, and the j-th
    ``<|video_pad|>`` by one ``<{s:.1f} seconds><|vision_start|><|video_pad|>*(h*w/merge**2)<|vision_end|>``
    per temporal patch (``Qwen3VLProcessor.replace_image_token`` / ``replace_video_token``). A video
    placeholder that the template wrapped as ``<|vision_start|><|video_pad|><|vision_end|>`` is replaced
    with its wrapper, so each temporal patch is one ``<|vision_start|>...<|vision_end|>`` block and
    none is nested (Qwen's reference processor, and transformers from 5.25; 5.24 kept the wrapper).
    ``timestamps[j]`` are the seconds of video j's temporal patches (default: :func:`video_timestamps`
    of ``t * temporal_patch_size`` frames at 24 fps, transformers' assumption for frames without
    metadata)."""
    images = [] if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3).tolist()
    videos = [] if video_grid_thw is None else np.asarray(video_grid_thw, np.int64).reshape(-1, 3).tolist()
    n_img, n_vid = text.count(IMAGE_TOKEN), text.count(VIDEO_TOKEN)
    if n_img != len(images):
        raise ImageProcessingError(
            f"the prompt has {n_img} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s) were given")
    if n_vid != len(videos):
        raise ImageProcessingError(
            f"the prompt has {n_vid} {VIDEO_TOKEN} placeholder(s) but {len(videos)} video(s) were given")
    if timestamps is not None and len(timestamps) != len(videos):
        raise ImageProcessingError(f"{len(timestamps)} timestamp lists for {len(videos)} videos")
    m2 = merge_size * merge_size
    wrapped = VISION_START + VIDEO_TOKEN + VISION_END
    pieces = re.split(f"({re.escape(wrapped)}|{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})", text)
    out, i, j = [], 0, 0
    for piece in pieces:
        if piece == wrapped:
            piece = VIDEO_TOKEN
        if piece == IMAGE_TOKEN:
            t, h, w = images[i]
            out.append(IMAGE_TOKEN * (t * h * w // m2))
            i += 1
        elif piece == VIDEO_TOKEN:
            t, h, w = videos[j]
            stamps = (timestamps[j] if timestamps is not None
                      else video_timestamps(t * temporal_patch_size, DEFAULT_VIDEO_FPS, temporal_patch_size))
            if len(stamps) != t:
                raise ImageProcessingError(f"video {j}: {len(stamps)} timestamps for {t} temporal patches")
            out.extend(f"<{s:.1f} seconds>{VISION_START}{VIDEO_TOKEN * (h * w // m2)}{VISION_END}" for s in stamps)
            j += 1
        else:
            out.append(piece)
    return "".join(out)


@dataclasses.dataclass(frozen=True, eq=False)
class ChatInputs:
    """Model inputs of one chat prompt: ``input_ids`` (a list, for ``generate``), and the packed
    images / videos (None when absent). ``model_kwargs()`` gives the vision keywords of
    ``forward`` / ``generate``."""

    input_ids: list[int]
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None

    def model_kwargs(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in (("pixel_values", self.pixel_values), ("image_grid_thw", self.image_grid_thw),
                                  ("pixel_values_videos", self.pixel_values_videos),
                                  ("video_grid_thw", self.video_grid_thw)) if v is not None}


def _part_kind(part: Mapping) -> str | None:
    """Which placeholder the default template (and Qwen's) renders for a content part."""
    kind = part.get("type")
    if kind in ("image", "image_url") or "image" in part or "image_url" in part:
        return "image"
    if kind in ("video", "video_url") or "video" in part or "video_url" in part:
        return "video"
    return None


def _part_source(part: Mapping, kind: str, where: str) -> Any:
    for key in (kind, f"{kind}_url", "path", "url"):
        if part.get(key) is not None:
            value = part[key]
            if isinstance(value, Mapping) and "url" in value:  # OpenAI style {"image_url": {"url": ...}}
                value = value["url"]
            return value
    raise ImageProcessingError(f"{where}: an {kind} part needs the {kind} under '{kind}' or 'path'")


def chat_inputs(tokenizer, messages: Sequence[Mapping], cfg: ModelConfig, *,
                processor: ProcessorConfig = ProcessorConfig(), **template_kwargs: Any) -> ChatInputs:
    """Messages whose content parts hold images / videos -> :class:`ChatInputs`.

    Image parts are ``{"type": "image", "image": PIL image | path | array}`` (also ``"path"``,
    ``"url"`` for ``file://`` / base64, or ``"image_url": {"url": ...}``); video parts
    ``{"type": "video", "video": frames, "fps": 2.0}`` (``fps`` only sets the timestamps in the
    prompt; without it transformers assumes 24). The prompt is rendered by ``tokenizer``'s chat template
    (``template_kwargs`` such as ``enable_thinking=False`` go to it), every placeholder is expanded
    (:func:`expand_vision_tokens`) and the text is tokenized; media are preprocessed in prompt order.
    Checks that the tokenizer's ``<|image_pad|>`` / ``<|video_pad|>`` ids are the model's."""
    if cfg.vision is None:
        raise ImageProcessingError(f"{cfg.architecture} has no vision tower: it cannot take images or videos")
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ImageProcessingError(f"messages must be a list of dicts, got {type(messages).__name__}")
    images, videos, stamps = [], [], []
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if not isinstance(content, (list, tuple)):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                continue  # the tokenizer reports malformed parts
            kind = _part_kind(part)
            where = f"messages[{i}]['content'][{j}]"
            if kind == "image":
                images.append((_part_source(part, "image", where), where))
            elif kind == "video":
                videos.append((_part_source(part, "video", where), where, part.get("fps")))
    # the ids first: a tokenizer of another model should fail before any image is decoded
    checks = [(VISION_START, cfg.vision_start_token_id), (VISION_END, cfg.vision_end_token_id)]
    checks = (checks if images or videos else []) + ([(IMAGE_TOKEN, cfg.image_token_id)] if images else [])
    checks += [(VIDEO_TOKEN, cfg.video_token_id)] if videos else []
    for token, want in checks:
        got = tokenizer.token_to_id(token)
        if got != want:
            raise ImageProcessingError(
                f"the tokenizer's {token} is id {got}, but the model expects {want}: "
                "tokenizer and checkpoint do not match")
    kwargs: dict[str, Any] = {}
    if images:
        rows, grids = [], []
        for source, where in images:
            try:
                out = preprocess_images([source], cfg.vision, processor)
            except ImageProcessingError as e:
                raise ImageProcessingError(f"{where}: {e}") from e
            rows.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
        kwargs.update(pixel_values=np.concatenate(rows), image_grid_thw=np.concatenate(grids))
    if videos:
        rows, grids = [], []
        for source, where, fps in videos:
            try:
                out = preprocess_video(source, cfg.vision, processor)
                n_frames = len(source) if isinstance(source, (list, tuple)) else np.asarray(source).shape[0]
                stamps.append(video_timestamps(n_frames, DEFAULT_VIDEO_FPS if fps is None else fps,
                                               cfg.vision.temporal_patch_size))
            except ImageProcessingError as e:
                raise ImageProcessingError(f"{where}: {e}") from e
            rows.append(out["pixel_values_videos"])
            grids.append(out["video_grid_thw"])
        kwargs.update(pixel_values_videos=np.concatenate(rows), video_grid_thw=np.concatenate(grids))
    text = tokenizer.apply_chat_template(messages, **template_kwargs)
    text = expand_vision_tokens(text, image_grid_thw=kwargs.get("image_grid_thw"),
                                video_grid_thw=kwargs.get("video_grid_thw"),
                                merge_size=cfg.vision.spatial_merge_size,
                                temporal_patch_size=cfg.vision.temporal_patch_size, timestamps=stamps or None)
    return ChatInputs(input_ids=tokenizer.encode(text), **kwargs)
