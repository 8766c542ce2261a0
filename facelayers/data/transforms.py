"""Clip-consistent transforms: one random draw per clip, applied identically to every frame.

Each transform takes a clip ``[T, C, H, W]`` float tensor (values in ``[0, 1]`` before
normalisation) and an optional ``torch.Generator``; random parameters (crop box, flip, jitter
factors and order, erasing box and fill) are drawn ONCE per call, so all ``T`` frames get the same
geometry and photometry. Passing a seeded generator makes the draw reproducible.

Presets follow the paper (Sec. IV-B: "random cropping, random erasing, horizontal flipping, and
color jittering", 224x224 faces, CLIP encoder); magnitudes the paper leaves open are those of the
released SSM code (crop scale 0.8-1.0 and ratio 0.9-1.1 and erasing p=0.3 of its AU branches,
brightness 0.5 of its DFEW branch). The release normalises MAFW and DISFA with ImageNet
statistics and everything else with (rounded) CLIP statistics; here every preset uses the exact
OpenAI CLIP mean/std by default (pass ``mean=``/``std=`` to change it).

torchvision ``transforms.v2`` transforms called on a ``[T, C, H, W]`` tensor also draw once per
call, so they can be used in :class:`ClipCompose` as well (they ignore the generator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
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
    "eval_transform",
    "train_transform",
]

#: OpenAI CLIP image normalisation (open_clip ``OPENAI_DATASET_MEAN``/``STD``).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


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


class ClipTransform:
    """Base class: ``__call__(clip [T, C, H, W], generator=None) -> clip``, one random draw per call."""

    def __call__(self, clip: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


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

    def __repr__(self) -> str:
        inner = "".join(f"\n  {t!r}," for t in self.transforms)
        return f"ClipCompose([{inner}\n])"


class ClipResize(ClipTransform):
    """Resize every frame: ``size`` int -> shorter side to ``size`` (aspect kept); (h, w) -> exact."""

    def __init__(self, size: int | Sequence[int], antialias: bool = True) -> None:
        if isinstance(size, int):
            if size < 1:
                raise ValueError(f"size must be >= 1, got {size}")
            self.size: int | tuple[int, int] = size
        else:
            self.size = _size2(size)
        self.antialias = antialias

    def __call__(self, clip: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_clip(clip, "ClipResize")
        size = [self.size] if isinstance(self.size, int) else list(self.size)
        return F.resize(clip, size, antialias=self.antialias)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class ClipCenterCrop(ClipTransform):
    """Crop the central ``size`` region of every frame (zero-padded if the frame is smaller)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size2(size)

    def __call__(self, clip: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_clip(clip, "ClipCenterCrop")
        return F.center_crop(clip, list(self.size))

    def extra_repr(self) -> str:
        return f"size={self.size}"


class ClipRandomResizedCrop(ClipTransform):
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

    def __call__(self, clip: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_clip(clip, "ClipRandomResizedCrop")
        top, left, h, w = self.get_params(clip.shape[-2], clip.shape[-1], generator)
        return F.resized_crop(clip, top, left, h, w, list(self.size), antialias=self.antialias)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}"


class ClipRandomHorizontalFlip(ClipTransform):
    """Flip every frame left-right with probability ``p`` (one coin per clip)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, clip: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_clip(clip, "ClipRandomHorizontalFlip")
        if float(torch.rand((), generator=generator)) < self.p:
            return F.hflip(clip)
        return clip

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

    def __call__(self, clip: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_clip(clip, "ClipRandomErasing")
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
        out = clip.clone()
        out[:, :, top : top + h, left : left + w] = fill.to(clip.device)
        return out

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
