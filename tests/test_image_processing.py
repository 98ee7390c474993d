"""Image / video preprocessing and the chat helper against transformers 5.x.

Tolerances. Both sides resize the same uint8 pixels with the same PIL call, rescale in float64 then
cast to float32, and normalize in float32 with the same operations in the same order, so the image
pixel values are compared for exact equality (any difference would be a real bug, not rounding).
Videos: transformers' ``Qwen3VLVideoProcessor`` needs torchvision, which cannot be installed next to
the CPU torch here; the tests run the real class with a stand-in for the two torchvision functions it
calls (``resize``, ``normalize``). With a resize that changes nothing, or with PIL's resize as the
stand-in, the rows must match exactly; with torch's own antialiased uint8 bicubic (what torchvision
runs on CPU) they may differ by one grey level, i.e. 1/127.5 after normalization.
"""

from __future__ import annotations

import enum
import json
import types

import numpy as np
import pytest

from qwen35_jax.config import ModelConfig, VisionConfig, tiny_text_config, tiny_vision_config
from qwen35_jax.image_processing import (
    ImageProcessingError,
    ProcessorConfig,
    chat_inputs,
    expand_vision_tokens,
    preprocess_images,
    preprocess_video,
    preprocess_videos,
    smart_resize,
    smart_resize_video,
    video_timestamps,
)
from qwen35_jax.vision import patch_rows_cols

import torch  # noqa: E402  (test extra: the parity references)
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

QWEN35_IMAGE = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                    size={"shortest_edge": 65536, "longest_edge": 16777216})
QWEN35_VIDEO = dict(QWEN35_IMAGE, size={"shortest_edge": 4096, "longest_edge": 25165824})


@pytest.fixture(scope="module")
def hf_image():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**QWEN35_IMAGE)


def _noise(h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _smooth(t, h, w, seed=0):
    """Frames of soft colour waves plus a little noise (natural-image-like, no clipping extremes)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[None, :, None, None]
    x = np.linspace(0, 1, w)[None, None, :, None]
    k = np.arange(t)[:, None, None, None]
    img = 127.5 + 90 * np.sin(6 * x + 3 * y + 0.4 * k + np.arange(3)) + rng.normal(0, 6, (t, h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _assert_same(ours, ref, key="pixel_values", grid="image_grid_thw"):
    np.testing.assert_array_equal(ours[grid], np.asarray(ref[grid]))
    assert ours[key].dtype == np.float32 and ours[key].shape == np.asarray(ref[key]).shape
    np.testing.assert_array_equal(ours[key], np.asarray(ref[key]))


def _image(mode, h, w, seed=0):
    rgba = Image.fromarray(_noise(h, w, 4, seed), "RGBA")
    if mode == "P+transparency":
        img = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        img.info["transparency"] = 3
        return img
    return rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode) if mode != "LA" else rgba.convert("LA")


# --------------------------------------------------------------------------------------------------
# Images: parity with Qwen2VLImageProcessorPil
# --------------------------------------------------------------------------------------------------

# (height, width): upscaled to the 65536-pixel floor, kept, elongated both ways, odd sizes
SIZES = [(70, 90), (300, 500), (33, 1000), (1000, 37), (257, 259)]
MODES = ["RGB", "L", "RGBA", "P", "P+transparency", "LA", "CMYK"]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pil_images_match_transformers(hf_image, size):
    images = [_image(mode, *size, seed=i) for i, mode in enumerate(MODES)]
    ours = preprocess_images(images)
    _assert_same(ours, hf_image(images=images, return_tensors="np"))
    assert ours["pixel_values"].shape[1] == VisionConfig().patch_dim == 1536


def test_downscale_and_half_rounding_match_transformers():
    """The max-pixels branch (scale down, floor) and sides at exact halves of the factor (48 -> 64 by
    round-half-even, 80 -> 64), with a budget small enough to keep the test fast."""
    from transformers import Qwen2VLImageProcessorPil

    cfg = ProcessorConfig(min_pixels=1024, max_pixels=40000)
    hf = Qwen2VLImageProcessorPil(**dict(QWEN35_IMAGE, size={"shortest_edge": 1024, "longest_edge": 40000}))
    images = [Image.fromarray(_noise(h, w, seed=h)) for h, w in [(600, 400), (48, 80), (112, 144), (31, 40)]]
    ours = preprocess_images(images, config=cfg)
    _assert_same(ours, hf(images=images, return_tensors="np"))
    assert ours["image_grid_thw"].tolist()[1] == [1, 4, 4]


def test_arrays_match_transformers(hf_image):
    rng = np.random.default_rng(3)
    cases = {
        "uint8 RGB": (_noise(50, 60), {}),
        "uint8 gray (H, W, 1)": (_noise(50, 60, 1), {}),
        "uint8 RGBA (blended on white, rounded)": (_noise(50, 60, 4), {}),
        "int64 RGB": (_noise(50, 60).astype(np.int64), {}),
        # transformers would rescale floats twice with do_rescale=True: compare with it off
        "float32 RGB in [0, 1]": (rng.random((50, 60, 3)).astype(np.float32), {"do_rescale": False}),
        "float64 RGBA in [0, 1]": (rng.random((50, 60, 4)), {"do_rescale": False}),
    }
    for name, (arr, kw) in cases.items():
        ref = hf_image(images=[arr], return_tensors="np", input_data_format="channels_last", **kw)
        _assert_same(preprocess_images(arr), ref)
    # 2-D grayscale, which transformers does not take, equals its (H, W, 1) form
    gray = _noise(50, 60, 1)
    np.testing.assert_array_equal(preprocess_images(gray[..., 0])["pixel_values"],
                                  preprocess_images(gray)["pixel_values"])


def test_files_match_transformers(hf_image, tmp_path):
    """Paths are read like transformers' load_image: EXIF rotation applied, alpha DROPPED (a PIL image
    object is blended on white instead); a palette's transparent colour still becomes white."""
    rgba = Image.fromarray(_noise(40, 56, 4), "RGBA")
    rgba.save(tmp_path / "a.png")
    pal = Image.fromarray(_noise(40, 56)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.png", transparency=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    Image.fromarray(_noise(40, 56)).save(tmp_path / "e.jpg", exif=exif)
    paths = [str(tmp_path / n) for n in ("a.png", "p.png", "e.jpg")]
    ours = preprocess_images(paths)
    _assert_same(ours, hf_image(images=paths, return_tensors="np"))
    assert ours["image_grid_thw"].tolist()[2] == [1, 20, 14]  # rotated
    assert not np.array_equal(preprocess_images(paths[0])["pixel_values"], preprocess_images(rgba)["pixel_values"])
    assert np.array_equal(preprocess_images(f"file://{paths[1]}")["pixel_values"],
                          preprocess_images(paths[1])["pixel_values"])


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_image_resize
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_video_resize

    rng = np.random.default_rng(0)
    sides = [1, 2, 15, 16, 31, 47, 48, 49, 80, 81, 112, 144, 255, 1000, 4097, 9000]
    budgets = [(65536, 16777216), (1024, 40000), (3136, 12845056), (4096, 25165824)]
    for h in sides:
        for w in sides:
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in budgets:
                assert smart_resize(h, w, factor=32, min_pixels=lo, max_pixels=hi) == hf_image_resize(h, w, 32, lo, hi)
                t = int(rng.integers(2, 12))
                assert (smart_resize_video(t, h, w, factor=32, temporal_factor=2, min_pixels=lo, max_pixels=hi)
                        == hf_video_resize(t, h, w, temporal_factor=2, factor=32, min_pixels=lo, max_pixels=hi))


def test_patch_order_is_the_vision_towers():
    """Each row holds one 16x16 patch in (C, T, row, col) order, rows in the block-major order that
    qwen35_jax.vision.patch_rows_cols assumes: encode each pixel's patch row/col in its colours."""
    h, w = 64, 96  # a 4x6 patch grid, no resize (within the budget of this config)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    img = np.stack([yy // 16 * 10, xx // 16 * 10, np.full_like(yy, 200)], -1).astype(np.uint8)
    out = preprocess_images(img, config=ProcessorConfig(min_pixels=1024))
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    vals = out["pixel_values"].reshape(-1, 3, 2, 16, 16)
    np.testing.assert_array_equal(vals[:, :, 0], vals[:, :, 1])  # the temporal repeat
    to_uint8 = np.rint((vals[:, :, 0] * 0.5 + 0.5) * 255)
    rows, cols = patch_rows_cols([[1, 4, 6]], 2)
    np.testing.assert_array_equal(to_uint8[:, 0, 0, 0], rows * 10)
    np.testing.assert_array_equal(to_uint8[:, 1, 0, 0], cols * 10)
    assert (to_uint8[:, 2] == 200).all()


# --------------------------------------------------------------------------------------------------
# Videos: parity with Qwen3VLVideoProcessor (torchvision replaced by a stand-in, see the docstring)
# --------------------------------------------------------------------------------------------------


class _Mode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


def _torch_resize(x, size, interpolation, antialias=True):
    # torchvision's resize on CPU uint8 bicubic calls this kernel directly (no float round trip)
    lead = x.shape[:-3]
    y = torch.nn.functional.interpolate(x.reshape(-1, *x.shape[-3:]), size=list(size), mode=interpolation.value,
                                        align_corners=False, antialias=antialias)
    return y.reshape(*lead, *y.shape[-3:])


def _pil_resize(x, size, interpolation, antialias=True):
    assert interpolation is _Mode.BICUBIC and x.dtype == torch.uint8
    frames = x.reshape(-1, *x.shape[-3:]).permute(0, 2, 3, 1).numpy()
    out = [np.asarray(Image.fromarray(f).resize((size[1], size[0]), Image.Resampling.BICUBIC)) for f in frames]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).reshape(*x.shape[:-2], *size)


def _normalize(x, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def hf_video():
    """(video processor, set_resize): the real Qwen3VLVideoProcessor with torchvision stood in for."""
    import transformers.image_processing_backends as backends
    import transformers.video_processing_utils as video_utils
    from transformers.image_utils import PILImageResampling
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    shim = types.SimpleNamespace(resize=_torch_resize, normalize=_normalize, InterpolationMode=_Mode,
                                 grayscale_to_rgb=lambda v: v)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backends, "tvF", shim, raising=False)
        mp.setattr(video_utils, "tvF", shim, raising=False)
        mp.setattr(backends, "pil_torch_interpolation_mapping", {PILImageResampling.BICUBIC: _Mode.BICUBIC})
        proc = Qwen3VLVideoProcessor(**QWEN35_VIDEO, do_sample_frames=False, cap_pixels_per_frame=False)

        def run(frames, resize):
            shim.resize = resize
            return proc(videos=[frames], return_tensors="np", input_data_format="channels_last")

        yield run


@pytest.mark.parametrize("shape", [(3, 64, 96), (2, 32, 64), (5, 96, 32)])
def test_video_without_resize_matches_transformers(hf_video, shape):
    """Sizes that need no resize: odd frame counts are padded with the last frame, fused normalize."""
    frames = _noise(shape[0] * shape[1], shape[2]).reshape(shape[0], shape[1], shape[2], 3)
    ours = preprocess_video(frames)
    _assert_same(ours, hf_video(frames, _torch_resize), "pixel_values_videos", "video_grid_thw")
    assert ours["video_grid_thw"][0, 0] == -(-shape[0] // 2)


def test_video_with_resize(hf_video):
    frames = _smooth(5, 50, 70)  # -> 64x64, 3 temporal patches
    ours = preprocess_video(list(frames))  # a list of frames and the array give the same
    np.testing.assert_array_equal(ours["pixel_values_videos"], preprocess_video(frames)["pixel_values_videos"])
    _assert_same(ours, hf_video(frames, _pil_resize), "pixel_values_videos", "video_grid_thw")
    ref = hf_video(frames, _torch_resize)["pixel_values_videos"]
    diff = np.abs(ours["pixel_values_videos"] - ref)
    assert diff.max() <= 1 / 127.5 + 1e-6 and (diff > 0).mean() < 0.05  # one grey level, in few pixels


def test_several_videos_pack_in_order():
    a, b = _noise(3 * 64, 64).reshape(3, 64, 64, 3), _noise(2 * 32, 96, seed=1).reshape(2, 32, 96, 3)
    out = preprocess_videos([a, b])
    assert out["video_grid_thw"].tolist() == [[2, 4, 4], [1, 2, 6]]
    np.testing.assert_array_equal(out["pixel_values_videos"][:32], preprocess_video(a)["pixel_values_videos"])


# --------------------------------------------------------------------------------------------------
# Placeholder expansion: Qwen3VLProcessor with a tiny tokenizer and our chat template
# --------------------------------------------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|vision_start|>",
            "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from qwen35_jax.tokenizer import default_chat_template

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["Describe these pictures. What happens in the video? 0.1 seconds user assistant"] * 3,
                            trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    root = tmp_path_factory.mktemp("tiny_vl_tok")
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": default_chat_template()}))
    return root


def _tiny_vl_config(tok, patch=16):
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    return ModelConfig(text=tiny_text_config(vocab_size=tok.vocab_size), vision=tiny_vision_config(patch_size=patch),
                       image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                       vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def test_chat_inputs_match_qwen3vl_processor(tiny_tokenizer_dir, hf_video, monkeypatch):
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.processing_utils import ProcessorMixin

    from qwen35_jax.tokenizer import Tokenizer

    # the class check looks the video processor up in a registry that needs torchvision; skip it
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    small = {"shortest_edge": 1024, "longest_edge": 40000}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**dict(QWEN35_IMAGE, size=small)),
        tokenizer=AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)),
        video_processor=Qwen3VLVideoProcessor(**QWEN35_VIDEO, do_sample_frames=False, cap_pixels_per_frame=False))
    ours_tok = Tokenizer.from_checkpoint(tiny_tokenizer_dir)
    cfg = _tiny_vl_config(ours_tok)
    images = [Image.fromarray(_noise(70, 90)), Image.fromarray(_noise(40, 200, seed=1)).convert("L")]
    video = _noise(3 * 64, 96, seed=2).reshape(3, 64, 96, 3)
    messages = [{"role": "user", "content": [
        {"type": "image", "image": images[0]}, {"type": "text", "text": "Describe these pictures."},
        {"type": "image", "image": images[1]}, {"type": "video", "video": video},
        {"type": "text", "text": "What happens in the video?"}]}]
    ours = chat_inputs(ours_tok, messages, cfg, processor=ProcessorConfig(min_pixels=1024, max_pixels=40000),
                       enable_thinking=False)
    text = ours_tok.apply_chat_template(messages, enable_thinking=False)
    ref = processor(text=[text], images=images, videos=[video], return_tensors="np")
    assert ours.input_ids == ref["input_ids"][0].tolist()
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        np.testing.assert_array_equal(getattr(ours, key), ref[key])
    # the counts the model checks: t*h*w / merge^2 pads per image and per video
    ids = np.asarray(ours.input_ids)
    assert (ids == cfg.image_token_id).sum() == sum(t * h * w // 4 for t, h, w in ours.image_grid_thw)
    assert (ids == cfg.video_token_id).sum() == sum(t * h * w // 4 for t, h, w in ours.video_grid_thw)
    assert "<0.0 seconds><|vision_start|>" in ours_tok.decode(ours.input_ids)
    assert set(ours.model_kwargs()) == {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"}


def test_expand_and_timestamps():
    text = "a<|vision_start|><|image_pad|><|vision_end|>b<|vision_start|><|video_pad|><|vision_end|>"
    out = expand_vision_tokens(text, image_grid_thw=[[1, 4, 6]], video_grid_thw=[[2, 2, 4]],
                               timestamps=[video_timestamps(3, fps=2.0)])
    # the template's wrapper around the video goes with it: one block per temporal patch, none nested
    assert out == ("a<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>b"
                   "<0.2 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|>"
                   "<1.0 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|>")
    # a bare placeholder (no wrapper) is expanded the same way
    assert expand_vision_tokens("x<|video_pad|>y", video_grid_thw=[[1, 2, 2]], timestamps=[[0.5]]) == (
        "x<0.5 seconds><|vision_start|><|video_pad|><|vision_end|>y")
    assert video_timestamps(4, fps=24.0) == pytest.approx([0.5 / 24, 2.5 / 24], rel=1e-15)


# --------------------------------------------------------------------------------------------------
# Processor files
# --------------------------------------------------------------------------------------------------


def test_from_checkpoint_reads_transformers_files(tmp_path):
    from transformers import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    assert ProcessorConfig.from_checkpoint(tmp_path) == ProcessorConfig()  # no files: the defaults
    small = {"shortest_edge": 1024, "longest_edge": 40000}
    Qwen2VLImageProcessorPil(**dict(QWEN35_IMAGE, size=small)).save_pretrained(tmp_path)
    Qwen3VLVideoProcessor(**QWEN35_VIDEO).save_pretrained(tmp_path)
    cfg = ProcessorConfig.from_checkpoint(tmp_path, vision=VisionConfig())
    assert cfg == ProcessorConfig(min_pixels=1024, max_pixels=40000)


def test_from_checkpoint_combined_file(tmp_path):
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "processor_class": "Qwen3VLProcessor",
        "image_processor": {"size": {"shortest_edge": 2048, "longest_edge": 8192}, "image_mean": [0.4, 0.5, 0.6]},
        "video_processor": {"max_pixels": 9999, "fps": 2}}))
    cfg = ProcessorConfig.from_checkpoint(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.image_mean, cfg.video_max_pixels) == (2048, 8192, (0.4, 0.5, 0.6), 9999)


@pytest.mark.parametrize("content, match", [
    ({"size": {"shortest_edge": 10, "longest_edge": 20}, "crop_size": 3}, r"unknown key\(s\) \['crop_size'\]"),
    ({"do_resize": False}, "do_resize=False is not supported"),
    ({"resample": 2}, "resample=2 is not supported"),
    ({"patch_size": 14}, "patch_size=14 disagrees with the model's vision config patch_size=16"),
    ({"size": {"height": 224, "width": 224}}, "size must be"),
    ({"size": {"shortest_edge": 5000, "longest_edge": 20}}, "larger than max_pixels"),
    ({"image_mean": "0.5"}, "image_mean must be a list"),
])
def test_from_checkpoint_is_strict(tmp_path, content, match):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(content))
    with pytest.raises(ImageProcessingError, match=match):
        ProcessorConfig.from_checkpoint(tmp_path, vision=VisionConfig())


def test_video_file_strictness(tmp_path):
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"cap_pixels_per_frame": True}))
    with pytest.raises(ImageProcessingError, match=r"video_preprocessor_config.json: cap_pixels_per_frame=True"):
        ProcessorConfig.from_checkpoint(tmp_path)
    (tmp_path / "video_preprocessor_config.json").write_text("{not json")
    with pytest.raises(ImageProcessingError, match="could not read"):
        ProcessorConfig.from_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_unreadable_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageProcessingError, match=r"could not read image file '.*garbage\.png'"):
        preprocess_images(str(garbage))
    good = tmp_path / "good.png"
    Image.fromarray(_noise(64, 64)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageProcessingError, match=r"could not read image file '.*truncated\.png'"):
        preprocess_images([str(good), str(truncated)])
    with pytest.raises(ImageProcessingError, match=r"image file '.*missing\.jpg' does not exist"):
        preprocess_images(tmp_path / "missing.jpg")
    with pytest.raises(ImageProcessingError, match="remote images are not downloaded"):
        preprocess_images("https://example.com/cat.png")
    with pytest.raises(ImageProcessingError, match="base64"):
        preprocess_images("data:image/png;base64,!!!notbase64")


@pytest.mark.parametrize("image, match", [
    (np.zeros((4, 900, 3), np.uint8), "aspect ratio of 225.0"),
    (Image.new("RGB", (900, 4)), "aspect ratio of 225.0"),
    (np.zeros((0, 5, 3), np.uint8), "is empty"),
    (np.zeros((8, 8, 2), np.uint8), r"shape \(H, W\) or \(H, W, C\) with C in 1, 3, 4"),
    (np.zeros((2, 8, 8, 3), np.uint8), r"got shape \(2, 8, 8, 3\)"),
    (np.zeros((8, 8, 3), bool), "dtype bool"),
    (np.zeros((8, 8, 3), np.complex64), "dtype complex64"),
    (np.full((8, 8, 3), 300, np.int32), r"integer images must hold values in \[0, 255\]"),
    (np.full((8, 8, 3), 2.0, np.float32), r"float images must hold values in \[0, 1\], got \[2, 2\]"),
    (np.where(np.eye(8)[..., None] > 0, np.nan, 0.5).repeat(3, -1), "24 NaN/inf value"),
    ([1, 2, 3], "expected a PIL image, a file path or a numpy array, got int"),
    ([], "an empty list"),
])
def test_bad_images(image, match):
    with pytest.raises(ImageProcessingError, match=match):
        preprocess_images(image)


def test_tiny_images_are_scaled_up_like_transformers(hf_image):
    """No size is too small for the image rule: the pixel floor scales a 1x1 image up to 256x256 (only
    an aspect ratio above 200 is refused), as transformers does."""
    for h, w in [(1, 1), (3, 5), (10, 10), (2, 300)]:
        img = _noise(h, w, seed=h)
        ref = hf_image(images=[img], return_tensors="np", input_data_format="channels_last")
        _assert_same(preprocess_images(img), ref)
    assert preprocess_images(_noise(1, 1))["image_grid_thw"].tolist() == [[1, 16, 16]]
    with pytest.raises(ImageProcessingError, match=r"1x201 pixels has an aspect ratio of 201.0"):
        preprocess_images(_noise(1, 201))


def test_bad_videos():
    with pytest.raises(ImageProcessingError, match="1 frame.*at least temporal_patch_size=2"):
        preprocess_video(_noise(64, 64)[None])
    with pytest.raises(ImageProcessingError, match="same size"):
        preprocess_video([_noise(64, 64), _noise(32, 64)])
    with pytest.raises(ImageProcessingError, match="video files are not decoded"):
        preprocess_video("clip.mp4")
    with pytest.raises(ImageProcessingError, match="frame 1: .*NaN"):
        preprocess_video(np.stack([np.zeros((32, 32, 3)), np.full((32, 32, 3), np.nan)]))
    with pytest.raises(ImageProcessingError, match=r"video 1: the video has 1 frame"):
        preprocess_videos([_noise(64, 64)[None].repeat(2, 0), [_noise(64, 64)]])


def test_bad_chat_inputs(tiny_tokenizer_dir):
    from qwen35_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_checkpoint(tiny_tokenizer_dir)
    cfg = _tiny_vl_config(tok)
    msg = [{"role": "user", "content": [{"type": "image", "image": _noise(40, 40)}, {"type": "text", "text": "hi"}]}]
    text_only = ModelConfig(text=tiny_text_config(vocab_size=tok.vocab_size), vision=None,
                            architecture="Qwen3_5ForCausalLM")
    with pytest.raises(ImageProcessingError, match="has no vision tower"):
        chat_inputs(tok, msg, text_only)
    with pytest.raises(ImageProcessingError, match=r"tokenizer's <\|image_pad\|> is id \d+, but the model expects 7"):
        chat_inputs(tok, msg, ModelConfig(text=cfg.text, vision=cfg.vision, image_token_id=7,
                                          vision_start_token_id=cfg.vision_start_token_id,
                                          vision_end_token_id=cfg.vision_end_token_id))
    bad = [{"role": "user", "content": [{"type": "image", "image": np.zeros((4, 900, 3), np.uint8)}]}]
    with pytest.raises(ImageProcessingError, match=r"messages\[0\]\['content'\]\[0\]: the image .*aspect ratio"):
        chat_inputs(tok, bad, cfg)
    with pytest.raises(ImageProcessingError, match="an image part needs the image"):
        chat_inputs(tok, [{"role": "user", "content": [{"type": "image"}]}], cfg)
    with pytest.raises(ImageProcessingError, match="2 <\\|image_pad\\|> placeholder\\(s\\) but 1 image"):
        expand_vision_tokens("<|image_pad|><|image_pad|>", image_grid_thw=[[1, 2, 2]])
