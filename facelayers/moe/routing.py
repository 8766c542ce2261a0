"""Task routing of MoE layers: the task-routing context, a public read of the current task ids, iterators.

Each :class:`~facelayers.moe.MoEFFN` routes the tokens of sample ``b`` with the router and experts of
task ``task_ids[b]``. The ids come from the ``task_ids=`` argument of a direct call or, for a whole
model, from :func:`moe_task_context`. Code that must re-run a forward later with the same routing
(activation checkpointing, :mod:`facelayers.moe.checkpoint`) reads them with :func:`current_task_ids`
and replays them with :func:`moe_task_state`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import Tensor, nn

from .layer import MoEFFN, as_task_ids

__all__ = ["moe_task_context", "moe_task_state", "current_task_ids", "iter_moe_layers", "named_moe_layers"]


def named_moe_layers(model: nn.Module) -> Iterator[tuple[str, MoEFFN]]:
    """``(qualified name, layer)`` for every :class:`MoEFFN` inside ``model`` (``model`` itself included), in order."""
    for name, module in model.named_modules():
        if isinstance(module, MoEFFN):
            yield name, module


def iter_moe_layers(model: nn.Module) -> Iterator[MoEFFN]:
    """Every :class:`MoEFFN` inside ``model`` (``model`` itself included), in module order."""
    for _, module in named_moe_layers(model):
        yield module


def current_task_ids(module: nn.Module) -> Tensor | None:
    """The task ids the MoE layers of ``module`` route with right now (when a forward passes none).

    Args:
        module: a :class:`MoEFFN` or any module containing MoEFFN layers.

    Returns:
        ``[B]`` (or scalar) long tensor, or None when no ids are set (every token uses task 0).

    Raises:
        ValueError: ``module`` contains no MoEFFN, or its MoE layers hold different ids (read them one
            by one with ``layer.task_ids`` then).
    """
    layers = list(iter_moe_layers(module))
    if not layers:
        raise ValueError(f"current_task_ids: {type(module).__name__} contains no MoEFFN layer "
                         f"(expected a module with MoEFFN layers, got none)")
    ids = layers[0].task_ids
    if any(layer.task_ids is not ids for layer in layers[1:]):
        raise ValueError(f"current_task_ids: the MoE layers of {type(module).__name__} hold different task ids "
                         f"(expected one setting, got {len({id(l.task_ids) for l in layers})}); read layer.task_ids")
    return ids


@contextlib.contextmanager
def moe_task_state(layers: Sequence[MoEFFN], task_ids: Sequence[Tensor | None]) -> Iterator[None]:
    """Give each layer its own task ids (None = task 0) for the duration of the context, then restore.

    The low-level form of :func:`moe_task_context` (no value checks, one setting per layer): used to
    replay exactly the routing state read earlier with ``[layer.task_ids for layer in layers]``.
    """
    layers = list(layers)
    task_ids = list(task_ids)
    if len(layers) != len(task_ids):
        raise ValueError(f"moe_task_state needs one task-id setting per layer "
                         f"(expected {len(layers)}, got {len(task_ids)})")
    previous = [layer.task_ids for layer in layers]
    for layer, ids in zip(layers, task_ids):
        layer.task_ids = ids
    try:
        yield
    finally:
        for layer, prev in zip(layers, previous):
            layer.task_ids = prev


@contextlib.contextmanager
def moe_task_context(model: nn.Module, task_ids: int | Sequence[int] | Tensor) -> Iterator[None]:
    """Set the task of every sample for all :class:`MoEFFN` layers inside ``model``.

    Within the context each MoE layer routes the tokens of sample ``b`` with task ``task_ids[b]``'s
    router and experts, so samples of different tasks can share ONE forward pass. How tokens map to
    samples: ``[B, L, D]`` inputs (``batch_first=True``) repeat each id ``L`` times, ``[L, B, D]``
    inputs tile the ids ``L`` times, ``[N, D]`` inputs take one id per row. Contexts nest; the
    previous ids are restored on exit. A backward pass that recomputes a block after the context
    closed (activation checkpointing) must replay the ids: see
    :func:`facelayers.moe.checkpoint_moe_blocks_`.

    Args:
        model: a module containing MoEFFN layers (or a MoEFFN itself).
        task_ids: ``[B]`` integer task ids (tensor or sequence), or one int for the whole batch.

    Examples::

        >>> with moe_task_context(clip.visual, torch.tensor([0, 0, 1])):  # doctest: +SKIP
        ...     feats = clip.encode_image(images)
    """
    layers = list(iter_moe_layers(model))
    if not layers:
        raise ValueError(f"moe_task_context: {type(model).__name__} contains no MoEFFN layer "
                         f"(expected a module with MoEFFN layers, got none; call inject_moe_ first)")
    t = as_task_ids(task_ids)
    if t.numel() > 0 and t.device.type == "cpu":
        lo, hi = int(t.min()), int(t.max())
        max_tasks = min(layer.num_tasks for layer in layers)
        if lo < 0 or hi >= max_tasks:
            raise ValueError(f"task ids must lie in [0, {max_tasks}) (num_tasks of the MoE layers) "
                             f"(expected ids in [0, {max_tasks}), got range [{lo}, {hi}])")
    with moe_task_state(layers, [t] * len(layers)):
        yield
