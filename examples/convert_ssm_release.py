#!/usr/bin/env python
"""Convert a released SSM checkpoint (MSA-LMC/SSM ``.pth``) into a facelayers run folder.

    python examples/convert_ssm_release.py checkpoint.pth --au-dataset bp4d --exp-dataset dfew --out runs/ssm-release
    python examples/predict_video.py runs/ssm-release face_video.mp4 --out predictions/

The ``.pth`` is read WITHOUT executing anything from it (an allowlist unpickler:
``facelayers.models.ssm.release_checkpoint``): the release runner's format (a dict with
``state_dict`` saved through ``nn.DataParallel``, a pickled ``RecorderMeter``, numpy arrays,
optimizer state) and bare state dicts are accepted; any other pickled global is refused by name.
The architecture is read from the weights' shapes, the released model is assembled from facelayers
layers (``facelayers.models.ssm.release``), every release key is mapped and checked (missing /
unexpected keys and shape mismatches are reported by name), and the result is written as
``OUT/model.safetensors`` + ``OUT/model.json`` (what ``facelayers.models.ssm.load_model(OUT)`` and
``examples/predict_video.py`` read).

``--dispatch release`` (default) keeps the release's MoE dispatch bug, so the converted model
reproduces the released outputs; ``--dispatch fixed`` runs the same weights with each token routed to
its own top-2 experts (see docs/release.md). Errors print one line ``error: ...`` and exit with 2 (``--debug``: the traceback).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from facelayers.models.cli import ScriptArgumentParser, UsageError, existing_file, output_folder, run_main

AU_DATASETS = ("bp4d", "disfa")
EXP_DATASETS = ("dfew", "ferv39k", "mafw")
DISPATCHES = ("release", "fixed")


def _choice(kind: str, options: Sequence[str]) -> Any:
    """argparse ``type=``: one of ``options``, case-insensitive (``DFEW`` is ``dfew``)."""
    import argparse

    def parse(value: str) -> str:
        v = value.strip().lower()
        if v not in options:
            raise argparse.ArgumentTypeError(f"unknown {kind} (expected one of {', '.join(options)}, got {value!r})")
        return v

    parse.__name__ = kind
    return parse


def _file_stem(value: str) -> str:
    """argparse ``type=``: a plain file stem (no folder, not hidden): letters, digits, ``_``, ``-``, ``.``."""
    import argparse
    import re

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", value) or value.endswith("."):
        raise argparse.ArgumentTypeError(f"expected a plain file stem (letters, digits, _-., not starting with "
                                         f"'.' or '-'), got {value!r}")
    return value


def build_parser() -> ScriptArgumentParser:
    p = ScriptArgumentParser(prog="convert_ssm_release.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=existing_file, help="the release's .pth (runner checkpoint or bare state dict)")
    p.add_argument("--au-dataset", required=True, type=_choice("AU dataset", AU_DATASETS),
                   help=f"AU dataset of the checkpoint: {', '.join(AU_DATASETS)}")
    p.add_argument("--exp-dataset", required=True, type=_choice("expression dataset", EXP_DATASETS),
                   help=f"expression dataset of the checkpoint: {', '.join(EXP_DATASETS)}")
    p.add_argument("--out", required=True, type=output_folder, help="output run folder (model.safetensors + model.json)")
    p.add_argument("--dispatch", default="release", type=_choice("dispatch", DISPATCHES),
                   help="MoE dispatch: 'release' (default) reproduces the released outputs, bug included; "
                        "'fixed' routes every token to its own experts")
    p.add_argument("--name", default="model", type=_file_stem, help="file stem inside --out (default: model)")
    p.add_argument("--force", action="store_true", help="overwrite an existing converted model in --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _provenance(path: str, checkpoint: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"file": os.path.basename(path), "sha256": _sha256(path)}
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        info["format"] = "release runner checkpoint"
        for key in ("epoch", "best_acc", "best_uar"):
            v = checkpoint.get(key)
            try:
                info[key] = v if v is None or isinstance(v, (int, str)) else float(v)
            except (TypeError, ValueError):
                info[key] = repr(v)
        if checkpoint.get("recorder") is not None:
            info["recorder"] = repr(checkpoint["recorder"])
    else:
        info["format"] = "bare state dict"
    return info


def _main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    from facelayers.models.ssm import release as R
    from facelayers.models.ssm.release_checkpoint import load_release_checkpoint, release_state_dict

    target = os.path.join(args.out, f"{args.name}.safetensors")
    if os.path.exists(target) and not args.force:
        raise UsageError(f"{target} exists (expected a new --out folder or --force, got an existing model)")
    checkpoint = load_release_checkpoint(args.checkpoint)
    sd = release_state_dict(checkpoint, source=args.checkpoint)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    arch = R.infer_release_architecture(sd, args.au_dataset, args.exp_dataset, dispatch=args.dispatch)
    model = R.build_release_model(arch)
    model.load_state_dict(R.convert_release_state_dict(sd, model, source=args.checkpoint), strict=True)
    extra = {"converted_from": _provenance(args.checkpoint, checkpoint), "converted_by": "examples/convert_ssm_release.py"}
    paths = R.save_release_model(model.eval(), args.out, name=args.name, extra=extra)
    print(f"{arch.model_class} {arch.au_dataset}+{arch.expression_dataset}: ViT width {arch.vision_width} x "
          f"{arch.vision_layers} blocks ({arch.image_size} px, patch {arch.patch_size}), MoE blocks "
          f"{list(arch.moe_blocks)}, {len(arch.expressions)} classes, {len(arch.aus)} AUs, dispatch {arch.dispatch!r}")
    for path in paths:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter; user errors print one line ``error: ... (expected ..., got ...)`` and return 2."""
    from facelayers.models.ssm.release import ReleaseConversionError
    from facelayers.models.ssm.release_checkpoint import CheckpointFormatError, UnsafeCheckpointError

    return run_main(_main, argv, extra_errors=(UnsafeCheckpointError, CheckpointFormatError, ReleaseConversionError))


if __name__ == "__main__":
    sys.exit(main())
