"""Text-aligned classification heads: cosine similarity to text prototypes over a temperature.

SSM scores a visual feature ``z`` against the ``K`` text prototypes ``T`` (paper eq. 25) and
divides by a temperature ``tau`` (eqs. 9, 12, 13; ``tau = 0.01``)::

    logits[b, k] = cos(z_b, T_k) / tau

The logits go to a softmax cross-entropy for expressions (eq. 12) or to per-AU sigmoids / BCE for
AUs (eq. 13). The baseline's linear head (eq. 6) is a plain :class:`torch.nn.Linear`.

Two more layers reproduce what the released SSM code (``ssm/models/bp4d.py``, ``disfa.py``) does
instead (not in the paper):

* :class:`LinearCosineHead` -- ``Linear(z) + scale * cos(z, T) / tau`` (release: scale 0.1, tau 0.01;
  the linear head is kept beside the text head).
* :class:`AUPairSmoothing` -- a learned depthwise ``Conv1d`` over consecutive *pairs* of AU frames
  (release: kernel 5, padding 2, weights ``1/5``, i.e. ``0.4 x`` the pair mean at initialisation).

Examples::

    >>> head = CosineClassifier(512)
    >>> z, text = torch.randn(4, 512), torch.randn(7, 512)
    >>> head(z, text).shape
    torch.Size([4, 7])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CosineClassifier", "LinearCosineHead", "AUPairSmoothing"]


def _check_features(z: Tensor, text: Tensor, dim: int | None) -> None:
    """Metadata checks of ``z [B, D] | [B, T, D]`` against ``text [K, D]``."""
    if not isinstance(z, Tensor) or not isinstance(text, Tensor):
        raise TypeError(
            f"z and text must be Tensors (expected Tensor, Tensor, got {type(z).__name__}, {type(text).__name__})"
        )
    if text.ndim != 2:
        raise ValueError(f"text has the wrong shape (expected [K, D], got shape {tuple(text.shape)})")
    if text.shape[0] == 0:
        raise ValueError(f"text holds no prototypes (expected [K >= 1, D], got shape {tuple(text.shape)})")
    if z.ndim not in (2, 3):
        raise ValueError(f"z has the wrong shape (expected [B, D] or [B, T, D], got shape {tuple(z.shape)})")
    if z.shape[-1] != text.shape[-1] or (dim is not None and text.shape[-1] != dim):
        expected = dim if dim is not None else "the same D"
        raise ValueError(
            f"z and text must have feature size D={expected} "
            f"(expected [.., {expected}] twice, got z {tuple(z.shape)} and text {tuple(text.shape)})"
        )


class CosineClassifier(nn.Module):
    """Logits ``cos(z, T) / tau`` of visual features against text prototypes (paper eq. 25).

    Args:
        dim: feature size ``D`` to check inputs against; ``None`` accepts any (``z`` and ``text``
            must still agree).
        tau: temperature (paper: 0.01). With ``learnable_tau`` it is the initial value.
        learnable_tau: learn ``log(tau)`` (a parameter ``log_tau``); otherwise ``tau`` is a fixed
            Python float and the logits are exactly ``cos / tau``.
        eps: norm floor of the L2 normalisation.
        device: device of ``log_tau`` (learnable only).
        dtype: dtype of ``log_tau`` (learnable only).

    Shapes:
        ``forward(z [B, D] or [B, T, D], text [K, D]) -> [B, K] or [B, T, K]``.
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        tau: float = 0.01,
        learnable_tau: bool = False,
        eps: float = 1e-12,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim is not None and dim < 1:
            raise ValueError(f"dim is out of range (expected >= 1 or None, got {dim})")
        if not tau > 0:
            raise ValueError(f"tau must be positive (expected > 0, got {tau})")
        self.dim = dim
        self.tau_init = float(tau)
        self.learnable_tau = bool(learnable_tau)
        self.eps = float(eps)
        if self.learnable_tau:
            self.log_tau = nn.Parameter(torch.empty((), device=device, dtype=dtype))
        else:
            self.register_parameter("log_tau", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set ``tau`` back to its initial value."""
        if self.log_tau is not None:
            with torch.no_grad():
                self.log_tau.fill_(math.log(self.tau_init))

    @property
    def tau(self) -> Tensor | float:
        """Current temperature."""
        return self.log_tau.exp() if self.log_tau is not None else self.tau_init

    def forward(self, z: Tensor, text: Tensor) -> Tensor:
        """Cosine logits.

        Args:
            z: visual features ``[B, D]`` or ``[B, T, D]``.
            text: text prototypes ``[K, D]``.

        Returns:
            ``[B, K]`` or ``[B, T, K]``.
        """
        _check_features(z, text, self.dim)
        z = F.normalize(z, dim=-1, eps=self.eps)
        t = F.normalize(text, dim=-1, eps=self.eps).to(z.dtype)
        cos = z @ t.t()
        if self.log_tau is None:
            return cos / self.tau_init
        return cos / self.log_tau.exp().to(cos.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, tau={self.tau_init}, learnable_tau={self.learnable_tau}"


class LinearCosineHead(nn.Module):
    """Composite logits ``Linear(z) + scale * cos(z, T) / tau`` (the released SSM code's heads).

    The released code (``ssm/models/bp4d.py`` and ``disfa.py``, ``forward``) keeps the baseline's
    linear classifier (paper eq. 6) beside the text-aligned one (eq. 25) and adds them::

        logits = W z + b + scale * cos(z, T) / tau        (release: scale = 0.1, tau = 0.01)

    for the expression head (``dfer_head``) and the AU head (``au_head``); it also returns the text
    term ``scale * cos(z, T) / tau`` alone (its second and fourth outputs), which
    ``forward(..., return_text=True)`` gives here. With ``scale=0`` this is a plain linear head;
    without the linear part it is :class:`CosineClassifier` times ``scale``.

    Args:
        dim: feature size ``D``.
        num_classes: number of classes / AUs ``K``.
        scale: weight of the cosine term (release: 0.1).
        tau: temperature of the cosine term (release: 0.01).
        learnable_tau: learn ``log(tau)`` (see :class:`CosineClassifier`).
        bias: bias in the linear classifier.
        normalize_text: L2-normalise ``text`` here. The release passes text features that are
            already unit-norm (the DPM renormalises them) and does not normalise them again; pass
            ``False`` for bit-identical logits in that case.
        eps: norm floor of the L2 normalisation.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shapes:
        ``forward(z [B, D] or [B, T, D], text [K, D]) -> [B, K] or [B, T, K]`` (a pair
        ``(logits, text_term)`` of that shape with ``return_text=True``).

    Attributes:
        linear: the ``nn.Linear(D, K)`` (release: ``dfer_head`` / ``au_head``).
        cosine: the :class:`CosineClassifier`.

    Examples::

        >>> head = LinearCosineHead(512, 7)
        >>> z, text = torch.randn(4, 512), torch.randn(7, 512)
        >>> logits, text_term = head(z, text, return_text=True)
        >>> torch.allclose(logits, head.linear(z) + text_term)
        True
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        scale: float = 0.1,
        tau: float = 0.01,
        learnable_tau: bool = False,
        bias: bool = True,
        normalize_text: bool = True,
        eps: float = 1e-12,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("dim", dim), ("num_classes", num_classes)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int (expected an int >= 1, got {val!r})")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite (expected a finite float, got {scale})")
        self.dim, self.num_classes = dim, num_classes
        self.scale = float(scale)
        self.normalize_text = bool(normalize_text)
        self.linear = nn.Linear(dim, num_classes, bias=bias, device=device, dtype=dtype)
        self.cosine = CosineClassifier(dim, tau=tau, learnable_tau=learnable_tau, eps=eps, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """Re-draw the linear classifier (``nn.Linear`` init) and reset ``tau``."""
        self.linear.reset_parameters()
        self.cosine.reset_parameters()

    def text_logits(self, z: Tensor, text: Tensor) -> Tensor:
        """The text term alone, ``scale * cos(z, T) / tau`` (the release's ``*_text_logits``)."""
        _check_features(z, text, self.dim)
        if text.shape[0] != self.num_classes:
            raise ValueError(
                f"text has the wrong number of classes (expected [K={self.num_classes}, {self.dim}], "
                f"got shape {tuple(text.shape)})"
            )
        zn = F.normalize(z, dim=-1, eps=self.cosine.eps)
        t = F.normalize(text, dim=-1, eps=self.cosine.eps) if self.normalize_text else text
        cos = zn @ t.to(zn.dtype).t()
        tau = self.cosine.tau
        return (cos / (tau if isinstance(tau, float) else tau.to(cos.dtype))) * self.scale

    def forward(self, z: Tensor, text: Tensor, *, return_text: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Composite logits.

        Args:
            z: visual features ``[B, D]`` or ``[B, T, D]`` (not normalised: the linear part sees them
                as they are).
            text: text prototypes ``[K, D]``.
            return_text: also return the text term.

        Returns:
            ``logits`` ``[B, K]`` / ``[B, T, K]``, or ``(logits, text_term)``.
        """
        text_term = self.text_logits(z, text)
        logits = self.linear(z) + text_term
        return (logits, text_term) if return_text else logits

    def extra_repr(self) -> str:
        return f"scale={self.scale}, normalize_text={self.normalize_text}"


class AUPairSmoothing(nn.Module):
    """Learned depthwise ``Conv1d`` over groups of consecutive AU frames (the released code's ``au_smooth``).

    The released code (``ssm/models/bp4d.py`` / ``disfa.py``, end of ``forward``) views its per-frame
    AU logits ``[B * T, M]`` as ``[B * T / 2, 2, M]`` -- consecutive frame *pairs* ``(0, 1), (2, 3),
    ...`` -- and runs a depthwise ``Conv1d(M, M, kernel_size=5, padding=2, groups=M, bias=False)``
    along each 2-frame pair (zero padding), with every weight initialised to ``1/5``. At
    initialisation both frames of a pair therefore become ``0.4 x`` the pair's mean; only the centre
    taps can ever reach a pair, so with ``group_size=2`` and ``kernel_size=5`` the outer two taps get
    no gradient. This layer does the same on ``[..., T, M]`` logits with ``T`` a multiple of
    ``group_size``; groups never cross the ``T`` axis (the release's flat ``[B * T, M]`` rows are
    the case ``[B * T, M]``, or ``[B, T, M]`` with even ``T``).

    Args:
        num_aus: ``M`` (channels).
        group_size: frames per group (release: 2).
        kernel_size: odd Conv1d kernel size; padding is ``kernel_size // 2`` (release: 5).
        init_value: initial value of every weight; ``None`` = ``1 / kernel_size`` (the release).
        learnable: learn the weights (release: yes); otherwise a buffer.
        device: device of the weight.
        dtype: dtype of the weight.

    Shapes:
        ``forward(logits [..., T, M]) -> [..., T, M]``.

    Attributes:
        weight: ``[M, 1, kernel_size]``, the layout of the release's ``au_smooth.weight``.

    Examples::

        >>> smooth = AUPairSmoothing(12)
        >>> x = torch.randn(3, 16, 12)
        >>> y = smooth(x)
        >>> torch.allclose(y[:, 0], 0.4 * (x[:, 0] + x[:, 1]) / 2)
        True
    """

    def __init__(
        self,
        num_aus: int,
        *,
        group_size: int = 2,
        kernel_size: int = 5,
        init_value: float | None = None,
        learnable: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("num_aus", num_aus), ("group_size", group_size), ("kernel_size", kernel_size)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int (expected an int >= 1, got {val!r})")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (expected 1, 3, 5, ..., got {kernel_size})")
        self.num_aus, self.group_size, self.kernel_size = num_aus, group_size, kernel_size
        self.init_value = 1.0 / kernel_size if init_value is None else float(init_value)
        self.learnable = bool(learnable)
        w = torch.empty(num_aus, 1, kernel_size, device=device, dtype=dtype)
        if self.learnable:
            self.weight = nn.Parameter(w)
        else:
            self.register_buffer("weight", w)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every weight to ``init_value`` (release: ``1 / kernel_size``)."""
        self.weight.fill_(self.init_value)

    def forward(self, logits: Tensor) -> Tensor:
        """Args:
            logits: ``[..., T, M]`` per-frame AU logits, ``T % group_size == 0``.

        Returns:
            ``[..., T, M]`` smoothed logits.
        """
        if not isinstance(logits, Tensor) or logits.ndim < 2:
            raise ValueError(
                f"logits must be a Tensor with frames and AUs (expected shape [..., T, {self.num_aus}], got {_desc(logits)})"
            )
        *lead, t, m = logits.shape
        if m != self.num_aus:
            raise ValueError(
                f"logits have the wrong number of AUs (expected [..., T, {self.num_aus}], got shape {tuple(logits.shape)})"
            )
        if t % self.group_size != 0:
            raise ValueError(
                f"the frame axis must split into groups of {self.group_size} consecutive frames "
                f"(expected T % {self.group_size} == 0, got T={t} in shape {tuple(logits.shape)})"
            )
        g = logits.reshape(-1, self.group_size, m).transpose(1, 2)  # [N * T / g, M, g]
        out = F.conv1d(g, self.weight.to(g.dtype), padding=self.kernel_size // 2, groups=m)
        return out.transpose(1, 2).reshape(logits.shape)

    def extra_repr(self) -> str:
        return (
            f"num_aus={self.num_aus}, group_size={self.group_size}, kernel_size={self.kernel_size}, "
            f"init_value={self.init_value:g}, learnable={self.learnable}"
        )


def _desc(x: object) -> str:
    if isinstance(x, Tensor):
        return f"Tensor of shape {tuple(x.shape)}"
    return type(x).__name__
