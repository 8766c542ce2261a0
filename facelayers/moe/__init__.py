"""Mixture-of-experts FFN layers (shared pretrained expert + routed per-task private experts)."""

from __future__ import annotations

from .inject import inject_moe_, load_pre_injection_state_dict, map_pre_injection_state_dict, moe_parameter_groups
from .layer import SSM_RELEASE_MOE_KWARGS, MoEFFN, moe_aux_loss, moe_load_stats, moe_task_context

__all__ = [
    "MoEFFN",
    "moe_task_context",
    "moe_aux_loss",
    "moe_load_stats",
    "SSM_RELEASE_MOE_KWARGS",
    "inject_moe_",
    "map_pre_injection_state_dict",
    "load_pre_injection_state_dict",
    "moe_parameter_groups",
]
