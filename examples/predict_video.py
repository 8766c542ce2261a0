#!/usr/bin/env python
"""Per-frame AU probabilities and windowed expression probabilities for one video.

    python examples/predict_video.py runs/ssm-seed0 interview.mp4 --out predictions/
    python examples/predict_video.py runs/ssm-seed0/checkpoint frames_folder/ --out predictions/
    python examples/predict_video.py released/ group.mp4 --all-faces --out predictions/

Input: a video file (decoded with PyAV) or a folder of frame images (natural order): either a raw
video (faces are detected, tracked and aligned first: the face stage, ``facelayers.faces``) or a
video that is already face-cropped. Checkpoint: a run folder (uses ``checkpoint/best``), a
checkpoint folder, a ``.safetensors`` file saved by ``ssm_reference.py`` (its ``.json`` beside it),
or the folder of a released checkpoint converted by ``convert_ssm_release.py``. The checkpoint is
checked before it runs (``facelayers.models.ssm.load_model``: config vs weights, vocabularies,
shapes, finite values).

Face detection (``--detect-faces`` / ``--no-detect-faces``; default: automatic). Automatic means:
on when the ``faces`` extra (facenet-pytorch) is installed and the input is not already a face
crop. The input counts as a crop when its frames are no larger than the model's input size, or
when, in at least half of 5 frames spread over the video, the largest face MTCNN finds covers at
least a quarter of the frame (``facelayers.faces.looks_like_face_crop``). Without the extra,
automatic means off (a note says so); ``--detect-faces`` without it is an error. With detection,
the model sees the aligned ``S x S`` crops of the main face (``S``: the model's input size;
``--all-faces``: every face, one output folder each); a frame without the face keeps its row with
empty values and ``face = 0`` (its window neighbours use the nearest frame with the face, never an
empty crop). A video in which no face is found at all is an error.

Outputs in ``--out`` (with ``--all-faces``: in ``--out/face{id}/``, id 0 = the main face):

* ``au_probs.csv``: one row per input frame (``frame``, ``time_s``, with face detection the face
  columns ``face``, ``face_score``, ``face_x1 .. face_y2`` and the five landmarks in frame pixels,
  then ``AU01``, ``AU02``, ...). Frame ``t`` is the centre of a ``T``-frame window
  ``t - T//2 .. t + T - 1 - T//2`` (edge frames repeated at the ends), exactly how the model was
  trained (paper eq. 5).
* ``expression_probs.csv``: one row per sliding window (``start``, ``end``, ``start_s``, ``end_s``,
  with face detection ``face_frames`` (how many of the ``T`` sampled frames have the face; the
  probabilities are empty when none has), one probability column per expression, ``top``): ``T``
  frames sampled at segment centres of each ``--window``-frame window, every ``--stride`` frames
  (``--stride`` larger than the window is an error: frames would get no prediction). A window
  longer than the video is one window over the whole video, and a video shorter than ``T``
  repeats frames to fill it; a note on stderr says so when it happens.
* ``au_timeline.png``: the AU probabilities over time (needs matplotlib); frames without a face
  are gaps.
* with face detection: ``faces.csv`` (the face columns, one row per frame) and ``face_crops.png``
  (a contact sheet of what the model saw: crops spread over the video, the alignment template
  as green crosses, the detected landmarks as red dots, grey tiles where no face was found).

The work is done by ``facelayers.faces.detect_align_track`` and
``facelayers.models.ssm.inference.predict_video`` (every frame is encoded once per task; windows
reuse the frame features). Detection and the model run on ``--device``. A bad argument or file
prints ``error: ...`` and exits with code 2 (``--debug`` shows the traceback). See docs/video.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence

import torch

from facelayers import facs
from facelayers import faces as face_stage
from facelayers.models import cli
from facelayers.models.ssm import ModelConfig, load_model, resolve_checkpoint, verify_checkpoint
from facelayers.models.ssm.inference import predict_video, read_frames
from facelayers.models.ssm.release import is_release_checkpoint


def _cell(v: float) -> str:
    return "" if v != v else f"{v:.5f}"  # NaN (no face) -> empty cell


def write_outputs(res: dict[str, object], cfg: ModelConfig, out_dir: str, fps: float | None, plot: bool = True,
                  track: face_stage.FaceTrack | None = None) -> list[str]:
    """The CSV files (and the AU timeline plot) of one prediction; returns the paths written.

    With a ``track`` (face detection), the face columns are added to ``au_probs.csv``, a
    ``face_frames`` column to ``expression_probs.csv``, and ``faces.csv`` + ``face_crops.png`` are
    written; NaN probabilities (no face) are written as empty cells."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    face_rows = track.rows() if track is not None else None
    face_cols = list(face_stage.FACE_COLUMNS) if track is not None else []
    au_probs = res["au_probs"]
    if au_probs is not None:
        cols = [facs.au_label(a) for a in cfg.aus]
        path = os.path.join(out_dir, "au_probs.csv")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["frame", "time_s", *face_cols, *cols])
            for i, row in enumerate(au_probs.tolist()):
                face = [face_rows[i][c] for c in face_cols] if face_rows is not None else []
                w.writerow([i, f"{i / fps:.3f}" if fps else "", *face, *[_cell(v) for v in row]])
        written.append(path)
        if plot:
            try:
                from facelayers.viz import plot_au_timeline

                p = os.path.join(out_dir, "au_timeline.png")
                title = "AU probabilities per frame" + (" (gaps: no face)" if track is not None else "")
                plot_au_timeline(au_probs, list(cfg.aus), fps=fps, path=p, title=title)
                written.append(p)
            except ImportError as err:
                print(f"warning: no plot ({err})", file=sys.stderr)
    if res["exp_probs"] is not None:
        path = os.path.join(out_dir, "expression_probs.csv")
        counts = res.get("exp_face_frames")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["start", "end", "start_s", "end_s", *(["face_frames"] if track is not None else []),
                        *cfg.expressions, "top"])
            for k, ((s, e), row) in enumerate(zip(res["exp_windows"], res["exp_probs"].tolist())):
                known = all(v == v for v in row)
                top = cfg.expressions[max(range(len(row)), key=row.__getitem__)] if known else ""
                w.writerow([s, e, f"{s / fps:.3f}" if fps else "", f"{e / fps:.3f}" if fps else "",
                            *([int(counts[k])] if track is not None else []), *[_cell(v) for v in row], top])
        written.append(path)
    if track is not None:
        written.append(face_stage.write_face_csv(os.path.join(out_dir, "faces.csv"), track, fps=fps))
        tile = max(96, min(track.size, 128))  # tiles of tiny-model crops are enlarged so they can be read
        written.append(face_stage.save_contact_sheet(track, os.path.join(out_dir, "face_crops.png"), tile=tile))
    return written


def build_parser() -> argparse.ArgumentParser:
    p = cli.ScriptArgumentParser(prog="predict_video.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", type=cli.existing_path, help="run folder, checkpoint folder or .safetensors file")
    p.add_argument("video", type=cli.existing_path,
                   help="video file or folder of frame images (raw: faces are detected; or already face-cropped)")
    p.add_argument("--out", type=cli.output_folder, default="predictions", help="output folder")
    p.add_argument("--window", type=cli.positive_int, default=None, help="expression window in frames (default 2T)")
    p.add_argument("--stride", type=cli.positive_int, default=None, help="expression window step, at most the window (default window/2)")
    p.add_argument("--fps", type=cli.positive_float, default=None,
                   help="frame rate for the time columns (default: from the video)")
    p.add_argument("--batch", type=cli.positive_int, default=64, help="frames / windows per forward")
    p.add_argument("--device", type=cli.device_arg, default="cpu", help="where detection and the model run")
    p.add_argument("--detect-faces", action=argparse.BooleanOptionalAction, default=None,
                   help="detect, track and align faces before the model (default: automatic = on when the "
                        "'faces' extra is installed and the input is not already a face crop: a crop has frames "
                        "no larger than the model's input, or a face covering >= 1/4 of the frame in at least "
                        "half of 5 sampled frames)")
    p.add_argument("--all-faces", action="store_true",
                   help="one set of outputs per face track, in OUT/face{id}/ (implies face detection)")
    p.add_argument("--face-margin", type=cli.nonnegative_float, default=None,
                   help=f"context around the aligned face, as a fraction of the ArcFace crop "
                        f"(default {face_stage.DEFAULT_MARGIN})")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    return p


def _check_window_args(args: argparse.Namespace) -> None:
    """``--stride`` larger than ``--window`` (both given) would leave frames without an expression
    prediction: refused before anything is loaded."""
    if args.window is not None and args.stride is not None and args.stride > args.window:
        raise cli.UsageError(f"--stride: larger than --window leaves frames without a window "
                             f"(expected stride <= {args.window}, got {args.stride})")


def plan_windows(args: argparse.Namespace, tasks: Sequence[str], num_frames: int,
                 n: int) -> tuple[int | None, int | None, list[str]]:
    """The expression ``(window, stride, notes)`` for a video of ``n`` frames and a
    ``num_frames``-frame model (``None, None, []`` without the expression task); ``notes`` (printed
    on stderr once the input is known to be usable) state the two short-video rules of
    ``expression_windows`` when they apply (one window over the whole video; frames repeated).

    Raises:
        UsageError: ``--window`` / ``--stride`` given for a model without the expression task, or
            a stride larger than the (default) window.
    """
    if "exp" not in tasks:
        for flag, v in (("--window", args.window), ("--stride", args.stride)):
            if v is not None:
                raise cli.UsageError(f"{flag}: has no effect for a model without the expression task "
                                     f"(expected a model with tasks including exp, got tasks {' '.join(tasks)})")
        return None, None, []
    window = args.window or 2 * num_frames
    stride = args.stride or max(1, window // 2)
    if stride > window:
        raise cli.UsageError(f"--stride: larger than the window ({window} frames = 2 T by default) leaves frames "
                             f"without a window (expected stride <= {window}, got {stride})")
    notes = []
    if window > n:
        notes.append(f"note: the expression window ({window} frames) is longer than the video ({n} frames): "
                     f"one window covers the whole video")
    if min(window, n) < num_frames:
        notes.append(f"note: the video has {n} frame(s), fewer than the model's T = {num_frames}: frames are "
                     f"repeated to fill each window")
    return window, stride, notes


def _check_face_args(args: argparse.Namespace) -> None:
    """Contradictory face options (before anything is loaded)."""
    if args.detect_faces is False:
        for flag, given in (("--all-faces", args.all_faces), ("--face-margin", args.face_margin is not None)):
            if given:
                raise cli.UsageError(f"{flag} needs face detection (expected --detect-faces or no face "
                                     f"option, got {flag} with --no-detect-faces)")
    if args.detect_faces or args.all_faces:
        face_stage.require_facenet()  # FacesExtraMissingError: names pip install "facelayers[faces]"


def decide_face_detection(args: argparse.Namespace, frames: torch.Tensor,
                          image_size: int) -> tuple[bool, str, face_stage.FaceDetector | None]:
    """Whether to run the face stage, why (the rule of ``--help`` / docs/video.md), and the
    detector (built once, reused by the crop check and the face stage)."""
    if args.detect_faces is False:
        return False, "--no-detect-faces", None
    if args.detect_faces or args.all_faces:
        return True, "asked for", face_stage.MTCNNDetector(device=args.device)
    h, w = frames.shape[-2:]
    if h <= image_size and w <= image_size:
        return False, f"frames of {w}x{h} are no larger than the model's input ({image_size}): taken as face crops", None
    try:
        detector = face_stage.MTCNNDetector(device=args.device)
    except face_stage.FacesExtraMissingError:
        return False, 'the faces extra is not installed: pip install "facelayers[faces]" to detect faces', None
    if face_stage.looks_like_face_crop(frames, detector=detector, device=args.device):
        return False, "the input looks like a face crop: the face fills the frame", None
    return True, "raw video", detector


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _check_window_args(args)
    _check_face_args(args)
    folder, name = resolve_checkpoint(args.checkpoint)
    if not is_release_checkpoint(folder, name):  # a converted released model is checked by its own loader
        verify_checkpoint(folder, name)  # config vs weights metadata, before anything is built or decoded
    frames, fps = read_frames(args.video)
    model = load_model(folder, name, device=args.device)  # shapes and finite values checked here
    fps = args.fps or fps
    cfg = model.cfg
    window, stride, notes = plan_windows(args, model.tasks, cfg.num_frames, frames.shape[0])
    detect, why, detector = decide_face_detection(args, frames, cfg.image_size)
    if not detect:
        if args.detect_faces is None:
            print(f"note: face detection off ({why}; --detect-faces to force it)", file=sys.stderr)
        for note in notes:
            print(note, file=sys.stderr)
        res = predict_video(model, frames, window=window, stride=stride, batch=args.batch, device=args.device)
        for path in write_outputs(res, cfg, args.out, fps, plot=not args.no_plot):
            print(path)
        return 0
    margin = face_stage.DEFAULT_MARGIN if args.face_margin is None else args.face_margin
    try:
        tracks = face_stage.detect_align_track(frames, size=cfg.image_size, margin=margin, all_faces=args.all_faces,
                                               device=args.device, detector=detector)
    except face_stage.NoFaceError as err:
        hint = "; if it is already a face crop, run with --no-detect-faces" if args.detect_faces is None and not args.all_faces else ""
        raise face_stage.NoFaceError(f"{args.video}: {err}{hint}") from None
    for note in notes:
        print(note, file=sys.stderr)
    for track in tracks:
        out = os.path.join(args.out, f"face{track.track_id}") if args.all_faces else args.out
        res = predict_video(model, track.crops, window=window, stride=stride, batch=args.batch,
                            device=args.device, present=track.present)
        print(f"note: face {track.track_id} found in {int(track.present.sum())} of {track.num_frames} frames",
              file=sys.stderr)
        for path in write_outputs(res, cfg, out, fps, plot=not args.no_plot, track=track):
            print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``error: ...`` + exit code 2 for every user error (``--debug``: traceback)."""
    return cli.run_main(_main, argv, extra_errors=(face_stage.NoFaceError, face_stage.FacesExtraMissingError))


if __name__ == "__main__":
    sys.exit(main())
