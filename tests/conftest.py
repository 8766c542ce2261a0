"""Shared test fixtures: offline hub, seeding, hypothesis profiles, tiny CLIP models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


def tiny_clip_kwargs(embed_dim: int = 32) -> dict:
    """Config of a tiny open_clip CLIP (random init, no download, real tokenizer vocabulary)."""
    return dict(
        embed_dim=embed_dim,
        vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )


@pytest.fixture
def tiny_clip():
    """A tiny open_clip CLIP model in eval mode (random weights)."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**tiny_clip_kwargs())
    return model.eval()
