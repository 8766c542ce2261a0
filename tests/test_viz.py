"""facelayers.viz: each plot writes a PNG, rejects mismatched shapes, and fails clearly without matplotlib."""

from __future__ import annotations

import builtins
import importlib
import sys

import pytest
import torch

pytest.importorskip("matplotlib")

from facelayers import viz  # noqa: E402


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_dpm_maps_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    a0, b0 = torch.rand(7, 12, generator=g).softmax(1), torch.rand(12, 7, generator=g).softmax(1)
    a1, b1 = torch.rand(7, 12, generator=g).softmax(1), torch.rand(12, 7, generator=g).softmax(1)
    names = ["happiness", "sadness", "neutral", "anger", "surprise", "disgust", "fear"]
    out = tmp_path / "dpm.png"
    fig = viz.plot_dpm_maps({"initial": (a0, b0), "learned": (a1, b1)}, names, [1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24],
                            path=out)
    assert _is_png(out)
    # 2 rows (A, B) x 2 panels, each with a colorbar axis
    assert len([ax for ax in fig.axes if ax.get_title()]) == 4


def test_dpm_maps_rejects_wrong_shapes():
    a, b = torch.rand(7, 12), torch.rand(12, 7)
    with pytest.raises(ValueError, match=r"\[K, M\]"):
        viz.plot_dpm_maps({"x": (a.T, b)}, list("abcdefg"), list(range(1, 13)))
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        viz.plot_dpm_maps({"x": (a, b[:5])}, list("abcdefg"), list(range(1, 13)))
    with pytest.raises(ValueError, match="at least one"):
        viz.plot_dpm_maps({}, list("abcdefg"), list(range(1, 13)))


def test_au_timeline_png(tmp_path):
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(40, 8, generator=g)
    labels = (torch.rand(40, 8, generator=g) > 0.7).float()
    out = tmp_path / "sub" / "tl.png"
    viz.plot_au_timeline(probs, [1, 2, 4, 6, 9, 12, 25, 26], fps=25.0, labels=labels, path=out)
    assert _is_png(out)
    with pytest.raises(ValueError, match="8 AU columns but 3"):
        viz.plot_au_timeline(probs, [1, 2, 4])
    with pytest.raises(ValueError, match="labels shape"):
        viz.plot_au_timeline(probs, [1, 2, 4, 6, 9, 12, 25, 26], labels=labels[:5])


def test_confusion_matrix_png_and_normalisation(tmp_path):
    cm = torch.tensor([[5, 1, 0], [0, 0, 0], [2, 2, 4]])
    out = tmp_path / "cm.png"
    fig = viz.plot_confusion_matrix(cm, ["a", "b", "c"], path=out)
    assert _is_png(out)
    img = fig.axes[0].images[0].get_array()
    # rows normalised by support; the row without support stays 0
    assert torch.allclose(torch.tensor(img[0].tolist(), dtype=torch.float64), torch.tensor([5 / 6, 1 / 6, 0.0], dtype=torch.float64))
    assert float(abs(torch.tensor(img[1].tolist())).sum()) == 0.0
    with pytest.raises(ValueError, match=r"\[2, 2\]"):
        viz.plot_confusion_matrix(cm, ["a", "b"])


def test_training_curves(tmp_path):
    hist = [{"epoch": i + 1, "loss": 1.0 / (i + 1), "val/uar": 0.1 * i} for i in range(4)]
    out = tmp_path / "curves.png"
    fig = viz.plot_training_curves(hist, path=out)
    assert _is_png(out)
    titles = sorted(ax.get_title() for ax in fig.axes if ax.get_title())
    assert titles == ["loss", "val/uar"]
    line = [ax for ax in fig.axes if ax.get_title() == "loss"][0].lines[0]
    assert list(line.get_xdata()) == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="empty"):
        viz.plot_training_curves([])


def test_missing_matplotlib_message(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    fresh = importlib.reload(viz)  # importing the module itself must not need matplotlib
    with pytest.raises(ImportError, match=r"facelayers\[plot\]"):
        fresh.plot_confusion_matrix(torch.eye(2), ["a", "b"])
