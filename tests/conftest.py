"""Shared test fixtures: offline hub, seeding, hypothesis profiles, tiny CLIP models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from hypothesis import HealthCheck, settings

from _testutils import tiny_clip_kwargs

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


@pytest.fixture
def tiny_clip():
    """A tiny open_clip CLIP model in eval mode (random weights)."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**tiny_clip_kwargs())
    return model.eval()
