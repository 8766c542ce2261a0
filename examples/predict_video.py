#!/usr/bin/env python
"""Per-frame AU probabilities and windowed expression probabilities for one face video.

    python examples/predict_video.py runs/ssm-seed0 face_video.mp4 --out predictions/
    python examples/predict_video.py runs/ssm-seed0/checkpoint frames_folder/ --out predictions/

Input: a face-cropped video file (decoded with PyAV) or a folder of frame images (natural order).
Checkpoint: a run folder (uses ``checkpoint/best``), a checkpoint folder, or a ``.safetensors``
file saved by ``ssm_reference.py`` (its ``.json`` beside it). The checkpoint is checked before it
runs (``facelayers.models.ssm.load_model``: config vs weights, vocabularies, shapes, finite values).

Outputs in ``--out``:

* ``au_probs.csv``: one row per frame (``frame``, ``time_s``, ``AU01``, ``AU02``, ...). Frame ``t``
  is the centre of a ``T``-frame window ``t - T//2 .. t + T - 1 - T//2`` (edge frames repeated at
  the ends), exactly how the model was trained (paper eq. 5).
* ``expression_probs.csv``: one row per sliding window (``start``, ``end``, ``start_s``, ``end_s``,
  one probability column per expression, ``top``): ``T`` frames sampled at segment centres of
  each ``--window``-frame window, every ``--stride`` frames.
* ``au_timeline.png``: the AU probabilities over time (needs matplotlib).

The work is done by ``facelayers.models.ssm.inference.predict_video`` (every frame is encoded once
per task; windows reuse the frame features). A bad argument or file prints ``error: ...`` and exits
with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence

from facelayers import facs
from facelayers.models import cli
from facelayers.models.ssm import ModelConfig, load_model, resolve_checkpoint
from facelayers.models.ssm.inference import predict_video, read_frames


def write_outputs(res: dict[str, object], cfg: ModelConfig, out_dir: str, fps: float | None, plot: bool = True) -> list[str]:
    """The CSV files (and the AU timeline plot) of one prediction; returns the paths written."""
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


def build_parser() -> argparse.ArgumentParser:
    p = cli.ScriptArgumentParser(prog="predict_video.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", type=cli.existing_path, help="run folder, checkpoint folder or .safetensors file")
    p.add_argument("video", type=cli.existing_path, help="face-cropped video file or folder of frame images")
    p.add_argument("--out", type=cli.output_folder, default="predictions", help="output folder")
    p.add_argument("--window", type=cli.positive_int, default=None, help="expression window in frames (default 2T)")
    p.add_argument("--stride", type=cli.positive_int, default=None, help="expression window step (default window/2)")
    p.add_argument("--fps", type=cli.positive_float, default=None,
                   help="frame rate for the time columns (default: from the video)")
    p.add_argument("--batch", type=cli.positive_int, default=64, help="frames / windows per forward")
    p.add_argument("--device", type=cli.device_arg, default="cpu")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    return p


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    folder, name = resolve_checkpoint(args.checkpoint)  # every argument is checked before the model is built
    model = load_model(folder, name, device=args.device)
    frames, fps = read_frames(args.video)
    fps = args.fps or fps
    res = predict_video(model, frames, window=args.window, stride=args.stride, batch=args.batch, device=args.device)
    for path in write_outputs(res, model.cfg, args.out, fps, plot=not args.no_plot):
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``error: ...`` + exit code 2 for every user error (``--debug``: traceback)."""
    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
