"""``python -m facelayers.data.synthetic --figure docs/images/synthetic_samples.png``."""

from __future__ import annotations

import argparse

from .figure import make_figure


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m facelayers.data.synthetic", description=__doc__)
    p.add_argument("--figure", required=True, help="output PNG path")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    make_figure(args.figure, image_size=args.image_size, seed=args.seed)
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
