"""The released SSM code's training recipe as reusable parts (objective, optimizer, schedule, step).

The SSM paper's published numbers come from the released research code's training (MSA-LMC/SSM @
978d79a, ``ssm/training/legacy.py`` ``_joint_training_step`` / ``build_legacy_optimizer`` and
``ssm/runner.py``), not from the paper's equations as written. This module expresses that training
with facelayers parts so that a script can run either recipe with the same model code:

==========================================================  =========================================
release behaviour                                           here
==========================================================  =========================================
four losses: CE(exp logits), BCE(smoothed per-frame AU       :class:`ReleaseObjective`
logits), CE(exp text term), BCE(unsmoothed AU text term)
each divided by a detached moving mean (0.95, eps 1e-8),     :class:`~facelayers.training.MovingMeanLossBalance`
restarted at the first step of every epoch                   (:meth:`ReleaseObjective.new_epoch`)
total ``(L1 + 2 L2 + a (L3 + L4)) / 3``,                     :class:`ReleaseObjective`,
``a = 2 / (1 + exp(-10 e / 30)) - 1`` (0-based epoch e)      :func:`~facelayers.training.sigmoid_ramp`
AU clip mixup, ``lam ~ Beta(0.4, 0.4)`` per batch, AU BCE    :class:`~facelayers.training.ClipMixup`
terms as ``lam L(y) + (1 - lam) L(y[perm])``                 (seeded; ``mixup_alpha=0`` switches off)
AdamW(wd 1e-4): vision tower incl. MoE 1e-6, the two DPM     :func:`release_param_groups`,
delta maps 1e-2, all else 1e-4; text tower frozen            :func:`release_optimizer`
MultiStepLR(15, 25; gamma 0.1), 30 epochs                    :func:`release_scheduler`
gradient clipping at norm 1.0                                :func:`release_train_step`
EMA of the trainable parameters (0.99, every step), used     :class:`~facelayers.training.ParameterEMA`,
for validation and saved checkpoints                         :meth:`ReleaseRecipe.averaged`
MoE router logit noise 1e-2 in training                      :func:`set_router_noise_`
its reported AU F1: threshold and segment-safe vote over      :func:`release_tuned_au_f1` (optimistic; reported
K = 0..7 with every vote count, tuned on the test labels     beside F1@0.5, never instead of it)
==========================================================  =========================================

Its data choices are options of the data layer: :func:`facelayers.data.datasets.full_windows`
(AU training windows), :func:`facelayers.data.datasets.release_segment_indices` (expression
frames), ``train_transform(erase_p=0)`` (no random erasing); CLIP normalisation is the default.

:class:`ReleaseRecipe` bundles them for a training loop; :func:`release_train_step` is one step on
its own. With mixup off and router noise 0 the two steps of the release's own code recorded in the
release fixtures (``tests/data/ssm_release/*_train.safetensors``) are reproduced: total losses and
gradient norms within 1e-5 (relative), parameters and EMA shadows within 1e-6
(``tests/test_release_train.py``).

Examples::

    >>> from facelayers.models.ssm import release, release_recipe as rr
    >>> model = release.convert_release_checkpoint("ck.pth", "bp4d", "dfew").train()  # doctest: +SKIP
    >>> recipe = rr.ReleaseRecipe(model, rr.ReleaseRecipeConfig(), generator=torch.Generator().manual_seed(0))
    >>> for epoch in range(recipe.config.epochs):                                  # doctest: +SKIP
    ...     recipe.start_epoch(epoch)
    ...     for x_exp, y_exp, x_au, y_au in loader:      # y_au [B2, T, M] in {0, 1}
    ...         result = recipe.step(x_exp, y_exp, x_au, y_au)
    ...     recipe.end_epoch()                           # MultiStepLR
    ...     with recipe.averaged():                      # EMA weights for validation / checkpoints
    ...         evaluate(model)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facelayers.training import ClipMixup, MovingMeanLossBalance, ParameterEMA, mixup_loss, sigmoid_ramp

__all__ = [
    "RELEASE_OUTPUT_KEYS",
    "RELEASE_THRESHOLDS",
    "RELEASE_VOTE_WINDOWS",
    "ReleaseLoss",
    "ReleaseObjective",
    "ReleaseRecipe",
    "ReleaseRecipeConfig",
    "ReleaseStepResult",
    "freeze_text_towers_",
    "release_optimizer",
    "release_param_groups",
    "release_scheduler",
    "release_model_from_clip",
    "release_train_step",
    "release_tuned_au_f1",
    "release_vote_fractions",
    "set_router_noise_",
]

#: The four model outputs the release's objective reads (:func:`~facelayers.models.ssm.release.release_outputs`).
RELEASE_OUTPUT_KEYS = ("exp_logits", "au_logits", "exp_text_logits", "au_text_logits")
_DELTA_NAMES = ("mapping.delta_au2exp", "mapping.delta_exp2au")


def _check_number(name: str, value: Any, *, low: float | None = None, low_open: bool = False,
                  high: float | None = None, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number (expected a float, got {value!r})")
    v = float(value)
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} out of range (expected {name} {'>' if low_open else '>='} {low}, got {v})")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name} out of range (expected {name} {'<' if high_open else '<='} {high}, got {v})")
    return v


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class ReleaseRecipeConfig:
    """Every setting of the release's training recipe (defaults: the release's values).

    Attributes:
        epochs: training epochs (release: 30).
        milestones: epochs after which every learning rate is multiplied by ``lr_gamma``
            (``MultiStepLR``; release: 15, 25).
        lr_gamma: the learning-rate factor at each milestone (release: 0.1).
        lr_vision: learning rate of the vision tower, MoE layers included (release: 1e-6).
        lr_delta: learning rate of each of the two DPM delta maps (release: 1e-2).
        lr_other: learning rate of every other trainable parameter (release: 1e-4).
        weight_decay: AdamW weight decay, all groups (release: 1e-4).
        grad_clip: max total gradient norm; ``None`` = no clipping (release: 1.0).
        ema_decay: decay of the parameter EMA updated after every step; ``None`` = no EMA
            (release: 0.99).
        mixup_alpha: Beta concentration of the AU clip mixup; 0 = off (release: 0.4).
        loss_balance: ``"moving_mean"`` (release) or ``"none"`` (raw loss terms).
        balance_momentum, balance_eps: of the moving-mean balance (release: 0.95, 1e-8).
        restart_balance_each_epoch: restart the moving means at every :meth:`ReleaseRecipe.start_epoch`
            (release: yes).
        au_weight: weight of the AU term ``L2`` (release: 2).
        loss_divisor: the total is divided by it (release: 3).
        ramp_epochs, ramp_scale: ``a = 2 / (1 + exp(-ramp_scale e / ramp_epochs)) - 1`` (release:
            30, 10; the release keeps 30 whatever the number of epochs).
        router_noise: std of the MoE router logit noise in training, set on every MoE layer;
            ``None`` leaves the model's (release: 1e-2; 0 = deterministic routing).
        freeze_text_tower: freeze every CLIP text tower of the model (release: yes; prompt
            contexts stay trainable).
    """

    epochs: int = 30
    milestones: tuple[int, ...] = (15, 25)
    lr_gamma: float = 0.1
    lr_vision: float = 1e-6
    lr_delta: float = 1e-2
    lr_other: float = 1e-4
    weight_decay: float = 1e-4
    grad_clip: float | None = 1.0
    ema_decay: float | None = 0.99
    mixup_alpha: float = 0.4
    loss_balance: str = "moving_mean"
    balance_momentum: float = 0.95
    balance_eps: float = 1e-8
    restart_balance_each_epoch: bool = True
    au_weight: float = 2.0
    loss_divisor: float = 3.0
    ramp_epochs: float = 30.0
    ramp_scale: float = 10.0
    router_noise: float | None = 1e-2
    freeze_text_tower: bool = True

    def __post_init__(self) -> None:
        self.milestones = tuple(self.milestones)
        self.validate()

    def validate(self) -> None:
        """Check every field.

        Raises:
            ValueError: naming the field, what was expected and what it holds.
        """
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an int >= 1 (expected e.g. 30, got {self.epochs!r})")
        ms = self.milestones
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ms) or list(ms) != sorted(set(ms)):
            raise ValueError(f"milestones must be increasing ints >= 1 (expected e.g. (15, 25), got {ms!r})")
        _check_number("lr_gamma", self.lr_gamma, low=0.0, low_open=True)
        for name in ("lr_vision", "lr_delta", "lr_other", "weight_decay"):
            _check_number(name, getattr(self, name), low=0.0)
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip, low=0.0, low_open=True)
        if self.ema_decay is not None:
            _check_number("ema_decay", self.ema_decay, low=0.0, high=1.0)
        _check_number("mixup_alpha", self.mixup_alpha, low=0.0)
        if self.loss_balance not in ("moving_mean", "none"):
            raise ValueError(f"loss_balance must be 'moving_mean' or 'none' (expected one of them, got {self.loss_balance!r})")
        _check_number("balance_momentum", self.balance_momentum, low=0.0, high=1.0, high_open=True)
        _check_number("balance_eps", self.balance_eps, low=0.0)
        _check_number("au_weight", self.au_weight, low=0.0)
        _check_number("loss_divisor", self.loss_divisor, low=0.0, low_open=True)
        _check_number("ramp_epochs", self.ramp_epochs, low=0.0, low_open=True)
        _check_number("ramp_scale", self.ramp_scale)
        if self.router_noise is not None:
            _check_number("router_noise", self.router_noise, low=0.0)
        for name in ("restart_balance_each_epoch", "freeze_text_tower"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool (expected True or False, got {getattr(self, name)!r})")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (what a run folder's config records)."""
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ReleaseRecipeConfig:
        """Inverse of :meth:`to_json` (missing keys take the release defaults).

        Raises:
            ValueError: not a dict, unknown keys, invalid values.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"release recipe config must be a JSON object (expected a dict, got {type(d).__name__})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown release recipe keys (expected keys among {sorted(known)}, got {unknown})")
        d = dict(d)
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# objective
# ------------------------------------------------------------------------------------------------
class ReleaseLoss(NamedTuple):
    """What :class:`ReleaseObjective` returns.

    Attributes:
        total: the scalar to backpropagate.
        terms: the raw terms ``(L1 exp CE, L2 AU BCE, L3 exp-text CE, L4 AU-text BCE)``.
        scaled: the terms after the balance (the raw terms when there is none).
        ramp: the weight ``a`` of ``L3 + L4``.
    """

    total: Tensor
    terms: tuple[Tensor, Tensor, Tensor, Tensor]
    scaled: tuple[Tensor, Tensor, Tensor, Tensor]
    ramp: float


class ReleaseObjective(nn.Module):
    """The release's four-term objective (``ssm/training/legacy.py``, ``_joint_training_step``).

    ::

        L1 = CE(exp_logits, y_exp)              L3 = CE(exp_text_logits, y_exp)
        L2 = BCE(au_logits, y_au)               L4 = BCE(au_text_logits, y_au)
        (Li' = Li / (m_i + eps), moving means m restarted by new_epoch())
        total = (L1' + au_weight L2' + a (L3' + L4')) / divisor,  a = sigmoid_ramp(epoch, ramp_epochs)

    BCE and CE are means over all elements (every frame of every AU clip). With AU clip mixup
    (``y_au_mix = y_au[perm]``, ``lam``) both BCE terms are ``lam BCE(., y_au) + (1 - lam)
    BCE(., y_au_mix)``, as in the release.

    Args:
        au_weight: weight of ``L2`` (release: 2).
        divisor: the total is divided by it (release: 3).
        ramp_epochs: ``total`` of :func:`~facelayers.training.sigmoid_ramp` (release: 30).
        ramp_scale: its ``scale`` (release: 10).
        balance: a module ``balance(l1, l2, l3, l4) -> 4 scaled terms`` with ``reset()``;
            ``"moving_mean"`` builds the release's :class:`~facelayers.training.MovingMeanLossBalance`
            (momentum 0.95, eps 1e-8); ``None`` uses the raw terms.
        momentum, eps: of the built moving-mean balance.
        device, dtype: of the built balance's buffers (default float32).

    Shapes:
        ``outputs["exp_logits"], outputs["exp_text_logits"]: [B1, K]``; ``y_exp: [B1]`` (class
        ids); ``outputs["au_logits"], outputs["au_text_logits"]: [B2, T, M]`` or ``[B2 * T, M]``;
        ``y_au, y_au_mix: [B2, T, M]`` or ``[B2 * T, M]`` in ``[0, 1]``.
    """

    def __init__(
        self,
        au_weight: float = 2.0,
        divisor: float = 3.0,
        ramp_epochs: float = 30.0,
        ramp_scale: float = 10.0,
        *,
        balance: nn.Module | str | None = "moving_mean",
        momentum: float = 0.95,
        eps: float = 1e-8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.au_weight = _check_number("au_weight", au_weight, low=0.0)
        self.divisor = _check_number("divisor", divisor, low=0.0, low_open=True)
        self.ramp_epochs = _check_number("ramp_epochs", ramp_epochs, low=0.0, low_open=True)
        self.ramp_scale = _check_number("ramp_scale", ramp_scale)
        if isinstance(balance, str):
            if balance != "moving_mean":
                raise ValueError(f"balance must be 'moving_mean', a module or None (expected one of them, got {balance!r})")
            balance = MovingMeanLossBalance(4, momentum, eps, device=device, dtype=dtype)
        elif balance is not None and not callable(balance):
            raise TypeError(f"balance must be a module, 'moving_mean' or None (expected one of them, got {type(balance).__name__})")
        self.balance = balance

    def reset_parameters(self) -> None:
        """Same as :meth:`new_epoch` (the objective has no parameters)."""
        self.new_epoch()

    def new_epoch(self) -> None:
        """Restart the moving means (the release does this at the first step of every epoch)."""
        if self.balance is not None and hasattr(self.balance, "reset"):
            self.balance.reset()

    def ramp(self, epoch: float) -> float:
        """The weight ``a`` of the two text-only terms at the 0-based ``epoch``."""
        return sigmoid_ramp(epoch, self.ramp_epochs, scale=self.ramp_scale)

    @staticmethod
    def _au_pair(logits: Tensor, target: Tensor, name: str) -> tuple[Tensor, Tensor]:
        m = target.shape[-1] if target.dim() >= 1 else 0
        if target.dim() not in (2, 3) or logits.dim() not in (2, 3) or logits.shape[-1] != m:
            raise ValueError(f"{name} and the AU targets must be [B2, T, M] or [B2*T, M] with the same M "
                             f"(expected matching shapes, got {tuple(logits.shape)} and {tuple(target.shape)})")
        flat_logits, flat_target = logits.reshape(-1, m), target.reshape(-1, m)
        if flat_logits.shape[0] != flat_target.shape[0]:
            raise ValueError(f"{name} has {flat_logits.shape[0]} frames but the AU targets {flat_target.shape[0]} "
                             f"(expected the same B2*T, got {tuple(logits.shape)} and {tuple(target.shape)})")
        return flat_logits, flat_target.to(flat_logits.dtype)

    def forward(
        self,
        outputs: Mapping[str, Tensor],
        y_exp: Tensor,
        y_au: Tensor,
        *,
        epoch: float,
        y_au_mix: Tensor | None = None,
        lam: float = 1.0,
    ) -> ReleaseLoss:
        """The total loss and its terms.

        Args:
            outputs: at least :data:`RELEASE_OUTPUT_KEYS` (e.g. from
                :func:`~facelayers.models.ssm.release.release_outputs`).
            y_exp: ``[B1]`` expression class ids.
            y_au: ``[B2, T, M]`` (or flat) AU targets of the (mixed) clips themselves.
            epoch: the 0-based epoch (for the ramp).
            y_au_mix: targets of the mixup partners (``y_au[perm]``); ``None`` = no mixup.
            lam: the batch's mixup weight in ``[0, 1]``.

        Returns:
            :class:`ReleaseLoss`.

        Raises:
            KeyError: an output is missing.
            ValueError: shapes that do not fit (named, with both shapes).
        """
        missing = [k for k in RELEASE_OUTPUT_KEYS if k not in outputs]
        if missing:
            raise KeyError(f"the release objective needs the model outputs {list(RELEASE_OUTPUT_KEYS)} "
                           f"(expected them, got {sorted(outputs)}; missing {missing})")
        exp_logits, exp_text = outputs["exp_logits"], outputs["exp_text_logits"]
        for name, t in (("exp_logits", exp_logits), ("exp_text_logits", exp_text)):
            if t.dim() != 2 or y_exp.dim() != 1 or t.shape[0] != y_exp.shape[0]:
                raise ValueError(f"{name} must be [B1, K] for y_exp [B1] (expected matching B1, got "
                                 f"{tuple(t.shape)} and {tuple(y_exp.shape)})")
        au, ya = self._au_pair(outputs["au_logits"], y_au, "au_logits")
        au_text, _ = self._au_pair(outputs["au_text_logits"], y_au, "au_text_logits")
        yb = None
        if y_au_mix is not None:
            if y_au_mix.shape != y_au.shape:
                raise ValueError(f"y_au_mix must have the shape of y_au (expected {tuple(y_au.shape)}, got "
                                 f"{tuple(y_au_mix.shape)})")
            yb = y_au_mix.reshape(ya.shape).to(ya.dtype)

        def bce(logits: Tensor) -> Tensor:
            if yb is None:
                return F.binary_cross_entropy_with_logits(logits, ya)
            return mixup_loss(F.binary_cross_entropy_with_logits, logits, ya, yb, lam)

        l1 = F.cross_entropy(exp_logits, y_exp)
        l2 = bce(au)
        l3 = F.cross_entropy(exp_text, y_exp)
        l4 = bce(au_text)
        terms = (l1, l2, l3, l4)
        scaled = tuple(self.balance(*terms)) if self.balance is not None else terms
        a = self.ramp(epoch)
        s1, s2, s3, s4 = scaled
        total = (s1 + self.au_weight * s2 + a * (s3 + s4)) / self.divisor
        return ReleaseLoss(total, terms, scaled, a)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return (f"au_weight={self.au_weight}, divisor={self.divisor}, ramp_epochs={self.ramp_epochs}, "
                f"ramp_scale={self.ramp_scale}")


# ------------------------------------------------------------------------------------------------
# parameters, optimizer, schedule
# ------------------------------------------------------------------------------------------------
def freeze_text_towers_(model: nn.Module) -> list[str]:
    """Freeze every :class:`~facelayers.prompts.CLIPTextTower` inside ``model`` (the release trains
    everything except its text encoder; prompt contexts stay trainable).

    Returns:
        The qualified names of the parameters that were trainable and are now frozen.
    """
    from facelayers.prompts import CLIPTextTower

    changed: list[str] = []
    towers = [name for name, m in model.named_modules() if isinstance(m, CLIPTextTower)]
    for name, p in model.named_parameters():
        if any(name.startswith(t + ".") for t in towers) and p.requires_grad:
            p.requires_grad_(False)
            changed.append(name)
    return changed


def set_router_noise_(model: nn.Module, std: float) -> list[str]:
    """Set the training-mode router logit noise of every MoE layer in ``model`` (0 = off).

    The noise is drawn from the global torch RNG: seed it (``torch.manual_seed``) for reproducible
    runs; the release draws it the same way (``torch.randn_like``, std 1e-2).

    Returns:
        Qualified names of the MoE layers set.

    Raises:
        ValueError: ``std`` negative or not finite.
    """
    from facelayers.moe import named_moe_layers

    value = _check_number("std", std, low=0.0)
    names = []
    for name, layer in named_moe_layers(model):
        layer.router.noise_std = value
        names.append(name)
    return names


def release_param_groups(
    model: nn.Module,
    lr_vision: float = 1e-6,
    lr_delta: float = 1e-2,
    lr_other: float = 1e-4,
    *,
    vision_prefix: str = "visual.",
    delta_names: Sequence[str] = _DELTA_NAMES,
) -> list[dict[str, Any]]:
    """The release's optimizer parameter groups (``build_legacy_optimizer``).

    ``vision`` (every trainable parameter under ``vision_prefix``: the CLIP vision tower with its
    MoE layers), ``delta_au2exp`` and ``delta_exp2au`` (the two DPM delta maps, one group each) and
    ``other`` (every other trainable parameter: prompt contexts, temporal modules, heads, AU
    smoothing, mapping factors). Frozen parameters (the text tower) are in no group; a parameter
    shared under several names appears once; empty groups are dropped.

    Args:
        model: e.g. a :class:`~facelayers.models.ssm.release.ReleaseSSMModel`.
        lr_vision, lr_delta, lr_other: learning rates (release: 1e-6, 1e-2, 1e-4).
        vision_prefix: name prefix of the vision tower.
        delta_names: qualified names of the delta maps (``()`` for a model without them).

    Returns:
        ``[{"params": [...], "lr": ..., "name": ...}, ...]`` in the release's order.

    Raises:
        ValueError: a name in ``delta_names`` is not a trainable parameter of ``model``.
    """
    for name, v in (("lr_vision", lr_vision), ("lr_delta", lr_delta), ("lr_other", lr_other)):
        _check_number(name, v, low=0.0)
    named = dict(model.named_parameters())
    deltas = []
    for name in delta_names:
        p = named.get(name)
        if p is None or not p.requires_grad:
            raise ValueError(f"{name!r} is not a trainable parameter of the model (expected the DPM delta maps "
                             f"{list(delta_names)}, got {'a frozen parameter' if p is not None else 'no such name'}; "
                             f"pass delta_names=() for a model without them)")
        deltas.append(p)
    delta_ids = {id(p) for p in deltas}
    vision, other = [], []
    seen: set[int] = set(delta_ids)
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (vision if name.startswith(vision_prefix) else other).append(p)
    groups = [dict(params=vision, lr=float(lr_vision), name="vision")]
    for name, p in zip(delta_names, deltas):
        groups.append(dict(params=[p], lr=float(lr_delta), name=name.rsplit(".", 1)[-1]))
    groups.append(dict(params=other, lr=float(lr_other), name="other"))
    return [g for g in groups if g["params"]]


def release_optimizer(model: nn.Module, config: ReleaseRecipeConfig | None = None, **group_kwargs: Any) -> torch.optim.AdamW:
    """``AdamW(release_param_groups(model, ...), weight_decay=config.weight_decay)`` (PyTorch's
    default betas and eps, as the release).

    Args:
        model: the model.
        config: learning rates and weight decay (default: the release's).
        **group_kwargs: passed to :func:`release_param_groups` (``vision_prefix``, ``delta_names``).
    """
    c = config or ReleaseRecipeConfig()
    groups = release_param_groups(model, c.lr_vision, c.lr_delta, c.lr_other, **group_kwargs)
    return torch.optim.AdamW(groups, weight_decay=c.weight_decay)


def release_scheduler(optimizer: torch.optim.Optimizer, config: ReleaseRecipeConfig | None = None) -> torch.optim.lr_scheduler.MultiStepLR:
    """``MultiStepLR(optimizer, config.milestones, config.lr_gamma)``, stepped once per epoch
    (after the epoch's training, before validation, as the release)."""
    c = config or ReleaseRecipeConfig()
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(c.milestones), gamma=c.lr_gamma)


# ------------------------------------------------------------------------------------------------
# one step
# ------------------------------------------------------------------------------------------------
class ReleaseStepResult(NamedTuple):
    """What :func:`release_train_step` returns (tensors stay on the device: no host sync).

    Attributes:
        loss: the :class:`ReleaseLoss`, its tensors detached (the graph is freed by backward).
        grad_norm: total gradient norm before clipping (``None`` without clipping).
        lam: the mixup weight used (1.0 without mixup).
        perm: ``[B2]`` mixup partners (``None`` without mixup).
        outputs: the model outputs of the step.
    """

    loss: ReleaseLoss
    grad_norm: Tensor | None
    lam: float
    perm: Tensor | None
    outputs: dict[str, Tensor]


def _release_forward(model: nn.Module, exp_clips: Tensor, au_clips: Tensor) -> dict[str, Tensor]:
    from .release import release_outputs

    return release_outputs(model, exp_clips, au_clips)  # type: ignore[arg-type]


def release_train_step(
    model: nn.Module,
    exp_clips: Tensor,
    y_exp: Tensor,
    au_clips: Tensor,
    y_au: Tensor,
    *,
    objective: ReleaseObjective,
    optimizer: torch.optim.Optimizer,
    epoch: float,
    ema: ParameterEMA | None = None,
    mixup: ClipMixup | None = None,
    grad_clip: float | None = 1.0,
    forward: Callable[[nn.Module, Tensor, Tensor], Mapping[str, Tensor]] = _release_forward,
) -> ReleaseStepResult:
    """One training step of the release (``_joint_training_step``), in its order.

    ``zero_grad`` -> AU clip mixup (expression clips are not mixed) -> forward -> four losses,
    balance, ramp -> backward -> clip the total gradient norm of ``model.parameters()`` -> optimizer
    step -> EMA update.

    Args:
        model: the model (in train mode).
        exp_clips: ``[B1, T, 3, H, W]``; ``y_exp``: ``[B1]``.
        au_clips: ``[B2, T, 3, H, W]``; ``y_au``: ``[B2, T, M]``.
        objective: the :class:`ReleaseObjective` (holds the moving means).
        optimizer: e.g. :func:`release_optimizer`.
        epoch: the 0-based epoch (ramp).
        ema: updated after the optimizer step.
        mixup: AU clip mixup (``None`` or ``alpha == 0``: off).
        grad_clip: max gradient norm (``None``: no clipping).
        forward: ``forward(model, exp_clips, au_clips) -> outputs`` with :data:`RELEASE_OUTPUT_KEYS`
            (default: :func:`~facelayers.models.ssm.release.release_outputs`).

    Returns:
        :class:`ReleaseStepResult`.

    Raises:
        ValueError: ``y_au`` does not have one target row per AU clip, ``grad_clip <= 0``.
    """
    if grad_clip is not None:
        _check_number("grad_clip", grad_clip, low=0.0, low_open=True)
    if y_au.dim() < 1 or y_au.shape[0] != au_clips.shape[0]:
        raise ValueError(f"y_au must hold one target per AU clip (expected [B2={au_clips.shape[0]}, T, M], "
                         f"got {tuple(y_au.shape)})")
    optimizer.zero_grad()
    lam, perm, y_mix = 1.0, None, None
    if mixup is not None and mixup.enabled:
        au_clips, perm, lam = mixup(au_clips)
        y_mix = y_au[perm.to(y_au.device)]
    outputs = dict(forward(model, exp_clips, au_clips))
    loss = objective(outputs, y_exp, y_au, epoch=epoch, y_au_mix=y_mix, lam=lam)
    loss.total.backward()
    grad_norm = None
    if grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if ema is not None:
        ema.update()
    detached = ReleaseLoss(loss.total.detach(), tuple(t.detach() for t in loss.terms),  # type: ignore[arg-type]
                           tuple(t.detach() for t in loss.scaled), loss.ramp)  # type: ignore[arg-type]
    return ReleaseStepResult(detached, grad_norm, lam, perm, outputs)


# ------------------------------------------------------------------------------------------------
# starting weights: the release preset from a CLIP model
# ------------------------------------------------------------------------------------------------
#: The release's temporal and head constants (``ssm/models/bp4d.py``, ``disfa.py``, ``temporal.py``).
RELEASE_TEMPORAL = dict(exp_depth=1, exp_heads=8, exp_head_dim=64, exp_mlp_dim=1024, au_depth=1, au_heads=8,
                        au_radius=1, smooth_kernel=5)


def release_model_from_clip(
    clip: nn.Module,
    au_dataset: str,
    expression_dataset: str,
    *,
    num_frames: int = 16,
    moe_blocks: Sequence[int] | None = None,
    num_experts: int = 4,
    expert_hidden: int = 512,
    top_k: int = 2,
    n_ctx: int = 8,
    dispatch: str = "release",
    **temporal: int,
) -> nn.Module:
    """The release preset (:func:`~facelayers.models.ssm.release.build_release_model`) started from
    an open_clip ``CLIP``'s weights, as the release starts its training from CLIP ViT-B/16.

    The architecture is read from ``clip`` (widths, depths, heads, patch and image size, context
    length); the release's constants fill the rest (:data:`RELEASE_TEMPORAL`, AU smoothing over
    frame pairs, class-specific prompts with the class text at the end). Weights: the vision tower
    (its MLPs become the MoE shared experts; routers, private experts and gates keep the preset's
    initialisation) and the text tower are copied from ``clip``; the prompts' fixed parts
    (``token_prefix``, ``token_suffix``) are ``clip``'s token embeddings of the release template
    ``"X X ... X <description>"`` with the release's description strings
    (:func:`facelayers.facs.release_descriptions`). Everything else keeps the preset's
    initialisation. Both towers use the release's QuickGELU (OpenAI CLIP), whatever ``clip`` uses.

    Args:
        clip: an open_clip ``CLIP`` (``visual`` a ``VisionTransformer``; text modules at the top level).
        au_dataset: ``"bp4d"`` or ``"disfa"``; expression_dataset: ``"dfew"``, ``"ferv39k"`` or ``"mafw"``.
        num_frames: clip length ``T`` (release: 16; even: AU logits are smoothed in frame pairs).
        moe_blocks: vision blocks with MoE FFNs (default: the last 6, or all when fewer).
        num_experts, expert_hidden, top_k: private experts (release: 4, 512, 2).
        n_ctx: learnable context tokens per prompt (release: 8).
        dispatch: ``"release"`` (the released routing, bug included) or ``"fixed"``.
        **temporal: overrides of :data:`RELEASE_TEMPORAL`.

    Returns:
        A :class:`~facelayers.models.ssm.release.ReleaseSSMModel` in train mode, on ``clip``'s
        device, float32.

    Raises:
        ValueError: an unsupported CLIP (named), bad sizes or dataset names.
    """
    from facelayers import facs
    from facelayers.moe import load_pre_injection_state_dict
    from facelayers.prompts import StoredPromptLearner

    from .release import ReleaseArchitecture, build_release_model

    unknown = sorted(set(temporal) - set(RELEASE_TEMPORAL))
    if unknown:
        raise ValueError(f"unknown temporal settings (expected keys among {sorted(RELEASE_TEMPORAL)}, got {unknown})")
    visual = getattr(clip, "visual", None)
    need = ("conv1", "transformer", "proj", "positional_embedding")
    if visual is None or any(not hasattr(visual, a) for a in need) or not hasattr(clip, "token_embedding"):
        raise ValueError("release_model_from_clip needs an open_clip CLIP with a ViT vision tower and a text tower "
                         f"(expected visual.{{{','.join(need)}}} and token_embedding, got {type(clip).__name__})")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 2 or num_frames % 2:
        raise ValueError(f"num_frames must be an even int >= 2 (expected e.g. 16, got {num_frames!r})")
    width = int(visual.conv1.weight.shape[0])
    patch = int(visual.conv1.weight.shape[-1])
    layers = len(visual.transformer.resblocks)
    grid = round((visual.positional_embedding.shape[0] - 1) ** 0.5)
    blk, tblk = visual.transformer.resblocks[0], clip.transformer.resblocks[0]
    t_width = int(clip.positional_embedding.shape[1])
    blocks = tuple(range(max(0, layers - 6), layers)) if moe_blocks is None else tuple(int(b) for b in moe_blocks)
    arch = ReleaseArchitecture(
        au_dataset=str(au_dataset).lower(), expression_dataset=str(expression_dataset).lower(),
        embed_dim=int(visual.proj.shape[1]), image_size=grid * patch, patch_size=patch, vision_width=width,
        vision_layers=layers, vision_heads=int(blk.attn.num_heads), vision_mlp_ratio=blk.mlp.c_fc.out_features / width,
        moe_blocks=blocks, num_experts=num_experts, expert_hidden=expert_hidden, top_k=top_k,
        text_width=t_width, text_layers=len(clip.transformer.resblocks), text_heads=int(tblk.attn.num_heads),
        text_mlp_ratio=tblk.mlp.c_fc.out_features / t_width, context_length=int(clip.positional_embedding.shape[0]),
        n_ctx=n_ctx, num_frames=num_frames, dispatch=dispatch, **{**RELEASE_TEMPORAL, **temporal},
    )
    device = visual.conv1.weight.device
    model = build_release_model(arch, device=device)
    with torch.no_grad():
        load_pre_injection_state_dict(model.visual, {k: v.float() for k, v in visual.state_dict().items()})
        tower = model.text.expression_prompts.tower
        tower.positional_embedding.copy_(clip.positional_embedding)
        proj = clip.text_projection
        tower.text_projection.copy_(proj.weight.t() if isinstance(proj, nn.Linear) else proj)
        tower.transformer.load_state_dict(clip.transformer.state_dict())
        tower.ln_final.load_state_dict(clip.ln_final.state_dict())
        exp_texts, au_texts = facs.release_descriptions(arch.au_dataset, arch.expression_dataset)
        for learner, texts in ((model.text.expression_prompts, exp_texts), (model.text.au_prompts, au_texts)):
            ids = StoredPromptLearner.release_token_ids(learner.tower, texts, n_ctx).to(device)
            emb = clip.token_embedding(ids).float()
            learner.token_prefix.copy_(emb[:, :1])
            learner.token_suffix.copy_(emb[:, 1 + n_ctx:])
    return model.train()


# ------------------------------------------------------------------------------------------------
# the recipe
# ------------------------------------------------------------------------------------------------
class ReleaseRecipe:
    """The release's training recipe around a model: optimizer, schedule, EMA, mixup, objective.

    Construction applies the recipe's model settings (freezes the text towers, sets the router
    noise), then builds the AdamW groups, ``MultiStepLR``, the parameter EMA (after the settings,
    so frozen parameters are not tracked; build the recipe after loading the weights you start
    from), the objective and the seeded clip mixup.

    Args:
        model: the model to train (e.g. :class:`~facelayers.models.ssm.release.ReleaseSSMModel`).
        config: :class:`ReleaseRecipeConfig` (default: the release's values).
        generator: CPU ``torch.Generator`` of the clip mixup (seed it for reproducible runs;
            ``None`` uses the global RNG).
        forward: ``forward(model, exp_clips, au_clips) -> outputs`` (default: ``release_outputs``).
        vision_prefix, delta_names: see :func:`release_param_groups`.

    Attributes:
        optimizer, scheduler, ema (``None`` when ``ema_decay`` is ``None``), objective, mixup
        (``None`` when ``mixup_alpha`` is 0), epoch, frozen (names frozen at construction),
        noisy_layers (MoE layers whose noise was set).
    """

    def __init__(
        self,
        model: nn.Module,
        config: ReleaseRecipeConfig | None = None,
        *,
        generator: torch.Generator | None = None,
        forward: Callable[[nn.Module, Tensor, Tensor], Mapping[str, Tensor]] = _release_forward,
        vision_prefix: str = "visual.",
        delta_names: Sequence[str] = _DELTA_NAMES,
    ) -> None:
        self.model = model
        self.config = c = config if config is not None else ReleaseRecipeConfig()
        if not isinstance(c, ReleaseRecipeConfig):
            raise TypeError(f"config must be a ReleaseRecipeConfig (expected one, got {type(c).__name__})")
        c.validate()
        self.forward = forward
        self.frozen = freeze_text_towers_(model) if c.freeze_text_tower else []
        self.noisy_layers = set_router_noise_(model, c.router_noise) if c.router_noise is not None else []
        self.optimizer = release_optimizer(model, c, vision_prefix=vision_prefix, delta_names=delta_names)
        self.scheduler = release_scheduler(self.optimizer, c)
        p = next(iter(model.parameters()), None)
        self.objective = ReleaseObjective(
            c.au_weight, c.loss_divisor, c.ramp_epochs, c.ramp_scale,
            balance="moving_mean" if c.loss_balance == "moving_mean" else None,
            momentum=c.balance_momentum, eps=c.balance_eps, device=None if p is None else p.device)
        self.ema = ParameterEMA(model, c.ema_decay) if c.ema_decay is not None else None
        self.mixup = ClipMixup(c.mixup_alpha, generator=generator) if c.mixup_alpha > 0 else None
        self.epoch = 0

    def start_epoch(self, epoch: int | None = None) -> None:
        """Begin an epoch (0-based; default: the next one): restarts the moving means (release)."""
        if epoch is not None:
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"epoch must be an int >= 0 (expected a 0-based epoch, got {epoch!r})")
            self.epoch = epoch
        if self.config.restart_balance_each_epoch:
            self.objective.new_epoch()

    def step(self, exp_clips: Tensor, y_exp: Tensor, au_clips: Tensor, y_au: Tensor) -> ReleaseStepResult:
        """One :func:`release_train_step` at the current epoch."""
        return release_train_step(
            self.model, exp_clips, y_exp, au_clips, y_au, objective=self.objective, optimizer=self.optimizer,
            epoch=self.epoch, ema=self.ema, mixup=self.mixup, grad_clip=self.config.grad_clip, forward=self.forward)

    def end_epoch(self) -> None:
        """Finish the epoch: ``scheduler.step()`` and advance :attr:`epoch`."""
        self.scheduler.step()
        self.epoch += 1

    @contextmanager
    def averaged(self) -> Iterator[nn.Module]:
        """Context manager: the model holds the EMA weights inside (validation, checkpoints), its own
        after; a no-op without EMA."""
        if self.ema is None:
            with nullcontext():
                yield self.model
        else:
            with self.ema.average_parameters() as m:
                yield m

    def describe(self) -> dict[str, Any]:
        """Everything in force, JSON-ready: the config plus the groups (name, lr, parameter count),
        the frozen parameter count, the MoE layers whose noise was set, whether mixup is seeded."""
        return {
            "recipe": "ssm_release",
            "config": self.config.to_json(),
            "param_groups": [{"name": g.get("name", str(i)), "lr": g["initial_lr"] if "initial_lr" in g else g["lr"],
                              "tensors": len(g["params"]), "numel": sum(p.numel() for p in g["params"])}
                             for i, g in enumerate(self.optimizer.param_groups)],
            "weight_decay": self.config.weight_decay,
            "frozen_by_recipe": len(self.frozen),
            "router_noise_layers": len(self.noisy_layers),
            "mixup": None if self.mixup is None else {"alpha": self.mixup.alpha, "seeded": self.mixup.generator is not None},
            "ema": None if self.ema is None else {"decay": self.ema.decay, "tracked": len(self.ema.shadow)},
        }

    def __repr__(self) -> str:
        return f"ReleaseRecipe(epoch={self.epoch}, config={self.config})"


# ------------------------------------------------------------------------------------------------
# the release's reported AU F1 (tuned on the evaluation labels: optimistic)
# ------------------------------------------------------------------------------------------------

#: The release's threshold candidates ``0.01, 0.02, ..., 0.99``.
RELEASE_THRESHOLDS: tuple[float, ...] = tuple(i / 100 for i in range(1, 100))
#: The release's vote half-widths ``K = 0 .. 7`` (windows ``W = 2K + 1``).
RELEASE_VOTE_WINDOWS: tuple[int, ...] = tuple(range(8))


def release_vote_fractions(vote_windows: Sequence[int] = RELEASE_VOTE_WINDOWS) -> tuple[float, ...]:
    """Every vote count as a fraction: ``{r / W : K in vote_windows, W = 2K + 1, r = 1 .. W}``, sorted.

    With :func:`facelayers.metrics.tuned_au_f1` (``count >= p * W``) these fractions are every
    rule "at least ``r`` of the ``W`` frames" (the release's ``search_all_vote_requirements``).
    """
    return tuple(sorted({r / (2 * k + 1) for k in vote_windows for r in range(1, 2 * k + 2)}))


def release_tuned_au_f1(probs: Tensor, target: Tensor, segment_ids: Tensor | None = None) -> dict[str, Any]:
    """The released code's reported AU F1: one global threshold and segment-safe vote tuned on ``target``.

    The release's evaluation (``ssm/evaluation/metrics.py`` -> ``ssm/evaluation/adaptive_vote.py``,
    shipped configs: segment-safe, every vote requirement) searches a threshold in
    :data:`RELEASE_THRESHOLDS`, a half-width in :data:`RELEASE_VOTE_WINDOWS` and every vote count,
    votes inside each segment only, counts an undefined F1 as 0 and reports the best mean F1.
    This is :func:`facelayers.metrics.tuned_au_f1` with those candidates (``zero_division=0``).
    Chosen on the labels it scores, so it is **optimistic**: report it beside F1@0.5 under its
    own name (``au_f1_tuned_release (optimistic)``), never instead of it.

    Args:
        probs: ``[N, M]`` probabilities of every evaluated frame, in temporal order within each segment.
        target: ``[N, M]`` binary labels.
        segment_ids: ``[N]`` integer segment of each row (a segment's rows consecutive); ``None``:
            one segment.

    Returns:
        :func:`~facelayers.metrics.tuned_au_f1`'s dict (``mean``, ``per_au``, ``threshold``,
        ``vote_window``, ``vote_fraction``, ``optimistic=True``, ``note``) plus ``vote_count``
        (``r`` of the chosen rule "at least ``r`` of ``W`` frames").
    """
    from facelayers.metrics import tuned_au_f1

    res = tuned_au_f1(probs, target, RELEASE_THRESHOLDS, vote_windows=RELEASE_VOTE_WINDOWS,
                      vote_fractions=release_vote_fractions(), segment_ids=segment_ids, zero_division=0.0)
    res["vote_count"] = math.ceil(float(res["vote_fraction"]) * (2 * int(res["vote_window"]) + 1) - 1e-9)
    return res
