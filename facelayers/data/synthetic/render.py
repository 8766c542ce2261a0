"""Vectorised procedural face renderer: signed-distance shapes with soft edges, torch ops only.

A face is a parameter vector, not a mesh. Every shape (head, hair, ears, brows, eyes, iris, nose,
nostrils, cheeks, lips, teeth, wrinkles, dimples, chin boss) is a soft-edged signed-distance
primitive evaluated on the whole pixel grid of a batch of frames at once, then alpha-composited
back to front. Facial Action Units (AUs) move, resize or fade these primitives; each AU of the SSM
paper's Table S4 has its own deformation (listed in ``docs/synthetic.md`` and in
:data:`AU_DEFORMATIONS`), intensities are in ``[0, 1]`` and AUs combine additively.

Coordinates: face space is ``x`` right, ``y`` down, the face roughly inside ``[-1, 1]^2``; the
image grid is mapped into face space through the inverse head pose (roll, scale, translation; yaw
shifts features by their depth). Frame parameters are dicts of tensors with a leading frame
dimension ``N`` (see :func:`sample_identities`, :func:`neutral_pose`, :func:`sample_scenes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = [
    "AU_DEFORMATIONS",
    "RENDERED_AUS",
    "neutral_pose",
    "plain_scenes",
    "render_au_apexes",
    "render_faces",
    "sample_identities",
]

#: AU codes the renderer deforms, in the column order of ``au`` intensity tensors (Table S4).
RENDERED_AUS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 24, 25, 26)

#: One line per AU: what the renderer does at intensity 1.
AU_DEFORMATIONS: dict[int, str] = {
    1: "inner brow ends rise; horizontal wrinkles in the centre of the forehead",
    2: "outer brow ends rise; horizontal wrinkles on the sides of the forehead",
    4: "brows drop and draw together (inner ends lower and closer), thicker brows, vertical "
    "glabella lines between them, upper lids slightly lowered",
    5: "upper lids rise: the eye opening grows upwards, white shows above the iris",
    6: "cheeks rise and brighten with a crease below them, crow's-feet lines at the outer eye "
    "corners, lower lids pushed up",
    7: "lids tighten: the eye opening narrows mostly from below, a dark lower-lid line appears",
    9: "nose wrinkler: wrinkle lines across the nose bridge, nostrils rise and widen",
    10: "upper lip rises in the middle (upper teeth show), nasolabial folds deepen",
    12: "lip corners pulled up and out (smile curve), nasolabial folds deepen",
    14: "dimples: dark dots beside the lip corners, corners tightened inwards",
    15: "lip corners pulled down, short vertical lines below them",
    17: "chin raiser: lower lip pushed up, stippled chin boss below the mouth",
    20: "lip stretcher: mouth widens horizontally, lips thin, oblique lines from the corners down",
    23: "lip tightener: mouth narrows, lips thin and darken (rolled, tense red)",
    24: "lip pressor: lips pressed into a thin dark line, skin bulges above and below",
    25: "lips part: a small opening with the upper teeth visible",
    26: "jaw drop: chin outline moves down and the mouth opens wide (dark interior, teeth)",
}

#: Half-extent of face space that the image shows (the face fills the frame).
_VIEW = 0.9

_AU_COL = {code: i for i, code in enumerate(RENDERED_AUS)}

# Identity fields that are colours [N, 3]; every other identity field is a scalar per frame [N].
_COLOR_FIELDS = ("skin", "hair", "iris", "lip", "background")


def _u(g: torch.Generator, n: int, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def sample_identities(n: int, *, generator: torch.Generator) -> dict[str, Tensor]:
    """Draw ``n`` random face identities (shape, skin tone, feature placement, colours).

    Args:
        n: number of identities.
        generator: source of randomness (the draw is a pure function of its state).

    Returns:
        Dict of tensors: colours ``[n, 3]`` (``skin``, ``hair``, ``iris``, ``lip``,
        ``background``) and scalar geometry ``[n]`` in face units.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = generator
    tone = torch.rand(n, generator=g)
    dark = torch.tensor([0.36, 0.23, 0.16])
    light = torch.tensor([0.96, 0.81, 0.70])
    skin = dark + tone[:, None] * (light - dark)
    skin = (skin + 0.03 * torch.randn(n, 3, generator=g)).clamp(0.05, 1.0)
    hair_palette = torch.tensor(
        [[0.08, 0.06, 0.05], [0.30, 0.18, 0.08], [0.55, 0.38, 0.18], [0.85, 0.72, 0.45],
         [0.55, 0.55, 0.55], [0.45, 0.15, 0.06]]
    )
    hair = hair_palette[torch.randint(0, len(hair_palette), (n,), generator=g)]
    hair = (hair + 0.04 * torch.randn(n, 3, generator=g)).clamp(0.0, 1.0)
    iris_palette = torch.tensor([[0.25, 0.15, 0.08], [0.20, 0.35, 0.60], [0.25, 0.45, 0.25], [0.1, 0.08, 0.06]])
    iris = iris_palette[torch.randint(0, len(iris_palette), (n,), generator=g)]
    lip = (skin * torch.tensor([0.78, 0.48, 0.50]) + torch.tensor([0.12, 0.02, 0.03])).clamp(0, 1)
    background = (0.45 + 0.25 * torch.rand(n, 1, generator=g)) * torch.ones(n, 3) + 0.08 * torch.randn(
        n, 3, generator=g
    )
    return {
        "skin": skin,
        "hair": hair,
        "iris": iris,
        "lip": lip,
        "background": background.clamp(0, 1),
        "head_rx": _u(g, n, 0.58, 0.70),
        "head_ry_top": _u(g, n, 0.74, 0.84),
        "head_ry_bot": _u(g, n, 0.74, 0.86),
        "jaw_w": _u(g, n, 0.78, 0.95),
        "face_cy": _u(g, n, 0.02, 0.08),
        "hair_line": _u(g, n, -0.52, -0.40),
        "eye_x": _u(g, n, 0.24, 0.30),
        "eye_y": _u(g, n, -0.14, -0.06),
        "eye_a": _u(g, n, 0.12, 0.145),
        "eye_h": _u(g, n, 0.058, 0.072),
        "brow_gap": _u(g, n, 0.11, 0.15),
        "brow_thick": _u(g, n, 0.03, 0.042),
        "brow_tilt": _u(g, n, -0.02, 0.03),
        "nose_y": _u(g, n, 0.14, 0.22),
        "nose_w": _u(g, n, 0.07, 0.10),
        "mouth_y": _u(g, n, 0.42, 0.50),
        "mouth_w": _u(g, n, 0.21, 0.25),
        "mouth_curve": _u(g, n, -0.01, 0.015),
        "lip_t": _u(g, n, 0.040, 0.052),
        "blush": _u(g, n, 0.0, 0.3),
    }


def neutral_pose(n: int) -> Tensor:
    """Frontal pose ``[n, 5]``: (roll rad, scale, tx, ty, yaw)."""
    pose = torch.zeros(n, 5)
    pose[:, 1] = 1.0
    return pose


def plain_scenes(n: int) -> dict[str, Tensor]:
    """Lab scene parameters: no clutter, even light, no occluder, no blur or noise.

    Scene fields (``N`` frames): ``gain [N]`` brightness factor; ``light_dir [N, 2]`` linear light
    gradient over image x/y; ``cast [N, 3]`` per-channel factor; ``clutter [N, K, 8]`` background
    shapes (cx, cy, rx, ry in image units, r, g, b, is_rect; zero radii are skipped);
    ``occluder [N, 8]`` (present, cx, cy, rx, ry, grey level, is_rect, unused; an ellipse is
    skin-coloured like a hand); ``blur [N]`` Gaussian sigma in pixels at 32 px (scaled with the
    size); ``noise [N]`` noise amplitude; ``noise_seed [N]`` per-frame seed of the hash noise.
    """
    return {
        "gain": torch.ones(n),
        "light_dir": torch.zeros(n, 2),
        "cast": torch.ones(n, 3),
        "clutter": torch.zeros(n, 0, 8),
        "occluder": torch.zeros(n, 8),
        "blur": torch.zeros(n),
        "noise": torch.zeros(n),
        "noise_seed": torch.zeros(n),
    }


# ---------------------------------------------------------------------------------------------
# primitives: every one returns an alpha map [N, H, W] in [0, 1]; parameters are [N, 1, 1]


def _soft(d: Tensor, e: Tensor) -> Tensor:
    """Soft inside-indicator of a signed distance ``d`` (positive inside): a linear ramp one edge
    width ``e`` (about a pixel) wide, i.e. approximate pixel coverage."""
    return (d / e).add_(0.5).clamp_(0.0, 1.0)


def _ellipse(X: Tensor, Y: Tensor, cx, cy, rx, ry, e: Tensor) -> Tensor:
    if not isinstance(rx, Tensor):
        rx = torch.full_like(e, rx)
    if not isinstance(ry, Tensor):
        ry = torch.full_like(e, ry)
    r = torch.hypot((X - cx) * (1.0 / rx), (Y - cy) * (1.0 / ry))
    return _soft(torch.minimum(rx, ry) * (1.0 - r), e)


def _ellipse2(X: Tensor, Y: Tensor, cx, cy, rx, ry_top, ry_bot, e: Tensor) -> Tensor:
    """Ellipse with different half-heights above and below its centre."""
    ry = torch.where(Y < cy, ry_top, ry_bot)
    r = torch.hypot((X - cx) / rx, (Y - cy) / ry)
    return _soft(torch.minimum(rx, ry) * (1.0 - r), e)


def _stroke(X: Tensor, Y: Tensor, x0, y0, x1, y1, thick, e: Tensor, bulge=0.0) -> Tensor:
    """Soft stroke (capsule) from (x0, y0) to (x1, y1), optionally bent by ``bulge`` (to the left
    of the direction of travel; negative bends right)."""
    dx, dy = x1 - x0, y1 - y0
    L2 = dx * dx + dy * dy + 1e-9
    ax, ay = X - x0, Y - y0
    t = (ax * (dx / L2)).addcmul_(ay, dy / L2).clamp_(0.0, 1.0)
    rx = ax.addcmul_(t, dx, value=-1.0)
    ry = ay.addcmul_(t, dy, value=-1.0)
    if isinstance(bulge, Tensor) or bulge != 0.0:
        L = torch.sqrt(L2)
        b = t.mul_(1.0 - t).mul_(4.0 * bulge)
        rx = rx.addcmul_(b, dy / L, value=-1.0)
        ry = ry.addcmul_(b, dx / L)
    return _soft(thick - torch.hypot(rx, ry), e)


def _over(img: Tensor, alpha: Tensor, color: Tensor) -> Tensor:
    """Composite ``color`` ([N, 3] or [N, 3, H, W]) over ``img`` [N, 3, H, W] with ``alpha``
    [N, H, W], in place."""
    if color.dim() == 2:
        color = color[:, :, None, None]
    return img.lerp_(color.expand_as(img), alpha[:, None])


def _p(t: Tensor) -> Tensor:
    """[N] -> [N, 1, 1]."""
    return t[:, None, None]


def _gaussian_blur(img: Tensor, sigma_px: Tensor) -> Tensor:
    """Per-frame Gaussian blur; ``sigma_px`` [N] in pixels (0 = untouched)."""
    n, c, h, w = img.shape
    if n == 0 or float(sigma_px.max()) <= 0.05:
        return img
    radius = max(1, int(math.ceil(2.5 * float(sigma_px.max()))))
    xs = torch.arange(-radius, radius + 1, dtype=img.dtype)
    s = sigma_px.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (xs[None] / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # [N, K]; sigma ~ 0 gives a delta kernel
    k = k.repeat_interleave(c, 0)  # [N*C, K]
    x = img.reshape(1, n * c, h, w)
    x = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = torch.nn.functional.conv2d(x, k[:, None, :, None], groups=n * c)
    x = torch.nn.functional.conv2d(x, k[:, None, None, :], groups=n * c)
    return x.reshape(n, c, h, w)


def _hash_noise(n_seed: Tensor, h: int, w: int) -> Tensor:
    """Deterministic pseudo-random noise in [-1, 1], [N, 3, H, W], from a per-frame seed [N]."""
    yy = torch.arange(h, dtype=torch.float64)[:, None]
    xx = torch.arange(w, dtype=torch.float64)[None, :]
    ch = torch.arange(3, dtype=torch.float64)[:, None, None]
    s = n_seed.to(torch.float64)[:, None, None, None]
    v = torch.sin(xx * 12.9898 + yy * 78.233 + ch * 37.719 + s * 4.1414) * 43758.5453
    return (2.0 * (v - torch.floor(v)) - 1.0).to(torch.float32)


def render_faces(
    identity: Mapping[str, Tensor],
    au: Tensor,
    *,
    image_size: int = 32,
    pose: Tensor | None = None,
    scene: Mapping[str, Tensor] | None = None,
    chunk_size: int = 256,
    num_threads: int | None = 1,
) -> Tensor:
    """Render a batch of face frames.

    Args:
        identity: per-frame identity parameters (``[N]`` scalars, ``[N, 3]`` colours), e.g.
            :func:`sample_identities` indexed by each frame's identity.
        au: ``[N, A]`` AU intensities in ``[0, 1]``, columns in :data:`RENDERED_AUS` order.
        image_size: output height and width in pixels.
        pose: ``[N, 5]`` (roll rad, scale, tx, ty, yaw); frontal when ``None``.
        scene: wild-scene parameters (see ``plain_scenes``); plain lab scene when ``None``.
        chunk_size: frames rendered per vectorised chunk (bounds memory).
        num_threads: torch intra-op threads while rendering (restored afterwards); ``None`` keeps
            the current setting. The default 1 is deliberate: the renderer runs many small
            elementwise ops, and on a busy 2-core machine OpenMP contention made 2 threads up
            to 20x slower than 1.

    Returns:
        ``[N, 3, image_size, image_size]`` float32 in ``[0, 1]``.
    """
    if au.dim() != 2 or au.shape[1] != len(RENDERED_AUS):
        raise ValueError(f"au must be [N, {len(RENDERED_AUS)}] (RENDERED_AUS order), got {tuple(au.shape)}")
    if image_size < 4:
        raise ValueError(f"image_size must be >= 4, got {image_size}")
    n = au.shape[0]
    for k, v in identity.items():
        if v.shape[0] != n:
            raise ValueError(f"identity[{k!r}] has {v.shape[0]} rows, expected {n} (one per frame)")
    pose = neutral_pose(n) if pose is None else pose
    scene = plain_scenes(n) if scene is None else scene
    if pose.shape != (n, 5):
        raise ValueError(f"pose must be [{n}, 5], got {tuple(pose.shape)}")
    out = torch.empty(n, 3, image_size, image_size)
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        _render_into(out, identity, au, pose, scene, image_size, chunk_size)
    finally:
        torch.set_num_threads(old_threads)
    return out



def render_au_apexes(identities: Mapping[str, Tensor], *, image_size: int = 32) -> Tensor:
    """Per identity the neutral face, then each rendered AU alone at intensity 1 (lab scene, frontal).

    Args:
        identities: identity parameters of ``I`` identities (:func:`sample_identities`).
        image_size: output height and width in pixels.

    Returns:
        ``[I, 1 + A, 3, S, S]`` float images, ``A = len(RENDERED_AUS)``, columns: neutral then
        :data:`RENDERED_AUS` order.
    """
    A = len(RENDERED_AUS)
    au = torch.cat([torch.zeros(1, A), torch.eye(A)])
    num_identities = len(next(iter(identities.values())))
    rows = []
    for i in range(num_identities):
        idn = {k: v[i : i + 1].expand(A + 1, *v.shape[1:]) for k, v in identities.items()}
        rows.append(render_faces(idn, au, image_size=image_size))
    return torch.stack(rows)

def _render_into(out, identity, au, pose, scene, image_size, chunk_size) -> None:
    n = au.shape[0]
    for s in range(0, n, chunk_size):
        sl = slice(s, min(n, s + chunk_size))
        out[sl] = _render_chunk(
            {k: v[sl].float() for k, v in identity.items()},
            au[sl].float().clamp(0, 1),
            pose[sl].float(),
            {k: v[sl].float() for k, v in scene.items()},
            image_size,
        )


class _Ctx:
    """Per-frame drawing context: every tensor attribute has a leading frame dimension."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def take(self, ix: Tensor) -> _Ctx:
        out = {}
        for k, v in self.__dict__.items():
            if isinstance(v, Tensor):
                out[k] = v[ix]
            elif isinstance(v, dict):
                out[k] = {kk: vv[ix] for kk, vv in v.items()}
            else:
                out[k] = v
        return _Ctx(**out)


def _gated(img: Tensor, gate: Tensor, ctx: _Ctx, draw) -> Tensor:
    """Draw ``draw(ctx)`` (a list of (alpha, colour)) only on frames whose ``gate`` [N] > 0."""
    ix = torch.nonzero(gate > 1e-4).flatten()
    if ix.numel() == 0:
        return img
    if ix.numel() == gate.numel():
        sub, full = ctx, True
    else:
        sub, full = ctx.take(ix), False
    part = img if full else img[ix]
    for alpha, color in draw(sub):
        part = _over(part, alpha, color)
    if full:
        return part
    img[ix] = part
    return img


# AU-specific marks (drawn only on frames where the AU is active) --------------------------------


def _marks_au1(c: _Ctx):
    out = []
    for j in range(2):
        y = c.fy - 0.07 * j
        out.append((_stroke(c.X, c.Y, -0.13 + 0.08 * c.yaw, y, 0.13 + 0.08 * c.yaw, y, 0.011 + 0 * y, c.e, bulge=0.02) * c.A[1], c.dark))
    return out


def _marks_au2(c: _Ctx):
    out = []
    for j in range(2):
        y = c.fy - 0.07 * j
        for s in (-1.0, 1.0):
            a = _stroke(c.X, c.Y, s * 0.20 + 0.08 * c.yaw, y + 0.02, s * 0.42 + 0.08 * c.yaw, y + 0.05, 0.011 + 0 * y, c.e, bulge=0.02 * s)
            out.append((a * c.A[2], c.dark))
    return out


def _mirrored(c: _Ctx, au: int, mark: Callable[[float], Tensor], scale: float = 1.0, colour: Tensor | None = None):
    """One mark on each side of the face (``s = -1.0`` then ``s = 1.0``), as ``(alpha, colour)`` pairs:
    ``mark(s) * scale * A[au]`` in ``colour`` (default ``c.dark``)."""
    colour = c.dark if colour is None else colour
    return [(mark(s) * scale * c.A[au], colour) for s in (-1.0, 1.0)]


def _marks_au4(c: _Ctx):
    def mark(s: float) -> Tensor:
        gx = s * 0.045 + 0.09 * c.yaw
        return _stroke(c.X, c.Y, gx, c.ey - 0.20, gx, c.ey - 0.06, 0.010 + 0 * gx, c.e)
    return _mirrored(c, 4, mark)


def _marks_au6(c: _Ctx):
    out = []
    for s in (-1.0, 1.0):
        ccx = s * (c.ex + 0.04) + 0.06 * c.yaw
        ccy = c.ey + 0.27 - 0.10 * c.A[6]
        crease = _stroke(c.X, c.Y, ccx - 0.15, ccy + 0.07, ccx + 0.15, ccy + 0.07, 0.012 + 0 * ccx, c.e, bulge=0.05 * s)
        out.append((crease * 0.85 * c.A[6], c.dark))
        ox = s * (c.ex + c.ea + 0.03) + 0.08 * c.yaw
        for ang in (-0.45, 0.0, 0.45):
            x1 = ox + s * 0.10 * math.cos(ang)
            y1 = c.ey + 0.10 * math.sin(ang)
            out.append((_stroke(c.X, c.Y, ox, c.ey + 0 * ox, x1, y1, 0.010 + 0 * ox, c.e) * 0.9 * c.A[6], c.dark))
    return out


def _marks_au7(c: _Ctx):
    def mark(s: float) -> Tensor:
        ecx = s * c.ex + 0.1 * c.yaw
        return _stroke(c.X, c.Y, ecx - c.ea, c.ey, ecx + c.ea, c.ey, 0.02 + 0 * ecx, c.e, bulge=-c.hl * 0.9)
    return _mirrored(c, 7, mark, 0.95, c.dark * 0.7)


def _marks_au9(c: _Ctx):
    out = []
    for j in range(3):
        wy = c.ey + 0.06 + 0.045 * j
        a = _stroke(c.X, c.Y, 0.15 * c.yaw - 0.07, wy, 0.15 * c.yaw + 0.07, wy, 0.010 + 0 * wy, c.e, bulge=0.015)
        out.append((a * c.A[9], c.dark))
    return out


def _marks_au14(c: _Ctx):
    def mark(s: float) -> Tensor:
        cxs = c.mx + s * c.w
        return _ellipse(c.X, c.Y, cxs + s * 0.05, c.my + c.c - 0.005, 0.04 + 0 * c.my, 0.04 + 0 * c.my, c.e)
    return _mirrored(c, 14, mark)


def _marks_au15(c: _Ctx):
    def mark(s: float) -> Tensor:
        cxs = c.mx + s * c.w
        return _stroke(c.X, c.Y, cxs, c.my + c.c + 0.03, cxs - s * 0.015, c.my + c.c + 0.13, 0.011 + 0 * c.my, c.e)
    return _mirrored(c, 15, mark, 0.8)


def _marks_au17(c: _Ctx):
    boss = _ellipse(c.X, c.Y, c.mx, c.chin_y - 0.15, 0.13 + 0 * c.my, 0.065 + 0 * c.my, c.e)
    stipple = 0.5 + 0.5 * torch.sin(c.X * 70.0) * torch.sin(c.Y * 70.0)
    return [(boss * c.A[17] * (0.35 + 0.55 * stipple), c.dark)]


def _marks_au20(c: _Ctx):
    def mark(s: float) -> Tensor:
        cxs = c.mx + s * c.w
        return _stroke(c.X, c.Y, cxs + s * 0.02, c.my + c.c + 0.02, cxs + s * 0.13, c.my + c.c + 0.16, 0.011 + 0 * c.my, c.e)
    return _mirrored(c, 20, mark, 0.8)


def _marks_au24(c: _Ctx):
    col = (c.skin * 1.25 + 0.05).clamp(0, 1)
    up = _ellipse(c.X, c.Y, c.mx, c.my - c.tu - 0.05, c.w * 0.85, 0.04 + 0 * c.my, c.e)
    lo = _ellipse(c.X, c.Y, c.mx, c.my + c.tl + 0.055, c.w * 0.75, 0.04 + 0 * c.my, c.e)
    return [(up * c.A[24], col), (lo * c.A[24], col)]


def _render_chunk(idn, au, pose, scene, size):  # noqa: C901 - one straight-line drawing routine
    n = au.shape[0]
    A = {code: _p(au[:, i]) for code, i in _AU_COL.items()}
    P = {k: _p(v) for k, v in idn.items() if v.dim() == 1}
    C = {k: idn[k] for k in _COLOR_FIELDS}
    roll, scale, tx, ty, yaw = (_p(pose[:, i]) for i in range(5))

    # pixel grid -> face space (inverse of: rotate by roll, scale, translate)
    g = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
    V0, U0 = torch.meshgrid(g, g, indexing="ij")
    U0, V0 = U0 * _VIEW, V0 * _VIEW
    U = U0[None] - tx
    V = V0[None] - ty
    cr, sr = torch.cos(roll), torch.sin(roll)
    X = (cr * U + sr * V) / scale
    Y = (-sr * U + cr * V) / scale
    e = (2.0 * _VIEW / size) / scale  # edge width: one pixel in face units

    # background and clutter (image space)
    img = (C["background"][:, :, None, None] * (1.0 - 0.12 * V0[None, None])).contiguous()
    clutter = scene["clutter"]
    e_img = torch.full((n, 1, 1), 2.0 * _VIEW / size)
    for k in range(clutter.shape[1]):
        cl = clutter[:, k]
        cx, cy, rx, ry = (_p(cl[:, i]) for i in range(4))
        present = ((rx > 0) & (ry > 0)).float()
        rx, ry = rx.clamp_min(1e-3), ry.clamp_min(1e-3)
        is_rect = _p(cl[:, 7])
        ell = _ellipse(U0[None], V0[None], cx, cy, rx, ry, e_img)
        rect = _soft(torch.minimum(rx - (U0[None] - cx).abs(), ry - (V0[None] - cy).abs()), e_img)
        img = _over(img, (ell * (1 - is_rect) + rect * is_rect) * present, cl[:, 4:7])

    skin = C["skin"]
    shade = skin * 0.72
    dark = skin * 0.3

    # neck, ears, head, hair
    cy_h = P["face_cy"]
    rx_h = P["head_rx"] * (1.0 - 0.25 * yaw.abs())
    ry_bot = P["head_ry_bot"] + 0.13 * A[26]
    img = _over(img, _stroke(X, Y, 0 * cy_h, cy_h + 0.5, 0 * cy_h, cy_h + 1.6, 0.30 * rx_h / 0.64, e), shade)
    ex, ey, ea, eh = P["eye_x"], P["eye_y"], P["eye_a"], P["eye_h"]
    for s in (-1.0, 1.0):
        ear = _ellipse(X, Y, s * rx_h * 0.98 + 0.05 * yaw, ey + 0.08, 0.075 + 0 * rx_h, 0.13 + 0 * rx_h, e)
        img = _over(img, ear, skin * 0.85)
    rx_lower = torch.where(Y < cy_h, rx_h, rx_h * P["jaw_w"])
    img = _over(img, _ellipse2(X, Y, 0.03 * yaw, cy_h, rx_lower, P["head_ry_top"], ry_bot, e), skin)
    hair = _ellipse(X, Y, 0.03 * yaw, cy_h - 0.04, rx_h * 1.07, P["head_ry_top"] * 1.1, e) * _soft(
        P["hair_line"] - Y + 0.04 * X.abs(), e
    )
    img = _over(img, hair, C["hair"])

    # cheeks (blush of the identity; AU6 raises and brightens them)
    cheek_color = (skin * 1.08 + torch.tensor([0.10, 0.0, 0.0])).clamp(0, 1)
    for s in (-1.0, 1.0):
        ccx = s * (ex + 0.04) + 0.06 * yaw
        ccy = ey + 0.27 - 0.10 * A[6]
        cheek = _ellipse(X, Y, ccx, ccy, 0.16 + 0 * ccx, 0.10 + 0.02 * A[6], e)
        img = _over(img, cheek * (0.25 * P["blush"] + 0.6 * A[6]), cheek_color)

    # eye and mouth geometry shared by the AU marks
    hu = eh * (1.0 + 1.0 * A[5]) * (1.0 - 0.35 * A[7]) * (1.0 - 0.2 * A[4])
    hl = eh * 0.85 * (1.0 - 0.6 * A[7]) * (1.0 - 0.45 * A[6])
    ntx = 0.20 * yaw
    ny, nw = P["nose_y"], P["nose_w"]
    mx = 0.15 * yaw
    my = P["mouth_y"] + 0.04 * A[26]
    w = P["mouth_w"] * (1.0 + 0.22 * A[12] + 0.38 * A[20] - 0.35 * A[23] - 0.15 * A[14])
    c = P["mouth_curve"] - 0.14 * A[12] + 0.14 * A[15] + 0.015 * A[20] - 0.01 * A[14] + 0.03 * A[17]
    gap = (0.06 * A[25] + 0.18 * A[26]) * (1.0 - 0.8 * A[24]) * (1.0 - 0.7 * A[17])
    r10 = 0.055 * A[10]
    p17 = 0.045 * A[17]
    thin = (1.0 - 0.45 * A[23] - 0.8 * A[24] - 0.35 * A[20]).clamp_min(0.12)
    tu = P["lip_t"] * thin
    tl = P["lip_t"] * 1.25 * thin
    ctx = _Ctx(
        X=X, Y=Y, e=e, A=A, yaw=yaw, skin=skin, dark=dark, ex=ex, ey=ey, ea=ea, hl=hl,
        fy=ey - P["brow_gap"] - 0.13, mx=mx, my=my, w=w, c=c, tu=tu, tl=tl, chin_y=cy_h + ry_bot,
    )
    for code, marks in ((1, _marks_au1), (2, _marks_au2), (4, _marks_au4), (6, _marks_au6)):
        img = _gated(img, au[:, _AU_COL[code]], ctx, marks)

    # brows
    by = ey - P["brow_gap"] + 0.02 * A[9]
    brow_col = C["hair"] * 0.8
    for s in (-1.0, 1.0):
        xi = s * (ex - ea * 0.95 - 0.02 + 0.07 * A[4]) + 0.09 * yaw
        yi = by - 0.20 * A[1] + 0.11 * A[4]
        xo = s * (ex + ea * 1.25) + 0.09 * yaw
        yo = by + P["brow_tilt"] - 0.20 * A[2] + 0.03 * A[4]
        thick = P["brow_thick"] * (1.0 + 0.35 * A[4])
        img = _over(img, _stroke(X, Y, xi, yi, xo, yo, thick, e, bulge=0.025 * s), brow_col)

    # eyes: lid outline, sclera, iris, pupil; AU5 opens upwards, AU7 / AU6 close from below
    white = torch.tensor([0.95, 0.95, 0.93]).expand(n, 3)
    for s in (-1.0, 1.0):
        ecx = s * ex + 0.1 * yaw
        lid = 0.012
        img = _over(img, _ellipse2(X, Y, ecx, ey, ea + lid, hu + lid, hl + lid * 0.6, e), dark)
        eye = _ellipse2(X, Y, ecx, ey, ea, hu, hl, e)
        img = _over(img, eye, white)
        ri = eh * 0.95
        d = torch.sqrt((X - ecx - 0.02 * yaw) ** 2 + (Y - ey - 0.1 * eh) ** 2 + 1e-12)
        img = _over(img, _soft(ri - d, e) * eye, C["iris"])
        img = _over(img, _soft(0.45 * ri - d, e) * eye, torch.zeros(n, 3))
    img = _gated(img, au[:, _AU_COL[7]], ctx, _marks_au7)

    # nose: bridge highlight, base, nostrils; AU9 wrinkles
    img = _over(img, _stroke(X, Y, 0.12 * yaw, ey, ntx, ny - 0.05, 0.025 + 0 * ny, e) * 0.35, (skin * 1.15).clamp(0, 1))
    img = _over(img, _ellipse(X, Y, ntx, ny, nw * (1 + 0.2 * A[9]), 0.05 + 0 * ny, e) * 0.35, shade)
    for s in (-1.0, 1.0):
        nos = _ellipse(
            X, Y, ntx + s * nw * 0.55, ny + 0.03 - 0.035 * A[9] - 0.02 * A[10],
            0.032 * (1 + 0.5 * A[9] + 0.2 * A[10]), 0.018 + 0 * ny, e,
        )
        img = _over(img, nos * 0.85, dark * 0.6)
    img = _gated(img, au[:, _AU_COL[9]], ctx, _marks_au9)

    # nasolabial folds (deepened by AU10, AU12)
    fold_a = (0.1 + 0.6 * A[10] + 0.45 * A[12]).clamp(0, 1)
    for s in (-1.0, 1.0):
        fold = _stroke(X, Y, ntx + s * nw * 1.3, ny - 0.02 - 0.02 * A[10], mx + s * (w + 0.05), my + c + 0.01, 0.011 + 0 * my, e, bulge=0.03 * s)
        img = _over(img, fold * fold_a, dark)
    for code, marks in ((15, _marks_au15), (20, _marks_au20), (14, _marks_au14), (24, _marks_au24), (17, _marks_au17)):
        img = _gated(img, au[:, _AU_COL[code]], ctx, marks)

    # lips, mouth interior, teeth
    uu = ((X - mx) / w).clamp(-1.0, 1.0)
    k = 1.0 - uu * uu
    sk = torch.sqrt(k + 1e-6)
    y0 = my + c * uu * uu
    yui = y0 - (0.2 * gap + r10) * k
    yli = torch.maximum(y0 + 0.8 * gap * k - p17 * k, yui)
    yuo = yui - tu * sk - 0.3 * r10 * k
    ylo = yli + tl * sk - 0.3 * p17 * k
    xmask = _soft(w - (X - mx).abs(), e)
    upper = _soft(Y - yuo, e) * _soft(yui - Y, e) * xmask
    lower = _soft(Y - yli, e) * _soft(ylo - Y, e) * xmask
    inner = _soft(Y - yui, e) * _soft(yli - Y, e) * xmask
    lip_col = C["lip"][:, :, None, None] * (1.0 - 0.55 * A[23] - 0.3 * A[24])[:, None]
    img = _over(img, inner, torch.tensor([0.22, 0.04, 0.06]).expand(n, 3))
    teeth = inner * (_soft(yui + 0.035 - Y, e) + _soft(Y - yli + 0.022, e) * _soft(gap - 0.07, e)).clamp(0, 1)
    img = _over(img, teeth, torch.tensor([0.96, 0.95, 0.88]).expand(n, 3))
    img = _over(img, upper, lip_col)
    img = _over(img, lower, lip_col)
    line = _soft(0.010 - (Y - y0).abs(), e) * xmask * _soft(0.02 - gap, e)
    img = _over(img, line * 0.5, dark)

    # occluder (wild; image space): [present, cx, cy, rx, ry, gray, kind(0 skin-ellipse, 1 rect), -]
    occ = scene["occluder"]
    if float(occ[:, 0].max()) > 0.5:
        present, ocx, ocy, orx, ory, gray, kind = (_p(occ[:, i]) for i in range(7))
        orx, ory = orx.clamp_min(1e-3), ory.clamp_min(1e-3)
        o_ell = _ellipse(U0[None], V0[None], ocx, ocy, orx, ory, e_img)
        o_rect = _soft(torch.minimum(orx - (U0[None] - ocx).abs(), ory - (V0[None] - ocy).abs()), e_img)
        o_alpha = torch.where(kind > 0.5, o_rect, o_ell) * (present > 0.5)
        is_rect = (kind > 0.5)[:, :, 0].float()
        occ_col = skin * 0.9 * (1 - is_rect) + gray[:, :, 0].expand(n, 3) * is_rect
        img = _over(img, o_alpha, occ_col)

    # lighting: gain, directional gradient, colour cast
    lx, ly = _p(scene["light_dir"][:, 0]), _p(scene["light_dir"][:, 1])
    light = _p(scene["gain"]) * (1.0 + lx * U0[None] + ly * V0[None])
    img = img * light[:, None] * scene["cast"][:, :, None, None]

    img = _gaussian_blur(img, scene["blur"] * size / 32.0)
    if float(scene["noise"].abs().max()) > 0:
        img = img + scene["noise"][:, None, None, None] * _hash_noise(scene["noise_seed"], size, size)
    return img.clamp(0.0, 1.0)
