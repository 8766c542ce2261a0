"""Grouped expert bank of :class:`facelayers.moe.MoEFFN` (a module of its own, passed as ``experts_layer=``).

The expert-bank protocol (what ``MoEFFN`` calls)::

    experts(tokens [N, D], expert_idx [N, k], gates [N, k]) -> [N, D]

with ``expert_idx`` virtual ids ``task * E + e`` (see :mod:`facelayers.moe.router`). The output is
``sum_j gates[n, j] * E_{expert_idx[n, j]}(tokens[n])`` (paper eq. S2's sum, before γ). An expert
bank must expose ``num_experts`` and ``num_tasks``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..ops.grouped_experts import available_backends, grouped_expert_mlp
from ..ops.grouped_experts.activations import check_activation

__all__ = ["GroupedExperts"]


class GroupedExperts(nn.Module):
    """``T * E`` two-layer expert MLPs in weight banks, run by ONE grouped-expert call for a mixed batch.

    Expert ``(t, e)``: ``E(x) = act(x @ w1[t, e] + b1[t, e]) @ w2[t, e] + b2[t, e]`` (paper eq. S2,
    ``E_j``). The banks are flattened to ``T * E`` virtual experts (id ``t * E + e``) and passed to
    :func:`facelayers.ops.grouped_experts.grouped_expert_mlp` (the pattern of scattermoe's
    ``ParallelExperts``; weights are stored ``[.., in, out]`` as the op reads them). Under autocast the
    experts run in the autocast dtype (explicit casts, so every backend sees one dtype).

    Args:
        dim: token width ``D``.
        hidden_dim: hidden width ``H`` of each expert.
        num_experts: experts per task ``E``.
        num_tasks: number of tasks ``T`` with their own experts.
        activation: "gelu" (exact) | "quick_gelu" | "relu" | callable (the registry of
            ``facelayers.ops.grouped_experts.activations``).
        backend: a grouped-expert backend ("auto" | "triton" | "torch" | "reference" | a name added
            with ``facelayers.ops.grouped_experts.register_backend``).
        device, dtype: of the parameters.

    Shapes:
        tokens ``[N, D]``, expert_idx ``[N, k]`` (ids in ``[0, T * E)``), gates ``[N, k]`` -> ``[N, D]``
        in the compute dtype (autocast dtype, else the tokens' dtype).

    Parameters: ``w1 [T, E, D, H]``, ``b1 [T, E, H]``, ``w2 [T, E, H, D]``, ``b2 [T, E, D]``.

    Examples::

        >>> bank = GroupedExperts(8, 16, 4, num_tasks=2)
        >>> bank(torch.randn(5, 8), torch.randint(0, 8, (5, 2)), torch.rand(5, 2)).shape
        torch.Size([5, 8])
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        *,
        num_tasks: int = 1,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts),
                            ("num_tasks", num_tasks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int (expected an int >= 1, got {value!r})")
        check_activation(activation)
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.num_experts = num_experts
        self.num_tasks = num_tasks
        self.activation = activation
        self.backend = backend  # validated by the property
        fk = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(num_tasks, num_experts, dim, hidden_dim, **fk))
        self.b1 = nn.Parameter(torch.empty(num_tasks, num_experts, hidden_dim, **fk))
        self.w2 = nn.Parameter(torch.empty(num_tasks, num_experts, hidden_dim, dim, **fk))
        self.b2 = nn.Parameter(torch.empty(num_tasks, num_experts, dim, **fk))
        self.reset_parameters()

    @property
    def backend(self) -> str:
        """The grouped-expert backend name (settable; checked against the registry)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        names = available_backends()
        if value not in names:
            raise ValueError(f"backend must be one of {names} (expected a registered name, got {value!r})")
        self._backend = value

    def reset_parameters(self) -> None:
        """Xavier-uniform expert matrices (per expert, as the released code's ``nn.init.xavier_uniform_``), zero biases."""
        bound = math.sqrt(6.0 / (self.dim + self.hidden_dim))
        with torch.no_grad():
            self.w1.uniform_(-bound, bound)
            self.w2.uniform_(-bound, bound)
            self.b1.zero_()
            self.b2.zero_()

    def extra_repr(self) -> str:
        act = self.activation if isinstance(self.activation, str) else getattr(self.activation, "__name__", "callable")
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
                f"num_tasks={self.num_tasks}, activation={act!r}, backend={self.backend!r}")

    def forward(self, tokens: Tensor, expert_idx: Tensor, gates: Tensor) -> Tensor:
        """``sum_j gates[n, j] * expert_{expert_idx[n, j]}(tokens[n])``; shapes in the class docstring."""
        dev_type = tokens.device.type
        cdtype = torch.get_autocast_dtype(dev_type) if torch.is_autocast_enabled(dev_type) else tokens.dtype
        ne = self.num_tasks * self.num_experts
        with torch.autocast(dev_type, enabled=False):
            return grouped_expert_mlp(
                tokens.to(cdtype), expert_idx, gates.to(cdtype),
                self.w1.reshape(ne, self.dim, self.hidden_dim).to(cdtype),
                self.b1.reshape(ne, self.hidden_dim).to(cdtype),
                self.w2.reshape(ne, self.hidden_dim, self.dim).to(cdtype),
                self.b2.reshape(ne, self.dim).to(cdtype),
                activation=self.activation, backend=self.backend,
            )


