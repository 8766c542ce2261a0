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


def load_example(name: str):
    """``examples/<name>.py`` as a module, loaded from its path (``examples/`` holds scripts, not a
    package: nothing adds it to the import path). Loaded once per test session."""
    import importlib.util
    import sys
    from pathlib import Path

    key = f"_facelayers_example_{name}"
    if key not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
