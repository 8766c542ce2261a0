"""Clip-consistent transforms: one random draw per clip, applied identically to every frame.

Each transform takes a clip ``[T, C, H, W]`` float tensor (values in ``[0, 1]`` before
normalisation) and an optional ``torch.Generator``; random parameters (crop box, flip, jitter
factors and order, erasing box and fill) are drawn ONCE per call, so all ``T`` frames get the same
geometry and photometry. Passing a seeded generator makes the draw reproducible.

Presets follow the paper (Sec. IV-B: "random cropping, random erasing, horizontal flipping, and
color jittering", 224x224 faces, CLIP encoder); magnitudes the paper leaves open are those of the
released SSM code (crop scale 0.8-1.0 and ratio 0.9-1.1 of its AU branches, brightness 0.5 of its
DFEW branch); random erasing (p=0.3) is the paper's, the release uses none (``erase_p=0``). Like the
release, every preset normalises with the full-precision OpenAI CLIP mean/std (pass
``mean=``/``std=`` to change it).

torchvision ``transforms.v2`` transforms called on a ``[T, C, H, W]`` tensor also draw once per
call, so they can be used in :class:`ClipCompose` as well (they ignore the generator).

Two ways to run a transform (same random draws, same generator consumption):

* ``transform(clip, generator)`` on a float clip: the **reference** path (every op in float at the
  frame's full size), kept as the specification the fast path is tested against.
* ``transform.apply_to_frames(frames, generator)`` on encoded frames (image files or uint8
  ``[3, H, W]`` tensors, e.g. decoded video frames): the **fast** path. Plain RGB JPEG files are
  decoded by PIL's JPEG decoder called directly (same pixels as :func:`load_frame`, without
  ``Image.open``'s header parsing or a copy out of PIL). The leading geometric
  transforms (random resized crop, resize, centre crop, flips) run on uint8 frames, JPEG files much
  larger than the crop are decoded at reduced scale (libjpeg DCT scaling through PIL's
  ``Image.draft``, with the crop box mapped into the reduced grid), and the frames are converted to
  float once, at output size, with the pointwise ops that follow (brightness jitter, normalisation)
  folded into that conversion. Results equal the reference up to uint8 rounding of the resize
  (:data:`FAST_PATH_ATOL`) or, with reduced-scale decoding, up to the different decimation filter
  (:data:`DRAFT_MEAN_ATOL`); see ``docs/data.md``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as Fnn
from torch import Tensor
from torchvision.transforms.v2 import functional as F

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClipCenterCrop",
    "ClipColorJitter",
    "ClipCompose",
    "ClipNormalize",
    "ClipRandomErasing",
    "ClipRandomHorizontalFlip",
    "ClipRandomResizedCrop",
    "ClipResize",
    "ClipTransform",
    "DRAFT_MEAN_ATOL",
    "FAST_PATH_ATOL",
    "FrameSizeMismatchError",
    "FrameSource",
    "JPEG_DRAFT_MARGIN",
    "eval_transform",
    "load_frame_uint8",
    "train_transform",
]

#: OpenAI CLIP image normalisation (open_clip ``OPENAI_DATASET_MEAN``/``STD``).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: Fast path vs reference, no reduced-scale decoding: largest difference of a pixel in ``[0, 1]``
#: units *before* the affine ops that follow the geometry (multiply by ``brightness / std`` for the
#: bound after them). The only source of difference is the uint8 rounding of the resize.
FAST_PATH_ATOL: float = 1.0 / 255.0
#: Fast path with reduced-scale JPEG decoding vs reference: bound on the MEAN absolute difference in
#: ``[0, 1]`` units before the affine ops (the decimation filter differs: libjpeg's scaled IDCT plus
#: a short bilinear step instead of one wide triangle filter), for smooth, face-like content.
DRAFT_MEAN_ATOL: float = 2.0 / 255.0
#: A JPEG is decoded at scale ``1/s`` (``s`` in 2, 4, 8) only if the crop box, so reduced, still has
#: at least ``JPEG_DRAFT_MARGIN`` times the output's pixels along each side (the last step is then
#: a downscale by at least this factor, never an upscale).
JPEG_DRAFT_MARGIN: float = 1.0

class FrameSizeMismatchError(ValueError):
    """The frames of one clip have different sizes."""


#: One encoded frame: a path to an image file, or an RGB uint8 tensor ``[3, H, W]`` (any strides).
FrameSource = Union[str, "os.PathLike[str]", Tensor]


def _check_clip(clip: Tensor, who: str) -> None:
    if not isinstance(clip, Tensor):
        raise TypeError(f"{who}: expected a clip tensor [T, C, H, W], got {type(clip).__name__}")
    if clip.ndim != 4:
        raise ValueError(f"{who}: expected a clip [T, C, H, W] (4 dims), got shape {tuple(clip.shape)}")
    if not clip.is_floating_point():
        raise TypeError(f"{who}: expected a floating clip with values in [0, 1], got dtype {clip.dtype}")


def _size2(size: int | Sequence[int], name: str = "size") -> tuple[int, int]:
    if isinstance(size, int):
        out = (size, size)
    else:
        out = tuple(int(s) for s in size)
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return out  # type: ignore[return-value]


def _range(value: Sequence[float], name: str, low: float = -math.inf) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not low <= a <= b:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max, got {tuple(value)}")
    return a, b


def _uniform(g: torch.Generator | None, a: float, b: float) -> float:
    return a + (b - a) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator | None, low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=g))


# ----------------------------------------------------------------------------------------------
# geometric steps: what a geometric transform does to a clip once its random draw is made. The
# float reference and the uint8 fast path apply the same steps, so both make the same draws.


@dataclass(frozen=True)
class _ResizedCrop:
    """Integer crop ``(top, left, height, width)`` of the current grid, then (optionally) resize."""

    top: int
    left: int
    height: int
    width: int
    size: tuple[int, int] | None  # None: crop only (may pad with zeros outside the frame)
    antialias: bool = True

    def apply(self, clip: Tensor) -> Tensor:
        if self.size is None:
            return F.crop(clip, self.top, self.left, self.height, self.width)
        box = (self.top, self.left, self.height, self.width)
        return F.resized_crop(clip, *box, list(self.size), antialias=self.antialias)

    def out_size(self) -> tuple[int, int]:
        return self.size if self.size is not None else (self.height, self.width)


@dataclass(frozen=True)
class _Resize:
    """Resize to ``(height, width)``; ``spec`` is the size as given to torchvision."""

    spec: tuple[int, ...]
    height: int
    width: int
    antialias: bool = True

    def apply(self, clip: Tensor) -> Tensor:
        return F.resize(clip, list(self.spec), antialias=self.antialias)

    def out_size(self) -> tuple[int, int]:
        return self.height, self.width


@dataclass(frozen=True)
class _Flip:
    """Horizontal flip (the coin was heads)."""

    size: tuple[int, int]

    def apply(self, clip: Tensor) -> Tensor:
        return F.hflip(clip)

    def out_size(self) -> tuple[int, int]:
        return self.size


_Step = Union[_ResizedCrop, _Resize, _Flip, "_CenterCropPad"]


def _resized_size(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """Output ``(h, w)`` of torchvision's resize: int -> shorter side ``size``, long side truncated."""
    if not isinstance(size, int):
        return size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


@dataclass
class _SourceMap:
    """Where the output of a list of steps comes from in the source frame (for reduced-scale decoding).

    ``box`` is the source region (float pixel edges) that the output grid covers, ``extent`` the
    integer region the resample may read (the reference crops to it before resizing), ``scale``
    the source pixels per output pixel of the one resample, ``flip`` whether the output is mirrored.
    """

    box: tuple[float, float, float, float]
    extent: tuple[int, int, int, int]
    out: tuple[int, int]
    scale: tuple[float, float]
    flip: bool


def _source_map(steps: Sequence[_Step], height: int, width: int) -> _SourceMap | None:
    """Fold ``steps`` into one resample of a source box, or ``None`` when that is not exact
    (no resample, two resamples, a crop that pads)."""
    x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
    extent = (0, 0, width, height)
    h, w = height, width
    flip = False
    resampled = False
    for st in steps:
        if isinstance(st, _Flip):
            flip = not flip
            continue
        if not isinstance(st, (_ResizedCrop, _Resize)):
            return None
        if isinstance(st, _ResizedCrop):
            if st.top < 0 or st.left < 0 or st.top + st.height > h or st.left + st.width > w:
                return None
            sx, sy = (x1 - x0) / w, (y1 - y0) / h
            left = w - st.left - st.width if flip else st.left
            x0, y0 = x0 + left * sx, y0 + st.top * sy
            x1, y1 = x0 + st.width * sx, y0 + st.height * sy
            if not resampled:
                extent = (int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)))
            h, w = st.height, st.width
            if st.size is None:
                continue
            target = st.size
        else:
            target = (st.height, st.width)
        if resampled:
            return None
        resampled = True
        h, w = target
    if not resampled:
        return None
    return _SourceMap((x0, y0, x1, y1), extent, (h, w), ((x1 - x0) / w, (y1 - y0) / h), flip)


class ClipTransform:
    """Base class: ``__call__(clip [T, C, H, W], generator=None) -> clip``, one random draw per call.

    :meth:`apply_to_frames` runs the same transform on encoded frames (the fast path); the base
    class runs it as a one-element :class:`ClipCompose`.
    """

    def __call__(self, clip: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def apply_to_frames(
        self, frames: Sequence[FrameSource], generator: torch.Generator | None = None, *, draft: bool = True
    ) -> Tensor:
        """Decode ``frames`` and transform them as one clip: float ``[T, 3, h, w]``.

        Same random draws as ``self(clip, generator)`` on the float clip of the decoded frames;
        see :meth:`ClipCompose.apply_to_frames`.
        """
        return ClipCompose([self]).apply_to_frames(frames, generator, draft=draft)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class _GeometricTransform(ClipTransform):
    """A transform made of :data:`_Step` s (crop / resize / flip): the fast path runs it in uint8."""

    def _steps(self, height: int, width: int, generator: torch.Generator | None = None) -> list[_Step]:
        """Make this call's random draw for a ``height x width`` frame and return the steps."""
        raise NotImplementedError

    def __call__(self, clip: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_clip(clip, type(self).__name__)
        for st in self._steps(clip.shape[-2], clip.shape[-1], generator):
            clip = st.apply(clip)
        return clip


class ClipCompose(ClipTransform):
    """Apply transforms in order, passing the generator to every :class:`ClipTransform`.

    Other callables (e.g. torchvision ``v2`` transforms) are called as ``t(clip)``.
    """

    def __init__(self, transforms: Sequence[Callable[..., Tensor]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, clip: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for t in self.transforms:
            clip = t(clip, generator) if isinstance(t, ClipTransform) else t(clip)
        return clip

    def _flat(self) -> list[Callable[..., Tensor]]:
        out: list[Callable[..., Tensor]] = []
        for t in self.transforms:
            out.extend(t._flat() if isinstance(t, ClipCompose) else [t])
        return out

    def apply_to_frames(
        self, frames: Sequence[FrameSource], generator: torch.Generator | None = None, *, draft: bool = True
    ) -> Tensor:
        """Fast path: decode ``frames`` (files or uint8 ``[3, H, W]`` tensors) and transform them as a clip.

        Equivalent to ``self(torch.stack([load_frame(f) for f in frames]), generator)`` (the float
        reference, same random draws in the same order) up to :data:`FAST_PATH_ATOL` per pixel
        before the affine ops; with ``draft=True`` JPEG frames much larger than the crop are decoded
        at reduced scale (mean difference :data:`DRAFT_MEAN_ATOL`, see the module docstring).

        Stages: (1) the leading geometric transforms (:class:`ClipRandomResizedCrop`,
        :class:`ClipResize`, :class:`ClipCenterCrop`, :class:`ClipRandomHorizontalFlip`) draw
        their parameters from the frame size read in the file headers, and run on uint8 frames;
        (2) one conversion to float at output size, with the leading pointwise transforms
        (:class:`ClipNormalize`, brightness-only :class:`ClipColorJitter`) folded into it;
        (3) everything else as in the reference, on the float clip. A frame repeated in ``frames``
        is decoded once.

        Args:
            frames: ``T`` frame sources: image paths or RGB uint8 tensors ``[3, H, W]`` of one size.
            generator: RNG for the random draws (as for ``__call__``).
            draft: Allow reduced-scale JPEG decoding (``False``: differences only from rounding).

        Returns:
            Float clip ``[T, 3, h, w]`` (contiguous).

        Examples::

            >>> clip = train_transform(224).apply_to_frames(paths, torch.Generator().manual_seed(0))
        """
        return _run_fast(self._flat(), frames, generator, draft)

    def __repr__(self) -> str:
        inner = "".join(f"\n  {t!r}," for t in self.transforms)
        return f"ClipCompose([{inner}\n])"


class ClipResize(_GeometricTransform):
    """Resize every frame: ``size`` int -> shorter side to ``size`` (aspect kept); (h, w) -> exact."""

    def __init__(self, size: int | Sequence[int], antialias: bool = True) -> None:
        if isinstance(size, int):
            if size < 1:
                raise ValueError(f"size must be >= 1, got {size}")
            self.size: int | tuple[int, int] = size
        else:
            self.size = _size2(size)
        self.antialias = antialias

    def _steps(self, height: int, width: int, generator: torch.Generator | None = None) -> list[_Step]:
        spec = (self.size,) if isinstance(self.size, int) else tuple(self.size)
        h, w = _resized_size(height, width, self.size)
        return [_Resize(spec, h, w, self.antialias)]

    def extra_repr(self) -> str:
        return f"size={self.size}"


class ClipCenterCrop(_GeometricTransform):
    """Crop the central ``size`` region of every frame (zero-padded if the frame is smaller)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size2(size)

    def _steps(self, height: int, width: int, generator: torch.Generator | None = None) -> list[_Step]:
        ch, cw = self.size
        if ch > height or cw > width:  # torchvision pads, then crops: keep its exact call
            return [_CenterCropPad(self.size, (height, width))]
        top, left = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))
        return [_ResizedCrop(top, left, ch, cw, None)]

    def extra_repr(self) -> str:
        return f"size={self.size}"


@dataclass(frozen=True)
class _CenterCropPad:
    """``F.center_crop`` of a crop larger than the frame (zero padding); never folded."""

    size: tuple[int, int]
    frame: tuple[int, int]

    def apply(self, clip: Tensor) -> Tensor:
        return F.center_crop(clip, list(self.size))

    def out_size(self) -> tuple[int, int]:
        return self.size


class ClipRandomResizedCrop(_GeometricTransform):
    """Random area/aspect crop resized to ``size``; one box per clip (torchvision's sampling rule).

    Args:
        size: Output size (int or (h, w)).
        scale: Range of the crop area as a fraction of the frame area.
        ratio: Range of the crop aspect ratio (w / h), sampled log-uniformly.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: Sequence[float] = (0.8, 1.0),
        ratio: Sequence[float] = (0.9, 1.1),
        antialias: bool = True,
    ) -> None:
        self.size = _size2(size)
        self.scale = _range(scale, "scale", 0.0)
        self.ratio = _range(ratio, "ratio", 0.0)
        if self.scale[1] <= 0 or self.ratio[0] <= 0:
            raise ValueError(f"scale max and ratio min must be > 0, got scale={scale}, ratio={ratio}")
        self.antialias = antialias

    def get_params(self, height: int, width: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """Draw ``(top, left, h, w)`` of the crop box."""
        area = height * width
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(generator, *self.scale)
            aspect = math.exp(_uniform(generator, *log_r))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return _randint(generator, 0, height - h), _randint(generator, 0, width - w), h, w
        # fallback: central crop with the aspect clamped to the range
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def _steps(self, height: int, width: int, generator: torch.Generator | None = None) -> list[_Step]:
        top, left, h, w = self.get_params(height, width, generator)
        return [_ResizedCrop(top, left, h, w, self.size, self.antialias)]

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}"


class ClipRandomHorizontalFlip(_GeometricTransform):
    """Flip every frame left-right with probability ``p`` (one coin per clip)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def _steps(self, height: int, width: int, generator: torch.Generator | None = None) -> list[_Step]:
        return [_Flip((height, width))] if float(torch.rand((), generator=generator)) < self.p else []

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ClipColorJitter(ClipTransform):
    """Brightness / contrast / saturation / hue jitter with one set of factors and order per clip.

    Factors are drawn from ``[max(0, 1 - x), 1 + x]`` (hue shift from ``[-hue, hue]``, ``hue <= 0.5``),
    as in torchvision; the four adjustments run in a random order. Contrast is measured per frame
    (each frame's own mean grey level), as when the same factor is applied to each image.
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0) -> None:
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    @property
    def pointwise(self) -> bool:
        """True when only brightness is jittered (each pixel then depends on itself only)."""
        return self.contrast == 0 and self.saturation == 0 and self.hue == 0

    def get_params(self, generator: torch.Generator | None = None) -> tuple[list[int], list[float | None]]:
        """Draw ``(order, [brightness, contrast, saturation, hue])`` (``None`` = not applied)."""
        order = torch.randperm(4, generator=generator).tolist()
        factors: list[float | None] = []
        for v in (self.brightness, self.contrast, self.saturation):
            factors.append(_uniform(generator, max(0.0, 1.0 - v), 1.0 + v) if v > 0 else None)
        factors.append(_uniform(generator, -self.hue, self.hue) if self.hue > 0 else None)
        return order, factors

    def __call__(self, clip: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_clip(clip, "ClipColorJitter")
        order, factors = self.get_params(generator)
        ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        for k in order:
            if factors[k] is not None:
                if k in (2, 3) and clip.shape[1] != 3:
                    raise ValueError(f"ClipColorJitter: saturation/hue need 3 channels, got {clip.shape[1]}")
                clip = ops[k](clip, factors[k])
        return clip

    def extra_repr(self) -> str:
        return f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, hue={self.hue}"


class ClipRandomErasing(ClipTransform):
    """Erase the same random rectangle in every frame with probability ``p``.

    Args:
        p: Probability of erasing.
        scale: Range of the erased area as a fraction of the frame area.
        ratio: Range of the rectangle's aspect ratio (h / w), log-uniform.
        value: Fill: a number, a per-channel tuple, or ``"random"`` (one standard-normal patch
            ``[C, h, w]`` drawn per clip, the same in every frame).
    """

    def __init__(
        self,
        p: float = 0.3,
        scale: Sequence[float] = (0.02, 0.1),
        ratio: Sequence[float] = (0.5, 2.0),
        value: float | Sequence[float] | str = "random",
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if isinstance(value, str) and value != "random":
            raise ValueError(f"value must be a number, a tuple or 'random', got {value!r}")
        self.p = p
        self.scale = _range(scale, "scale", 0.0)
        self.ratio = _range(ratio, "ratio", 0.0)
        if self.ratio[0] <= 0:
            raise ValueError(f"ratio min must be > 0, got {ratio}")
        self.value = value

    def get_params(self, height: int, width: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int] | None:
        """Draw ``(top, left, h, w)``, or ``None`` when nothing is erased."""
        if float(torch.rand((), generator=generator)) >= self.p:
            return None
        area = height * width
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(generator, *self.scale)
            aspect = math.exp(_uniform(generator, *log_r))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if 0 < h < height and 0 < w < width:
                return _randint(generator, 0, height - h), _randint(generator, 0, width - w), h, w
        return None

    def _erase(self, clip: Tensor, generator: torch.Generator | None, inplace: bool) -> Tensor:
        box = self.get_params(clip.shape[-2], clip.shape[-1], generator)
        if box is None:
            return clip
        top, left, h, w = box
        c = clip.shape[1]
        if self.value == "random":
            fill = torch.randn((c, h, w), generator=generator).to(clip.dtype)
        else:
            vals = [float(self.value)] * c if isinstance(self.value, (int, float)) else [float(v) for v in self.value]
            if len(vals) != c:
                raise ValueError(f"ClipRandomErasing: value has {len(vals)} channels, clip has {c}")
            fill = torch.tensor(vals, dtype=clip.dtype).view(c, 1, 1).expand(c, h, w)
        out = clip if inplace else clip.clone()
        out[:, :, top : top + h, left : left + w] = fill.to(clip.device)
        return out

    def __call__(self, clip: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_clip(clip, "ClipRandomErasing")
        return self._erase(clip, generator, inplace=False)

    def extra_repr(self) -> str:
        return f"p={self.p}, scale={self.scale}, ratio={self.ratio}, value={self.value!r}"


class ClipNormalize(ClipTransform):
    """``(clip - mean) / std`` per channel (default: OpenAI CLIP statistics)."""

    def __init__(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean and std need the same length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0, got {tuple(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, clip: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_clip(clip, "ClipNormalize")
        if clip.shape[1] != len(self.mean):
            raise ValueError(f"ClipNormalize: clip has {clip.shape[1]} channels, mean/std have {len(self.mean)}")
        mean = torch.tensor(self.mean, dtype=clip.dtype, device=clip.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=clip.dtype, device=clip.device).view(1, -1, 1, 1)
        return (clip - mean) / std

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


# ----------------------------------------------------------------------------------------------
# fast path: encoded frames -> uint8 geometry -> one float conversion -> the rest


def _jpeg_frame_header(data: bytes) -> tuple[int, int, int] | None:
    """``(height, width, components)`` from the start-of-frame segment of an 8-bit JPEG, or ``None``
    (not a JPEG, another precision, or a marker sequence this short reader does not follow)."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD7:  # markers without a length
            i += 2
            continue
        if m in (0xD8, 0xD9, 0xDA):  # a second SOI, EOI or scan data before the frame header
            return None
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            if i + 10 > n or data[i + 4] != 8:
                return None
            return (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8], data[i + 9]
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


@functools.lru_cache(maxsize=None)
def _pil_image() -> Any:
    """``PIL.Image``, imported on first use (per-frame code calls this instead of importing)."""
    from PIL import Image

    return Image


def _lean_jpeg_available() -> bool:
    Image = _pil_image()
    return all(hasattr(Image.core, name) for name in ("map_buffer", "jpeg_decoder")) and hasattr(Image, "_getdecoder")


class _Source:
    """One unique frame source: size read on construction, decoded by ``rgbx`` / ``hwc`` / ``draft_hwc``.

    A plain 8-bit three-component JPEG file is decoded by PIL's own JPEG decoder, called directly
    with the arguments ``Image.open(...).load()`` would give it, straight into the caller's buffer
    (no header parsing by ``Image.open``, no copy out of PIL): the same pixels as :func:`load_frame`,
    bit for bit. Anything else (other formats and modes, a decoder error, a truncated file, a
    frame over ``Image.MAX_IMAGE_PIXELS``) goes through ``Image.open`` as in :func:`load_frame`.
    """

    _lean: bool | None = None  # PIL internals for the direct JPEG decode are present (checked once)

    def __init__(self, frame: FrameSource) -> None:
        self.tensor: Tensor | None = None
        self.image = None
        self.path: str | None = None
        self.data: bytes | None = None  # file bytes, kept for a direct JPEG decode
        self.jpeg = False
        if isinstance(frame, Tensor):
            if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[0] != 3:
                raise ValueError(
                    f"a frame tensor must be RGB uint8 [3, H, W] (expected uint8 [3, H, W], "
                    f"got {frame.dtype} {tuple(frame.shape)})"
                )
            self.tensor = frame
            self.size = (int(frame.shape[1]), int(frame.shape[2]))
            return
        self.path = os.fspath(frame)
        if _Source._lean is None:
            _Source._lean = _lean_jpeg_available()
        if _Source._lean:
            try:
                with open(self.path, "rb", buffering=0) as f:
                    data = f.readall()
            except FileNotFoundError:
                raise FileNotFoundError(f"frame image not found: {self.path}") from None
            head = _jpeg_frame_header(data)
            if head is not None and head[2] == 3 and head[0] > 0 and head[1] > 0 and self._pixels_ok(head):
                self.data, self.size, self.jpeg = data, (head[0], head[1]), True
                return
        self._open()

    @staticmethod
    def _pixels_ok(head: tuple[int, int, int]) -> bool:
        limit = _pil_image().MAX_IMAGE_PIXELS
        return limit is None or head[0] * head[1] <= limit  # larger: Image.open warns / raises

    def _open(self, from_data: bool = False) -> None:
        import io

        from PIL import Image

        assert self.path is not None
        try:
            self.image = Image.open(io.BytesIO(self.data) if from_data and self.data is not None else self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"frame image not found: {self.path}") from None
        self.data = None
        self.size = (self.image.height, self.image.width)
        self.jpeg = self.image.format == "JPEG" and self.image.mode in ("RGB", "L")

    def close(self) -> None:
        if self.image is not None:
            self.image.close()
            self.image = None

    def _decode_into(self, out: Any) -> bool:
        """Direct JPEG decode into ``out`` (C-contiguous uint8 ``[H, W, 4]``, RGBX); False if not done."""
        Image = _pil_image()
        H, W = self.size
        try:
            target = Image.core.map_buffer(out, (W, H), "raw", 0, ("RGBX", 0, 1))
            decoder = Image._getdecoder("RGBX", "jpeg", ("RGB", ""))
        except Exception:  # PIL internals changed: use Image.open
            _Source._lean = False
            return False
        try:
            decoder.setimage(target, (0, 0, W, H))
            consumed, err = decoder.decode(self.data)
        finally:
            decoder.cleanup()
        return consumed < 0 and err == 0  # the whole image decoded without an error

    def rgbx(self, buffer: Any) -> Any:
        """The full-size frame as uint8 ``[H, W, 4]`` (RGB + a padding channel), decoded by PIL as
        :func:`load_frame` does; ``buffer`` (C-contiguous uint8 ``[H, W, 4]``) may receive it."""
        if self.tensor is not None:
            buffer[..., :3] = self.tensor.permute(1, 2, 0).numpy()
            buffer[..., 3] = 0
            return buffer
        if self.data is not None:
            if self._decode_into(buffer):
                return buffer
            self._open()  # not decoded directly: PIL's own path (and its errors)
        import numpy as np

        rgb = self._rgb()
        return np.frombuffer(rgb.tobytes("raw", "RGBX"), dtype=np.uint8).reshape(rgb.height, rgb.width, 4)

    def _rgb(self) -> Any:
        if self.image is None:
            self._open()
        im = self.image
        rgb = im.convert("RGB") if im.mode != "RGB" else im
        rgb.load()
        return rgb

    def hwc(self) -> Any:
        """The full-size frame as a uint8 numpy array ``[H, W, 3]`` (decoded by PIL, as :func:`load_frame`),
        possibly a read-only view."""
        import numpy as np

        if self.tensor is not None:
            return self.tensor.permute(1, 2, 0).numpy()
        if self.data is not None:
            return self.rgbx(np.empty((*self.size, 4), dtype=np.uint8))[..., :3]
        return np.asarray(self._rgb(), dtype=np.uint8)

    def draft_hwc(self, smap: _SourceMap, scale: int) -> Any:
        """Decode at ``1/scale`` and resample ``smap.box`` to ``smap.out``: uint8 ``[h, w, 4]`` (RGBX, not flipped)."""
        import numpy as np
        from PIL import Image

        if self.image is None:
            self._open(from_data=True)
        im = self.image
        H, W = self.size
        got = im.draft("RGB", (max(1, W // scale), max(1, H // scale)))
        sx, sy = (W / got[1][2], H / got[1][3]) if got is not None else (1.0, 1.0)
        rgb = im.convert("RGB") if im.mode != "RGB" else im
        rgb.load()
        ex = smap.extent
        e0, e1 = max(0, math.floor(ex[0] / sx)), max(0, math.floor(ex[1] / sy))
        e2, e3 = min(rgb.width, math.ceil(ex[2] / sx)), min(rgb.height, math.ceil(ex[3] / sy))
        sub = rgb.crop((e0, e1, e2, e3))
        b = smap.box
        box = (b[0] / sx - e0, b[1] / sy - e1, b[2] / sx - e0, b[3] / sy - e1)
        box = (max(0.0, box[0]), max(0.0, box[1]), min(float(sub.width), box[2]), min(float(sub.height), box[3]))
        out = sub.resize((smap.out[1], smap.out[0]), Image.Resampling.BILINEAR, box=box)
        return np.frombuffer(out.tobytes("raw", "RGBX"), dtype=np.uint8).reshape(out.height, out.width, 4)


def load_frame_uint8(path: FrameSource) -> Tensor:
    """Decode one image file with PIL to an RGB uint8 tensor ``[3, H, W]`` (channels-last strides).

    ``load_frame_uint8(p).float() / 255`` equals the reference :func:`~facelayers.data.load_frame`.
    """
    import numpy as np

    src = _Source(path)
    try:
        return torch.from_numpy(np.array(src.hwc(), dtype=np.uint8, order="C", copy=True)).permute(2, 0, 1)
    finally:
        src.close()


def _draft_scale(smap: _SourceMap | None, sources: Sequence[_Source]) -> int:
    if smap is None or not all(s.jpeg and s.path is not None for s in sources):
        return 1
    room = min(smap.scale) / JPEG_DRAFT_MARGIN
    for s in (8, 4, 2):
        if room >= s:
            return s
    return 1


#: Frames decoded, resized and converted together on the fast path: small enough that a group's
#: uint8 and float copies stay in the CPU cache between the stages, large enough for batched kernels.
_GROUP_FRAMES = 4


def _geometry_groups(
    sources: Sequence[_Source], steps: Sequence[Any], height: int, width: int, draft: bool
) -> Iterator[Tensor]:
    """Decode the unique frames and run the geometric steps in uint8, a few frames at a time.

    Yields ``[g, 3, h, w]`` uint8 tensors (any strides) covering ``sources`` in order; a yielded
    tensor may share memory with the next group, so use it before asking for the next one.
    """
    import numpy as np

    smap = _source_map(steps, height, width) if draft else None
    scale = _draft_scale(smap, sources)
    if scale > 1:
        assert smap is not None
        clip = torch.from_numpy(np.stack([s.draft_hwc(smap, scale) for s in sources])).permute(0, 3, 1, 2)
        yield (_hflip_u8(clip) if smap.flip else clip)[:, :3]
        return
    steps = list(steps)
    rows, cols = slice(None), slice(None)
    first = steps[0] if steps else None
    if isinstance(first, _ResizedCrop) and first.top >= 0 and first.left >= 0:
        if first.top + first.height <= height and first.left + first.width <= width:
            # crop before stacking: only the crop box is copied (resized_crop == crop, then resize)
            rows = slice(first.top, first.top + first.height)
            cols = slice(first.left, first.left + first.width)
            steps[0] = _Resize(first.size, *first.size, first.antialias) if first.size is not None else None
    # decode each frame into one RGBX frame buffer (reused, so it stays in cache) and copy only
    # its crop box into the group; the 4th (padding) channel is resized along, never read
    h = len(range(height)[rows])
    w = len(range(width)[cols])
    out = np.empty((min(_GROUP_FRAMES, len(sources)), h, w, 4), dtype=np.uint8)
    frame = np.empty((height, width, 4), dtype=np.uint8)
    for start in range(0, len(sources), _GROUP_FRAMES):
        part = sources[start : start + _GROUP_FRAMES]
        for j, s in enumerate(part):
            out[j] = s.rgbx(frame)[rows, cols]
        clip = torch.from_numpy(out[: len(part)]).permute(0, 3, 1, 2)
        for st in steps:
            if isinstance(st, _Flip):
                clip = _hflip_u8(clip)
            elif isinstance(st, _Resize) and clip.shape[0] > 1 and _native_uint8_resize():
                if (st.height, st.width) != tuple(clip.shape[-2:]):  # F.resize returns an equal size as is
                    # the interpolate call F.resize makes for a uint8 clip here, without its overhead
                    clip = Fnn.interpolate(clip, size=(st.height, st.width), mode="bilinear",
                                           align_corners=False, antialias=st.antialias)
            elif st is not None:
                clip = st.apply(clip)
        yield clip[:, :3]


@functools.lru_cache(maxsize=None)
def _native_uint8_resize() -> bool:
    """torchvision's ``F.resize`` runs a uint8 bilinear resize natively (no float round trip) here."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _hflip_u8(clip: Tensor) -> Tensor:
    """``F.hflip`` of a uint8 clip; a channels-last RGBX clip is flipped as one int32 per pixel."""
    hwc = clip.permute(0, 2, 3, 1)
    if clip.dtype == torch.uint8 and clip.shape[1] == 4 and hwc.is_contiguous():
        return hwc.view(torch.int32).flip(-2).view(torch.uint8).permute(0, 3, 1, 2)
    return F.hflip(clip)


def _fold_pointwise(
    transforms: Sequence[Callable[..., Tensor]], generator: torch.Generator | None, channels: int
) -> tuple[int, list[list[float]] | None]:
    """Fold the leading normalise / brightness transforms into ``clamp(a * x + b, lo, hi)`` per channel.

    ``x`` is the uint8 value; returns how many transforms were folded and ``[a, b, lo, hi]`` (or
    ``None`` when none). The jitter's draw is made here, in its turn, as its ``__call__`` would.
    """
    a, b = [1.0 / 255.0] * channels, [0.0] * channels
    lo, hi = [-math.inf] * channels, [math.inf] * channels
    n = 0
    for t in transforms:
        if isinstance(t, ClipNormalize) and len(t.mean) == channels:
            for c in range(channels):
                m, s = t.mean[c], t.std[c]
                a[c], b[c], lo[c], hi[c] = a[c] / s, (b[c] - m) / s, (lo[c] - m) / s, (hi[c] - m) / s
        elif isinstance(t, ClipColorJitter) and t.pointwise:
            f = t.get_params(generator)[1][0]
            if f is not None:
                for c in range(channels):
                    a[c], b[c] = a[c] * f, b[c] * f
                    lo[c] = max(lo[c] * f if lo[c] != -math.inf else -math.inf, 0.0)
                    hi[c] = min(hi[c] * f if hi[c] != math.inf else math.inf, 1.0)
        else:
            break
        n += 1
    return n, ([a, b, lo, hi] if n else None)


class _Uint8ToFloat:
    """Write uint8 frames ``[..., 3, h, w]`` (any strides) into float frames as ``clamp(a * x + b)``
    per channel (the folded pointwise ops), or as ``x / 255`` (exactly :func:`load_frame`) when none.

    Called a few frames at a time: the affine passes then run on frames that the conversion has
    just left in cache (over a whole clip they stream it through memory three times, which a loaded
    machine pays dearly).
    """

    def __init__(self, coef: list[list[float]] | None) -> None:
        self.coef = coef
        if coef is None:
            return
        a, b, lo, hi = coef
        self.scale, self.shift = torch.tensor(a).view(-1, 1, 1), torch.tensor(b).view(-1, 1, 1)
        # clamp only where a folded brightness can leave [0, 1]; as a bound on x when it is the same
        # for every channel (brightness then normalise: x <= 255 / f), else per channel afterwards
        clamp = [c for c in range(len(a)) if lo[c] > b[c] or hi[c] < 255.0 * a[c] + b[c]]
        upper_only = len(clamp) == len(a) and all(a[c] > 0 and lo[c] <= b[c] for c in clamp)
        x_hi = [(hi[c] - b[c]) / a[c] for c in clamp] if upper_only else []
        shared = bool(x_hi) and max(x_hi) - min(x_hi) <= 1e-9 * max(x_hi)
        self.x_max = min(x_hi) if shared else None
        self.bounds = [] if shared else [
            (c, lo[c] if lo[c] > b[c] else None, hi[c] if hi[c] < 255.0 * a[c] + b[c] else None) for c in clamp
        ]

    def __call__(self, out: Tensor, frames8: Tensor) -> None:
        """``out`` float ``[..., 3, h, w]`` <- ``frames8`` uint8 of the same shape (any strides)."""
        out.copy_(frames8)  # conversion and layout change in one pass
        if self.coef is None:
            out.div_(255.0)
            return
        if self.x_max is not None:
            out.clamp_(max=self.x_max)
        out.mul_(self.scale).add_(self.shift)  # (a mixed-dtype addcmul is far slower)
        for c, low, high in self.bounds:
            out.select(-3, c).clamp_(min=low, max=high)


def _run_fast(
    transforms: Sequence[Callable[..., Tensor]],
    frames: Sequence[FrameSource],
    generator: torch.Generator | None,
    draft: bool,
) -> Tensor:
    if isinstance(frames, (str, os.PathLike, Tensor)) or len(frames) == 0:
        raise ValueError(f"apply_to_frames: expected a non-empty sequence of frames, got {frames!r:.80}")
    order: list[int] = []
    unique: list[FrameSource] = []
    seen: dict[Any, int] = {}
    for f in frames:
        key = ("t", id(f)) if isinstance(f, Tensor) else ("p", os.fspath(f))
        if key not in seen:
            seen[key] = len(unique)
            unique.append(f)
        order.append(seen[key])
    sources: list[_Source] = []
    try:
        for f in unique:
            sources.append(_Source(f))
        sizes = {s.size for s in sources}
        if len(sizes) > 1:
            raise FrameSizeMismatchError(f"frames have different sizes {sorted(sizes)}; resize them to one size")
        height, width = sizes.pop()
        steps: list[Any] = []
        h, w, i = height, width, 0
        while i < len(transforms) and isinstance(transforms[i], _GeometricTransform):
            for st in transforms[i]._steps(h, w, generator):
                steps.append(st)
                h, w = st.out_size()
            i += 1
        rest = transforms[i:]
        n, coef = _fold_pointwise(rest, generator, 3)  # draws what the reference draws next
        convert = _Uint8ToFloat(coef)
        positions: list[list[int]] = [[] for _ in unique]
        for k, u in enumerate(order):
            positions[u].append(k)
        clip = torch.empty((len(order), 3, h, w), dtype=torch.float32)
        u = 0
        for part in _geometry_groups(sources, steps, height, width, draft):
            g = part.shape[0]
            if order[u : u + g] == list(range(u, u + g)) and all(len(positions[v]) == 1 for v in range(u, u + g)):
                convert(clip[u : u + g], part)  # the usual case: distinct frames, in order
            else:
                for j in range(g):
                    for k in positions[u + j]:
                        convert(clip[k], part[j])
            u += g
    finally:
        for s in sources:
            s.close()
    for t in rest[n:]:
        if isinstance(t, ClipRandomErasing):
            clip = t._erase(clip, generator, inplace=True)
        elif isinstance(t, ClipTransform):
            clip = t(clip, generator)
        else:
            clip = t(clip)
    return clip


def train_transform(
    size: int = 224,
    *,
    crop_scale: Sequence[float] = (0.8, 1.0),
    crop_ratio: Sequence[float] = (0.9, 1.1),
    flip_p: float = 0.5,
    brightness: float = 0.5,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
    erase_p: float = 0.3,
    erase_scale: Sequence[float] = (0.02, 0.1),
    erase_ratio: Sequence[float] = (0.5, 2.0),
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> ClipCompose:
    """Training preset (paper Sec. IV-B): random resized crop, flip, colour jitter, normalise, erase.

    Order: crop to ``size`` -> horizontal flip -> colour jitter -> CLIP normalisation -> random
    erasing (after normalisation, so the ``"random"`` standard-normal fill matches normalised
    pixel statistics). One draw of every parameter per clip.

    Examples::

        >>> t = train_transform(224)
        >>> out = t(torch.rand(16, 3, 256, 256), torch.Generator().manual_seed(0))  # [16, 3, 224, 224]
    """
    return ClipCompose(
        [
            ClipRandomResizedCrop(size, scale=crop_scale, ratio=crop_ratio),
            ClipRandomHorizontalFlip(flip_p),
            ClipColorJitter(brightness, contrast, saturation, hue),
            ClipNormalize(mean, std),
            ClipRandomErasing(erase_p, erase_scale, erase_ratio, value="random"),
        ]
    )


def eval_transform(
    size: int = 224, *, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> ClipCompose:
    """Evaluation preset: resize the shorter side to ``size``, centre crop ``size``, CLIP normalise.

    For square (aligned) face crops this is a plain resize to ``size x size``.
    """
    return ClipCompose([ClipResize(size), ClipCenterCrop(size), ClipNormalize(mean, std)])
