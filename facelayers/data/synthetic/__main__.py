"""Command line of the synthetic benchmark.

``python -m facelayers.data.synthetic --figure docs/images/synthetic_samples.png``: the sample figure.

``python -m facelayers.data.synthetic pretrain-clip --out FILE``: contrastive pretraining of the
default tiny CLIP on synthetic frames with FACS captions (``docs/zeroshot.md``); writes the compact
safetensors ``FILE``, and ``FILE`` with suffix ``.json``: recipe, loss curve, timings, SHA-256 and
(unless ``--no-eval``) the zero-shot numbers on the benchmark's test data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from facelayers.models import cli

#: largest --image-size of the sample figure (the renderer draws 10^4+ frames of this size)
MAX_FIGURE_IMAGE_SIZE = 512
_FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def _positive_int(text: str) -> int:
    """A positive integer (below 2**63)."""
    try:
        return cli.positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


def _figure_size(text: str) -> int:
    try:
        v = cli.positive_int(text)
    except argparse.ArgumentTypeError:
        v = 0
    if not 4 <= v <= MAX_FIGURE_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"expected an integer in [4, {MAX_FIGURE_IMAGE_SIZE}], got {text!r}")
    return v


def _figure_path(text: str) -> str:
    path = cli.output_file(text)
    if os.path.splitext(path)[1].lower() not in _FIGURE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"expected an image file name ending in {', '.join(_FIGURE_SUFFIXES)}, "
                                             f"got {text!r}")
    return path


def _safetensors_path(text: str) -> str:
    path = cli.output_file(text)
    if not path.endswith(".safetensors"):
        raise argparse.ArgumentTypeError(f"expected a file name ending in .safetensors, got {text!r}")
    return path


def _figure(argv: list[str]) -> int:
    from .figure import make_figure

    p = cli.ScriptArgumentParser(prog="python -m facelayers.data.synthetic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--figure", required=True, type=_figure_path, help="output PNG path")
    p.add_argument("--image-size", type=_figure_size, default=64, help=f"4..{MAX_FIGURE_IMAGE_SIZE} (default 64)")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    args = p.parse_args(argv)
    make_figure(args.figure, image_size=args.image_size, seed=args.seed)
    print(f"wrote {args.figure}")
    return 0


def _pretrain(argv: list[str]) -> int:
    from .pretrain import PretrainRecipe

    d = PretrainRecipe()
    p = cli.ScriptArgumentParser(prog="python -m facelayers.data.synthetic pretrain-clip",
                                 description="Pretrain the default tiny CLIP on synthetic frames with FACS captions.")
    p.add_argument("--out", required=True, type=_safetensors_path,
                   help="output .safetensors file (a .json with the recipe goes beside it)")
    p.add_argument("--seed", type=cli.nonnegative_int, default=d.seed)
    p.add_argument("--steps", type=_positive_int, default=d.steps)
    p.add_argument("--batch", type=_positive_int, default=d.batch_size, help="images (and captions) per step (>= 2)")
    p.add_argument("--lr", type=cli.positive_float, default=d.lr)
    p.add_argument("--weight-decay", type=cli.nonnegative_float, default=d.weight_decay)
    p.add_argument("--warmup", type=cli.nonnegative_int, default=d.warmup)
    p.add_argument("--subjects", type=_positive_int, default=d.num_subjects, help="rendered identities")
    p.add_argument("--subset-p", type=_unit_closed, default=d.subset_p,
                   help="share of captions naming a subset of the AUs")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads for training (default 1: on a busy 2-core machine 2 threads ran 5x slower)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluation on the benchmark's test data")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    args = p.parse_args(argv)
    recipe = PretrainRecipe(seed=args.seed, steps=args.steps, batch_size=args.batch, lr=args.lr,
                            weight_decay=args.weight_decay, warmup=args.warmup, num_subjects=args.subjects,
                            subset_p=args.subset_p)
    try:
        recipe.validate()
    except ValueError as err:
        raise cli.UsageError(str(err)) from None
    from facelayers.assets import file_sha256, save_compact_clip

    from .pretrain import pretrain_tiny_clip

    model, info = pretrain_tiny_clip(recipe, progress=not args.no_progress, threads=args.threads)
    out = Path(args.out)
    save_compact_clip(model, out, clip_kwargs=recipe.resolved_clip_kwargs(), token_seed=recipe.seed,
                      info={"recipe": info["recipe"]})
    record = {**info, "file": out.name, "bytes": out.stat().st_size, "sha256": file_sha256(out),
              "command": "python -m facelayers.data.synthetic pretrain-clip " + " ".join(argv)}
    if not args.no_eval:
        import torch

        from facelayers.zeroshot import synthetic_zero_shot

        torch.set_num_threads(args.threads)
        zs = synthetic_zero_shot(model)
        record["zero_shot"] = zs
        print(f"zero-shot AU AUC {zs['au']['mean']:.3f}; expression UAR "
              + ", ".join(f"{k} {v['uar']:.3f}" for k, v in zs["exp"].items()))
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({record['bytes']} bytes, sha256 {record['sha256']}) and {out.with_suffix('.json')}")
    return 0


def _unit_closed(text: str) -> float:
    v = cli.finite_float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "pretrain-clip":
        return _pretrain(argv[1:])
    if argv and not argv[0].startswith("-"):
        raise cli.UsageError(f"unknown command (expected 'pretrain-clip' or --figure, got {argv[0]!r})")
    return _figure(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point; a user error prints ONE line ``error: ... (expected ..., got ...)`` on stderr and
    exits with status 2 (``--debug``: the traceback)."""
    rc = cli.run_main(_main, list(sys.argv[1:] if argv is None else argv))
    if rc:
        raise SystemExit(rc)


if __name__ == "__main__":
    main()
