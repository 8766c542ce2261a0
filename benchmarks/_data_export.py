"""The synthetic benchmark on disk, in the real manifest formats, for the data-loading benchmark.

:func:`export_synthetic` renders the library's synthetic benchmark
(:class:`facelayers.data.synthetic.SyntheticExpressionDataset` / ``SyntheticAUDataset``, training
splits) and writes it with their ``export`` methods: PNG frame folders plus a DFEW expression
manifest (``dir num_frames label``) and a BP4D AU manifest (``seq/frame.png b1..b12``), read back by
:class:`facelayers.data.ExpressionClipDataset` / :class:`facelayers.data.AUClipDataset` exactly as
real data would be.

:func:`resized_copy` rewrites every exported frame at another size (same file names, same
manifests): the paper's 224 px case. Rendering 224 px faces directly costs ~100 s for 28 clips on 2
cores, far more than the benchmark it feeds, so the 224 px frames are the rendered 32 px frames
upsampled (bilinear) and re-encoded as PNG -- the decode and transform cost per frame is that of a
224 px image, which is what the benchmark measures.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def export_synthetic(root: str | Path, *, num_clips: int, num_subjects: int, num_frames: int, sequence_length: int,
                     image_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Render and export the synthetic training splits; returns roots, manifests and counts.

    Args:
        root: output folder; expression data under ``root/exp``, AU data under ``root/au``.
        num_clips: expression clips in the whole synthetic benchmark (the training split is ~70 %);
            at least 35 (5 per class).
        num_subjects: AU subjects in the whole benchmark (3 folds: the training split has about a third
            fewer), each with 2 takes of ``sequence_length`` frames.
        num_frames: frames per exported expression clip.
        image_size: rendered frame size.
    """
    from facelayers.data.synthetic import SyntheticAUDataset, SyntheticExpressionDataset

    root = Path(root)
    exp = SyntheticExpressionDataset(split="train", num_clips=num_clips, num_frames=num_frames,
                                     image_size=image_size, seed=seed, class_balance="uniform")
    au = SyntheticAUDataset(split="train", num_subjects=num_subjects, num_frames=num_frames, image_size=image_size,
                            seed=seed, sequences_per_subject=2, sequence_length=sequence_length)
    exp_manifest = exp.export(root / "exp", format="dfew")
    au_manifest = au.export(root / "au", format="bp4d")
    return dict(exp_root=root / "exp", exp_manifest=exp_manifest, au_root=root / "au", au_manifest=au_manifest,
                n_exp_clips=len(exp), n_au_frames=int(sum(1 for _ in open(au_manifest))), size=image_size)


def resized_copy(export: dict[str, Any], root: str | Path, size: int) -> dict[str, Any]:
    """Copy an :func:`export_synthetic` folder with every PNG frame resized to ``size x size``."""
    from PIL import Image

    root = Path(root)
    out = dict(export, size=size)
    for side in ("exp", "au"):
        src: Path = export[f"{side}_root"]
        dst = root / side
        for f in sorted(src.rglob("*")):
            target = dst / f.relative_to(src)
            if f.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif f.suffix == ".png":
                target.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(f) as img:
                    img.convert("RGB").resize((size, size), Image.BILINEAR).save(target, compress_level=1)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
        out[f"{side}_root"] = dst
        out[f"{side}_manifest"] = dst / Path(export[f"{side}_manifest"]).name
    return out


def frame_bytes(export: dict[str, Any]) -> float:
    """Mean size of one frame file in bytes."""
    files = [f for side in ("exp", "au") for f in Path(export[f"{side}_root"]).rglob("*.png")]
    return sum(f.stat().st_size for f in files) / max(1, len(files))


__all__ = ["export_synthetic", "resized_copy", "frame_bytes"]
