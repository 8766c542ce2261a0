"""Helpers shared by test modules (import as `from _testutils import ...`; `conftest` is not
importable by name because benchmarks/ has a conftest too)."""

from __future__ import annotations


def tiny_clip_kwargs(embed_dim: int = 32) -> dict:
    """Config of a tiny open_clip CLIP (random init, no download, real tokenizer vocabulary)."""
    return dict(
        embed_dim=embed_dim,
        vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )
