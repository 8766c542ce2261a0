"""MoE feed-forward layer: a shared expert (the original FFN) plus routed private experts.

Implements the paper's Mixture of Private Experts (Sec. III-A, Appendix E, eqs. S1-S2)::

    y = E_s(x) + γ ⊙ Σ_{j ∈ TopK(g)} ĝ_j E_j(x),   g = softmax(R_t x),   E_j(x) = W2_j act(W1_j x + b1_j) + b2_j

where ``E_s`` is the pretrained FFN (kept unchanged), ``R_t`` and the private experts ``E_j`` belong
to the task ``t`` of the sample the token comes from, and ``ĝ`` are the top-k gates renormalised to
sum to one. ``MoEFFN`` composes three modules (torchtune ``MoE(experts=, router=, shared_expert=)``):
the shared expert, a router (default :class:`~facelayers.moe.router.TaskTopKRouter`) and an expert
bank (default :class:`~facelayers.moe.experts.GroupedExperts`, banks ``[num_tasks, E, ...]`` run by
ONE grouped-expert call for a mixed batch). Router and bank are injectable (``router_layer=``,
``experts_layer=``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..ops.grouped_experts.activations import check_activation
from .experts import GroupedExperts
from .router import TaskTopKRouter, TokenLayout

__all__ = [
    "MoEFFN",
    "moe_aux_loss",
    "moe_load_stats",
    "SSM_RELEASE_MOE_KWARGS",
    "LEGACY_PARAMETER_NAMES",
    "MissingTaskIdsWarning",
    "as_task_ids",
    "ffn_width",
]

#: ``MoEFFN`` keyword arguments reproducing the released SSM code's router and experts (released code,
#: ``ssm/models/moe.py``): one task-agnostic pool of 4 experts of width 512, top-2, softmax gates NOT
#: renormalised, logit noise 1e-2 in training, scalar γ initialised to 0.1, exact-GELU experts. The
#: release's dispatch bug is NOT included (add ``router_layer=ReleaseMisroutedTopKRouter`` for that) and
#: neither is its shared-expert activation (``inject_moe_(..., shared_activation="gelu")``).
SSM_RELEASE_MOE_KWARGS: dict = dict(
    num_tasks=1, renormalize=False, noise_std=1e-2, gamma="scalar", gamma_init=0.1, hidden_dim=512,
    num_experts=4, top_k=2, activation="gelu",
)

#: Parameter names of ``MoEFFN`` checkpoints saved before the router and expert bank became modules of
#: their own -> today's names (``gamma`` and ``shared.*`` are unchanged). ``MoEFFN.load_state_dict``
#: renames them automatically (a load-state-dict pre-hook).
LEGACY_PARAMETER_NAMES: dict[str, str] = {
    "router_weight": "router.weight",
    "router_bias": "router.bias",
    "w1": "experts.w1",
    "b1": "experts.b1",
    "w2": "experts.w2",
    "b2": "experts.b2",
}


#: Children of ``MoEFFN`` listed before the layer itself by ``named_modules`` (parameter order, see
#: ``MoEFFN.named_modules``).
_PARAMETER_ORDER_FIRST = ("router", "experts")


class MissingTaskIdsWarning(UserWarning):
    """A multi-task MoE layer ran without task ids (every token went to task 0)."""


def as_task_ids(task_ids: int | Sequence[int] | Tensor) -> Tensor:
    """Task ids as a long tensor: a scalar (one id for every sample) or ``[B]``; type and rank checked."""
    if isinstance(task_ids, bool):
        raise TypeError("task_ids must be an int, a sequence of ints or an integer tensor (expected int, got bool)")
    if isinstance(task_ids, int):
        return torch.tensor(task_ids, dtype=torch.long)
    if isinstance(task_ids, Tensor):
        if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
            raise TypeError(f"task_ids must be an integer tensor (expected an integer dtype, got dtype {task_ids.dtype})")
        t = task_ids.long()
    else:
        try:
            t = torch.as_tensor(list(task_ids), dtype=torch.long)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"task_ids must be an int, a sequence of ints or an integer tensor "
                            f"(expected int/sequence/tensor, got {type(task_ids).__name__})") from exc
    if t.dim() > 1:
        raise ValueError(f"task_ids must be a scalar or a 1-D tensor [B] (expected rank <= 1, got shape {tuple(t.shape)})")
    return t


def ffn_width(module: nn.Module) -> tuple[int | None, int | None]:
    """``(input width, output width)`` of an FFN: from ``c_fc``/``c_proj`` (open_clip) or ``fc1``/``fc2``
    (timm), else the first and last ``nn.Linear`` found; None where nothing tells."""
    first = next((getattr(module, a) for a in ("c_fc", "fc1") if isinstance(getattr(module, a, None), nn.Linear)), None)
    last = next((getattr(module, a) for a in ("c_proj", "fc2") if isinstance(getattr(module, a, None), nn.Linear)), None)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    first = first or (linears[0] if linears else None)
    last = last or (linears[-1] if linears else None)
    return (first.in_features if first is not None else None, last.out_features if last is not None else None)


def _part_setting(part: str, attr: str) -> property:
    """Read-only property ``MoEFFN.<attr>``: the setting ``<part>.<attr>`` of the router or expert bank
    (``top_k``: int, ``renormalize``: bool, ``noise_std``: float, ``hidden_dim``: int, ``activation``:
    str or callable)."""

    def get(self: nn.Module) -> Any:
        return getattr(getattr(self, part), attr)

    return property(get, doc=f"``self.{part}.{attr}`` (read-only; the setting lives on the part).")


def _legacy_parameter(old: str) -> property:
    """Property ``MoEFFN.<old>`` for the parameter now at ``LEGACY_PARAMETER_NAMES[old]`` (``part.attr``).

    Reading returns the part's parameter. Assigning a Parameter re-registers it on the part; assigning
    a plain tensor swaps it into the part's parameter slot, as ``torch.func.functional_call`` does for
    parameters it is given by name (so functional code written with the older names keeps working).
    """
    part, attr = LEGACY_PARAMETER_NAMES[old].split(".")

    def get(self: nn.Module) -> Tensor:
        return getattr(getattr(self, part), attr)

    def set_(self: nn.Module, value: Tensor) -> None:
        sub = getattr(self, part)
        if isinstance(value, nn.Parameter):
            setattr(sub, attr, value)
        elif isinstance(value, Tensor) and attr in sub._parameters:
            sub._parameters[attr] = value  # what torch.nn.utils.stateless' swap does for a parameter
        else:
            raise TypeError(f"MoEFFN.{old} takes a tensor for {part}.{attr} (expected Tensor, got {type(value).__name__})")

    return property(get, set_, doc=f"``{LEGACY_PARAMETER_NAMES[old]}`` under its older name ``{old}``.")


def _rng_untouched(device: torch.device | str | None) -> contextlib.AbstractContextManager:
    """A context that restores the CPU generator (and that of ``device``, when it has one) on exit."""
    dev = torch.empty(0, device=device).device  # resolves device=None through the default device
    if dev.type in ("cpu", "meta"):
        return torch.random.fork_rng(devices=[])
    index = dev.index if dev.index is not None else torch.get_device_module(dev.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=dev.type)


def _build(layer: Any, what: str, kwargs: dict, checks: dict) -> nn.Module:
    """A sub-module from ``layer``: a built module (its settings checked against ``checks``) or a class/factory."""
    if isinstance(layer, nn.Module):
        module = layer
    elif callable(layer):
        module = layer(**kwargs)
        if not isinstance(module, nn.Module):
            raise TypeError(f"{what} must build an nn.Module (expected nn.Module, got {type(module).__name__})")
    else:
        raise TypeError(f"{what} must be an nn.Module, a module class or a factory "
                        f"(expected nn.Module or callable, got {type(layer).__name__})")
    for name, want in checks.items():
        have = getattr(module, name, None)
        if have != want:
            raise ValueError(f"{what} {type(module).__name__} does not match the layer's {name} "
                             f"(expected {name}={want}, got {have!r})")
    return module


class MoEFFN(nn.Module):
    """Shared FFN + per-task routed private experts (paper eqs. S1-S2).

    Args:
        shared: the shared expert, an FFN module mapping ``[..., dim] -> [..., dim]`` (e.g. the
            pretrained CLIP MLP). It is kept as is (same object, same parameters).
        dim: model width ``D`` (checked against the shared FFN's Linear layers when it has any).
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
        backend: grouped expert backend ("auto" | "triton" | "torch" | "reference" | a registered name).
        batch_first: layout of 3-D inputs used to map per-sample task ids onto tokens: True for
            ``[B, L, D]``, False for ``[L, B, D]``, None to detect it from the length of the task ids
            (ambiguous when ``B == L``: raises). ``inject_moe_`` sets it from the host model.
        router_layer: the router: None (:class:`TaskTopKRouter`), a class or factory called as
            ``router_layer(dim=, num_experts=, top_k=, num_tasks=, renormalize=, noise_std=, device=,
            dtype=)``, or a built module (its ``num_experts``, ``top_k``, ``num_tasks`` must match;
            its own ``renormalize``/``noise_std`` then apply). Protocol: :mod:`facelayers.moe.router`.
        experts_layer: the expert bank: None (:class:`GroupedExperts`), a class or factory called as
            ``experts_layer(dim=, hidden_dim=, num_experts=, num_tasks=, activation=, backend=, device=,
            dtype=)``, or a built module (``num_experts``, ``num_tasks`` must match). Protocol:
            :mod:`facelayers.moe.experts`.
        device, dtype: of the private parameters.

    Shapes:
        ``x: [N, D]`` (one token per sample), ``[B, L, D]`` or ``[L, B, D]``; output: like ``x``.
        Outside autocast ``x`` must have the dtype of the private parameters.

    Sub-modules and parameters: ``shared`` (the original FFN), ``router`` (``router.weight [T, E, D]``,
    ``router.bias [T, E]`` by default), ``experts`` (``experts.w1 [T, E, D, H]``, ``b1``, ``w2``, ``b2``),
    ``gamma`` (``[D]`` or ``[]``). Checkpoints with the older flat names (``router_weight``, ``w1``, ...;
    :data:`LEGACY_PARAMETER_NAMES`) load unchanged. The old attribute reads (``layer.w1``,
    ``layer.router_weight``, ``layer.top_k``, ...) still work.

    Task ids: per call (``task_ids=``) or for a whole model with
    :func:`facelayers.moe.moe_task_context`; readable with :attr:`task_ids`. A multi-task layer that
    runs without any warns once (:class:`MissingTaskIdsWarning`) and routes every token to task 0.

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
        router_layer: type[nn.Module] | Callable[..., nn.Module] | nn.Module | None = None,
        experts_layer: type[nn.Module] | Callable[..., nn.Module] | nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(shared, nn.Module):
            raise TypeError(f"shared must be an nn.Module (expected nn.Module, got {type(shared).__name__})")
        for name, value in (("dim", dim), ("num_experts", num_experts), ("hidden_dim", hidden_dim),
                            ("top_k", top_k), ("num_tasks", num_tasks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int (expected an int >= 1, got {value!r})")
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts ({num_experts}) (expected 1 <= top_k <= {num_experts}, "
                             f"got top_k={top_k})")
        if gamma not in ("vector", "scalar"):
            raise ValueError(f"gamma must be 'vector' or 'scalar' (expected 'vector' or 'scalar', got {gamma!r})")
        if aux_loss not in ("none", "switch"):
            raise ValueError(f"aux_loss must be 'none' or 'switch' (expected 'none' or 'switch', got {aux_loss!r})")
        check_activation(activation)
        if (not isinstance(noise_std, (int, float)) or isinstance(noise_std, bool) or not math.isfinite(noise_std)
                or noise_std < 0):
            raise ValueError(f"noise_std must be >= 0 (expected a finite float >= 0, got {noise_std!r})")
        if not isinstance(gamma_init, (int, float)) or isinstance(gamma_init, bool) or not math.isfinite(gamma_init):
            raise ValueError(f"gamma_init must be a finite number (expected e.g. 0.1, got {gamma_init!r})")
        if batch_first not in (True, False, None):
            raise ValueError(f"batch_first must be True, False or None (expected bool or None, got {batch_first!r})")
        d_in, d_out = ffn_width(shared)
        for side, width in (("input", d_in), ("output", d_out)):
            if width is not None and width != dim:
                raise ValueError(f"dim does not match the shared FFN's {side} width "
                                 f"(expected dim={width} for {type(shared).__name__}, got dim={dim})")
        self.shared = shared
        self.dim = dim
        self.num_experts = num_experts
        self.num_tasks = num_tasks
        self.gamma_mode = gamma
        self.gamma_init = float(gamma_init)
        self.aux_loss_mode = aux_loss
        self.batch_first = batch_first
        fk = {"device": device, "dtype": dtype}
        # Parts built here leave the global RNG untouched (their own initialisation runs under a forked
        # RNG and is redone by `self._reset` below, experts first), so a layer built at a seed draws
        # exactly the pre-composition sequence: experts w1, w2, then the router weight. Built modules
        # passed in keep their weights and draw nothing.
        with _rng_untouched(device):
            self.router = _build(
                TaskTopKRouter if router_layer is None else router_layer, "router_layer",
                dict(dim=dim, num_experts=num_experts, top_k=top_k, num_tasks=num_tasks, renormalize=renormalize,
                     noise_std=noise_std, **fk),
                dict(num_experts=num_experts, top_k=top_k, num_tasks=num_tasks),
            )
            self.experts = _build(
                GroupedExperts if experts_layer is None else experts_layer, "experts_layer",
                dict(dim=dim, hidden_dim=hidden_dim, num_experts=num_experts, num_tasks=num_tasks,
                     activation=activation, backend=backend, **fk),
                dict(num_experts=num_experts, num_tasks=num_tasks),
            )
        self._built_parts = tuple(name for name, layer in (("experts", experts_layer), ("router", router_layer))
                                  if not isinstance(layer, nn.Module))
        self.gamma = nn.Parameter(torch.empty((dim,) if gamma == "vector" else (), **fk))
        self._task_ids: Tensor | None = None  # set through `task_ids` (moe_task_context); None = task 0
        self._warned_missing_ids = False
        self.last_load: Tensor | None = None
        self.last_router_prob: Tensor | None = None
        self.aux_loss: Tensor | None = None
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)
        self._reset(self._built_parts)

    def reset_parameters(self) -> None:
        """Initialise the private branch (the shared expert is left untouched): the expert bank's, then
        the router's own ``reset_parameters()`` (defaults: Xavier-uniform experts ``w1`` then ``w2``,
        zero biases, router Xavier-uniform with gain 0.1, as the released code), γ = ``gamma_init``.

        Random draws, in order: ``experts.w1``, ``experts.w2``, ``router.weight`` (the order of the layer
        before the router and bank became modules, so a seed gives the same weights). Construction does
        the same, except that a router or bank passed in built keeps its weights (it is not reset).
        """
        self._reset(("experts", "router"))

    def _reset(self, parts: Sequence[str]) -> None:
        for name in parts:
            reset = getattr(getattr(self, name), "reset_parameters", None)
            if callable(reset):
                reset()
        with torch.no_grad():
            self.gamma.fill_(self.gamma_init)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, num_tasks={self.num_tasks}, "
                f"gamma={self.gamma_mode!r}, aux_loss={self.aux_loss_mode!r}, batch_first={self.batch_first}")

    # ------------------------------------------------------------------ parameter order
    def named_modules(
        self, memo: set[nn.Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Module]]:
        """Sub-modules in the order that keeps :meth:`parameters` in the pre-composition layer's order.

        ``parameters()``/``named_parameters()`` (and so optimizers, ``clip_grad_norm_``, DDP buckets)
        list a module's parameters in ``named_modules()`` order. Before the router and the expert bank
        became modules, a ``MoEFFN`` listed ``router_weight, router_bias, w1, b1, w2, b2, gamma`` and then
        the shared FFN's parameters. This order is kept by listing ``router`` and ``experts`` (with
        their sub-modules) *before* this layer, then the other children (``shared``). Names are
        unchanged; only the position of this layer relative to those two children differs from
        ``nn.Module``'s pre-order. Why it matters: optimizer state dicts are positional (a checkpoint
        saved before still lines up) and order-dependent reductions such as the total norm of
        ``clip_grad_norm_`` round differently in another order (a reproducibility break for a seed).
        """
        if memo is None:
            memo = set()
        if self in memo:
            return
        if remove_duplicate:
            memo.add(self)
        dot = prefix + "." if prefix else ""
        first = [name for name in _PARAMETER_ORDER_FIRST if self._modules.get(name) is not None]
        for name in first:
            yield from self._modules[name].named_modules(memo, dot + name, remove_duplicate)  # type: ignore[union-attr]
        yield prefix, self
        for name, module in self._modules.items():
            if module is not None and name not in first:
                yield from module.named_modules(memo, dot + name, remove_duplicate)

    # ------------------------------------------------------------------ task ids (public read/write)
    @property
    def task_ids(self) -> Tensor | None:
        """Task ids this layer routes with when ``forward`` gets none: ``[B]`` or a scalar tensor, or None
        (every token task 0). Set by :func:`facelayers.moe.moe_task_context`; assigning checks the type."""
        return self._task_ids

    @task_ids.setter
    def task_ids(self, value: int | Sequence[int] | Tensor | None) -> None:
        self._task_ids = None if value is None else as_task_ids(value)

    # ------------------------------------------------------------------ settings read from the parts
    top_k = _part_setting("router", "top_k")
    renormalize = _part_setting("router", "renormalize")
    noise_std = _part_setting("router", "noise_std")
    hidden_dim = _part_setting("experts", "hidden_dim")
    activation = _part_setting("experts", "activation")

    @property
    def backend(self) -> str:
        """The expert bank's grouped-expert backend (settable)."""
        return self.experts.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.experts.backend = value

    # Older flat parameter names (LEGACY_PARAMETER_NAMES) as properties on the parts' parameters.
    router_weight = _legacy_parameter("router_weight")
    router_bias = _legacy_parameter("router_bias")
    w1 = _legacy_parameter("w1")
    b1 = _legacy_parameter("b1")
    w2 = _legacy_parameter("w2")
    b2 = _legacy_parameter("b2")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in LEGACY_PARAMETER_NAMES:  # the property, not a new parameter of this module
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

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
    def _token_tasks(self, x: Tensor, task_ids: Any) -> tuple[Tensor | None, TokenLayout]:
        """Per-token task id ``[N]`` (memory order of ``x``; None for all-task-0) and the token layout."""
        shape = tuple(x.shape[:-1])
        layout_bdim = None if x.dim() == 2 else (None if self.batch_first is None else (0 if self.batch_first else 1))
        if task_ids is None:
            task_ids = self._task_ids
        if task_ids is None:
            if self.num_tasks > 1 and not self._warned_missing_ids:
                self._warned_missing_ids = True
                warnings.warn(
                    f"MoEFFN with num_tasks={self.num_tasks} ran without task ids: every token uses task 0's router "
                    "and experts (pass task_ids= or use facelayers.moe.moe_task_context; under activation "
                    "checkpointing use facelayers.moe.checkpoint_moe_blocks_). Warned once per layer.",
                    MissingTaskIdsWarning, stacklevel=3)
            return None, TokenLayout(shape, layout_bdim)
        t = as_task_ids(task_ids)
        if t.numel() > 0 and t.device.type == "cpu":  # value check only where it costs no device sync
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.num_tasks:
                raise ValueError(f"task ids must lie in [0, {self.num_tasks}) (num_tasks) "
                                 f"(expected ids in [0, {self.num_tasks}), got range [{lo}, {hi}])")
        t = t.to(x.device, non_blocking=True)
        if t.dim() == 0:
            n_tokens = x.numel() // x.shape[-1]
            return t.expand(n_tokens), TokenLayout(shape, layout_bdim)
        if x.dim() == 2:
            if t.shape[0] != x.shape[0]:
                raise ValueError(f"task_ids has {t.shape[0]} entries but the [N, D] input has N={x.shape[0]} "
                                 f"tokens (expected one task id per row, got {t.shape[0]})")
            return t, TokenLayout(shape, None)
        # 3-D input: find the batch dimension
        n_ids = t.shape[0]
        batch_first = self.batch_first
        if batch_first is None:
            fits0, fits1 = x.shape[0] == n_ids, x.shape[1] == n_ids
            if fits0 and fits1:
                raise ValueError(f"cannot detect the batch dimension of input {tuple(x.shape)} from {n_ids} "
                                 f"task ids (B == L); set MoEFFN.batch_first explicitly "
                                 f"(expected B != L, got B = L = {n_ids})")
            if not (fits0 or fits1):
                raise ValueError(f"task_ids has {n_ids} entries but input {tuple(x.shape)} has no matching "
                                 f"batch dimension (expected [B, L, D] or [L, B, D] with B={n_ids}, "
                                 f"got {tuple(x.shape)})")
            batch_first = fits0
        bdim = 0 if batch_first else 1
        if x.shape[bdim] != n_ids:
            layout = "[B, L, D]" if batch_first else "[L, B, D]"
            raise ValueError(f"task_ids has {n_ids} entries but the {layout} input {tuple(x.shape)} has "
                             f"B={x.shape[bdim]} (batch_first={batch_first}) (expected B={n_ids}, got B={x.shape[bdim]})")
        length = x.shape[1 - bdim]
        tok = t.repeat_interleave(length) if batch_first else t.repeat(length)
        return tok, TokenLayout(shape, bdim)

    def _route(self, tokens: Tensor, tok_task: Tensor | None,
               layout: TokenLayout | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(virtual expert ids [N, k], gates [N, k], probs [N, E])`` from the router (older internal API)."""
        return tuple(self.router(tokens, tok_task, layout))  # type: ignore[return-value]

    def _stats(self, virt_idx: Tensor, probs: Tensor, tok_task: Tensor | None) -> None:
        """Per-task expert load, mean router probability and (optionally) the Switch aux loss. No host sync."""
        t, e, k = self.num_tasks, self.num_experts, virt_idx.shape[1]
        n_tokens = probs.shape[0]
        flat = virt_idx.reshape(-1)
        # scatter_add, not bincount: CUDA bincount reads max() on the host; integer adds are exact.
        load = torch.zeros(t * e, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat)).view(t, e)
        if tok_task is None:
            tok_task = torch.zeros(n_tokens, dtype=torch.long, device=probs.device)
        onehot = torch.nn.functional.one_hot(tok_task, t).to(probs.dtype)  # [N, T]
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
            raise ValueError(f"MoEFFN expects x of rank 2 [N, D] or 3 ([B, L, D] / [L, B, D]) "
                             f"(expected rank 2 or 3, got shape {tuple(x.shape)})")
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoEFFN was built for dim={self.dim}, got input with last dim {x.shape[-1]} "
                             f"(expected [..., {self.dim}], got shape {tuple(x.shape)})")
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != self.gamma.dtype:
            raise TypeError(f"MoEFFN input dtype must match its parameters outside autocast "
                            f"(expected {self.gamma.dtype}, got {x.dtype}); cast the input or the module, "
                            f"or run under torch.autocast")
        out_shared = self.shared(x)
        tok_task, layout = self._token_tasks(x, task_ids)
        tokens = x.reshape(-1, self.dim)
        virt_idx, gates, probs = self.router(tokens, tok_task, layout)
        self._stats(virt_idx, probs, tok_task)
        private = self.experts(tokens, virt_idx, gates)
        private = private.view(x.shape).to(out_shared.dtype)
        return out_shared + self.gamma.to(out_shared.dtype) * private


def _rename_legacy_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: older flat names (:data:`LEGACY_PARAMETER_NAMES`) -> today's names."""
    for old, new in LEGACY_PARAMETER_NAMES.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def _moe_layers(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


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


