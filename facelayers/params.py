"""Declare what trains: pretrained-vs-new parameter groups for optimizers (torchtune
``peft/_utils.py`` style; STYLE.md habit 9).

Fine-tuning a pretrained backbone with new parts (MoE private experts, temporal heads, prompt
contexts, mappings) usually wants two learning rates: a small one for the pretrained weights and a
larger one for everything new (the SSM paper: 1e-6 and 1e-4).
"""

from __future__ import annotations

import math

from collections.abc import Iterable, Mapping, Sequence

from torch import nn

__all__ = ["pretrained_and_new", "optimizer_param_groups"]


def pretrained_and_new(
    model: nn.Module,
    *,
    pretrained_prefixes: Sequence[str],
    new_params: Iterable[nn.Parameter] = (),
) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters of ``model`` split into pretrained and new ones.

    A parameter is *pretrained* when its (first) qualified name starts with one of
    ``pretrained_prefixes`` and it is not one of ``new_params`` (e.g. the private experts that
    :func:`facelayers.moe.inject_moe_` added inside a pretrained tower:
    ``moe_parameter_groups(model.visual)``); every other trainable parameter is *new*. Frozen
    parameters (``requires_grad=False``) are in no group; a parameter shared under several names
    appears once. Order: ``model.named_parameters()``.

    Args:
        model: the model.
        pretrained_prefixes: name prefixes of pretrained sub-modules, e.g. ``("visual.",)``.
        new_params: parameters to count as new although they sit under a pretrained prefix.

    Returns:
        ``{"pretrained": [...], "new": [...]}``.

    Raises:
        TypeError: ``pretrained_prefixes`` is a plain string (pass a tuple).

    Examples::

        >>> groups = pretrained_and_new(model, pretrained_prefixes=("visual.",),
        ...                             new_params=[p for ps in moe_parameter_groups(model.visual).values() for p in ps])
        >>> torch.optim.AdamW(optimizer_param_groups(groups, {"pretrained": 1e-6, "new": 1e-4}))
    """
    if isinstance(pretrained_prefixes, str):
        raise TypeError(f"pretrained_prefixes must be a sequence of strings (expected e.g. ('visual.',), "
                        f"got the string {pretrained_prefixes!r})")
    prefixes = tuple(pretrained_prefixes)
    new_ids = {id(p) for p in new_params}
    pretrained, new = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith(prefixes) and id(p) not in new_ids:
            pretrained.append(p)
        else:
            new.append(p)
    return {"pretrained": pretrained, "new": new}


def optimizer_param_groups(groups: Mapping[str, Sequence[nn.Parameter]], lrs: Mapping[str, float]) -> list[dict]:
    """Optimizer parameter groups ``[{"params": ..., "lr": ..., "name": ...}]`` (empty groups dropped).

    Raises:
        KeyError: a non-empty group has no learning rate in ``lrs``, or ``lrs`` names a group that
            ``groups`` does not have (a typo would otherwise be ignored).
        ValueError: a learning rate that is not a finite number >= 0, or a parameter in two groups
            (torch would refuse it later, without naming the groups).
    """
    unknown = sorted(set(lrs) - set(groups))
    if unknown:
        raise KeyError(f"learning rate for unknown parameter group(s) (expected names from {sorted(groups)}, "
                       f"got {unknown})")
    out = []
    seen: dict[int, str] = {}
    for name, params in groups.items():
        if not params:
            continue
        if name not in lrs:
            raise KeyError(f"no learning rate for parameter group {name!r} (expected one of {sorted(lrs)}, got {name!r})")
        lr = lrs[name]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"learning rate of group {name!r} must be a finite number >= 0 (expected e.g. 1e-4, "
                             f"got {lr!r})")
        for p in params:
            if id(p) in seen:
                raise ValueError(f"a parameter is in two groups (expected each parameter in one group, got it in "
                                 f"{seen[id(p)]!r} and {name!r})")
            seen[id(p)] = name
        out.append(dict(params=list(params), lr=float(lr), name=name))
    return out
