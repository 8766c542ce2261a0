"""Mixture-of-experts FFN layers (shared pretrained expert + routed per-task private experts).

Modules: ``layer.py`` (:class:`MoEFFN`), ``router.py`` (task top-k routers, the release's misrouted
dispatch), ``experts.py`` (grouped expert bank), ``routing.py`` (task-routing context, public read of
the task ids, iterators), ``checkpoint.py`` (routing-safe activation checkpointing), ``inject.py``
(model surgery), ``hosts.py`` (open_clip / timm block lists).
"""

from __future__ import annotations

from .checkpoint import checkpoint_moe_blocks_
from .experts import GroupedExperts
from .inject import (
    inject_moe_, load_pre_injection_state_dict, map_pre_injection_state_dict, moe_parameter_groups,
    set_shared_activation_,
)
from .layer import (
    LEGACY_PARAMETER_NAMES, SSM_RELEASE_MOE_KWARGS, MissingTaskIdsWarning, MoEFFN, moe_aux_loss,
    moe_load_stats,
)
from .router import ReleaseMisroutedTopKRouter, RouterOutput, TaskTopKRouter, TokenLayout
from .routing import current_task_ids, iter_moe_layers, moe_task_context, moe_task_state, named_moe_layers

__all__ = [
    "MoEFFN", "moe_task_context", "moe_aux_loss", "moe_load_stats", "SSM_RELEASE_MOE_KWARGS",
    "inject_moe_", "map_pre_injection_state_dict", "load_pre_injection_state_dict",
    "moe_parameter_groups",
    # composition
    "TaskTopKRouter", "ReleaseMisroutedTopKRouter", "RouterOutput", "TokenLayout",
    "GroupedExperts", "LEGACY_PARAMETER_NAMES", "set_shared_activation_",
    # routing and checkpointing
    "current_task_ids", "iter_moe_layers", "named_moe_layers", "moe_task_state",
    "checkpoint_moe_blocks_", "MissingTaskIdsWarning",
]
