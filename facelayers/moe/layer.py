"""MoE feed-forward layer: a shared expert (the original FFN) plus routed private experts.

Implements the paper's Mixture of Private Experts (Sec. III-A, Appendix E, eqs. S1-S2)::

    y = E_s(x) + γ ⊙ Σ_{j ∈ TopK(g)} ĝ_j E_j(x),   g = softmax(R_t x),   E_j(x) = W2_j act(W1_j x + b1_j) + b2_j

where ``E_s`` is the pretrained FFN (kept unchanged), ``R_t`` and the private experts ``E_j`` belong
to the task ``t`` of the sample the token comes from, and ``ĝ`` are the top-k gates renormalised to
sum to one. The private experts of all tasks live in weight banks ``[num_tasks, E, ...]`` that are
flattened into ``num_tasks * E`` "virtual experts" (id ``task * E + e``), so ONE call of
:func:`facelayers.ops.grouped_experts.grouped_expert_mlp` runs every task's experts for a mixed batch.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.grouped_experts import grouped_expert_mlp
from ..ops.grouped_experts.reference import ACTIVATIONS

__all__ = ["MoEFFN", "moe_task_context", "moe_aux_loss", "moe_load_stats", "SSM_RELEASE_MOE_KWARGS"]

#: ``MoEFFN`` keyword arguments reproducing the released SSM code's choices (except its dispatch bug):
#: one task-agnostic expert pool, scalar γ, top-k gates not renormalised, router noise 1e-2.
SSM_RELEASE_MOE_KWARGS: dict = dict(
    num_tasks=1, renormalize=False, noise_std=1e-2, gamma="scalar", gamma_init=0.1, hidden_dim=512,
    num_experts=4, top_k=2, activation="gelu",
)


def _as_task_tensor(task_ids: int | Sequence[int] | Tensor) -> Tensor:
    if isinstance(task_ids, bool):
        raise TypeError("task_ids must be an int, a sequence of ints or an integer tensor, got bool")
    if isinstance(task_ids, int):
        return torch.tensor(task_ids, dtype=torch.long)
    if isinstance(task_ids, Tensor):
        if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
            raise TypeError(f"task_ids must be an integer tensor, got dtype {task_ids.dtype}")
        t = task_ids.long()
    else:
        try:
            t = torch.as_tensor(list(task_ids), dtype=torch.long)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"task_ids must be an int, a sequence of ints or an integer tensor, "
                            f"got {type(task_ids).__name__}") from exc
    if t.dim() > 1:
        raise ValueError(f"task_ids must be a scalar or a 1-D tensor [B], got shape {tuple(t.shape)}")
    return t


class MoEFFN(nn.Module):
    """Shared FFN + per-task routed private experts (paper eqs. S1-S2).

    Args:
        shared: the shared expert, an FFN module mapping ``[..., dim] -> [..., dim]`` (e.g. the
            pretrained CLIP MLP). It is kept as is (same object, same parameters).
        dim: model width ``D``.
        num_experts: private experts per task ``E``.
        hidden_dim: hidden width ``H`` of each private expert.
        top_k: experts per token ``k`` (``1 <= k <= E``).
        num_tasks: number of tasks with their own router and experts (the paper uses 2: expression
            and AU; the released code uses 1 shared pool).
        renormalize: renormalise the top-k gates to sum to one (paper) or keep the raw softmax values
            (release).
        noise_std: std of Gaussian noise added to the router logits in training mode (release: 1e-2).
        gamma: "vector" (learnable ``[D]``, paper) or "scalar" (learnable ``[]``, release).
        gamma_init: initial value of γ.
        activation: private experts' activation: "gelu" (exact) | "quick_gelu" | "relu" | callable.
        aux_loss: "none" or "switch" (Switch-Transformer load balancing, see :attr:`aux_loss`).
        backend: grouped expert backend ("auto" | "triton" | "torch" | "reference").
        batch_first: layout of 3-D inputs used to map per-sample task ids onto tokens: True for
            ``[B, L, D]``, False for ``[L, B, D]``, None to detect it from the length of the task ids
            (ambiguous when ``B == L``: raises). ``inject_moe_`` sets it from the host model.
        device, dtype: of the private parameters.

    Shapes:
        ``x: [N, D]`` (one token per sample), ``[B, L, D]`` or ``[L, B, D]``; output: like ``x``.

    After every forward: :attr:`last_load` ``[num_tasks, E]`` (token-slot assignments per expert,
    detached), :attr:`last_router_prob` ``[num_tasks, E]`` (mean router probability, detached) and
    :attr:`aux_loss` (a differentiable scalar when ``aux_loss="switch"``, else None).

    Examples::

        >>> ffn = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
        >>> moe = MoEFFN(ffn, 8, num_experts=4, hidden_dim=16, top_k=2, num_tasks=2)
        >>> x = torch.randn(3, 5, 8)
        >>> moe(x, task_ids=torch.tensor([0, 1, 1])).shape
        torch.Size([3, 5, 8])
    """

    def __init__(
        self,
        shared: nn.Module,
        dim: int,
        *,
        num_experts: int = 4,
        hidden_dim: int = 512,
        top_k: int = 2,
        num_tasks: int = 1,
        renormalize: bool = True,
        noise_std: float = 0.0,
        gamma: str = "vector",
        gamma_init: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        aux_loss: str = "none",
        backend: str = "auto",
        batch_first: bool | None = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(shared, nn.Module):
            raise TypeError(f"shared must be an nn.Module, got {type(shared).__name__}")
        for name, value in (("dim", dim), ("num_experts", num_experts), ("hidden_dim", hidden_dim),
                            ("top_k", top_k), ("num_tasks", num_tasks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts ({num_experts}), got top_k={top_k}")
        if gamma not in ("vector", "scalar"):
            raise ValueError(f"gamma must be 'vector' or 'scalar', got {gamma!r}")
        if aux_loss not in ("none", "switch"):
            raise ValueError(f"aux_loss must be 'none' or 'switch', got {aux_loss!r}")
        if not (callable(activation) or activation in ACTIVATIONS):
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}")
        if backend not in ("auto", "triton", "torch", "reference"):
            raise ValueError(f"backend must be one of ('auto', 'triton', 'torch', 'reference'), got {backend!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if batch_first not in (True, False, None):
            raise ValueError(f"batch_first must be True, False or None, got {batch_first!r}")
        self.shared = shared
        self.dim = dim
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.top_k = top_k
        self.num_tasks = num_tasks
        self.renormalize = renormalize
        self.noise_std = float(noise_std)
        self.gamma_mode = gamma
        self.gamma_init = float(gamma_init)
        self.activation = activation
        self.aux_loss_mode = aux_loss
        self.backend = backend
        self.batch_first = batch_first
        fk = {"device": device, "dtype": dtype}
        self.router_weight = nn.Parameter(torch.empty(num_tasks, num_experts, dim, **fk))
        self.router_bias = nn.Parameter(torch.empty(num_tasks, num_experts, **fk))
        self.w1 = nn.Parameter(torch.empty(num_tasks, num_experts, dim, hidden_dim, **fk))
        self.b1 = nn.Parameter(torch.empty(num_tasks, num_experts, hidden_dim, **fk))
        self.w2 = nn.Parameter(torch.empty(num_tasks, num_experts, hidden_dim, dim, **fk))
        self.b2 = nn.Parameter(torch.empty(num_tasks, num_experts, dim, **fk))
        self.gamma = nn.Parameter(torch.empty((dim,) if gamma == "vector" else (), **fk))
        self._task_ids: Tensor | None = None  # set by moe_task_context
        self.last_load: Tensor | None = None
        self.last_router_prob: Tensor | None = None
        self.aux_loss: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the private branch (the shared expert is left untouched).

        Expert matrices: Xavier-uniform per expert; biases zero; router: Xavier-uniform with gain 0.1,
        zero bias (as the released code); γ = ``gamma_init``.
        """
        d, h, e = self.dim, self.hidden_dim, self.num_experts
        with torch.no_grad():
            bound = math.sqrt(6.0 / (d + h))
            self.w1.uniform_(-bound, bound)
            self.w2.uniform_(-bound, bound)
            self.b1.zero_()
            self.b2.zero_()
            rbound = 0.1 * math.sqrt(6.0 / (d + e))
            self.router_weight.uniform_(-rbound, rbound)
            self.router_bias.zero_()
            self.gamma.fill_(self.gamma_init)

    def extra_repr(self) -> str:
        act = self.activation if isinstance(self.activation, str) else getattr(self.activation, "__name__", "callable")
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, num_tasks={self.num_tasks}, renormalize={self.renormalize}, "
                f"noise_std={self.noise_std}, gamma={self.gamma_mode!r}, activation={act!r}, "
                f"aux_loss={self.aux_loss_mode!r}, backend={self.backend!r}, batch_first={self.batch_first}")

    # Attribute delegation: code written for the original FFN (open_clip reads ``mlp.c_fc.weight``,
    # timm code may read ``mlp.fc1``) still finds the shared expert's submodules and attributes.
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            shared = modules.get("shared") if modules is not None else None
            if shared is None or name.startswith("__"):
                raise
            try:
                return getattr(shared, name)
            except AttributeError:
                raise AttributeError(
                    f"'{type(self).__name__}' object (and its shared expert "
                    f"'{type(shared).__name__}') has no attribute '{name}'"
                ) from None

    # ------------------------------------------------------------------ routing helpers
    def _token_tasks(self, x: Tensor, task_ids: Tensor | None) -> Tensor | None:
        """Per-token task id ``[N]`` (flattened in the memory order of ``x``), or None for all-task-0."""
        if task_ids is None:
            task_ids = self._task_ids
        if task_ids is None:
            return None  # every token uses task 0
        t = _as_task_tensor(task_ids)
        if t.numel() > 0 and t.device.type == "cpu":  # value check only where it costs no device sync
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.num_tasks:
                raise ValueError(f"task ids must lie in [0, {self.num_tasks}) (num_tasks), got range [{lo}, {hi}]")
        t = t.to(x.device, non_blocking=True)
        if t.dim() == 0:
            n_tokens = x.numel() // x.shape[-1]
            return t.expand(n_tokens)
        if x.dim() == 2:
            if t.shape[0] != x.shape[0]:
                raise ValueError(f"task_ids has {t.shape[0]} entries but the [N, D] input has N={x.shape[0]} "
                                 f"tokens (one task id per row expected)")
            return t
        # 3-D input: find the batch dimension
        n_ids = t.shape[0]
        batch_first = self.batch_first
        if batch_first is None:
            fits0, fits1 = x.shape[0] == n_ids, x.shape[1] == n_ids
            if fits0 and fits1:
                raise ValueError(f"cannot detect the batch dimension of input {tuple(x.shape)} from {n_ids} "
                                 f"task ids (B == L); set MoEFFN.batch_first explicitly")
            if not (fits0 or fits1):
                raise ValueError(f"task_ids has {n_ids} entries but input {tuple(x.shape)} has no matching "
                                 f"batch dimension (expected [B, L, D] or [L, B, D] with B={n_ids})")
            batch_first = fits0
        bdim = 0 if batch_first else 1
        if x.shape[bdim] != n_ids:
            layout = "[B, L, D]" if batch_first else "[L, B, D]"
            raise ValueError(f"task_ids has {n_ids} entries but the {layout} input {tuple(x.shape)} has "
                             f"B={x.shape[bdim]} (batch_first={batch_first})")
        length = x.shape[1 - bdim]
        return t.repeat_interleave(length) if batch_first else t.repeat(length)

    def _route(self, tokens: Tensor, tok_task: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Router: returns (virtual expert ids [N, k], gates [N, k], probs [N, E]) in router dtype."""
        n_tokens = tokens.shape[0]
        e = self.num_experts
        rdtype = torch.promote_types(tokens.dtype, torch.float32)
        xr = tokens.to(rdtype)
        if tok_task is None or self.num_tasks == 1:
            logits = F.linear(xr, self.router_weight[0].to(rdtype), self.router_bias[0].to(rdtype))
        else:
            all_logits = F.linear(xr, self.router_weight.reshape(-1, self.dim).to(rdtype),
                                  self.router_bias.reshape(-1).to(rdtype))
            all_logits = all_logits.view(n_tokens, self.num_tasks, e)
            logits = all_logits.gather(1, tok_task.view(n_tokens, 1, 1).expand(n_tokens, 1, e)).squeeze(1)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        if tok_task is not None and self.num_tasks > 1:
            top_i = top_i + (tok_task * e).unsqueeze(1)
        return top_i, top_p, probs

    def _stats(self, virt_idx: Tensor, probs: Tensor, tok_task: Tensor | None) -> None:
        """Per-task expert load, mean router probability and (optionally) the Switch aux loss. No host sync."""
        t, e, k = self.num_tasks, self.num_experts, self.top_k
        n_tokens = probs.shape[0]
        flat = virt_idx.reshape(-1)
        # scatter_add, not bincount: CUDA bincount reads max() on the host; integer adds are exact.
        load = torch.zeros(t * e, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat)).view(t, e)
        if tok_task is None:
            tok_task = torch.zeros(n_tokens, dtype=torch.long, device=probs.device)
        onehot = F.one_hot(tok_task, t).to(probs.dtype)  # [N, T]
        n_per_task = onehot.sum(0)  # [T]
        prob_sum = onehot.t() @ probs  # [T, E], deterministic (no atomics)
        denom = n_per_task.clamp_min(1).unsqueeze(1)
        mean_prob = prob_sum / denom
        self.last_load = load.detach()
        self.last_router_prob = mean_prob.detach()
        if self.aux_loss_mode == "switch":
            frac = load.to(probs.dtype) / (denom * k)
            per_task = e * (frac * mean_prob).sum(-1)  # [T]
            present = (n_per_task > 0).to(probs.dtype)
            self.aux_loss = (per_task * present).sum() / present.sum().clamp_min(1)
        else:
            self.aux_loss = None

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, task_ids: int | Sequence[int] | Tensor | None = None) -> Tensor:
        """Shared FFN plus routed private experts.

        Args:
            x: ``[N, D]``, ``[B, L, D]`` or ``[L, B, D]`` (see ``batch_first``).
            task_ids: per-sample task ids ``[B]`` (or ``[N]`` for 2-D input, or one int); overrides
                :func:`moe_task_context`; default: the context's ids, else task 0 for every token.

        Returns:
            Tensor shaped like ``x``.
        """
        if x.dim() not in (2, 3):
            raise ValueError(f"MoEFFN expects x of rank 2 [N, D] or 3 ([B, L, D] / [L, B, D]), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoEFFN was built for dim={self.dim}, got input with last dim {x.shape[-1]} "
                             f"(shape {tuple(x.shape)})")
        out_shared = self.shared(x)
        tok_task = self._token_tasks(x, task_ids)
        tokens = x.reshape(-1, self.dim)
        virt_idx, gates, probs = self._route(tokens, tok_task)
        self._stats(virt_idx, probs, tok_task)

        # Compute dtype: the autocast dtype when autocast is on (cast explicitly so every backend sees
        # one dtype), else the input dtype.
        dev_type = x.device.type
        if torch.is_autocast_enabled(dev_type):
            cdtype = torch.get_autocast_dtype(dev_type)
        else:
            cdtype = x.dtype
        ne = self.num_tasks * self.num_experts
        with torch.autocast(dev_type, enabled=False):
            private = grouped_expert_mlp(
                tokens.to(cdtype), virt_idx, gates.to(cdtype),
                self.w1.reshape(ne, self.dim, self.hidden_dim).to(cdtype),
                self.b1.reshape(ne, self.hidden_dim).to(cdtype),
                self.w2.reshape(ne, self.hidden_dim, self.dim).to(cdtype),
                self.b2.reshape(ne, self.dim).to(cdtype),
                activation=self.activation, backend=self.backend,
            )
        private = private.view(x.shape).to(out_shared.dtype)
        return out_shared + self.gamma.to(out_shared.dtype) * private


def _moe_layers(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


@contextlib.contextmanager
def moe_task_context(model: nn.Module, task_ids: int | Sequence[int] | Tensor) -> Iterator[None]:
    """Set the task of every sample for all :class:`MoEFFN` layers inside ``model``.

    Within the context each MoE layer routes the tokens of sample ``b`` with task ``task_ids[b]``'s
    router and experts, so samples of different tasks can share ONE forward pass. How tokens map to
    samples: ``[B, L, D]`` inputs (``batch_first=True``) repeat each id ``L`` times, ``[L, B, D]``
    inputs tile the ids ``L`` times, ``[N, D]`` inputs take one id per row. Contexts nest; the
    previous ids are restored on exit.

    Args:
        model: a module containing MoEFFN layers (or a MoEFFN itself).
        task_ids: ``[B]`` integer task ids (tensor or sequence), or one int for the whole batch.

    Examples::

        >>> with moe_task_context(clip.visual, torch.tensor([0, 0, 1])):  # doctest: +SKIP
        ...     feats = clip.encode_image(images)
    """
    layers = _moe_layers(model)
    if not layers:
        raise ValueError(f"moe_task_context: {type(model).__name__} contains no MoEFFN layer "
                         f"(call inject_moe_ first)")
    t = _as_task_tensor(task_ids)
    if t.numel() > 0 and t.device.type == "cpu":
        lo, hi = int(t.min()), int(t.max())
        max_tasks = min(layer.num_tasks for layer in layers)
        if lo < 0 or hi >= max_tasks:
            raise ValueError(f"task ids must lie in [0, {max_tasks}) (num_tasks of the MoE layers), "
                             f"got range [{lo}, {hi}]")
    previous = [layer._task_ids for layer in layers]
    for layer in layers:
        layer._task_ids = t
    try:
        yield
    finally:
        for layer, prev in zip(layers, previous):
            layer._task_ids = prev


def moe_aux_loss(model: nn.Module) -> Tensor | None:
    """Sum of the Switch aux losses of the last forward over all MoEFFN layers (None if none computed)."""
    losses = [m.aux_loss for m in _moe_layers(model) if m.aux_loss is not None]
    if not losses:
        return None
    return torch.stack([l.float() for l in losses]).sum()


def moe_load_stats(model: nn.Module) -> dict[str, Tensor]:
    """``{module name: last_load [num_tasks, E]}`` for every MoEFFN that has run a forward."""
    return {name: m.last_load for name, m in model.named_modules()
            if isinstance(m, MoEFFN) and m.last_load is not None}
