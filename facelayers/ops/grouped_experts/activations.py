"""The one activation registry of the grouped-expert op (and of every MoE layer that names an activation).

Names map to elementwise functions; every backend (``torch``, ``reference``, ``triton``) and
:class:`facelayers.moe.GroupedExperts` resolve names here, so one name means one function everywhere.
A callable may be passed instead of a name wherever an activation is accepted.

=============  =======================================================================
name           function
=============  =======================================================================
``gelu``       exact (erf) GELU, ``torch.nn.functional.gelu`` (= ``nn.GELU()``)
``quick_gelu`` ``x * sigmoid(1.702 x)`` (OpenAI CLIP's ``QuickGELU``)
``relu``       ``torch.relu``
=============  =======================================================================
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "resolve_activation", "activation_module", "Activation", "check_activation"]


def _gelu(x: Tensor) -> Tensor:
    return F.gelu(x)  # exact erf form, same as nn.GELU()


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _relu(x: Tensor) -> Tensor:
    return torch.relu(x)


#: Registry of named activations: name -> elementwise function.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": _gelu,
    "quick_gelu": _quick_gelu,
    "relu": _relu,
}


def check_activation(activation: object) -> None:
    """Raise ``ValueError`` unless ``activation`` is a registered name or a callable."""
    if callable(activation):
        return
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or a callable "
                     f"(expected a registered name or a callable, got {activation!r})")


def resolve_activation(activation: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The elementwise function of ``activation`` (a registered name or a callable, returned as is)."""
    check_activation(activation)
    return activation if callable(activation) else ACTIVATIONS[activation]  # type: ignore[index]


class Activation(nn.Module):
    """A registered activation as a parameter-free module (``Activation("gelu")(x) == F.gelu(x)``).

    Args:
        name: a name of :data:`ACTIVATIONS`.

    Shapes:
        any input; output like the input.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        if not isinstance(name, str):
            raise TypeError(f"name must be a registered activation name (expected str, got {type(name).__name__})")
        check_activation(name)
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return ACTIVATIONS[self.name](x)

    def extra_repr(self) -> str:
        return repr(self.name)


def activation_module(activation: str | nn.Module) -> nn.Module:
    """A module for ``activation``: ``nn.GELU()`` for "gelu", :class:`Activation` for other names, a
    module as is."""
    if isinstance(activation, nn.Module):
        return activation
    if activation == "gelu":
        return nn.GELU()
    if isinstance(activation, str):
        return Activation(activation)
    raise TypeError(f"activation must be a registered name or an nn.Module "
                    f"(expected one of {sorted(ACTIVATIONS)} or a module, got {type(activation).__name__})")
