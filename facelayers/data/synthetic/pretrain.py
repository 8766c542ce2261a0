"""Contrastive pretraining of the default tiny CLIP on synthetic frames with FACS captions.

The recipe (``python -m facelayers.data.synthetic pretrain-clip --out FILE``):

* data: lab frames of :func:`~.captions.generate_captioned_frames` (benchmark seeds disjoint from
  the default benchmark's), every rendered AU labelled, random horizontal flips, CLIP
  normalisation (as the reference recipe feeds its frames);
* text: a fresh random FACS caption per frame and step (:func:`~.captions.caption_frames`);
* loss: :class:`MultiPositiveClipLoss`: a caption is a positive of every image of the batch it is
  true of (:func:`~.captions.caption_positives`), so the many duplicate or overlapping captions
  of a batch are not pushed apart as open_clip's ``ClipLoss`` would;
* model: ``open_clip.CLIP`` with the default tiny config
  (:data:`facelayers.models.ssm.TINY_CLIP`), AdamW with linear warm-up and cosine decay, weight
  decay on weight matrices only. The token embedding starts from a seeded normal draw of its
  own (:func:`facelayers.assets.base_token_embedding`) and gets no weight decay, so only the rows
  of tokens that occur in captions ever change: the compact checkpoint stores just those rows.

See ``docs/zeroshot.md``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .captions import caption_frames, caption_generator, caption_positives, generate_captioned_frames, named_mask

__all__ = [
    "MultiPositiveClipLoss",
    "PretrainRecipe",
    "encode_text_buckets",
    "encode_text_prefix",
    "multi_positive_clip_loss",
    "pretrain_tiny_clip",
    "tokenize_prefix",
]


# ---------------------------------------------------------------------------------------------
# loss


def multi_positive_clip_loss(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor, positives: Tensor | None = None
) -> Tensor:
    """Symmetric contrastive loss with any number of positive captions per image (and images per caption).

    With logits ``L = logit_scale * image_features @ text_features.T`` (``[N, C]``), each image's
    target distribution spreads evenly over its positive captions and each caption's over its
    positive images::

        loss = ( mean_i  -sum_j P_ij / |P_i.| * log_softmax_j(L_i.)
               + mean_j  -sum_i P_ij / |P_.j| * log_softmax_i(L_.j) ) / 2

    With ``positives = I`` (every caption differs) this is exactly open_clip's ``ClipLoss``. An
    image (caption) without any positive has no target and contributes 0 to its side's mean.

    Args:
        image_features: ``[N, D]`` (normalised, as ``ClipLoss`` expects).
        text_features: ``[C, D]``.
        logit_scale: scalar tensor (already exponentiated, as ``CLIP.forward`` returns it).
        positives: ``[N, C]`` bool (``None``: the identity, which needs ``N == C``).

    Returns:
        Scalar loss.

    Examples::

        >>> img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
        >>> pos = torch.eye(4, dtype=torch.bool); pos[0, 1] = pos[1, 0] = True  # captions 0 and 1 agree
        >>> multi_positive_clip_loss(img, txt, torch.tensor(10.0), pos).shape
        torch.Size([])
    """
    if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image_features [N, D] and text_features [C, D] must share D (expected two 2-D tensors with "
                         f"equal last dims, got {list(image_features.shape)} and {list(text_features.shape)})")
    n, c = image_features.shape[0], text_features.shape[0]
    if positives is None:
        if n != c:
            raise ValueError(f"positives=None means one caption per image (expected N == C, got N={n}, C={c})")
        positives = torch.eye(n, dtype=torch.bool, device=image_features.device)
    elif tuple(positives.shape) != (n, c):
        raise ValueError(f"positives must be [N, C] = [{n}, {c}] (expected [{n}, {c}], got {list(positives.shape)})")
    logits = logit_scale * image_features @ text_features.t()
    p = positives.to(logits.dtype)
    q_img = p / p.sum(1, keepdim=True).clamp_min(1.0)
    q_txt = p / p.sum(0, keepdim=True).clamp_min(1.0)
    loss_img = -(q_img * logits.log_softmax(1)).sum(1).mean()
    loss_txt = -(q_txt * logits.log_softmax(0)).sum(0).mean()
    return (loss_img + loss_txt) / 2


class MultiPositiveClipLoss(nn.Module):
    """Module form of :func:`multi_positive_clip_loss` (call signature of open_clip's ``ClipLoss``
    plus ``positives``).

    Shapes: ``image_features [N, D]``, ``text_features [C, D]``, ``logit_scale []``,
    ``positives [N, C]`` bool or ``None`` (identity) -> scalar.
    """

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                positives: Tensor | None = None) -> Tensor:
        return multi_positive_clip_loss(image_features, text_features, logit_scale, positives)


# ---------------------------------------------------------------------------------------------
# text encoding of short captions


def tokenize_prefix(texts: list[str], length: int | None = None, context_length: int = 77) -> Tensor:
    """open_clip tokens of ``texts`` cut to their first ``length`` positions ``[B, length]``
    (``None``: the longest caption's length, end-of-text token included).

    Raises:
        ValueError: a caption whose end-of-text token lies beyond ``length`` (it would be cut).
    """
    import open_clip

    tokens = open_clip.tokenize(texts, context_length=context_length)
    eot = tokens.argmax(-1)
    if length is None:
        length = int(eot.max()) + 1
    if int(eot.max()) >= length:
        i = int(eot.argmax())
        raise ValueError(f"caption {texts[i]!r} needs {int(eot[i]) + 1} tokens (expected <= {length}); "
                         "raise text_length")
    return tokens[:, :length].contiguous()


def encode_text_prefix(model: nn.Module, tokens: Tensor, normalize: bool = False) -> Tensor:
    """``model.encode_text`` for token sequences shorter than the context ``[B, L] -> [B, E]``.

    The text tower is causal and pools at the end-of-text token, so the features of the first
    ``L`` positions do not depend on the padding after them: the result equals
    ``model.encode_text`` of the same tokens padded to the full context (tested), at ``L / 77`` of
    the cost.
    """
    length = tokens.shape[1]
    if length > model.positional_embedding.shape[0]:
        raise ValueError(f"tokens are longer than the context (expected <= {model.positional_embedding.shape[0]}, "
                         f"got {length})")
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def encode_text_buckets(model: nn.Module, tokens: Tensor, buckets: int = 4, normalize: bool = False) -> Tensor:
    """:func:`encode_text_prefix` of length-sorted buckets, each cut to its own longest caption
    ``[B, L] -> [B, E]``: the same features as one call (every caption is encoded independently),
    with less padding to compute when caption lengths vary."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1 (got {buckets})")
    lengths = tokens.argmax(-1) + 1
    order = torch.argsort(lengths, stable=True)
    out = []
    for chunk in torch.tensor_split(order, min(buckets, max(1, tokens.shape[0]))):
        if chunk.numel():
            length = int(lengths[chunk].max())
            out.append(encode_text_prefix(model, tokens[chunk, :length], normalize=normalize))
    feats = torch.cat(out)
    return feats[torch.argsort(order)]


# ---------------------------------------------------------------------------------------------
# recipe and training


@dataclass
class PretrainRecipe:
    """Everything that determines the pretrained weights (stored in the checkpoint metadata).

    ``clip_kwargs`` defaults to :data:`facelayers.models.ssm.TINY_CLIP` (the default tiny CLIP).
    """

    seed: int = 0
    steps: int = 700
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 40
    num_subjects: int = 64
    sequences_per_subject: int = 2
    sequence_length: int = 64
    subset_p: float = 0.5
    flip: bool = True
    text_buckets: int = 4
    clip_kwargs: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved_clip_kwargs(self) -> dict[str, Any]:
        if self.clip_kwargs is not None:
            return copy.deepcopy(self.clip_kwargs)
        from facelayers.models.ssm.config import TINY_CLIP

        return copy.deepcopy(TINY_CLIP)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "num_subjects", "sequences_per_subject", "sequence_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int (expected >= 1, got {v!r})")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0 (expected > 0, got {self.lr!r})")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2: the contrastive loss of one image-caption pair is 0 "
                             f"(expected >= 2, got {self.batch_size!r})")
        if not 0.0 <= self.subset_p <= 1.0:
            raise ValueError(f"subset_p must be in [0, 1] (expected 0 <= p <= 1, got {self.subset_p!r})")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (expected >= 0, got {self.warmup!r})")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0 (expected >= 0, got {self.weight_decay!r})")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["clip_kwargs"] = self.resolved_clip_kwargs()
        return d


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on 2-D+ weight matrices only; never on the token embedding (its unused rows
    must stay at the seeded init), positional / class embeddings, norms, biases, logit scale."""
    no_decay_names = ("token_embedding", "positional_embedding", "class_embedding", "logit_scale")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or any(k in name for k in no_decay_names):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(warmup: int, steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def pretrain_tiny_clip(
    recipe: PretrainRecipe | None = None,
    *,
    progress: bool = True,
    threads: int | None = None,
    log: Callable[[str], None] | None = print,
) -> tuple[nn.Module, dict[str, Any]]:
    """Pretrain the default tiny CLIP on captioned synthetic lab frames (CPU, seeded).

    Args:
        recipe: the recipe (default :class:`PretrainRecipe`).
        progress: tqdm progress bar.
        threads: ``torch.set_num_threads`` for the training (rendering always runs single-threaded).
        log: where to print stage messages (``None``: silent).

    Returns:
        ``(model, info)``: the trained ``open_clip.CLIP`` (eval mode, CPU) and a dict with the
        recipe, the loss curve (every 10 steps) and timings.
    """
    import open_clip

    from facelayers.assets import base_token_embedding

    from ..transforms import CLIP_MEAN, CLIP_STD

    recipe = recipe or PretrainRecipe()
    recipe.validate()
    say = log or (lambda s: None)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        t0 = time.perf_counter()
        data = generate_captioned_frames(
            recipe.num_subjects, seed=recipe.seed,
            image_size=int(recipe.resolved_clip_kwargs()["vision_cfg"]["image_size"]),
            sequences_per_subject=recipe.sequences_per_subject, sequence_length=recipe.sequence_length,
        )
        t_render = time.perf_counter() - t0
        say(f"rendered {data.frames.shape[0]} frames in {t_render:.1f} s")
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        images = (data.frames.float() / 255.0 - mean) / std
        active = data.active

        torch.manual_seed(recipe.seed)
        kw = recipe.resolved_clip_kwargs()
        model = open_clip.CLIP(**kw)
        with torch.no_grad():
            model.token_embedding.weight.copy_(
                base_token_embedding(recipe.seed, kw["text_cfg"]["vocab_size"], kw["text_cfg"]["width"]))
        model.train()
        opt = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup, recipe.steps))
        loss_fn = MultiPositiveClipLoss()
        g = torch.Generator().manual_seed(recipe.seed)
        ctx = int(kw["text_cfg"].get("context_length", 77))
        eye = torch.eye(recipe.batch_size, dtype=torch.bool)
        history: list[tuple[int, float]] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=recipe.steps, desc="pretrain tiny CLIP", unit="step")
        t1 = time.perf_counter()
        running = 0.0
        for step in range(recipe.steps):
            idx = torch.randint(0, images.shape[0], (recipe.batch_size,), generator=g)
            x = images[idx]
            if recipe.flip:
                flip = torch.rand(recipe.batch_size, generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            act = active[idx]
            caps = caption_frames(act, data.aus, caption_generator(recipe.seed, step), subset_p=recipe.subset_p)
            tokens = tokenize_prefix([c.text for c in caps], None, ctx)
            pos = caption_positives(named_mask(caps, data.aus), act) | eye
            img = model.encode_image(x, normalize=True)
            txt = encode_text_buckets(model, tokens, recipe.text_buckets, normalize=True)
            loss = loss_fn(img, txt, model.logit_scale.exp(), pos)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            running += float(loss.detach())
            if (step + 1) % 10 == 0 or step + 1 == recipe.steps:
                k = (step % 10) + 1
                history.append((step + 1, running / k))
                running = 0.0
                if bar is not None:
                    bar.set_postfix(loss=f"{history[-1][1]:.3f}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        t_train = time.perf_counter() - t1
        say(f"trained {recipe.steps} steps in {t_train:.1f} s (final loss {history[-1][1]:.3f})")
    finally:
        torch.set_num_threads(old_threads)
    model.eval()
    info = {"recipe": recipe.to_json(), "loss": history, "render_s": round(t_render, 1),
            "train_s": round(t_train, 1), "frames": int(images.shape[0])}
    return model, info
