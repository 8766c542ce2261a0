#!/usr/bin/env python
"""Per-frame AU probabilities and windowed expression probabilities for one face video.

    python examples/predict_video.py runs/ssm-seed0 face_video.mp4 --out predictions/
    python examples/predict_video.py runs/ssm-seed0/checkpoint frames_folder/ --out predictions/

Input: a face-cropped video file (decoded with PyAV) or a folder of frame images (natural order).
Checkpoint: a run folder (uses ``checkpoint/best``), a checkpoint folder, or a ``.safetensors``
file saved by ``ssm_reference.py`` (its ``.json`` beside it).

Outputs in ``--out``:

* ``au_probs.csv``: one row per frame (``frame``, ``time_s``, ``AU01``, ``AU02``, ...). Frame ``t``
  is the centre of a ``T``-frame window ``t - T//2 .. t + T - 1 - T//2`` (edge frames repeated at
  the ends), exactly how the model was trained (paper eq. 5).
* ``expression_probs.csv``: one row per sliding window (``start``, ``end``, ``start_s``, ``end_s``,
  one probability column per expression, ``top``): ``T`` frames sampled at segment centres of
  each ``--window``-frame window, every ``--stride`` frames.
* ``au_timeline.png``: the AU probabilities over time (needs matplotlib).

Every frame is encoded once per task by the vision encoder; windows reuse the frame features.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import ssm_builders as B  # noqa: E402
from facelayers import facs  # noqa: E402


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """-> (folder, name) of a ``{name}.safetensors`` + ``{name}.json`` pair."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)[: -len(".safetensors")]
    for folder in (os.path.join(path, "checkpoint"), path):
        for name in ("best", "last", "model"):
            if os.path.isfile(os.path.join(folder, f"{name}.safetensors")):
                return folder, name
    raise FileNotFoundError(f"no checkpoint found at {path} (expected a run folder, a checkpoint folder "
                            "with best.safetensors / last.safetensors, or a .safetensors file)")


def read_frames(source: str) -> tuple[Tensor, float | None]:
    """``[N, 3, H, W]`` float frames in ``[0, 1]`` and the frame rate (None for image folders)."""
    from facelayers.data import list_frame_files, load_frame, read_video_frames

    if os.path.isdir(source):
        names = list_frame_files(source)
        if not names:
            raise FileNotFoundError(f"no image frames in {source}")
        frames = [load_frame(os.path.join(source, n)) for n in names]
        fps = None
    elif os.path.isfile(source):
        frames = read_video_frames(source)
        fps = None
        try:
            import av

            with av.open(source) as c:
                rate = c.streams.video[0].average_rate
                fps = float(rate) if rate else None
        except Exception:  # noqa: BLE001 - the frame rate is only used for a time column
            fps = None
        if not frames:
            raise ValueError(f"no frames decoded from {source}")
    else:
        raise FileNotFoundError(f"input not found: {source} (expected a video file or a folder of frames)")
    shapes = {tuple(f.shape) for f in frames}
    if len(shapes) > 1:
        raise ValueError(f"frames of {source} have different sizes {sorted(shapes)}")
    return torch.stack(frames), fps


def au_window_indices(n: int, t: int) -> Tensor:
    """``[n, t]`` frame indices: row ``i`` is the window whose centre slot ``t // 2`` is frame ``i``."""
    c = t // 2
    return (torch.arange(n).unsqueeze(1) + torch.arange(t).unsqueeze(0) - c).clamp(0, n - 1)


def expression_windows(n: int, t: int, window: int, stride: int) -> list[tuple[int, int, list[int]]]:
    """``(start, end_exclusive, T indices)`` per sliding window (segment centres, edge padding)."""
    from facelayers.data import segment_indices

    window = max(1, min(window, n))
    starts = list(range(0, max(n - window, 0) + 1, max(1, stride)))
    if starts[-1] + window < n:
        starts.append(n - window)
    return [(s, s + window, [s + i for i in segment_indices(window, t, False)]) for s in starts]


@torch.no_grad()
def predict_video(model: B.SSMModel, frames: Tensor, *, window: int | None = None, stride: int | None = None,
                  batch: int = 64, device: str | torch.device = "cpu") -> dict[str, object]:
    """Run a trained model over a video.

    Args:
        model: trained :class:`ssm_builders.SSMModel` (eval mode is set here).
        frames: ``[N, 3, H, W]`` in ``[0, 1]`` (any size; resized to the model's input size).
        window: expression window length in frames (default ``2 T``).
        stride: expression window step (default ``window // 2``).
        batch: frames / windows per forward.

    Returns:
        dict with ``au_probs [N, M]`` (or None), ``exp_windows`` list of ``(start, end)`` and
        ``exp_probs [W, K]`` (or None).
    """
    from facelayers.data import eval_transform

    model = model.eval().to(device)
    cfg = model.cfg
    t = cfg.num_frames
    n = frames.shape[0]
    x = eval_transform(cfg.image_size)(frames.float())
    out: dict[str, object] = {"au_probs": None, "exp_windows": [], "exp_probs": None}
    t_exp, t_au = model.text_features()

    def encode(task: str) -> Tensor:
        feats = [model.encode_task_frames(x[i : i + batch].to(device), task) for i in range(0, n, batch)]
        return torch.cat(feats).float()

    if "au" in cfg.tasks:
        f = encode("au")
        idx = au_window_indices(n, t)
        probs = []
        for i in range(0, n, batch):
            logits = model.au_logits_from_features(f[idx[i : i + batch]], t_au)
            if logits.dim() == 3:  # model trained on all frames: read the centre slot
                logits = logits[:, t // 2]
            probs.append(logits.float().sigmoid().cpu())
        out["au_probs"] = torch.cat(probs)
    if "exp" in cfg.tasks:
        f = encode("exp")
        window = window or 2 * t
        stride = stride or max(1, window // 2)
        wins = expression_windows(n, t, window, stride)
        idx = torch.tensor([w[2] for w in wins])
        probs = []
        for i in range(0, len(wins), batch):
            logits = model.exp_logits_from_features(f[idx[i : i + batch]], t_exp)
            probs.append(logits.float().softmax(-1).cpu())
        out["exp_windows"] = [(w[0], w[1]) for w in wins]
        out["exp_probs"] = torch.cat(probs)
    return out


def write_outputs(res: dict[str, object], cfg: B.ModelConfig, out_dir: str, fps: float | None, plot: bool = True) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []
    au_probs = res["au_probs"]
    if au_probs is not None:
        cols = [facs.au_label(a) for a in cfg.aus]
        path = os.path.join(out_dir, "au_probs.csv")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["frame", "time_s", *cols])
            for i, row in enumerate(au_probs.tolist()):
                w.writerow([i, f"{i / fps:.3f}" if fps else "", *[f"{v:.5f}" for v in row]])
        written.append(path)
        if plot:
            try:
                from facelayers.viz import plot_au_timeline

                p = os.path.join(out_dir, "au_timeline.png")
                plot_au_timeline(au_probs, list(cfg.aus), fps=fps, path=p, title="AU probabilities per frame")
                written.append(p)
            except ImportError as err:
                print(f"warning: no plot ({err})", file=sys.stderr)
    if res["exp_probs"] is not None:
        path = os.path.join(out_dir, "expression_probs.csv")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["start", "end", "start_s", "end_s", *cfg.expressions, "top"])
            for (s, e), row in zip(res["exp_windows"], res["exp_probs"].tolist()):
                top = cfg.expressions[max(range(len(row)), key=row.__getitem__)]
                w.writerow([s, e, f"{s / fps:.3f}" if fps else "", f"{e / fps:.3f}" if fps else "",
                            *[f"{v:.5f}" for v in row], top])
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="run folder, checkpoint folder or .safetensors file")
    p.add_argument("video", help="face-cropped video file or folder of frame images")
    p.add_argument("--out", default="predictions", help="output folder")
    p.add_argument("--window", type=int, default=None, help="expression window in frames (default 2T)")
    p.add_argument("--stride", type=int, default=None, help="expression window step (default window/2)")
    p.add_argument("--fps", type=float, default=None, help="frame rate for the time columns (default: from the video)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    try:
        folder, name = resolve_checkpoint(args.checkpoint)
        model = B.load_model(folder, name, device=args.device)
        frames, fps = read_frames(args.video)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    fps = args.fps or fps
    res = predict_video(model, frames, window=args.window, stride=args.stride, batch=args.batch, device=args.device)
    for path in write_outputs(res, model.cfg, args.out, fps, plot=not args.no_plot):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
