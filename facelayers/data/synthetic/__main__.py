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
import sys
from pathlib import Path


def _figure(argv: list[str]) -> None:
    from .figure import make_figure

    p = argparse.ArgumentParser(prog="python -m facelayers.data.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--figure", required=True, help="output PNG path")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    make_figure(args.figure, image_size=args.image_size, seed=args.seed)
    print(f"wrote {args.figure}")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _pretrain(argv: list[str]) -> None:
    from .pretrain import PretrainRecipe

    d = PretrainRecipe()
    p = argparse.ArgumentParser(prog="python -m facelayers.data.synthetic pretrain-clip",
                                description="Pretrain the default tiny CLIP on synthetic frames with FACS captions.")
    p.add_argument("--out", required=True, help="output .safetensors file (a .json with the recipe goes beside it)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=_positive_int, default=d.steps)
    p.add_argument("--batch", type=_positive_int, default=d.batch_size, help="images (and captions) per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--subjects", type=_positive_int, default=d.num_subjects, help="rendered identities")
    p.add_argument("--subset-p", type=float, default=d.subset_p, help="share of captions naming a subset of the AUs")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads for training (default 1: on a busy 2-core machine 2 threads ran 5x slower)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluation on the benchmark's test data")
    args = p.parse_args(argv)
    recipe = PretrainRecipe(seed=args.seed, steps=args.steps, batch_size=args.batch, lr=args.lr,
                            weight_decay=args.weight_decay, warmup=args.warmup, num_subjects=args.subjects,
                            subset_p=args.subset_p)
    try:
        recipe.validate()
    except ValueError as err:
        p.error(str(err))
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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "pretrain-clip":
        _pretrain(argv[1:])
    else:
        _figure(argv)


if __name__ == "__main__":
    main()
