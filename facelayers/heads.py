"""Text-aligned classification head: cosine similarity to text prototypes over a temperature.

SSM scores a visual feature ``z`` against the ``K`` text prototypes ``T`` (paper eq. 25) and
divides by a temperature ``tau`` (eqs. 9, 12, 13; ``tau = 0.01``)::

    logits[b, k] = cos(z_b, T_k) / tau

The logits go to a softmax cross-entropy for expressions (eq. 12) or to per-AU sigmoids / BCE for
AUs (eq. 13). The baseline's linear head (eq. 6) is a plain :class:`torch.nn.Linear`.

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

__all__ = ["CosineClassifier"]


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
            raise ValueError(f"dim must be >= 1 or None, got {dim}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
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
        if text.ndim != 2:
            raise ValueError(f"text must be [K, D], got shape {tuple(text.shape)}")
        if z.ndim not in (2, 3):
            raise ValueError(f"z must be [B, D] or [B, T, D], got shape {tuple(z.shape)}")
        if z.shape[-1] != text.shape[-1] or (self.dim is not None and text.shape[-1] != self.dim):
            expected = self.dim if self.dim is not None else "the same D"
            raise ValueError(
                f"z and text must have feature size D={expected}; got z {tuple(z.shape)} and text {tuple(text.shape)}"
            )
        z = F.normalize(z, dim=-1, eps=self.eps)
        t = F.normalize(text, dim=-1, eps=self.eps).to(z.dtype)
        cos = z @ t.t()
        if self.log_tau is None:
            return cos / self.tau_init
        return cos / self.log_tau.exp().to(cos.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, tau={self.tau_init}, learnable_tau={self.learnable_tau}"
