"""Zero-shot evaluation of a CLIP backbone: AUs and expressions recognised through text alone.

No training: an image (a frame, or the mean embedding of a clip's frames) is compared by cosine
similarity with the text embeddings of

* AU descriptions (:func:`facelayers.facs.au_descriptions`, optionally inside templates):
  per-AU scores, evaluated by ROC AUC per AU (a threshold-free ranking measure: a cosine has no
  calibrated 0.5);
* expression descriptions in the paper's three styles (:func:`facelayers.facs.expression_descriptions`:
  ``"words"``, ``"standalone"``, ``"compound"``): the most similar description is the prediction,
  evaluated by UAR / WAR.

A model is anything with open_clip's ``encode_image(images [N, 3, H, W]) -> [N, E]`` and
``encode_text(tokens [K, L]) -> [K, E]``. :func:`synthetic_zero_shot` runs both on the held-out
test data of the synthetic benchmark exactly as the reference recipe builds it. See
``docs/zeroshot.md``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import facs
from .metrics import au_auc, per_class_recall, uar, war

__all__ = [
    "au_prompt_embeddings",
    "clip_embeddings",
    "encode_texts",
    "expression_prompt_embeddings",
    "frame_embeddings",
    "lab_zero_shot_auc",
    "main",
    "synthetic_timeline_figure",
    "plot_zero_shot_timeline",
    "synthetic_zero_shot",
    "zero_shot_au",
    "zero_shot_au_metrics",
    "zero_shot_expression",
    "zero_shot_expression_metrics",
]


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def encode_texts(model: nn.Module, texts: Sequence[str], *, context_length: int | None = None) -> Tensor:
    """Normalised text embeddings ``[K, E]`` of ``texts`` (open_clip tokenizer)."""
    import open_clip

    if not texts:
        raise ValueError("encode_texts needs at least one text (expected K >= 1, got 0)")
    ctx = context_length or int(getattr(model, "context_length", 77))
    tokens = open_clip.tokenize(list(texts), context_length=ctx).to(_device(model))
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


def au_prompt_embeddings(model: nn.Module, aus: Sequence[int], *, templates: Sequence[str] = ("{}",)) -> Tensor:
    """``[M, E]`` normalised AU text prototypes: the mean over ``templates`` of the embeddings of
    ``template.format(AU description)`` (Table S4 wording), renormalised."""
    names = facs.au_descriptions(aus)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates must be format strings with one '{{}}' (got {list(templates)!r})")
    emb = torch.stack([encode_texts(model, [t.format(n) for n in names]) for t in templates]).mean(0)
    return F.normalize(emb, dim=-1)


def expression_prompt_embeddings(model: nn.Module, expressions: Sequence[str], style: str = "compound") -> Tensor:
    """``[K, E]`` normalised expression text prototypes (:func:`facelayers.facs.expression_descriptions`)."""
    return encode_texts(model, facs.expression_descriptions(expressions, style=style))


@torch.no_grad()
def frame_embeddings(model: nn.Module, images: Tensor, *, batch_size: int = 512) -> Tensor:
    """Normalised image embeddings ``[N, E]`` of frames ``[N, 3, H, W]`` (already normalised as the
    model expects)."""
    if images.dim() != 4:
        raise ValueError(f"images must be [N, 3, H, W] (expected 4 dims, got {list(images.shape)})")
    dev = _device(model)
    out = [F.normalize(model.encode_image(images[i:i + batch_size].to(dev)).float(), dim=-1)
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def clip_embeddings(model: nn.Module, clips: Tensor, *, batch_size: int = 512) -> Tensor:
    """``[N, E]``: the renormalised mean of the frame embeddings of each clip ``[N, T, 3, H, W]``."""
    if clips.dim() != 5:
        raise ValueError(f"clips must be [N, T, 3, H, W] (expected 5 dims, got {list(clips.shape)})")
    n, t = clips.shape[:2]
    emb = frame_embeddings(model, clips.reshape(n * t, *clips.shape[2:]), batch_size=batch_size)
    return F.normalize(emb.reshape(n, t, -1).mean(1), dim=-1)


def zero_shot_au_metrics(scores: Tensor, labels: Tensor) -> dict[str, Any]:
    """Per-AU ROC AUC of zero-shot scores.

    Args:
        scores: ``[N, M]`` cosine similarities (any real scores: only their order matters).
        labels: ``[N, M]`` 0/1.

    Returns:
        ``{"per_au": float64 [M], "mean": float}`` (an AU with one class only: NaN, left out of the mean).

    Examples::

        >>> s = torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.8, 0.2]])
        >>> zero_shot_au_metrics(s, torch.tensor([[1, 0], [0, 1], [1, 0]]))["mean"]
        1.0
    """
    if scores.shape != labels.shape or scores.dim() != 2:
        raise ValueError(f"scores and labels must both be [N, M] (got {list(scores.shape)} and {list(labels.shape)})")
    s = scores.detach().double().cpu()
    lo, hi = s.min(), s.max()
    probs = (s - lo) / (hi - lo) if float(hi - lo) > 0 else torch.full_like(s, 0.5)  # monotone map into [0, 1]
    return au_auc(probs, labels.cpu())


def zero_shot_expression_metrics(logits: Tensor, labels: Tensor, num_classes: int) -> dict[str, Any]:
    """UAR, WAR and per-class recall of the argmax of ``logits [N, K]`` against ``labels [N]``.

    Examples::

        >>> zero_shot_expression_metrics(torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0]]),
        ...                              torch.tensor([0, 1, 1]), 2)["uar"]
        0.75
    """
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be [N, K] with N = len(labels) (got {list(logits.shape)} and "
                         f"{list(labels.shape)})")
    pred = logits.argmax(-1).cpu()
    labels = labels.cpu()
    return {"uar": uar(pred, labels, num_classes), "war": war(pred, labels),
            "per_class_recall": per_class_recall(pred, labels, num_classes).tolist()}


def _stack_items(dataset: Any, key: str, *, center: bool) -> tuple[Tensor, Tensor]:
    clips, labels = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        clip = item["clip"]
        if center:
            lab = item["labels"]
            if lab.dim() != 1:
                raise ValueError(f"zero_shot_au needs centre-frame labels (label_mode='center': expected labels [M], "
                                 f"got {list(lab.shape)})")
            clips.append(clip[clip.shape[0] // 2])
            labels.append(lab)
        else:
            clips.append(clip)
            labels.append(item[key])
    return torch.stack(clips), torch.stack(labels)


def zero_shot_au(model: nn.Module, dataset: Any, aus: Sequence[int], *, templates: Sequence[str] = ("{}",),
                 batch_size: int = 512) -> dict[str, Any]:
    """Zero-shot AU detection on an AU clip dataset (items ``clip [T, 3, H, W]``, ``labels [M]``):
    the centre frame of every window is scored against every AU prompt.

    With ``eval_cover=True`` (one window centred on each frame) every frame is scored once.

    Returns:
        ``{"per_au": [M], "mean": float, "aus": [...], "scores": [N, M], "labels": [N, M]}``.
    """
    frames, labels = _stack_items(dataset, "labels", center=True)
    text = au_prompt_embeddings(model, aus, templates=templates)
    scores = frame_embeddings(model, frames, batch_size=batch_size) @ text.t()
    out = zero_shot_au_metrics(scores.cpu(), labels)
    out["per_au"] = out["per_au"].tolist()
    return {**out, "aus": [int(a) for a in aus], "scores": scores.cpu(), "labels": labels}


def zero_shot_expression(model: nn.Module, dataset: Any, expressions: Sequence[str], *,
                         styles: Sequence[str] = facs.DESCRIPTION_STYLES, batch_size: int = 512) -> dict[str, Any]:
    """Zero-shot expression recognition on an expression clip dataset (items ``clip [T, 3, H, W]``,
    ``label []``): each clip's mean frame embedding against the descriptions of each style.

    Returns:
        ``{style: {"uar", "war", "per_class_recall"}}`` for each style.
    """
    clips, labels = _stack_items(dataset, "label", center=False)
    emb = clip_embeddings(model, clips, batch_size=batch_size)
    out = {}
    for style in styles:
        text = expression_prompt_embeddings(model, expressions, style)
        out[style] = zero_shot_expression_metrics((emb @ text.t()).cpu(), labels, len(expressions))
    return out


def synthetic_zero_shot(model: nn.Module, *, data_seed: int = 0, fold: int = 1, frames: int = 4,
                        image_size: int | None = None, size: float = 1.0, class_balance: str = "uniform",
                        nuisance: float | None = 0.5, au_dataset: str = "bp4d", exp_dataset: str = "dfew",
                        templates: Sequence[str] = ("{}",), tasks: Sequence[str] = ("exp", "au")) -> dict[str, Any]:
    """Zero-shot AU AUC and expression UAR on the synthetic benchmark's held-out test data.

    The test sets are built by :func:`facelayers.models.ssm.data.build_synthetic_datasets` with the
    reference recipe's defaults (``--data-seed 0 --fold 1 --synthetic-balance uniform
    --synthetic-nuisance 0.5``, 4 frames), so the numbers refer to the same clips and frames the
    reference model is tested on.

    Returns:
        ``{"au": {"per_au", "mean", "aus"}, "exp": {style: {"uar", "war", "per_class_recall"}},
        "expressions": [...], "sizes": {...}}``.
    """
    from facelayers.models.ssm.data import build_synthetic_datasets

    if image_size is None:
        img = model.visual.image_size
        image_size = int(img[0] if isinstance(img, (tuple, list)) else img)
    bundle = build_synthetic_datasets(frames=frames, image_size=image_size, seed=data_seed, fold=fold, quick=False,
                                      size=size, val_fraction=0.15, au_dataset=au_dataset, exp_dataset=exp_dataset,
                                      tasks=tuple(tasks), class_balance=class_balance, nuisance=nuisance)
    out: dict[str, Any] = {"expressions": list(bundle.expressions), "aus": list(bundle.aus), "sizes": {}}
    if "au" in tasks:
        au = zero_shot_au(model, bundle.test["au"], bundle.aus, templates=templates)
        out["au"] = {k: au[k] for k in ("per_au", "mean", "aus")}
        out["sizes"]["au_frames"] = int(au["labels"].shape[0])
    if "exp" in tasks:
        out["exp"] = zero_shot_expression(model, bundle.test["exp"], bundle.expressions)
        out["sizes"]["exp_clips"] = len(bundle.test["exp"])
    return out


def lab_zero_shot_auc(model: nn.Module, *, subjects: Sequence[int] = (0,), seed: int = 0,
                      aus: Sequence[int] = facs.BP4D_AUS, sequence_length: int = 48,
                      templates: Sequence[str] = ("{}",)) -> dict[str, Any]:
    """Zero-shot AU AUC on a few rendered lab takes (one take per subject, every frame), without
    building a whole benchmark: a quick, fixed check of a CLIP's AU semantics (the shipped tiny
    CLIP records its value; ``tests/test_tiny_facs.py`` reproduces it).

    Returns:
        ``{"per_au": [M], "mean": float, "frames": int}``.
    """
    from facelayers.data.synthetic import generate_lab_sequences
    from facelayers.data.transforms import ClipNormalize

    img = model.visual.image_size
    size = int(img[0] if isinstance(img, (tuple, list)) else img)
    data = generate_lab_sequences(list(subjects), aus=aus, sequences_per_subject=1, sequence_length=sequence_length,
                                  image_size=size, seed=seed)
    frames = ClipNormalize()(data.frames.float() / 255.0)
    text = au_prompt_embeddings(model, aus, templates=templates)
    scores = frame_embeddings(model, frames) @ text.t()
    out = zero_shot_au_metrics(scores.cpu(), data.labels)
    return {"per_au": out["per_au"].tolist(), "mean": out["mean"], "frames": int(frames.shape[0])}


def plot_zero_shot_timeline(scores: Tensor, labels: Tensor, aus: Sequence[int], *,
                            path: str | os.PathLike[str] | None = None, title: str | None = None) -> Any:
    """One row per AU: the zero-shot score over the frames of a take (line, min-max scaled per AU)
    over the ground-truth active frames (shaded).

    Args:
        scores: ``[T, M]`` zero-shot scores (cosines).
        labels: ``[T, M]`` 0/1 ground truth.
        aus: the ``M`` AU codes.
        path: optional PNG path.
        title: optional figure title.

    Returns:
        The matplotlib figure.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if scores.shape != labels.shape or scores.dim() != 2 or scores.shape[1] != len(aus):
        raise ValueError(f"scores and labels must be [T, {len(aus)}] (got {list(scores.shape)} and {list(labels.shape)})")
    s = scores.detach().double().cpu()
    lo, hi = s.min(0).values, s.max(0).values
    s = (s - lo) / (hi - lo).clamp_min(1e-12)
    t = torch.arange(s.shape[0])
    m = len(aus)
    fig, axes = plt.subplots(m, 1, figsize=(8, 0.55 * m + 0.8), sharex=True)
    axes = [axes] if m == 1 else list(axes)
    for j, (ax, a) in enumerate(zip(axes, aus)):
        ax.fill_between(t.numpy(), 0, labels[:, j].float().numpy(), step="mid", color="tab:orange", alpha=0.35,
                        linewidth=0)
        ax.plot(t.numpy(), s[:, j].numpy(), color="tab:blue", linewidth=1.0)
        ax.set_ylim(-0.05, 1.05)
        ax.set_yticks([])
        ax.set_ylabel(facs.au_label(a), rotation=0, ha="right", va="center", fontsize=8)
    axes[-1].set_xlabel("frame")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(h_pad=0.1)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def synthetic_timeline_figure(model: nn.Module, path: str | os.PathLike[str], *, take: int = 0, data_seed: int = 0,
                              fold: int = 1, au_dataset: str = "bp4d", title: str | None = None) -> dict[str, Any]:
    """Plot :func:`plot_zero_shot_timeline` for one take of the synthetic benchmark's AU test split
    (the subjects :func:`synthetic_zero_shot` evaluates); returns the take's per-AU AUC."""
    from facelayers.data.transforms import ClipNormalize
    from facelayers.models.ssm.data import build_synthetic_datasets

    img = model.visual.image_size
    size = int(img[0] if isinstance(img, (tuple, list)) else img)
    bundle = build_synthetic_datasets(frames=4, image_size=size, seed=data_seed, fold=fold, quick=False, size=1.0,
                                      val_fraction=0.15, au_dataset=au_dataset, tasks=("au",))
    data = bundle.test["au"].data
    if not 0 <= take < len(data.starts):
        raise ValueError(f"take must be in [0, {len(data.starts) - 1}] (got {take})")
    rows = slice(data.starts[take], data.starts[take] + data.lengths[take])
    frames = ClipNormalize()(data.frames[rows].float() / 255.0)
    text = au_prompt_embeddings(model, bundle.aus)
    scores = (frame_embeddings(model, frames) @ text.t()).cpu()
    labels = data.labels[rows]
    plot_zero_shot_timeline(scores, labels, bundle.aus, path=path, title=title)
    out = zero_shot_au_metrics(scores, labels)
    return {"per_au": out["per_au"].tolist(), "mean": out["mean"], "subject": data.subjects[take],
            "frames": int(labels.shape[0])}


def _cli(argv: list[str]) -> dict[str, Any]:
    import argparse
    import json

    from facelayers.models import cli

    def png(text: str) -> str:
        path = cli.output_file(text)
        if os.path.splitext(path)[1].lower() not in (".png", ".jpg", ".jpeg", ".pdf", ".svg"):
            raise argparse.ArgumentTypeError(f"expected an image file name ending in .png, .jpg, .jpeg, .pdf or .svg, "
                                             f"got {text!r}")
        return path

    p = cli.ScriptArgumentParser(prog="python -m facelayers.zeroshot", description=main.__doc__)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", default=None, type=cli.existing_file,
                   help="compact CLIP checkpoint (default: the shipped tiny FACS CLIP)")
    g.add_argument("--random", action="store_true", help="a random-init default tiny CLIP (seed --seed)")
    p.add_argument("--seed", type=cli.nonnegative_int, default=None, help="seed of --random (default 0)")
    p.add_argument("--figure", default=None, type=png, help="PNG of zero-shot AU scores over one test take")
    p.add_argument("--json", default=None, type=cli.output_file, help="write the numbers here")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    args = p.parse_args(argv)
    if args.seed is not None and not args.random:
        raise cli.UsageError(f"--seed only seeds --random (expected --random with --seed, got --seed {args.seed} "
                             "without --random)")
    torch.set_num_threads(1)
    if args.random:
        import open_clip

        from facelayers.models.ssm.config import TINY_CLIP

        seed = args.seed or 0
        torch.manual_seed(seed)
        model, name = open_clip.CLIP(**TINY_CLIP).eval(), f"random tiny CLIP (seed {seed})"
    else:
        from facelayers.assets import TINY_FACS_CLIP, load_compact_clip
        from facelayers.io import check_finite_tensors, inspect_safetensors

        path = args.checkpoint or TINY_FACS_CLIP
        if args.checkpoint:  # a one-line error naming the file for an empty / truncated / pickled / NaN file
            inspect_safetensors(path)
            check_finite_tensors(path)
        model = load_compact_clip(path)
        name = os.path.basename(str(path)) if args.checkpoint else "tiny FACS CLIP (shipped)"
    out = synthetic_zero_shot(model)
    print(f"{name}: AU AUC {out['au']['mean']:.3f} | expression UAR "
          + " | ".join(f"{k} {v['uar']:.3f}" for k, v in out["exp"].items()))
    print("  per AU: " + " ".join(f"{facs.au_label(a)} {v:.2f}" for a, v in zip(out["aus"], out["au"]["per_au"])))
    if args.figure:
        out["timeline"] = synthetic_timeline_figure(model, args.figure, title=f"zero-shot AU scores, {name}")
        print(f"wrote {args.figure}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m facelayers.zeroshot [--checkpoint FILE | --random] [--figure PNG] [--json FILE]``:
    zero-shot numbers of the shipped tiny FACS CLIP (default), a compact checkpoint, or a random
    tiny CLIP on the synthetic benchmark's test data. Returns the numbers; a user error prints ONE
    line ``error: ... (expected ..., got ...)`` on stderr and exits with status 2 (``--debug``: the
    traceback)."""
    import sys

    from facelayers.assets import CompactCheckpointError
    from facelayers.models import cli

    result: dict[str, Any] = {}

    def run(args_: list[str]) -> int:
        result.update(_cli(args_))
        return 0

    rc = cli.run_main(run, list(sys.argv[1:] if argv is None else argv), extra_errors=(CompactCheckpointError,))
    if rc:
        raise SystemExit(rc)
    return result


if __name__ == "__main__":
    main()
