"""Reusable training utilities: parameter EMA, AU clip mixup, moving-mean loss balance, ramp.

The released SSM code trains with a few general devices that its paper does not describe (released
code, ``ssm/training/legacy.py`` and ``ssm/runner.py``). Each is a small, separately usable part
here; the release recipe that wires them together lives in ``examples/``.

* :class:`ParameterEMA` -- exponential moving average ("shadow") of the trainable parameters,
  updated after every optimizer step and swapped in for evaluation and checkpoints (release:
  ``ModelEMA``, decay 0.99).
* :func:`mix_clips`, :class:`ClipMixup`, :func:`mixup_loss` -- mixup of whole clips: one
  ``lam ~ Beta(alpha, alpha)`` per batch, every frame of clip ``b`` mixed with the same frames of
  clip ``perm[b]``; the loss is ``lam * L(y) + (1 - lam) * L(y[perm])`` (release: ``mixup_clips``,
  alpha 0.4, AU clips only).
* :class:`MovingMeanLossBalance` -- divides each loss term by a detached moving mean of itself
  (momentum 0.95, eps 1e-8) so that terms of different scales weigh alike; restarted at the first
  step of every epoch in the release.
* :func:`sigmoid_ramp` -- ``2 / (1 + exp(-10 e / total)) - 1``, the release's weight of its two
  text-only loss terms over the epochs.

Examples::

    >>> ema = ParameterEMA(model, decay=0.99)
    >>> mixup = ClipMixup(alpha=0.4, generator=torch.Generator().manual_seed(0))
    >>> balance = MovingMeanLossBalance(4)
    >>> for epoch in range(epochs):
    ...     balance.reset()                         # the release restarts the means every epoch
    ...     a = sigmoid_ramp(epoch, epochs)
    ...     for x_exp, y_exp, x_au, y_au in loader:
    ...         x_au, perm, lam = mixup(x_au)
    ...         ...                                 # forward, four losses
    ...         l1, l2, l3, l4 = balance(l1, l2, l3, l4)
    ...         ((l1 + 2 * l2 + a * (l3 + l4)) / 3).backward()
    ...         optimizer.step(); ema.update()
    ...     with ema.average_parameters():
    ...         evaluate(model)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = [
    "ClipMixup",
    "MovingMeanLossBalance",
    "ParameterEMA",
    "mix_clips",
    "mixup_loss",
    "sigmoid_ramp",
]


def _check_unit_interval(name: str, value: float, *, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number (expected a float, got {value!r})")
    v = float(value)
    lo_ok = v > 0.0 if low_open else v >= 0.0
    hi_ok = v < 1.0 if high_open else v <= 1.0
    if not (lo_ok and hi_ok):
        bounds = f"0 {'<' if low_open else '<='} {name} {'<' if high_open else '<='} 1"
        raise ValueError(f"{name} out of range (expected {bounds}, got {v})")
    return v


# ----------------------------------------------------------------------------- EMA


class ParameterEMA:
    """Exponential moving average of a module's trainable parameters (the release's ``ModelEMA``).

    At construction the shadow of every parameter with ``requires_grad=True`` is a copy of its
    current value. Each :meth:`update` (call it after every optimizer step) sets, for every tracked
    parameter that still requires grad::

        shadow = decay * shadow + (1 - decay) * param

    computed with exactly these floating-point operations, in the parameter's dtype (the
    release's formula, ``ssm/training/legacy.py``). Evaluate with the averages through
    :meth:`average_parameters` (a context manager) or :meth:`store` / :meth:`copy_to` /
    :meth:`restore` (the release's ``apply_shadow`` = ``store`` + ``copy_to``).

    The release creates its EMA right after building the model, before the first step; create
    this one at the same point (after loading any weights you start from).

    Args:
        module: the model whose parameters are averaged (held by reference).
        decay: ``d`` in ``[0, 1]`` (release: 0.99); 1 keeps the initial values, 0 copies the
            parameters.
        include_buffers: also average floating-point buffers (e.g. BatchNorm running statistics)
            with the same formula; other buffers are copied at each update. The release averages
            parameters only (``False``).

    Raises:
        ValueError: ``decay`` outside ``[0, 1]``.
    """

    def __init__(self, module: nn.Module, decay: float = 0.99, *, include_buffers: bool = False) -> None:
        self.module = module
        self.decay = _check_unit_interval("decay", decay, low_open=False, high_open=False)
        self.include_buffers = bool(include_buffers)
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {
                name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad
            }
            self.buffer_shadow: dict[str, Tensor] = (
                {name: b.detach().clone() for name, b in module.named_buffers()} if self.include_buffers else {}
            )
        self.num_updates = 0
        self._backup: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ updates
    def _tracked(self) -> Iterator[tuple[str, Tensor, Tensor]]:
        for name, p in self.module.named_parameters():
            s = self.shadow.get(name)
            if s is not None:
                yield name, p, s

    @torch.no_grad()
    def update(self) -> None:
        """Move every shadow towards its parameter (tracked parameters that still require grad)."""
        d = self.decay
        for _, p, s in self._tracked():
            if p.requires_grad:
                # The release's expression: decay * shadow + (1 - decay) * param.
                s.copy_(d * s + (1 - d) * p.detach())
        if self.include_buffers:
            for name, b in self.module.named_buffers():
                s = self.buffer_shadow.get(name)
                if s is None:
                    continue
                if b.is_floating_point():
                    s.copy_(d * s + (1 - d) * b.detach())
                else:
                    s.copy_(b)
        self.num_updates += 1

    # ------------------------------------------------------------------ swapping
    def _targets(self) -> Iterator[tuple[str, Tensor, Tensor]]:
        for name, p, s in self._tracked():
            yield name, p, s
        if self.include_buffers:
            for name, b in self.module.named_buffers():
                s = self.buffer_shadow.get(name)
                if s is not None:
                    yield "buffer:" + name, b, s

    @torch.no_grad()
    def store(self) -> None:
        """Remember the current values of the tracked tensors (for :meth:`restore`).

        Raises:
            RuntimeError: values are already stored (a ``store`` without ``restore``).
        """
        if self._backup:
            raise RuntimeError("ParameterEMA.store() called twice without restore() (expected one store per restore)")
        self._backup = {key: t.detach().clone() for key, t, _ in self._targets()}

    @torch.no_grad()
    def copy_to(self) -> None:
        """Write the averages into the module's tensors (the release's ``apply_shadow``, minus the backup)."""
        for _, t, s in self._targets():
            t.copy_(s)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the values saved by :meth:`store`.

        Raises:
            RuntimeError: nothing was stored.
        """
        if not self._backup:
            raise RuntimeError("ParameterEMA.restore() without a previous store() (expected store() first)")
        for key, t, _ in self._targets():
            if key in self._backup:
                t.copy_(self._backup[key])
        self._backup = {}

    @contextmanager
    def average_parameters(self) -> Iterator[nn.Module]:
        """Context manager: the module holds the averages inside, its own values again after.

        Yields:
            the module.
        """
        self.store()
        try:
            self.copy_to()
            yield self.module
        finally:
            self.restore()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        """Shadows as tensors: ``{"param:<name>": ..., "buffer:<name>": ..., "num_updates": ...}``.

        Flat ``str -> Tensor``, so it can be written with safetensors.
        """
        out = {f"param:{k}": v.detach().clone() for k, v in self.shadow.items()}
        out.update({f"buffer:{k}": v.detach().clone() for k, v in self.buffer_shadow.items()})
        out["num_updates"] = torch.tensor(self.num_updates, dtype=torch.long)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load shadows saved by :meth:`state_dict` (strict: same names and shapes).

        Raises:
            KeyError: missing or unexpected entries (named).
            ValueError: a shape mismatch (named, with both shapes).
        """
        expected = {f"param:{k}" for k in self.shadow} | {f"buffer:{k}" for k in self.buffer_shadow}
        expected.add("num_updates")
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the tracked tensors (missing {missing}, unexpected {unexpected})")
        for table, prefix in ((self.shadow, "param:"), (self.buffer_shadow, "buffer:")):
            for k, s in table.items():
                v = state[prefix + k]
                if tuple(v.shape) != tuple(s.shape):
                    raise ValueError(
                        f"EMA state {prefix + k} has shape {tuple(v.shape)} (expected {tuple(s.shape)})"
                    )
        for table, prefix in ((self.shadow, "param:"), (self.buffer_shadow, "buffer:")):
            for k, s in table.items():
                s.copy_(state[prefix + k])
        self.num_updates = int(state["num_updates"])

    def __repr__(self) -> str:
        return (
            f"ParameterEMA(decay={self.decay}, tracked={len(self.shadow)}, "
            f"include_buffers={self.include_buffers}, num_updates={self.num_updates})"
        )


# ----------------------------------------------------------------------------- mixup


def mix_clips(x: Tensor, lam: float, perm: Tensor) -> Tensor:
    """Mix whole clips with permuted partners: ``lam * x + (1 - lam) * x[perm]``.

    Every frame of clip ``b`` is mixed with the same frame of clip ``perm[b]`` by the same ``lam``
    (the release's clip-consistent mixup, ``ssm/training/legacy.py``, computed with its expression).

    Args:
        x: ``[B, ...]`` clips (e.g. ``[B, T, C, H, W]``).
        lam: mixing weight in ``[0, 1]``.
        perm: ``[B]`` integer permutation of the batch (partner of each clip).

    Returns:
        ``[B, ...]`` mixed clips (a new tensor, also when ``lam == 1``).

    Raises:
        ValueError: ``lam`` outside ``[0, 1]``, ``perm`` not an integer ``[B]`` tensor.
    """
    lam = _check_unit_interval("lam", lam, low_open=False, high_open=False)
    if x.ndim < 1:
        raise ValueError(f"x must have a batch dimension (expected [B, ...], got shape {tuple(x.shape)})")
    if perm.shape != (x.shape[0],) or perm.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"perm must be an integer tensor of shape [B]=[{x.shape[0]}] (expected that, got "
            f"{perm.dtype} {tuple(perm.shape)})"
        )
    if perm.device.type == "cpu" and perm.numel():  # value check only where it costs no device sync
        lo, hi = int(perm.min()), int(perm.max())
        if lo < 0 or hi >= x.shape[0]:
            raise ValueError(f"perm holds a clip index out of range (expected 0..{x.shape[0] - 1}, "
                             f"got {lo if lo < 0 else hi})")
    return lam * x + (1.0 - lam) * x[perm.to(x.device)]


def mixup_loss(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    output: Tensor,
    target_a: Tensor,
    target_b: Tensor,
    lam: float,
) -> Tensor:
    """The mixup objective ``lam * loss_fn(output, target_a) + (1 - lam) * loss_fn(output, target_b)``.

    With :class:`ClipMixup`, ``target_a = y`` and ``target_b = y[perm]`` (reshape both as
    ``output`` needs, e.g. ``[B, T, M] -> [B*T, M]``). Both terms are computed even when ``lam`` is 1,
    as in the release.

    Args:
        loss_fn: e.g. ``nn.BCEWithLogitsLoss()``.
        output: the model output on the mixed inputs.
        target_a: targets of the clips themselves.
        target_b: targets of their partners.
        lam: the batch's mixing weight in ``[0, 1]``.

    Raises:
        ValueError: ``lam`` outside ``[0, 1]`` or targets of different shapes.
    """
    lam = _check_unit_interval("lam", lam, low_open=False, high_open=False)
    if target_a.shape != target_b.shape:
        raise ValueError(
            f"target_a and target_b must have the same shape (expected {tuple(target_a.shape)}, got "
            f"{tuple(target_b.shape)})"
        )
    return lam * loss_fn(output, target_a) + (1 - lam) * loss_fn(output, target_b)


class ClipMixup:
    """Clip mixup with one ``lam ~ Beta(alpha, alpha)`` per batch (the release's AU clip mixup).

    ``mixup(x)`` draws ``lam`` and a uniformly random permutation of the batch from ``generator``
    and returns ``(mix_clips(x, lam, perm), perm, lam)``; the targets become two loss terms, see
    :func:`mixup_loss`. ``alpha == 0`` switches mixup off: ``(x, arange(B), 1.0)`` with ``x``
    returned as is and no random numbers drawn (the release returns its inputs unchanged for
    ``alpha <= 0``; its fixture README: "alpha 0, so lam = 1").

    The release draws ``lam`` from NumPy's global generator and orders the partners by the first
    appearance of each clip in a random permutation of all ``B*T`` frames, which is again a
    uniformly random permutation of the clips: this class draws from the same distributions,
    from its own seeded stream.

    Args:
        alpha: Beta concentration (release: 0.4); 0 disables mixup.
        generator: a CPU ``torch.Generator`` for reproducible draws; ``None`` uses the global RNG.

    Raises:
        ValueError: ``alpha < 0`` or not finite.
    """

    def __init__(self, alpha: float = 0.4, *, generator: torch.Generator | None = None) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0 (expected e.g. 0.4, or 0 to disable, got {alpha!r})")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator (expected device cpu, got {generator.device})")
        self.alpha = float(alpha)
        self.generator = generator

    @property
    def enabled(self) -> bool:
        """``alpha > 0``."""
        return self.alpha > 0

    def sample_lam(self) -> float:
        """One draw of ``lam ~ Beta(alpha, alpha)`` (``1.0`` when disabled).

        ``lam = X / (X + Y)`` with ``X, Y ~ Gamma(alpha)`` drawn by Marsaglia-Tsang from the
        generator's uniform and normal streams (torch's own Beta sampler takes no generator), in
        log space so that tiny ``alpha`` cannot give ``0 / 0``.
        """
        if not self.enabled:
            return 1.0
        log_x = self._log_gamma_draw(self.alpha)
        log_y = self._log_gamma_draw(self.alpha)
        diff = log_y - log_x
        return 0.0 if diff > 700 else 1.0 / (1.0 + math.exp(diff))

    def _uniform(self) -> float:
        """A draw from ``(0, 1]``."""
        return 1.0 - float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def _log_gamma_draw(self, shape: float) -> float:
        """``log`` of one ``Gamma(shape, 1)`` draw (Marsaglia & Tsang, 2000; boost for shape < 1)."""
        log_boost = 0.0
        if shape < 1.0:
            log_boost = math.log(self._uniform()) / shape
            shape += 1.0
        d = shape - 1.0 / 3.0
        c = 1.0 / math.sqrt(9.0 * d)
        while True:
            z = float(torch.randn((), generator=self.generator, dtype=torch.float64))
            v = 1.0 + c * z
            if v <= 0.0:
                continue
            v = v * v * v
            if math.log(self._uniform()) < 0.5 * z * z + d - d * v + d * math.log(v):
                return math.log(d * v) + log_boost

    def sample_perm(self, batch: int) -> Tensor:
        """A uniformly random permutation ``[batch]`` (CPU, int64)."""
        return torch.randperm(batch, generator=self.generator)

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, float]:
        """Mix a batch of clips.

        Args:
            x: ``[B, ...]`` clips.

        Returns:
            ``(mixed [B, ...], perm [B] on x's device, lam)``.
        """
        if x.ndim < 1 or x.shape[0] < 1:
            raise ValueError(f"x must be a non-empty batch (expected [B>=1, ...], got shape {tuple(x.shape)})")
        if not self.enabled:
            return x, torch.arange(x.shape[0], device=x.device), 1.0
        lam = self.sample_lam()
        perm = self.sample_perm(x.shape[0])
        return mix_clips(x, lam, perm), perm.to(x.device), lam

    def __repr__(self) -> str:
        return f"ClipMixup(alpha={self.alpha}, seeded={self.generator is not None})"


# ----------------------------------------------------------------------------- loss balance


class MovingMeanLossBalance(nn.Module):
    """Divide each loss term by a detached moving mean of itself (the release's loss normalisation).

    For each term ``i`` at each call (released code, ``_joint_training_step``)::

        m_i = L_i.detach()                                   # first call after reset()
        m_i = momentum * m_i + (1 - momentum) * L_i.detach() # later calls
        out_i = L_i / (m_i + eps)

    i.e. the mean is updated first and the loss is divided by the updated mean, so the first call
    returns ``L / (L + eps)`` (about 1). The means are buffers (``means [n_terms]``, ``started``),
    so they move with the module, appear in its state dict, and need no host sync. The release
    restarts them at the first step of every epoch: call :meth:`reset` there.

    Args:
        n_terms: number of loss terms.
        momentum: weight of the old mean, in ``[0, 1)`` (release: 0.95).
        eps: added to the mean before dividing (release: 1e-8).
        device: device of the buffers.
        dtype: dtype of the means (default float32, the release's).

    Raises:
        ValueError: ``n_terms < 1``, ``momentum`` outside ``[0, 1)``, ``eps < 0``.
    """

    def __init__(
        self,
        n_terms: int,
        momentum: float = 0.95,
        eps: float = 1e-8,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(n_terms, bool) or not isinstance(n_terms, int) or n_terms < 1:
            raise ValueError(f"n_terms must be an int >= 1 (expected e.g. 4, got {n_terms!r})")
        self.momentum = _check_unit_interval("momentum", momentum, low_open=False, high_open=True)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite number >= 0 (expected e.g. 1e-8, got {eps!r})")
        self.n_terms = n_terms
        self.eps = float(eps)
        self.register_buffer("means", torch.empty(n_terms, device=device, dtype=dtype or torch.float32))
        self.register_buffer("started", torch.empty((), device=device, dtype=torch.bool))
        self.reset_parameters()

    @torch.no_grad()
    def reset(self) -> None:
        """Forget the means: the next call starts them from its losses."""
        self.means.zero_()
        self.started.fill_(False)

    def reset_parameters(self) -> None:
        """Same as :meth:`reset` (the module has no parameters)."""
        self.reset()

    def forward(self, *losses: Tensor) -> tuple[Tensor, ...]:
        """Update the means and return the normalised losses.

        Args:
            *losses: ``n_terms`` scalar (0-d) loss tensors.

        Returns:
            ``n_terms`` scalars ``L_i / (m_i + eps)``; gradients flow through ``L_i`` only.

        Raises:
            ValueError: a wrong number of terms or a non-scalar term.
        """
        if len(losses) != self.n_terms:
            raise ValueError(f"expected {self.n_terms} loss terms, got {len(losses)}")
        for i, loss in enumerate(losses):
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"loss term {i} must be a scalar tensor (expected shape (), got {shape})")
        with torch.no_grad():
            new = torch.stack([loss.detach().to(self.means) for loss in losses])
            m = self.momentum
            moved = m * self.means + (1 - m) * new
            self.means.copy_(torch.where(self.started, moved, new))
            self.started.fill_(True)
        # `means[i] + eps` is a new tensor: later in-place updates of the buffer cannot reach autograd.
        return tuple(loss / (self.means[i].to(loss.dtype) + self.eps) for i, loss in enumerate(losses))

    def extra_repr(self) -> str:
        return f"n_terms={self.n_terms}, momentum={self.momentum}, eps={self.eps}"


# ----------------------------------------------------------------------------- ramp


def sigmoid_ramp(epoch: float, total: float, *, scale: float = 10.0) -> float:
    """``2 / (1 + exp(-scale * epoch / total)) - 1``: 0 at epoch 0, rising towards 1.

    The release weighs its two text-only loss terms by this ramp over the 0-based epoch with
    ``total = 30`` and ``scale = 10`` (``ssm/training/legacy.py``; DANN's schedule).

    Args:
        epoch: current (0-based) epoch, ``>= 0``; may exceed ``total``.
        total: the ramp's length in epochs, ``> 0``.
        scale: steepness (release: 10).

    Returns:
        The weight, a float in ``[0, 1)``.

    Raises:
        ValueError: ``epoch < 0``, ``total <= 0`` or a non-finite value.

    Examples::

        >>> round(sigmoid_ramp(3, 30), 6)
        0.462117
    """
    for name, v in (("epoch", epoch), ("total", total), ("scale", scale)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number (expected a float, got {v!r})")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0 (expected a 0-based epoch, got {epoch})")
    if total <= 0:
        raise ValueError(f"total must be > 0 (expected the ramp length in epochs, got {total})")
    return 2.0 / (1.0 + math.exp(-scale * epoch / total)) - 1.0
