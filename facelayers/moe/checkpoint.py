"""Routing-safe activation checkpointing of transformer blocks that contain MoE layers.

Why: activation checkpointing recomputes a block's forward during backward. A MoE layer routes each
token by the task ids current AT CALL TIME (:func:`facelayers.moe.moe_task_context`), and by backward
the caller's context has usually closed -- the recomputation would route with other ids (task 0),
send tokens to other experts and either raise ``torch.utils.checkpoint.CheckpointError`` (other
saved-tensor shapes) or silently give wrong gradients. open_clip's ``set_grad_checkpointing`` and
timm's ``set_grad_checkpointing`` both recompute that way.

:func:`checkpoint_moe_blocks_` wraps each chosen block (an instance-level ``forward``: state-dict keys,
attributes, hooks and ``isinstance`` unchanged) in a non-reentrant ``torch.utils.checkpoint.checkpoint``
of a function that receives the task ids of the block's MoE layers as ARGUMENTS and re-enters them, so
the recomputation routes every token exactly as the forward did. RNG state (router noise) is
replayed by ``checkpoint`` itself. Without gradients (eval, ``torch.no_grad``) blocks run plainly.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .hosts import BlockSpec, filtered_module_names, find_block_container, host_checkpointing_on, select_blocks
from .routing import iter_moe_layers, moe_task_state

__all__ = ["checkpoint_moe_blocks_"]

def _replay(block: nn.Module, layers: list, task_ids: list, *args: Any, **kwargs: Any) -> Tensor:
    """The block's class forward with its MoE layers holding ``task_ids`` (forward AND recomputation)."""
    with moe_task_state(layers, task_ids):
        return type(block).forward(block, *args, **kwargs)


def _routed_checkpoint_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return type(self).forward(self, *args, **kwargs)
    layers = list(iter_moe_layers(self))
    # The ids are ARGUMENTS of the checkpointed function, so the recomputation in backward re-enters
    # them even though the caller's moe_task_context has closed by then.
    task_ids = [layer.task_ids for layer in layers]
    return checkpoint(_replay, self, layers, task_ids, *args, use_reentrant=False, **kwargs)


def _is_wrapped(block: nn.Module) -> bool:
    fwd = block.__dict__.get("forward")
    return isinstance(fwd, types.MethodType) and fwd.__func__ is _routed_checkpoint_forward


def checkpoint_moe_blocks_(
    model: nn.Module,
    *,
    blocks: BlockSpec = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    enable: bool = True,
) -> list[str]:
    """Turn routing-safe activation checkpointing on (or off) for blocks of ``model``, in place.

    Each chosen block's forward becomes a non-reentrant checkpoint whose recomputation routes every
    token as the forward did (see the module docstring). Works for blocks with and without MoE layers
    (without, it is plain checkpointing). The host's own checkpointing flag (open_clip
    ``transformer.grad_checkpointing``, timm ``grad_checkpointing``) is switched off when enabling (it
    would recompute without the routing; a warning says so when it was on). ``enable=False`` restores
    the blocks' own forward (the host flag stays off).

    Args:
        model: an open_clip CLIP / VisionTransformer / Transformer, a timm ViT, or any module with
            ``filter_fn``.
        blocks: which blocks of the recognised block list: "all" (default), "last:<n>", a list of
            indices or ``i -> bool``. Not allowed together with ``filter_fn``.
        filter_fn: ``(module, qualified_name) -> bool`` choosing the modules to wrap (outermost match
            wins) in any model.
        enable: True to wrap, False to unwrap.

    Returns:
        Qualified names of the blocks changed (wrapped, or unwrapped), in model order.

    Examples::

        >>> inject_moe_(clip, blocks="last:6", num_tasks=2)  # doctest: +SKIP
        >>> checkpoint_moe_blocks_(clip)  # doctest: +SKIP
        ['visual.transformer.resblocks.0', ..., 'visual.transformer.resblocks.11']
        >>> with moe_task_context(clip.visual, task_ids):  # doctest: +SKIP
        ...     loss = criterion(clip.encode_image(images))
        >>> loss.backward()  # recomputation routes like the forward  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (expected nn.Module, got {type(model).__name__})")
    if not isinstance(enable, bool):
        raise TypeError(f"enable must be a bool (expected bool, got {type(enable).__name__})")
    if filter_fn is not None:
        names = filtered_module_names(model, filter_fn, blocks)
    else:
        prefix, container, _family = find_block_container(model)
        names = [f"{prefix}.{i}" for i in select_blocks(blocks, len(container), default="all")]
    if not names:
        raise ValueError("checkpoint_moe_blocks_: no block selected (expected at least one, got none; "
                         "check blocks / filter_fn)")
    if enable:
        flags = host_checkpointing_on(model)
        for flag in flags:
            owner_path, _, attr = flag.rpartition(".")
            setattr(model.get_submodule(owner_path) if owner_path else model, attr, False)
        if flags:
            warnings.warn(f"checkpoint_moe_blocks_ switched off the host's own activation checkpointing "
                          f"({', '.join(flags)}): it recomputes blocks without the MoE routing", UserWarning,
                          stacklevel=2)
    changed = []
    for name in names:
        block = model.get_submodule(name)
        if enable and not _is_wrapped(block):
            block.forward = types.MethodType(_routed_checkpoint_forward, block)
            changed.append(name)
        elif not enable and _is_wrapped(block):
            del block.__dict__["forward"]
            changed.append(name)
    return changed
