"""Explicit model surgery: replace FFNs by :class:`MoEFFN` (open_clip, timm, or any model via filter_fn).

Nothing is patched at import time; :func:`inject_moe_` edits the given model in place and returns
the names of the modules it replaced (the pattern of torchao's ``quantize_(model, config, filter_fn)``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..ops.grouped_experts.activations import activation_module
from .hosts import BlockSpec, filtered_module_names, find_block_container, host_checkpointing_on, select_blocks
from .layer import MoEFFN, ffn_width

__all__ = [
    "inject_moe_",
    "set_shared_activation_",
    "map_pre_injection_state_dict",
    "load_pre_injection_state_dict",
    "moe_parameter_groups",
]

#: Activation classes recognised inside a shared FFN (by class name, so open_clip's / OpenAI CLIP's
#: ``QuickGELU`` and timm's activation modules count without importing them).
_ACTIVATION_CLASS_NAMES = frozenset({
    "GELU", "QuickGELU", "ReLU", "SiLU", "Tanh", "Sigmoid", "GELUTanh", "Activation", "Identity",
})


def set_shared_activation_(ffn: nn.Module, activation: str | nn.Module) -> str:
    """Replace the activation module of an FFN in place (e.g. the shared expert of a MoE layer).

    The FFN must have exactly one direct child that is a parameter-free activation module (open_clip /
    OpenAI CLIP ``mlp.gelu``, timm ``mlp.act``, ...). Parameters and state-dict keys are unchanged.

    Args:
        ffn: the FFN module (for a :class:`MoEFFN`, pass ``moe.shared``).
        activation: a name of the activation registry ("gelu" -> ``nn.GELU()``, exact erf;
            "quick_gelu"; "relu") or an ``nn.Module``.

    Returns:
        The name of the replaced child.

    Examples::

        >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> set_shared_activation_(mlp, "gelu")
        '1'
    """
    found = [(name, child) for name, child in ffn.named_children()
             if type(child).__name__ in _ACTIVATION_CLASS_NAMES and next(child.parameters(), None) is None]
    if len(found) != 1:
        names = [name for name, _ in found]
        raise ValueError(f"cannot find the activation of {type(ffn).__name__} (expected exactly one parameter-free "
                         f"activation child, got {len(found)}: {names})")
    name, _ = found[0]
    setattr(ffn, name, activation_module(activation))
    return name

def _infer_batch_first(model: nn.Module, name: str) -> bool:
    """``batch_first`` of the nearest ancestor that declares one (open_clip ``Transformer``), else True."""
    parts = name.split(".")[:-1]
    while parts:
        anc = model.get_submodule(".".join(parts))
        bf = getattr(anc, "batch_first", None)
        if isinstance(bf, bool) and not isinstance(anc, nn.MultiheadAttention):
            return bf
        parts.pop()
    bf = getattr(model, "batch_first", None)
    return bf if isinstance(bf, bool) else True


def inject_moe_(
    model: nn.Module,
    *,
    blocks: BlockSpec = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    shared_activation: str | nn.Module | None = None,
    **moe_kwargs: Any,
) -> list[str]:
    """Replace FFN modules of ``model`` in place by :class:`MoEFFN` whose shared expert is the original FFN.

    Supported without ``filter_fn``: open_clip ``CLIP`` (vision tower,
    ``visual.transformer.resblocks[i].mlp``), open_clip ``VisionTransformer``/``Transformer``
    (``transformer.resblocks[i].mlp`` / ``resblocks[i].mlp``) and timm ``VisionTransformer``
    (``blocks[i].mlp``). Any other model (or open_clip's text tower): pass ``filter_fn``.

    The original FFN object becomes ``MoEFFN.shared`` unchanged (pretrained weights, activation --
    QuickGELU stays QuickGELU), and attribute reads such as ``mlp.c_fc`` are delegated to it. ``dim``,
    ``batch_first`` (from open_clip's ``Transformer.batch_first``; timm is batch-first), ``device`` and
    ``dtype`` are inferred unless given in ``moe_kwargs``.

    Args:
        model: the model to edit in place.
        blocks: "last:<n>" (default "last:6", as the paper), "all", a list of block indices
            (negative allowed) or a callable ``i -> bool``. Not allowed together with ``filter_fn``.
        filter_fn: ``(module, qualified_name) -> bool`` choosing the modules to replace (outermost
            match wins; nested matches are ignored).
        shared_activation: None (default: the shared FFN is left exactly as it was) or an activation
            for the shared expert instead of its own ("gelu" = exact-erf ``nn.GELU()``, "quick_gelu",
            "relu", or a module); see :func:`set_shared_activation_`. The released SSM code runs its
            shared experts with exact GELU instead of CLIP's QuickGELU (released code,
            ``ssm/models/moe.py``: OpenAI CLIP's MLP has no ``act`` attribute, so it falls back to
            ``nn.GELU()``); pass "gelu" to reproduce released weights.
        **moe_kwargs: forwarded to :class:`MoEFFN` (``num_experts``, ``hidden_dim``, ``top_k``,
            ``num_tasks``, ``router_layer``, ``experts_layer``, ...). ``router_layer`` /
            ``experts_layer`` must be classes or factories when more than one FFN is replaced (one
            built module cannot serve several layers).

    Warns:
        UserWarning: when a multi-task MoE is injected into a host whose own activation
        checkpointing is on (open_clip ``transformer.grad_checkpointing``, timm
        ``grad_checkpointing``): its recomputation would not replay the task routing; use
        :func:`facelayers.moe.checkpoint_moe_blocks_` instead.

    Returns:
        Qualified names of the replaced modules, in model order.

    Examples::

        >>> import open_clip  # doctest: +SKIP
        >>> model = open_clip.create_model("ViT-B-16", pretrained=None)  # doctest: +SKIP
        >>> inject_moe_(model, blocks="last:6", num_tasks=2, hidden_dim=512)  # doctest: +SKIP
        ['visual.transformer.resblocks.6.mlp', ..., 'visual.transformer.resblocks.11.mlp']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (expected nn.Module, got {type(model).__name__})")
    if filter_fn is not None:
        names = filtered_module_names(model, filter_fn, blocks)
    else:
        prefix, container, _family = find_block_container(model)
        chosen = select_blocks(blocks, len(container), default="last:6")
        names = []
        for i in chosen:
            block = container[i]
            if not isinstance(getattr(block, "mlp", None), nn.Module):
                raise TypeError(f"block {prefix}.{i} has no 'mlp' submodule (expected an FFN at .mlp, "
                                f"got {type(block).__name__} without one)")
            names.append(f"{prefix}.{i}.mlp")
    if not names:
        raise ValueError("inject_moe_: no module selected (expected at least one, got none; check blocks / filter_fn)")

    for key in ("router_layer", "experts_layer"):
        if isinstance(moe_kwargs.get(key), nn.Module) and len(names) > 1:
            raise ValueError(f"{key} is a built module but {len(names)} FFNs are replaced (expected a class or "
                             f"factory building one per layer, got a {type(moe_kwargs[key]).__name__} instance)")
    if shared_activation is not None and not isinstance(shared_activation, (str, nn.Module)):
        raise TypeError(f"shared_activation must be None, an activation name or an nn.Module "
                        f"(expected None/str/nn.Module, got {type(shared_activation).__name__})")
    replaced = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, MoEFFN) or any(isinstance(m, MoEFFN) for m in module.modules()):
            raise ValueError(f"{name} already contains a MoEFFN; inject_moe_ was applied twice "
                             f"(expected a plain FFN, got {type(module).__name__})")
        kwargs = dict(moe_kwargs)
        if "dim" not in kwargs:
            dim = ffn_width(module)[0]
            if dim is None:
                raise ValueError(f"cannot infer the width of {name}: pass dim=... (expected an FFN with an "
                                 f"nn.Linear, got {type(module).__name__})")
            kwargs["dim"] = dim
        kwargs.setdefault("batch_first", _infer_batch_first(model, name))
        param = next(module.parameters(), None)
        if param is not None:
            kwargs.setdefault("device", param.device)
            kwargs.setdefault("dtype", param.dtype)
        dim = kwargs.pop("dim")
        moe = MoEFFN(module, dim, **kwargs)
        if shared_activation is not None:
            set_shared_activation_(moe.shared, shared_activation)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, moe)
        replaced.append(name)
    flags = host_checkpointing_on(model)
    if flags and any(m.num_tasks > 1 for m in model.modules() if isinstance(m, MoEFFN)):
        warnings.warn(
            f"inject_moe_: the host's own activation checkpointing is on ({', '.join(flags)}); its recomputation "
            "does not replay the MoE task routing (wrong gradients or a CheckpointError). Use "
            "facelayers.moe.checkpoint_moe_blocks_(model) instead (it switches the host's flag off).",
            UserWarning, stacklevel=2)
    return replaced


def map_pre_injection_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the keys of a state_dict saved BEFORE ``inject_moe_`` to the injected model's names.

    ``"<ffn>.c_fc.weight"`` becomes ``"<ffn>.shared.c_fc.weight"`` for every injected ``<ffn>``; keys
    the injected model already has are left alone. The private MoE parameters are simply absent
    from the result (load with :func:`load_pre_injection_state_dict`, or ``strict=False``).

    Args:
        state_dict: the original model's state_dict.
        model: the injected model.

    Returns:
        A new dict with renamed keys.
    """
    moe_names = [name for name, m in model.named_modules() if isinstance(m, MoEFFN)]
    target = set(model.state_dict().keys())
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        if key not in target:
            for p in moe_names:
                if key.startswith(p + "."):
                    new_key = f"{p}.shared.{key[len(p) + 1:]}"
                    break
        out[new_key] = value
    return out


def load_pre_injection_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a pre-injection state_dict into an injected model; the MoE private parameters keep their values.

    Raises ``KeyError`` if anything other than MoE private parameters is missing, or if the
    state_dict has keys the model does not know.

    Returns:
        The names of the (intentionally) missing private MoE parameters.
    """
    mapped = map_pre_injection_state_dict(state_dict, model)
    result = model.load_state_dict(mapped, strict=False)
    private = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, MoEFFN)
               for p, _ in m.named_parameters() if not p.startswith("shared.")}
    missing_other = [k for k in result.missing_keys if k not in private]
    if missing_other or result.unexpected_keys:
        raise KeyError(f"state_dict does not match the injected model: missing {missing_other}, "
                       f"unexpected {list(result.unexpected_keys)}")
    return list(result.missing_keys)


def moe_parameter_groups(model: nn.Module, *, include_shared: bool = False) -> dict[str, list[nn.Parameter]]:
    """Trainable parameter groups of the MoE layers, for explicit optimizer groups.

    Args:
        model: a model with MoEFFN layers.
        include_shared: also return the shared experts' parameters under "shared".

    Returns:
        ``{"experts": [experts.w1, b1, w2, b2, ...], "routers": [router.weight, router.bias, ...],
        "gamma": [...]}`` (+ ``"shared"``), each list in model order.

    Examples::

        >>> groups = moe_parameter_groups(model)  # doctest: +SKIP
        >>> opt = torch.optim.AdamW([{"params": groups["experts"] + groups["gamma"], "lr": 1e-4},
        ...                          {"params": groups["routers"], "lr": 1e-3}])  # doctest: +SKIP
    """
    groups: dict[str, list[nn.Parameter]] = {"experts": [], "routers": [], "gamma": []}
    if include_shared:
        groups["shared"] = []
    for m in model.modules():
        if not isinstance(m, MoEFFN):
            continue
        groups["experts"] += list(m.experts.parameters())
        groups["routers"] += list(m.router.parameters())
        groups["gamma"].append(m.gamma)
        if include_shared:
            groups["shared"] += list(m.shared.parameters())
    if not groups["experts"]:
        raise ValueError(f"{type(model).__name__} contains no MoEFFN layer (expected MoEFFN layers, got none; "
                         f"call inject_moe_ first)")
    return groups
