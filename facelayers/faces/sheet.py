"""A contact sheet of a track's aligned crops, so a person can check what a model was shown.

Drawn with Pillow (a core dependency). Tiles are frames spread evenly over the whole video (frames
without a face included, drawn as grey "no face" tiles), each captioned with its frame index; the
canonical template points are drawn as green crosses and the frame's (smoothed) landmarks, mapped
into the crop, as red dots: on a good alignment they sit on top of each other.
"""

from __future__ import annotations

import os

import torch

from .pipeline import FaceTrack

__all__ = ["contact_sheet", "save_contact_sheet"]


def contact_sheet(
    track: FaceTrack,
    *,
    max_tiles: int = 32,
    columns: int = 8,
    tile: int | None = None,
    landmarks: bool = True,
):
    """Build the contact sheet of a :class:`~.pipeline.FaceTrack` as a ``PIL.Image`` (RGB).

    Args:
        track: the track whose crops to show.
        max_tiles: at most this many frames, spread evenly over the video (all if fewer).
        columns: tiles per row.
        tile: tile side in pixels (default ``min(track.size, 128)``).
        landmarks: draw the template (green crosses) and the mapped landmarks (red dots).
    """
    from PIL import Image, ImageDraw

    if max_tiles < 1 or columns < 1:
        raise ValueError(f"max_tiles and columns: expected >= 1, got {max_tiles} and {columns}")
    n = track.num_frames
    tile = tile or min(track.size, 128)
    idx = torch.linspace(0, n - 1, min(n, max_tiles)).round().long().unique().tolist()
    cols = min(columns, len(idx))
    rows = -(-len(idx) // cols)
    caption = 14
    sheet = Image.new("RGB", (cols * tile, rows * (tile + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    scale = tile / track.size
    template = (track.template() + 0.5) * scale - 0.5
    crop_lms = (track.crop_landmarks() + 0.5) * scale - 0.5
    for j, f in enumerate(idx):
        x0, y0 = (j % cols) * tile, (j // cols) * (tile + caption)
        if bool(track.present[f]):
            arr = (track.crops[f].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            img = Image.fromarray(arr).resize((tile, tile), Image.BILINEAR)
            sheet.paste(img, (x0, y0))
            if landmarks:
                for x, y in template.tolist():
                    draw.line([(x0 + x - 3, y0 + y), (x0 + x + 3, y0 + y)], fill=(0, 220, 0))
                    draw.line([(x0 + x, y0 + y - 3), (x0 + x, y0 + y + 3)], fill=(0, 220, 0))
                for x, y in crop_lms[f].tolist():
                    draw.ellipse([(x0 + x - 1.5, y0 + y - 1.5), (x0 + x + 1.5, y0 + y + 1.5)], fill=(230, 0, 0))
            label = f"frame {f}"
        else:
            draw.rectangle([(x0, y0), (x0 + tile - 1, y0 + tile - 1)], fill=(90, 90, 90))
            draw.text((x0 + 6, y0 + tile // 2 - 6), "no face", fill=(255, 255, 255))
            label = f"frame {f} (face=0)"
        draw.text((x0 + 3, y0 + tile + 1), label, fill=(0, 0, 0))
    return sheet


def save_contact_sheet(track: FaceTrack, path: str | os.PathLike, **kwargs) -> str:
    """Write :func:`contact_sheet` ``(track, **kwargs)`` as a PNG at ``path``; returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    contact_sheet(track, **kwargs).save(path, format="PNG")
    return path
