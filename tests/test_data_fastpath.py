"""Fast data path (uint8 geometry, reduced-scale JPEG decoding, sampled video decoding) vs the float reference.

Tolerances (``facelayers.data.transforms``): without reduced-scale decoding a pixel may differ by
``FAST_PATH_ATOL`` in [0, 1] units before the affine ops that follow the geometry (the uint8
rounding of the resize), i.e. by ``FAST_PATH_ATOL * max(brightness) / min(std)`` after them; with
reduced-scale JPEG decoding the MEAN difference is at most ``DRAFT_MEAN_ATOL``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as Fnn
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from facelayers.data import load_frame, read_video_frames
from facelayers.data.datasets import decode_video_frames, video_frame_count
from facelayers.data.transforms import (
    CLIP_STD, DRAFT_MEAN_ATOL, FAST_PATH_ATOL, ClipCenterCrop, ClipColorJitter, ClipCompose,
    ClipNormalize, ClipRandomErasing, ClipRandomHorizontalFlip, ClipRandomResizedCrop, ClipResize,
    FrameSizeMismatchError, eval_transform, load_frame_uint8, train_transform,
)

# ---------------------------------------------------------------------------------------------
# frames on disk


def _face_like(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour field + mid-frequency texture + a little noise (compresses like a face crop)."""
    g = torch.Generator().manual_seed(seed)
    low = Fnn.interpolate(torch.rand(1, 3, 5, 5, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    mid = Fnn.interpolate(torch.rand(1, 3, max(h // 12, 2), max(w // 12, 2), generator=g), size=(h, w), mode="bicubic",
                          align_corners=False)
    img = 0.65 * low + 0.3 * mid + 0.03 * torch.rand(1, 3, h, w, generator=g)
    return (img[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _write(path: Path, arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> Path:
    img = Image.fromarray(arr)
    if mode is not None:
        img = img.convert(mode)
    img.save(path, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return path


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fast_frames")
    for i in range(3):
        _write(root / f"j{i}.jpg", _face_like(40, 52, i))
        _write(root / f"p{i}.png", _face_like(40, 52, 10 + i), "PNG")
    _write(root / "grey.jpg", _face_like(40, 52, 20), mode="L")
    _write(root / "rgba.png", np.concatenate([_face_like(40, 52, 21), np.full((40, 52, 1), 128, np.uint8)], 2), "PNG")
    _write(root / "pal.png", _face_like(40, 52, 22), "PNG", mode="P")
    _write(root / "small.jpg", _face_like(30, 52, 23))
    return root


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(t, paths, seed):
    g = _gen(seed)
    out = t(torch.stack([load_frame(p) for p in paths]), g)
    return out, g.get_state()


def _fast(t, paths, seed, draft=False):
    g = _gen(seed)
    out = t.apply_to_frames(paths, g, draft=draft)
    return out, g.get_state()


# ---------------------------------------------------------------------------------------------
# decoding without a transform is exact


@pytest.mark.parametrize("name", ["j0.jpg", "p0.png", "grey.jpg", "rgba.png", "pal.png"])
def test_decoding_without_transform_equals_load_frame_exactly(frames_dir, name):
    p = frames_dir / name
    ref = load_frame(p)
    u8 = load_frame_uint8(p)
    assert u8.dtype == torch.uint8 and u8.shape == ref.shape
    assert torch.equal(u8.float() / 255.0, ref)
    clip = ClipCompose([]).apply_to_frames([p, p])
    assert clip.is_contiguous() and torch.equal(clip, torch.stack([ref, ref]))


# ---------------------------------------------------------------------------------------------
# parity with the float reference: same draws, same generator consumption, rounding-level diffs

GEOMETRY = {
    "rrc_flip": lambda: ClipCompose([ClipRandomResizedCrop(24, scale=(0.3, 1.0), ratio=(0.6, 1.6)),
                                     ClipRandomHorizontalFlip(0.5)]),
    "flip_then_rrc": lambda: ClipCompose([ClipRandomHorizontalFlip(0.5), ClipRandomResizedCrop((20, 28))]),
    "resize_centercrop": lambda: ClipCompose([ClipResize(30), ClipCenterCrop(28)]),
    "centercrop_pads": lambda: ClipCompose([ClipCenterCrop((44, 50)), ClipResize((22, 25))]),
    "upscale": lambda: ClipCompose([ClipRandomResizedCrop(64)]),
    "nested_compose": lambda: ClipCompose([ClipCompose([ClipResize(26)]), ClipRandomHorizontalFlip(1.0)]),
}


@pytest.mark.parametrize("name", sorted(GEOMETRY))
@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=6)
def test_geometry_parity_with_reference(frames_dir, name, seed):
    t = GEOMETRY[name]()
    paths = [frames_dir / f"j{i}.jpg" for i in (0, 1, 2, 1)]
    ref, ref_state = _reference(t, paths, seed)
    out, state = _fast(t, paths, seed)
    assert torch.equal(state, ref_state), "the fast path consumed the generator differently"
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=FAST_PATH_ATOL + 1e-6, rtol=0)


def _preset_atol(amplification: float) -> float:
    """Bound after the photometric ops: a rounding difference ``d`` becomes at most ``amplification * d``
    (brightness ``f <= 1 + b`` scales it by ``f``; a contrast / saturation blend with factor
    ``f in [1 - x, 1 + x]`` by ``|f| + |1 - f| <= 1 + 2x``; a hue shift by at most 2), then ``/ std``."""
    return FAST_PATH_ATOL * amplification / min(CLIP_STD) + 1e-5


PRESETS = {
    "train": (lambda: train_transform(24), 1.5),
    "train_full_jitter_erase": (lambda: train_transform(24, contrast=0.4, saturation=0.4, hue=0.1, erase_p=1.0),
                                1.5 * 1.8 * 1.8 * 2),
    "train_const_erase": (lambda: ClipCompose([ClipRandomResizedCrop(20), ClipColorJitter(brightness=0.9),
                                               ClipNormalize(), ClipRandomErasing(p=1.0, value=(0.1, 0.2, 0.3))]), 1.9),
    "eval": (lambda: eval_transform(24), 1.0),
    "jitter_before_normalize_twice": (lambda: ClipCompose([ClipResize(20), ClipColorJitter(brightness=0.8),
                                                           ClipColorJitter(brightness=0.8), ClipNormalize()]), 1.8 * 1.8),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=6)
def test_preset_parity_with_reference(frames_dir, name, seed):
    make, amplification = PRESETS[name]
    t = make()
    paths = [frames_dir / "p0.png", frames_dir / "j1.jpg", frames_dir / "p0.png"]
    ref, ref_state = _reference(t, paths, seed)
    out, state = _fast(t, paths, seed)
    assert torch.equal(state, ref_state)
    torch.testing.assert_close(out, ref, atol=_preset_atol(amplification), rtol=0)
    assert (out - ref).abs().mean() <= FAST_PATH_ATOL / min(CLIP_STD), "rounding differences must be rare"


def test_brightness_clamp_is_folded_correctly(frames_dir):
    # a bright factor saturates pixels: the folded affine must clamp exactly where the reference does
    t = ClipCompose([ClipResize(20), ClipColorJitter(brightness=(3.0 - 1.0)), ClipNormalize()])
    paths = [frames_dir / "j0.jpg"]
    for seed in range(6):
        ref, _ = _reference(t, paths, seed)
        out, _ = _fast(t, paths, seed)
        torch.testing.assert_close(out, ref, atol=_preset_atol(3.0), rtol=0)
        top = (1.0 - torch.tensor(ClipNormalize().mean)) / torch.tensor(CLIP_STD)
        assert (out <= top.view(1, 3, 1, 1) + 1e-5).all()


@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=8)
def test_fast_path_keeps_clip_consistency(frames_dir, seed):
    t = train_transform(20, contrast=0.3, erase_p=1.0)
    out = t.apply_to_frames([frames_dir / "j2.jpg"] * 4, _gen(seed))
    for k in range(1, 4):
        assert torch.equal(out[k], out[0])


def test_tensor_frames_and_plain_callables(frames_dir):
    u8 = [load_frame_uint8(frames_dir / f"j{i}.jpg") for i in range(3)]
    t = ClipCompose([ClipRandomResizedCrop(24), lambda c: c * 2.0, ClipNormalize()])
    ref = t(torch.stack([f.float() / 255 for f in u8]), _gen(3))
    out = t.apply_to_frames(u8, _gen(3))
    torch.testing.assert_close(out, ref, atol=2 * FAST_PATH_ATOL / min(CLIP_STD) + 1e-5, rtol=0)
    # a single transform (not a compose) has the fast path too
    one = ClipRandomResizedCrop(16)
    torch.testing.assert_close(one.apply_to_frames(u8, _gen(4)), one(torch.stack([f.float() / 255 for f in u8]), _gen(4)),
                               atol=FAST_PATH_ATOL + 1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# direct JPEG decoding (PIL's decoder without Image.open): bit-exact, or PIL's own path


def _jpeg_variants(root: Path) -> dict[str, tuple[Path, bool]]:
    """name -> (file, decoded directly); the rest must fall back to ``Image.open``."""
    arr = _face_like(37, 53, 30)
    out = {}
    for name, kw in {
        "q90_420": {"quality": 90},
        "q95_444": {"quality": 95, "subsampling": 0},
        "progressive": {"quality": 85, "progressive": True},
        "optimized": {"quality": 75, "optimize": True},
        "restart_markers": {"quality": 90, "restart_marker_blocks": 2},
        "exif_icc": {"quality": 90, "exif": b"Exif\x00\x00" + b"\x00" * 30, "icc_profile": b"\x00" * 600},
    }.items():
        path = root / f"{name}.jpg"
        Image.fromarray(arr).save(path, "JPEG", **kw)
        out[name] = (path, True)
    out["grey"] = (_write(root / "v_grey.jpg", arr, mode="L"), False)
    out["cmyk"] = (_write(root / "v_cmyk.jpg", arr, mode="CMYK"), False)
    png_named_jpg = root / "png_content.jpg"
    Image.fromarray(arr).save(png_named_jpg, "PNG")
    out["png_named_jpg"] = (png_named_jpg, False)
    return out


@pytest.fixture(scope="module")
def jpeg_variants(tmp_path_factory) -> dict[str, tuple[Path, bool]]:
    return _jpeg_variants(tmp_path_factory.mktemp("jpeg_variants"))


@pytest.mark.parametrize("name", ["q90_420", "q95_444", "progressive", "optimized", "restart_markers", "exif_icc",
                                  "grey", "cmyk", "png_named_jpg"])
def test_direct_jpeg_decoding_is_bit_exact(jpeg_variants, name, monkeypatch):
    path, direct = jpeg_variants[name]
    ref = load_frame(path)
    assert torch.equal(load_frame_uint8(path).float() / 255.0, ref)
    if direct:  # decoded without Image.open: it must not be needed
        import PIL.Image

        def no_open(*args, **kwargs):
            raise AssertionError("Image.open called for a frame the direct decoder handles")

        monkeypatch.setattr(PIL.Image, "open", no_open)
    clip = ClipCompose([]).apply_to_frames([path, path])
    assert torch.equal(clip, torch.stack([ref, ref]))
    out, _ = _fast(GEOMETRY["rrc_flip"](), [path], 3)
    monkeypatch.undo()
    ref_t, _ = _reference(GEOMETRY["rrc_flip"](), [path], 3)
    torch.testing.assert_close(out, ref_t, atol=FAST_PATH_ATOL + 1e-6, rtol=0)


def test_jpeg_frame_header_matches_pil(jpeg_variants):
    from facelayers.data.transforms import _jpeg_frame_header

    for name, (path, _) in jpeg_variants.items():
        head = _jpeg_frame_header(path.read_bytes())
        with Image.open(path) as im:
            if im.format != "JPEG":
                assert head is None, name
            else:
                assert head == (im.height, im.width, len(im.getbands())), name


@given(data=st.binary(max_size=64), prefix=st.booleans())
@settings(max_examples=60)
def test_jpeg_frame_header_never_fails_on_garbage(data, prefix):
    from facelayers.data.transforms import _jpeg_frame_header

    head = _jpeg_frame_header((b"\xff\xd8\xff" if prefix else b"") + data)
    assert head is None or (len(head) == 3 and all(isinstance(v, int) and v >= 0 for v in head))


def test_broken_or_huge_jpeg_gets_pil_behaviour(jpeg_variants, tmp_path, monkeypatch):
    path, _ = jpeg_variants["q90_420"]
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(OSError) as ref_err:
        load_frame(cut)
    with pytest.raises(OSError) as err:
        ClipCompose([]).apply_to_frames([cut])
    assert str(err.value) == str(ref_err.value)
    # a frame over PIL's decompression-bomb limit is refused as Image.open refuses it
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 37 * 53 // 4)
    with pytest.raises(PIL.Image.DecompressionBombError):
        load_frame(path)
    with pytest.raises(PIL.Image.DecompressionBombError):
        ClipCompose([]).apply_to_frames([path])


@pytest.mark.parametrize("name", ["rrc_flip", "resize_centercrop"])
def test_long_clips_with_repeats_match_reference(frames_dir, name):
    # more unique frames than one processing group, repeated and out of order
    t = GEOMETRY[name]()
    paths = [frames_dir / f"j{i}.jpg" for i in (2, 0, 1, 0, 2)] + [frames_dir / f"p{i}.png" for i in (0, 1, 2, 1)]
    paths += [frames_dir / "grey.jpg", frames_dir / "j1.jpg"]
    for seed in range(3):
        ref, ref_state = _reference(t, paths, seed)
        out, state = _fast(t, paths, seed)
        assert torch.equal(state, ref_state)
        torch.testing.assert_close(out, ref, atol=FAST_PATH_ATOL + 1e-6, rtol=0)
        assert torch.equal(out[1], out[3]) and torch.equal(out[0], out[4]) and torch.equal(out[6], out[8])


# ---------------------------------------------------------------------------------------------
# reduced-scale JPEG decoding: same region, mean difference bounded


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("big") / "big.jpg", _face_like(416, 560, 5))


@pytest.mark.parametrize("make", [lambda: train_transform(48, erase_p=0.0), lambda: eval_transform(48),
                                  lambda: ClipCompose([ClipRandomHorizontalFlip(1.0), ClipRandomResizedCrop((40, 56)),
                                                       ClipRandomHorizontalFlip(0.5)])])
def test_draft_decoding_maps_the_crop_box(big_jpeg, make, monkeypatch):
    from PIL import JpegImagePlugin

    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = original(self, mode, size)
        scales.append(self.decoderconfig[0])
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    t = make()
    for seed in range(4):
        ref, ref_state = _reference(t, [big_jpeg] * 2, seed)
        out, state = _fast(t, [big_jpeg] * 2, seed, draft=True)
        assert torch.equal(state, ref_state)
        scale = 1.0 / min(CLIP_STD) if any(isinstance(x, ClipNormalize) for x in t._flat()) else 1.0
        diff = (out - ref).abs()
        assert diff.mean() <= DRAFT_MEAN_ATOL * 1.5 * scale, f"mean diff {diff.mean() / scale * 255:.2f}/255"
        # the same region: a box mapped wrongly by even one reduced pixel shifts the image by s
        # source pixels, which shows as large errors all over this textured frame
        assert diff.quantile(0.99) <= 12 / 255 * 1.5 * scale
        nodraft, _ = _fast(t, [big_jpeg] * 2, seed, draft=False)
        assert (nodraft - ref).abs().max() <= (FAST_PATH_ATOL * 1.5 * scale) + 1e-5
    assert scales and min(scales) >= 4, f"expected reduced-scale decoding, got scales {scales}"


def test_draft_mean_tolerance_is_what_it_claims(big_jpeg):
    t = ClipCompose([ClipRandomResizedCrop(48), ClipRandomHorizontalFlip()])
    diffs = []
    for seed in range(6):
        ref, _ = _reference(t, [big_jpeg], seed)
        out, _ = _fast(t, [big_jpeg], seed, draft=True)
        diffs.append(float((out - ref).abs().mean()))
    assert max(diffs) <= DRAFT_MEAN_ATOL, [d * 255 for d in diffs]


# ---------------------------------------------------------------------------------------------
# errors


def test_fast_path_errors(frames_dir):
    t = train_transform(16)
    with pytest.raises(FrameSizeMismatchError, match="different sizes"):
        t.apply_to_frames([frames_dir / "j0.jpg", frames_dir / "small.jpg"])
    with pytest.raises(FileNotFoundError, match="frame image not found"):
        t.apply_to_frames([frames_dir / "nope.jpg"])
    with pytest.raises(ValueError, match="non-empty sequence"):
        t.apply_to_frames([])
    with pytest.raises(ValueError, match="non-empty sequence"):
        t.apply_to_frames(str(frames_dir / "j0.jpg"))
    with pytest.raises(ValueError, match=r"expected uint8 \[3, H, W\], got torch.float32"):
        t.apply_to_frames([torch.rand(3, 8, 8)])


# ---------------------------------------------------------------------------------------------
# video: decode only the sampled frames, equal to full decoding


def _write_video(path: Path, codec: str, n: int, gop: int, bframes: int) -> Path:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"bf": str(bframes), "keyint": str(gop), "min-keyint": str(gop), "scenecut": "0"}
        else:
            stream.codec_context.max_b_frames = bframes
        for i in range(n):
            a = np.zeros((24, 32, 3), np.uint8)
            a[..., 0] = (7 * i) % 256
            a[: i % 24, :, 1] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module", params=[("libx264", "mp4", 2), ("mpeg4", "mp4", 0), ("mpeg4", "avi", 2),
                                        ("libx264", "mkv", 3)], ids=lambda p: f"{p[0]}-{p[1]}-bf{p[2]}")
def video(request, tmp_path_factory) -> tuple[Path, list[torch.Tensor]]:
    codec, ext, bf = request.param
    av = pytest.importorskip("av")
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} encoder not available")
    path = _write_video(tmp_path_factory.mktemp("vid") / f"v.{ext}", codec, 48, 8, bf)
    return path, read_video_frames(path)


def test_video_frame_count_matches_full_decode(video):
    path, full = video
    assert video_frame_count(path) == len(full) == 48


@given(idx=st.lists(st.integers(0, 47), min_size=1, max_size=8))
@settings(max_examples=15)
def test_sampled_video_frames_equal_full_decoding(video, idx):
    path, full = video
    got = decode_video_frames(path, idx)
    assert len(got) == len(idx)
    for i, frame in zip(idx, got):
        assert frame.dtype == torch.uint8 and frame.shape == (3, 24, 32)
        assert torch.equal(frame.float() / 255.0, full[i]), f"frame {i} differs from the full decode"


def test_sampled_video_decodes_fewer_frames(video):
    path, full = video
    stats: dict[str, int] = {}
    decode_video_frames(path, [1, 2], stats=stats)
    assert stats["decoded"] < len(full) // 2, stats  # stops after the last needed frame
    if path.suffix in (".mp4", ".mkv"):
        stats = {}
        decode_video_frames(path, [3, 30, 45], stats=stats)
        assert stats["seeks"] >= 2 and stats["decoded"] < 40, stats  # skipped whole GOPs


def test_video_index_errors(video):
    path, _ = video
    with pytest.raises(IndexError, match=r"\[0, 48\)"):
        decode_video_frames(path, [0, 48])
    with pytest.raises(ValueError, match="at least one"):
        decode_video_frames(path, [])
