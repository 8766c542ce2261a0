"""Data pipeline vs the JPEG decoder (issue 16): frames/s per loader worker on one CPU core.

A "clip" is 16 JPEG frames (distinct files, so nothing is decoded twice), at 256 x 256 (a face crop)
and at 1040 x 1392 (an uncropped BP4D frame). Rows of each group (``data_256``, ``data_1040x1392``):

- ``pil_decode`` (baseline): ``Image.open(p).load()`` for every frame -- the decoder alone, full size.
- ``pil_decode_rgb``: ``Image.open(p).convert("RGB")`` -- the first step of the reference ``load_frame``.
- ``fast_train``: ``train_transform(224).apply_to_frames(paths, g)`` -- the whole training pipeline
  (decode, random resized crop, flip, brightness, CLIP normalisation, random erasing) to the float
  clip the model gets; reduced-scale JPEG decoding where it applies (1040 x 1392).
- ``fast_eval``: ``eval_transform(224).apply_to_frames(paths)``.
- ``fast_train_nodraft`` (1040 x 1392 only): ``fast_train`` with ``draft=False``.
- ``reference_train``: ``load_frame`` of every frame + ``train_transform(224)`` on the float clip
  (the float reference path, fewer rounds).

``test_interleaved_ratio`` (timed with ``--benchmark``) times ``pil_decode`` and ``fast_train``
clip by clip, alternating (30 rounds), so both see the same machine load; it prints medians (wall
and process CPU time), the ratios, and the loader workers the paper's batch needs (12 expression +
128 AU clips x 16 frames = 2240 frames per training step) for a given GPU step time. The rows above
run one after another, so under a changing load their ratios are less reliable than these.

Without ``--benchmark`` every body runs once on 4-frame clips (smoke test).
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as Fnn
from bench_report import set_role
from PIL import Image

from facelayers.data import load_frame
from facelayers.data.transforms import eval_transform, train_transform

SIZES = {"256": (256, 256), "1040x1392": (1040, 1392)}
FRAMES_TIMED, FRAMES_SMOKE = 16, 4
ROUNDS = {"256": 30, "1040x1392": 10}
PAPER_FRAMES_PER_STEP = (12 + 128) * 16  # 2240 (paper Sec. IV-B batch)
STEP_SECONDS = (0.25, 0.5, 1.0)  # GPU step times to size the loader for (not measured here)


def _face_like(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour field + mid-frequency texture + a little noise: compresses like a face frame
    (about 1.3 bits per pixel at quality 90)."""
    g = torch.Generator().manual_seed(seed)
    low = Fnn.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    mid = Fnn.interpolate(torch.rand(1, 3, max(h // 16, 2), max(w // 16, 2), generator=g), size=(h, w),
                          mode="bicubic", align_corners=False)
    img = 0.6 * low + 0.3 * mid + 0.03 * torch.rand(1, 3, h, w, generator=g)
    return (img[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def clips(tmp_path_factory, bench_timed) -> dict[str, list[Path]]:
    n = FRAMES_TIMED if bench_timed else FRAMES_SMOKE
    out = {}
    for key, (h, w) in SIZES.items():
        root = tmp_path_factory.mktemp(f"frames_{key}")
        for s in range(2):
            Image.fromarray(_face_like(h, w, s)).save(root / f"src{s}.jpg", quality=90)
        paths = []
        for i in range(n):
            p = root / f"{i:03d}.jpg"
            shutil.copyfile(root / f"src{i % 2}.jpg", p)
            paths.append(p)
        out[key] = paths
    return out


def _pil_decode(paths):
    for p in paths:
        with Image.open(p) as im:
            im.load()


def _pil_decode_rgb(paths):
    for p in paths:
        with Image.open(p) as im:
            im.convert("RGB")


_SEEDS = itertools.count()  # a new draw (crop, flip, brightness, erasing) every round, as in training


def _fast_train(paths, draft=True, _t=train_transform(224)):
    return _t.apply_to_frames(paths, torch.Generator().manual_seed(next(_SEEDS)), draft=draft)


def _fast_eval(paths, _t=eval_transform(224)):
    return _t.apply_to_frames(paths)


def _reference_train(paths, _t=train_transform(224)):
    return _t(torch.stack([load_frame(p) for p in paths]), torch.Generator().manual_seed(next(_SEEDS)))


def _bench(benchmark, key, fn, paths, rounds, baseline=False):
    benchmark.group = f"data_{key}"
    if baseline:
        set_role(benchmark, "baseline")
    benchmark.extra_info["frames_per_round"] = len(paths)
    benchmark.pedantic(fn, args=(paths,), rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("key", list(SIZES))
def test_pil_decode(benchmark, clips, key):
    _bench(benchmark, key, _pil_decode, clips[key], ROUNDS[key], baseline=True)


@pytest.mark.parametrize("key", list(SIZES))
def test_pil_decode_rgb(benchmark, clips, key):
    _bench(benchmark, key, _pil_decode_rgb, clips[key], ROUNDS[key])


@pytest.mark.parametrize("key", list(SIZES))
def test_fast_train(benchmark, clips, key):
    _bench(benchmark, key, _fast_train, clips[key], ROUNDS[key])


@pytest.mark.parametrize("key", list(SIZES))
def test_fast_eval(benchmark, clips, key):
    _bench(benchmark, key, _fast_eval, clips[key], ROUNDS[key])


def test_fast_train_nodraft(benchmark, clips):
    _bench(benchmark, "1040x1392", lambda p: _fast_train(p, draft=False), clips["1040x1392"], 5)


@pytest.mark.parametrize("key", list(SIZES))
def test_reference_train(benchmark, clips, key):
    _bench(benchmark, key, _reference_train, clips[key], 5)


def test_interleaved_ratio(clips, bench_timed, capsys):
    """Alternate baseline and pipeline clip by clip; report medians, ratios and the workers needed."""
    rounds = 30 if bench_timed else 1
    lines = [f"data pipeline vs PIL decode, interleaved, {rounds} rounds, load average {os.getloadavg()}"]
    for key, paths in clips.items():
        wall = {"pil_decode": [], "fast_train": []}
        cpu = {"pil_decode": [], "fast_train": []}
        _pil_decode(paths), _fast_train(paths)  # warm-up
        for _ in range(rounds):
            for name, fn in (("pil_decode", _pil_decode), ("fast_train", _fast_train)):
                w0, c0 = time.perf_counter(), time.process_time()
                fn(paths)
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        n = len(paths)
        for label, d in (("wall", wall), ("cpu", cpu)):
            base, fast = statistics.median(d["pil_decode"]), statistics.median(d["fast_train"])
            paired = statistics.median(b / f for b, f in zip(d["pil_decode"], d["fast_train"]))
            fps = n / fast
            workers = ", ".join(f"{PAPER_FRAMES_PER_STEP / (fps * s):.1f} for a {s} s step" for s in STEP_SECONDS)
            lines.append(
                f"  {key} [{label}]: PIL decode {1e3 * base / n:.3f} ms/frame ({n / base:.0f} frames/s), "
                f"fast_train {1e3 * fast / n:.3f} ms/frame ({fps:.0f} frames/s) -> ratio {base / fast:.2f}x "
                f"(median of per-round ratios {paired:.2f}x); "
                f"paper batch {PAPER_FRAMES_PER_STEP} frames/step needs {workers} workers"
            )
        assert all(t > 0 for t in wall["fast_train"])
    if bench_timed:
        with capsys.disabled():
            print("\n" + "\n".join(lines))
