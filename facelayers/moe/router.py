"""Task top-k routers of :class:`facelayers.moe.MoEFFN` (modules of their own, passed as ``router_layer=``).

The router protocol (what ``MoEFFN`` calls)::

    router(tokens [N, D], task_of_token [N] | None, layout: TokenLayout | None) -> RouterOutput

``RouterOutput.expert_idx`` are *virtual* expert ids ``task * E + e`` into the expert bank
``[num_tasks, E, ...]`` (so one grouped call serves every task), ``gates`` the weights of the ``k``
slots and ``probs`` each token's softmax over its own task's ``E`` experts (for statistics and
aux losses). A router must expose ``num_experts``, ``top_k`` and ``num_tasks``.

Customising routing without patching anything: subclass :class:`TaskTopKRouter` (override
:meth:`~TaskTopKRouter.select` or :meth:`~TaskTopKRouter.assign`) and pass the class as
``MoEFFN(..., router_layer=...)`` / ``inject_moe_(..., router_layer=...)``; or observe/replace the
output of a built router with ``moe.router.register_forward_hook(...)`` (returning a new
``RouterOutput`` from the hook replaces it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RouterOutput", "TokenLayout", "TaskTopKRouter", "ReleaseMisroutedTopKRouter"]


class RouterOutput(NamedTuple):
    """What a router returns.

    Attributes:
        expert_idx: ``[N, k]`` int64 virtual expert ids ``task * E + e``.
        gates: ``[N, k]`` gate weight of each slot (router dtype, at least float32).
        probs: ``[N, E]`` softmax over the token's own task's experts (after noise).
    """

    expert_idx: Tensor
    gates: Tensor
    probs: Tensor


class TokenLayout(NamedTuple):
    """How the ``N`` routed tokens were laid out in the layer input (memory order of ``x[..., D]``).

    Attributes:
        shape: the input shape without the feature dim: ``(N,)`` for ``[N, D]``, ``(B, L)`` or
            ``(L, B)`` for 3-D inputs.
        batch_dim: 0 (``[B, L, D]``) or 1 (``[L, B, D]``) for 3-D inputs when known, else None.
    """

    shape: tuple[int, ...]
    batch_dim: int | None


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int (expected an int >= 1, got {value!r})")
    return value


class TaskTopKRouter(nn.Module):
    """Per-task linear router with top-k selection (paper eq. S1: ``g = softmax(R_t x)``, top-k of ``g``).

    Each task ``t`` has its own router ``R_t`` (weight ``[E, D]``, bias ``[E]``); a token is routed by
    the router of the task of its sample. Gaussian noise of std ``noise_std`` is added to the logits in
    training mode (released code: 1e-2); the top-k gates are renormalised to sum to one when
    ``renormalize`` (paper) or kept as raw softmax values (released code). Router math runs in at
    least float32.

    Args:
        dim: token width ``D``.
        num_experts: experts per task ``E``.
        top_k: experts per token ``k`` (``1 <= k <= E``).
        num_tasks: number of task routers ``T``.
        renormalize: renormalise the top-k gates to sum to one.
        noise_std: std of the training-mode logit noise (``>= 0``).
        device, dtype: of the parameters.

    Shapes:
        tokens ``[N, D]``, task_of_token ``[N]`` (or None: every token task 0) -> :class:`RouterOutput`
        with ``expert_idx [N, k]``, ``gates [N, k]``, ``probs [N, E]``.

    Parameters: ``weight [T, E, D]``, ``bias [T, E]``.

    Examples::

        >>> router = TaskTopKRouter(8, 4, top_k=2, num_tasks=2)
        >>> out = router(torch.randn(5, 8), torch.tensor([0, 1, 1, 0, 1]))
        >>> out.expert_idx.shape, out.gates.shape, out.probs.shape
        (torch.Size([5, 2]), torch.Size([5, 2]), torch.Size([5, 4]))
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        top_k: int = 2,
        num_tasks: int = 1,
        renormalize: bool = True,
        noise_std: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_experts", num_experts), ("top_k", top_k), ("num_tasks", num_tasks)):
            _positive_int(name, value)
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts ({num_experts}) (expected 1 <= top_k <= {num_experts}, "
                             f"got top_k={top_k})")
        if (not isinstance(noise_std, (int, float)) or isinstance(noise_std, bool) or not math.isfinite(noise_std)
                or noise_std < 0):
            raise ValueError(f"noise_std must be >= 0 (expected a float >= 0, got {noise_std!r})")
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_tasks = num_tasks
        self.renormalize = bool(renormalize)
        self.noise_std = float(noise_std)
        fk = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_tasks, num_experts, dim, **fk))
        self.bias = nn.Parameter(torch.empty(num_tasks, num_experts, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weight with gain 0.1 per task (as the released code's router), zero bias."""
        bound = 0.1 * math.sqrt(6.0 / (self.dim + self.num_experts))
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.zero_()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, num_tasks={self.num_tasks}, "
                f"renormalize={self.renormalize}, noise_std={self.noise_std}")

    def _check_inputs(self, tokens: Tensor, task_of_token: Tensor | None) -> None:
        """Shape / dtype checks (free: no host sync); task-id values only for CPU tensors."""
        if tokens.dim() != 2 or tokens.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__}: tokens must be [N, dim={self.dim}] "
                             f"(expected [N, {self.dim}], got {list(tokens.shape)})")
        if task_of_token is None:
            return
        if task_of_token.dtype.is_floating_point or task_of_token.dtype.is_complex or task_of_token.dtype == torch.bool:
            raise TypeError(f"{type(self).__name__}: task ids must be integers (expected an integer tensor, "
                            f"got {task_of_token.dtype})")
        if task_of_token.shape != (tokens.shape[0],):
            raise ValueError(f"{type(self).__name__}: one task id per token (expected shape [{tokens.shape[0]}], "
                             f"got {list(task_of_token.shape)})")
        if task_of_token.device.type == "cpu" and task_of_token.numel() and self.num_tasks > 1:
            lo, hi = int(task_of_token.min()), int(task_of_token.max())
            if lo < 0 or hi >= self.num_tasks:
                raise ValueError(f"{type(self).__name__}: task id out of range (expected 0..{self.num_tasks - 1}, "
                                 f"got {lo if lo < 0 else hi})")

    # ------------------------------------------------------------------ steps (override in subclasses)
    def logits(self, tokens: Tensor, task_of_token: Tensor | None) -> Tensor:
        """Router logits ``[N, E]`` of each token's own task router, in at least float32."""
        n_tokens, e = tokens.shape[0], self.num_experts
        rdtype = torch.promote_types(tokens.dtype, torch.float32)
        xr = tokens.to(rdtype)
        if task_of_token is None or self.num_tasks == 1:
            return F.linear(xr, self.weight[0].to(rdtype), self.bias[0].to(rdtype))
        all_logits = F.linear(xr, self.weight.reshape(-1, self.dim).to(rdtype), self.bias.reshape(-1).to(rdtype))
        all_logits = all_logits.view(n_tokens, self.num_tasks, e)
        return all_logits.gather(1, task_of_token.view(n_tokens, 1, 1).expand(n_tokens, 1, e)).squeeze(1)

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k of the probabilities: ``(gates [N, k], local expert ids [N, k])``, renormalised if asked."""
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        return top_p, top_i

    def assign(self, top_i: Tensor, layout: TokenLayout | None) -> Tensor:
        """The local expert ids ``[N, k]`` that process each (token, slot): the token's own choice here."""
        return top_i

    def forward(
        self, tokens: Tensor, task_of_token: Tensor | None = None, layout: TokenLayout | None = None
    ) -> RouterOutput:
        """Route ``tokens [N, D]`` (task ids ``[N]`` or None for task 0); see the class docstring.

        Raises:
            ValueError: ``tokens`` not ``[N, dim]``, or task ids not ``[N]`` (or, for CPU tensors,
                outside ``[0, num_tasks)``).
            TypeError: task ids that are not integers.
        """
        self._check_inputs(tokens, task_of_token)
        logits = self.logits(tokens, task_of_token)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        probs = torch.softmax(logits, dim=-1)
        gates, top_i = self.select(probs)
        expert_idx = self.assign(top_i, layout)
        if task_of_token is not None and self.num_tasks > 1:
            expert_idx = expert_idx + (task_of_token * self.num_experts).unsqueeze(1)
        return RouterOutput(expert_idx, gates, probs)


class ReleaseMisroutedTopKRouter(TaskTopKRouter):
    """The released SSM code's MoE dispatch, bug included -- FOR RUNNING RELEASED WEIGHTS ONLY.

    Released code, ``ssm/models/moe.py`` (``TrueMoE_FFN.forward``): the top-k indices ``[N, k]`` of the
    tokens (flattened in ``[L, N]`` order: OpenAI-CLIP blocks see ``[L, B, D]``) are read back flat,
    row-major, as ``k`` chunks of ``N``, so slot ``j`` of token ``r`` is processed by the expert that
    token ``(j * N + r) // k`` chose for its slot ``(j * N + r) % k`` -- usually ANOTHER token's choice,
    possibly another image's. The gate of the slot stays the token's own ``j``-th top-k value. So an
    image's features depend on the other images in the same forward call. The released weights were
    trained with it; use this router (never a default anywhere) only to reproduce their outputs.

    Routing logits, noise, softmax, top-k and (no) renormalisation are those of
    :class:`TaskTopKRouter`. The flat read is done in the release's ``[L, B]`` token order whatever the
    layer's input layout: ``[B, L, D]`` inputs are read as if transposed (``layout.batch_dim`` must be
    known), ``[L, B, D]`` inputs and ``[N, D]`` inputs in memory order. With ``num_tasks > 1`` (not a
    release setting) the misread acts on the task-local ids and each token keeps its own task's bank.

    Args: as :class:`TaskTopKRouter` (release values: ``renormalize=False, noise_std=1e-2``, see
    ``facelayers.moe.SSM_RELEASE_MOE_KWARGS``).
    """

    def assign(self, top_i: Tensor, layout: TokenLayout | None) -> Tensor:
        n, k = top_i.shape
        transpose = False
        if layout is not None and len(layout.shape) == 2:
            if layout.batch_dim is None:
                raise ValueError(
                    "ReleaseMisroutedTopKRouter needs the token layout of 3-D inputs (expected MoEFFN.batch_first "
                    "True or False, or task ids that identify the batch dimension, got batch_first=None without ids)")
            transpose = layout.batch_dim == 0
        if transpose:
            b, length = layout.shape  # type: ignore[union-attr]
            seq_major = top_i.view(b, length, k).transpose(0, 1).reshape(n, k)
        else:
            seq_major = top_i
        misread = seq_major.reshape(k, n).t()  # slot j of token r <- flat element j * n + r
        if transpose:
            misread = misread.reshape(length, b, k).transpose(0, 1)
        return misread.reshape(n, k)
