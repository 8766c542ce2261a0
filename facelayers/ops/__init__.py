"""Functional operators (kernels with a PyTorch reference beside them)."""

from __future__ import annotations

from .grouped_experts import grouped_expert_mlp

__all__ = ["grouped_expert_mlp"]
