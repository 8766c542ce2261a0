"""Helpers shared by test modules (import as `from _testutils import ...`; `conftest` is not
importable by name because benchmarks/ has a conftest too)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on the shared 2-core CI machine.

    Autouse, module-scoped: a test module turns it on by importing it
    (``from _testutils import one_thread  # noqa: F401``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_clip_kwargs(embed_dim: int = 32) -> dict:
    """Config of a tiny open_clip CLIP (random init, no download, real tokenizer vocabulary)."""
    return dict(
        embed_dim=embed_dim,
        vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )


def break_weights_file(path, kind: str, *, keep_fraction: int = 2) -> None:
    """Overwrite a ``.safetensors`` file with a broken one (a loader must refuse it, never unpickle it).

    ``kind``: ``"zero_bytes"`` (empty), ``"truncated"`` (its first ``1 / keep_fraction``),
    ``"corrupt_header"`` (a header length pointing into garbage), ``"pickle"`` (a pickled dict),
    ``"zip"`` (a ``torch.save`` archive) or ``"garbage"`` (a length prefix then non-JSON).
    """
    import pickle
    from pathlib import Path

    path = Path(path)
    data = path.read_bytes()
    if kind == "zip":
        torch.save({"w": torch.zeros(2)}, str(path))
        return
    broken = {
        "zero_bytes": lambda: b"",
        "truncated": lambda: data[: len(data) // keep_fraction],
        "corrupt_header": lambda: b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"{" * 32 + data[40:],
        "pickle": lambda: pickle.dumps({"state_dict": {"w": [1, 2]}}),
        "garbage": lambda: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}",
    }
    if kind not in broken:
        raise ValueError(f"kind is unknown (expected one of {sorted([*broken, 'zip'])}, got {kind!r})")
    path.write_bytes(broken[kind]())


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


def check_script_error(rc: int, err: str, *needles: str) -> str:
    """A script's user error: exit code 2, ONE stderr line ``error: ... (expected ..., got ...)``, no
    traceback, and every needle in that line. Returns the line."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, f"exit code {rc}, stderr: {err}"
    assert len(lines) == 1, f"expected one stderr line, got {lines}"
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in err
    assert "expected" in line and "got" in line, line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def forbid_calls(monkeypatch, targets, why: str) -> None:
    """Patch every ``(owner, attribute)`` in ``targets`` with a function that fails the test with ``why``."""
    def boom(*args, **kwargs):
        raise AssertionError(why)

    for owner, name in targets:
        monkeypatch.setattr(owner, name, boom)


def save_tiny_checkpoint(folder, *, seed: int | None = None, **cfg_kwargs):
    """Save a tiny reference SSM (T = 2, 16-px input, one block; ``cfg_kwargs`` override) as ``folder/best``."""
    from facelayers.models import ssm

    if seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(mode="baseline", num_frames=2, moe_blocks="all", temporal_heads=2,
                  clip_kwargs=ssm.tiny_clip_kwargs(16, 8, 32, 1))
    kwargs.update(cfg_kwargs)
    ssm.save_model(ssm.build_model(ssm.ModelConfig(**kwargs)), str(folder), name="best")
    return folder
