"""Explicit model surgery: replace FFNs by :class:`MoEFFN` (open_clip, timm, or any model via filter_fn).

Nothing is patched at import time; :func:`inject_moe_` edits the given model in place and returns
the names of the modules it replaced (the pattern of torchao's ``quantize_(model, config, filter_fn)``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .layer import MoEFFN

__all__ = [
    "inject_moe_",
    "map_pre_injection_state_dict",
    "load_pre_injection_state_dict",
    "moe_parameter_groups",
]

BlockSpec = str | Sequence[int] | Callable[[int], bool] | None


def _find_block_container(model: nn.Module) -> tuple[str, nn.Module, str]:
    """Return (prefix of the block list, the list, family) for the supported architectures."""
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module):
        tr = getattr(visual, "transformer", None)
        if isinstance(getattr(tr, "resblocks", None), nn.Module):
            return "visual.transformer.resblocks", tr.resblocks, "open_clip"
    tr = getattr(model, "transformer", None)
    if isinstance(getattr(tr, "resblocks", None), nn.Module):
        return "transformer.resblocks", tr.resblocks, "open_clip"
    if isinstance(getattr(model, "resblocks", None), nn.Module):
        return "resblocks", model.resblocks, "open_clip"
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0 and all(
        isinstance(getattr(b, "mlp", None), nn.Module) for b in blocks
    ):
        return "blocks", blocks, "timm"
    raise TypeError(
        f"inject_moe_: {type(model).__name__} is not a recognised open_clip CLIP/VisionTransformer/Transformer "
        "(visual.transformer.resblocks[i].mlp) or timm VisionTransformer (blocks[i].mlp); "
        "pass filter_fn=lambda module, name: ... to choose the FFN modules to replace"
    )


def _select_blocks(blocks: BlockSpec, n: int) -> list[int]:
    if blocks is None:
        blocks = "last:6"
    if callable(blocks) and not isinstance(blocks, str):
        return [i for i in range(n) if blocks(i)]
    if isinstance(blocks, str):
        if blocks == "all":
            return list(range(n))
        if blocks.startswith("last:"):
            try:
                count = int(blocks[len("last:"):])
            except ValueError:
                raise ValueError(f"blocks must look like 'last:6', got {blocks!r}") from None
            if not 1 <= count <= n:
                raise ValueError(f"blocks={blocks!r} asks for the last {count} blocks but the model has {n}")
            return list(range(n - count, n))
        raise ValueError(f"blocks must be 'all', 'last:<n>', a list of block indices or a callable, got {blocks!r}")
    idx = []
    for i in blocks:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"block indices must be ints, got {i!r}")
        if not -n <= i < n:
            raise ValueError(f"block index {i} out of range for a model with {n} blocks")
        idx.append(i % n)
    if len(set(idx)) != len(idx):
        raise ValueError(f"duplicate block indices in {list(blocks)}")
    return sorted(idx)


def _infer_dim(module: nn.Module) -> int | None:
    for attr in ("c_fc", "fc1"):
        lin = getattr(module, attr, None)
        if isinstance(lin, nn.Linear):
            return lin.in_features
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    return None


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
        **moe_kwargs: forwarded to :class:`MoEFFN` (``num_experts``, ``hidden_dim``, ``top_k``,
            ``num_tasks``, ...).

    Returns:
        Qualified names of the replaced modules, in model order.

    Examples::

        >>> import open_clip  # doctest: +SKIP
        >>> model = open_clip.create_model("ViT-B-16", pretrained=None)  # doctest: +SKIP
        >>> inject_moe_(model, blocks="last:6", num_tasks=2, hidden_dim=512)  # doctest: +SKIP
        ['visual.transformer.resblocks.6.mlp', ..., 'visual.transformer.resblocks.11.mlp']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None:
        if blocks is not None:
            raise ValueError("pass either blocks or filter_fn, not both")
        names: list[str] = []
        for name, mod in model.named_modules():
            if not name or any(name.startswith(p + ".") for p in names):
                continue
            if filter_fn(mod, name):
                names.append(name)
    else:
        prefix, container, _family = _find_block_container(model)
        chosen = _select_blocks(blocks, len(container))
        names = []
        for i in chosen:
            block = container[i]
            if not isinstance(getattr(block, "mlp", None), nn.Module):
                raise TypeError(f"block {prefix}.{i} ({type(block).__name__}) has no 'mlp' submodule")
            names.append(f"{prefix}.{i}.mlp")
    if not names:
        raise ValueError("inject_moe_: no module selected (check blocks / filter_fn)")

    replaced = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, MoEFFN) or any(isinstance(m, MoEFFN) for m in module.modules()):
            raise ValueError(f"{name} already contains a MoEFFN; inject_moe_ was applied twice")
        kwargs = dict(moe_kwargs)
        if "dim" not in kwargs:
            dim = _infer_dim(module)
            if dim is None:
                raise ValueError(f"cannot infer the width of {name} ({type(module).__name__}): pass dim=...")
            kwargs["dim"] = dim
        kwargs.setdefault("batch_first", _infer_batch_first(model, name))
        param = next(module.parameters(), None)
        if param is not None:
            kwargs.setdefault("device", param.device)
            kwargs.setdefault("dtype", param.dtype)
        dim = kwargs.pop("dim")
        moe = MoEFFN(module, dim, **kwargs)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, moe)
        replaced.append(name)
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
    private_suffixes = tuple("." + n for n in ("router_weight", "router_bias", "w1", "b1", "w2", "b2", "gamma"))
    moe_names = {name for name, m in model.named_modules() if isinstance(m, MoEFFN)}
    missing_other = [k for k in result.missing_keys
                     if not (k.endswith(private_suffixes) and k.rsplit(".", 1)[0] in moe_names)]
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
        ``{"experts": [w1, b1, w2, b2, ...], "routers": [router_weight, router_bias, ...],
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
        groups["experts"] += [m.w1, m.b1, m.w2, m.b2]
        groups["routers"] += [m.router_weight, m.router_bias]
        groups["gamma"].append(m.gamma)
        if include_shared:
            groups["shared"] += list(m.shared.parameters())
    if not groups["experts"]:
        raise ValueError(f"{type(model).__name__} contains no MoEFFN layer (call inject_moe_ first)")
    return groups
