"""End-to-end benchmarks of the reference SSM against the released code's execution strategy (issue 9).

Run ``pytest benchmarks --benchmark`` for timings (plain ``pytest benchmarks`` runs each body once,
at the smallest shapes, as a smoke test). Every group compares facelayers' path with the
release-style path ON THE SAME MODEL in the same process (see ``_release_style.py``); the row marked
``[baseline]`` is the release-style one, ``x baseline`` = baseline median / row median.

2. One training step (``train step ...``): facelayers (ONE concatenated vision pass, grouped
   experts), ``two_pass`` (only the pass count changed), ``release`` [baseline] (two passes + masked
   per-expert loop; fp32), and facelayers with activation checkpointing. CPU: the example's tiny
   backbone, 16 expression + 16 AU clips of 8 frames (the example's default batch). GPU
   (``requires_cuda``): ViT-B/16 (random init) with MoE in the last 6 blocks, 12 + 8 clips of 16
   frames at 224 px, bf16 autocast vs fp32 release-style. Peak memory: CPU, the resident-set
   high-water mark of one step above the resident set before it (``peak_rss_delta``); GPU,
   ``torch.cuda.max_memory_allocated`` of one step. Activation checkpointing at ViT-B/16 size on
   CPU (1 + 1 clips of 8 frames, one round; memory effect; ``--benchmark`` only).
3. Evaluation latency of one 16-frame expression clip (``eval 1 clip ...``): cached text
   prototypes (facelayers' eval mode) vs re-encoding the prompts on every forward [baseline];
   tiny backbone, and ViT-B/16 (random init, MoE in the last 6 blocks; ``--benchmark`` only).
4. Data loading (``data ...``): the synthetic benchmark exported to disk in the real manifest
   formats and read back with ``ExpressionClipDataset`` / ``AUClipDataset`` + ``DataLoader`` +
   ``HeterogeneousLoader``, one training step's worth of clips per round, vs the model step
   [baseline] (``x baseline`` > 1: the loader outruns the step, the accelerator would not starve).

Extra numbers (clips/s, peak memory, interleaved one-vs-two-pass ratio) are printed in a second
table at the end of a ``--benchmark`` session and stored in each row's ``extra_info``.

Smoke mode (CI) shapes: tiny backbone, 2 + 2 clips of 4 frames for training, one 16-frame clip for
evaluation, 4 + 4 clips of 4 frames at 32 px for data loading; no ViT-B/16.

``FACELAYERS_BENCH_THREADS=N`` sets torch's CPU threads for these benchmarks (default: torch's).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from bench_report import set_role

import _release_style as R

# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------

TINY_TRAIN = dict(n_exp=16, n_au=16, frames=8)  # the example's tiny default batch (resolve_defaults)
TINY_TRAIN_SMOKE = dict(n_exp=2, n_au=2, frames=4)
GPU_TRAIN = dict(n_exp=12, n_au=8, frames=16)  # the paper's batch (12 expression + 8 AU clips shown)
EVAL_FRAMES = 16
DATA_TINY = dict(n_exp=16, n_au=16, frames=8, size=32)
DATA_PAPER = dict(n_exp=12, n_au=8, frames=16, size=224)
DATA_SMOKE = dict(n_exp=4, n_au=4, frames=4, size=32)
DISK_SIZE = 224  # frame size on disk (aligned face crops); the transforms resize to the model's input

ROUNDS = dict(train=10, eval_tiny=20, eval_vitb=3, data=8, data_workers=16, gpu=5)
PAIRED_ROUNDS = 12


def _timed(request: pytest.FixtureRequest) -> bool:
    """``--benchmark`` given (module-scoped fixtures cannot use conftest's function-scoped ``bench_timed``)."""
    return bool(request.config.getoption("facelayers_benchmark"))


@pytest.fixture(scope="module", autouse=True)
def _threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """``FACELAYERS_BENCH_THREADS`` if set; smoke mode (which measures nothing) uses 1 thread, since
    2 OpenMP threads stall badly when the test suite shares the 2 cores with other processes."""
    n = os.environ.get("FACELAYERS_BENCH_THREADS") or (None if _timed(request) else "1")
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    yield
    torch.set_num_threads(old)


def _rounds(kind: str, timed: bool) -> dict[str, int]:
    return dict(rounds=ROUNDS[kind] if timed else 1, iterations=1, warmup_rounds=(1 if timed else 0))


# ----------------------------------------------------------------------------------------------
# second table: clips/s, memory, paired ratios
# ----------------------------------------------------------------------------------------------


class _ExtraReport:
    """Collects (group, row, metric -> value) and prints them at the end of a --benchmark session."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, dict[str, str]]] = []

    def add(self, group: str, row: str, **metrics: Any) -> None:
        fmt = {k: (f"{v:.0f}" if isinstance(v, float) and abs(v) >= 100 else f"{v:.3g}" if isinstance(v, float)
                   else str(v)) for k, v in metrics.items()}
        self.rows.append((group, row, fmt))

    @pytest.hookimpl(trylast=True)  # after conftest's comparison table
    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if not self.rows or not config.getoption("facelayers_benchmark"):
            return
        terminalreporter.write_sep("=", "facelayers end-to-end extras (clips/s, peak memory, paired ratios)")
        for group, row, metrics in self.rows:
            terminalreporter.write_line(f"{group:<34} {row:<30} " + "  ".join(f"{k}={v}" for k, v in metrics.items()))


_REPORT = _ExtraReport()


@pytest.fixture(scope="session")
def extra_report(request: pytest.FixtureRequest) -> _ExtraReport:
    pm = request.config.pluginmanager
    if not pm.is_registered(_REPORT):
        pm.register(_REPORT, "facelayers-ssm-extras")
    return _REPORT


def _median_s(benchmark: Any) -> float | None:
    st = getattr(benchmark, "stats", None)
    return None if st is None else float(st.stats.median)


def _record_clips(benchmark: Any, report: _ExtraReport, clips: int, **extra: Any) -> None:
    med = _median_s(benchmark)
    benchmark.extra_info["clips_per_step"] = clips
    benchmark.extra_info.update(extra)
    if med is not None:
        benchmark.extra_info["clips_per_s"] = clips / med
        report.add(benchmark.group, benchmark.name, clips_per_s=clips / med, median_ms=1e3 * med, **extra)


# ----------------------------------------------------------------------------------------------
# benchmark 2: one training step, tiny backbone on CPU
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_train(request: pytest.FixtureRequest) -> dict[str, Any]:
    shape = TINY_TRAIN if _timed(request) else TINY_TRAIN_SMOKE
    model, opt = R.build(R.tiny_config(num_frames=shape["frames"]))
    eb, ab = R.make_batch(model, shape["n_exp"], shape["n_au"], shape["frames"])
    label = f"{shape['n_exp']}+{shape['n_au']}x{shape['frames']}f"
    return dict(model=model, opt=opt, eb=eb, ab=ab, clips=shape["n_exp"] + shape["n_au"],
                group=f"train step tiny {label}")


def _checkpointing(model: R.B.SSMModel, on: bool) -> None:
    model.set_grad_checkpointing(on)


STEP_KINDS = ["facelayers", "facelayers_grad_ckpt", "two_pass", "release"]


def _step_fn(kind: str, t: dict[str, Any]) -> Callable[[], float]:
    model, opt, eb, ab = t["model"], t["opt"], t["eb"], t["ab"]
    if kind in ("facelayers", "facelayers_grad_ckpt"):
        return lambda: R.facelayers_step(model, opt, eb, ab)
    if kind == "two_pass":
        return lambda: R.two_pass_step(model, opt, eb, ab)
    return lambda: R.release_step(model, opt, eb, ab)


@pytest.mark.parametrize("kind", STEP_KINDS)
def test_train_step_tiny(benchmark, bench_timed, tiny_train, extra_report, kind):
    """One optimizer step of the reference SSM (tiny backbone, CPU); time, clips/s and peak RSS."""
    t = tiny_train
    benchmark.group = t["group"]
    stack = contextlib.ExitStack()
    if kind == "release":
        set_role(benchmark, "baseline")
        stack.enter_context(R.masked_loop_experts(t["model"]))
    _checkpointing(t["model"], kind == "facelayers_grad_ckpt")
    try:
        with stack:
            fn = _step_fn(kind, t)
            loss = benchmark.pedantic(fn, **_rounds("train", bench_timed))
            assert math.isfinite(loss), f"{kind}: non-finite loss {loss}"
            mem: dict[str, float] = {}
            if R.rss_measurable():
                mem = R.peak_rss_delta(fn, repeats=3) if bench_timed else R.peak_rss_delta(fn, 1, trim=False)
            _record_clips(benchmark, extra_report, t["clips"], **{k: round(v, 1) for k, v in mem.items()})
    finally:
        _checkpointing(t["model"], False)


VITB_CPU_TRAIN = dict(n_exp=1, n_au=1, frames=8)


@pytest.fixture(scope="module")
def vitb_train(request: pytest.FixtureRequest) -> dict[str, Any]:
    if not _timed(request):
        pytest.skip("the ViT-B/16 CPU training step runs only with --benchmark (about 30 s per step)")
    shape = VITB_CPU_TRAIN
    model, opt = R.build(R.vitb_config(num_frames=shape["frames"]))
    eb, ab = R.make_batch(model, shape["n_exp"], shape["n_au"], shape["frames"])
    return dict(model=model, opt=opt, eb=eb, ab=ab, clips=shape["n_exp"] + shape["n_au"],
                group=f"train step ViT-B/16 CPU {shape['n_exp']}+{shape['n_au']}x{shape['frames']}f")


@pytest.mark.parametrize("kind", ["facelayers", "facelayers_grad_ckpt"])
def test_train_step_vitb16_cpu_grad_ckpt(benchmark, vitb_train, extra_report, kind):
    """Memory effect of activation checkpointing at ViT-B/16 size (one round: a memory measurement,
    the time is indicative only). ``--benchmark`` only."""
    t = vitb_train
    benchmark.group = t["group"]
    _checkpointing(t["model"], kind == "facelayers_grad_ckpt")
    try:
        fn = _step_fn(kind, t)
        loss = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
        assert math.isfinite(loss), f"{kind}: non-finite loss {loss}"
        mem = R.peak_rss_delta(fn, repeats=1) if R.rss_measurable() else {}
        _record_clips(benchmark, extra_report, t["clips"], **{k: round(v, 1) for k, v in mem.items()})
    finally:
        _checkpointing(t["model"], False)


def test_train_step_tiny_one_vs_two_passes_paired(bench_timed, tiny_train, extra_report):
    """Interleaved medians (one pass, two passes, alternating) so machine-load drift cancels; the
    ratio two/one is the target "one concatenated pass at least as fast as two passes"."""
    t = tiny_train
    one, two = _step_fn("facelayers", t), _step_fn("two_pass", t)
    one(), two()  # warm-up
    n = PAIRED_ROUNDS if bench_timed else 1
    t1, t2 = [], []
    for i in range(n):
        for fn, acc in ((one, t1), (two, t2)) if i % 2 == 0 else ((two, t2), (one, t1)):
            s = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - s)
    m1, m2 = sorted(t1)[n // 2], sorted(t2)[n // 2]
    assert m1 > 0 and m2 > 0
    if bench_timed:
        extra_report.add(t["group"], "paired one-vs-two passes", one_pass_ms=1e3 * m1, two_pass_ms=1e3 * m2,
                         ratio_two_over_one=m2 / m1, rounds=n)


# ----------------------------------------------------------------------------------------------
# benchmark 3: evaluation latency of one 16-frame clip, cached text vs re-encoding
# ----------------------------------------------------------------------------------------------


def _eval_model(cfg: R.B.ModelConfig) -> R.B.SSMModel:
    model, _ = R.build(cfg, optimizer=False)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_eval() -> R.B.SSMModel:
    return _eval_model(R.tiny_config(num_frames=EVAL_FRAMES))


@pytest.fixture(scope="module")
def vitb_eval(request: pytest.FixtureRequest) -> R.B.SSMModel:
    if not _timed(request):
        pytest.skip("ViT-B/16 evaluation runs only with --benchmark (about 5 s per forward on 2 CPU cores)")
    return _eval_model(R.vitb_config(num_frames=EVAL_FRAMES))


def _eval_latency(benchmark, model: R.B.SSMModel, cached: bool, rounds: dict[str, int]) -> None:
    n = R.set_text_cache(model, cached)
    assert n == 2, f"expected the expression and AU prompt learners, found {n}"
    s = model.cfg.image_size
    clip = torch.randn(1, EVAL_FRAMES, 3, s, s, generator=torch.Generator().manual_seed(0))
    if not cached:
        set_role(benchmark, "baseline")

    @torch.no_grad()
    def forward() -> torch.Tensor:
        return model(exp_clips=clip)["exp_logits"]

    try:
        out = benchmark.pedantic(forward, **rounds)
        assert out.shape == (1, len(model.cfg.expressions)) and torch.isfinite(out).all()
    finally:
        R.set_text_cache(model, True)


@pytest.mark.parametrize("text", ["cached", "reencode"])
def test_eval_clip_tiny(benchmark, bench_timed, tiny_eval, text):
    benchmark.group = f"eval 1 clip tiny {EVAL_FRAMES}f"
    _eval_latency(benchmark, tiny_eval, text == "cached", _rounds("eval_tiny", bench_timed))


@pytest.mark.parametrize("text", ["cached", "reencode"])
def test_eval_clip_vitb16(benchmark, bench_timed, vitb_eval, text):
    benchmark.group = f"eval 1 clip ViT-B/16 {EVAL_FRAMES}f"
    _eval_latency(benchmark, vitb_eval, text == "cached", _rounds("eval_vitb", bench_timed))


def test_text_cache_is_used_and_exact(tiny_eval):
    """The cached path serves the same logits as re-encoding (the comparison is apples to apples)."""
    s = tiny_eval.cfg.image_size
    clip = torch.randn(1, EVAL_FRAMES, 3, s, s, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        R.set_text_cache(tiny_eval, True)
        cached = tiny_eval(exp_clips=clip)["exp_logits"]
        R.set_text_cache(tiny_eval, False)
        fresh = tiny_eval(exp_clips=clip)["exp_logits"]
        R.set_text_cache(tiny_eval, True)
    torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)


def test_release_forward_matches_one_pass(tiny_train):
    """Two passes (release order) and one concatenated pass compute the same logits."""
    model, eb, ab = tiny_train["model"], tiny_train["eb"], tiny_train["ab"]
    model.eval()
    try:
        with torch.no_grad():
            one = model(eb["clip"], ab["clip"])
            two = model(eb["clip"], ab["clip"], vision_passes=2)
    finally:
        model.train()
    for key in ("exp_logits", "au_logits"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


# ----------------------------------------------------------------------------------------------
# benchmark 4: data loading throughput vs the model step
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_data(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The synthetic benchmark exported (PNG frames + DFEW / BP4D manifests) at 32 px, and a copy
    resized to 224 px (--benchmark only; see ``_data_export.py``)."""
    from _data_export import export_synthetic, frame_bytes, resized_copy

    root = tmp_path_factory.mktemp("synthetic_export")
    timed = _timed(request)
    with warnings.catch_warnings():  # torchvision.io's PNG writer (used by the exporter) is deprecated
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        if timed:
            small = export_synthetic(root / "px32", num_clips=70, num_subjects=6, num_frames=16, sequence_length=64)
        else:
            small = export_synthetic(root / "px32", num_clips=35, num_subjects=4, num_frames=4, sequence_length=16)
    data = {"tiny": small}
    if timed:
        data["paper"] = resized_copy(small, root / "px224", DISK_SIZE)
    for d in data.values():
        d["frame_bytes"] = frame_bytes(d)
    return data


def _pair_stream(data: dict[str, Any], shape: dict[str, int], workers: int) -> Iterator[Any]:
    """Endless (expression batch, AU batch) pairs: training datasets + transforms, as the example trains."""
    from torch.utils.data import DataLoader

    from facelayers.data import AUClipDataset, ExpressionClipDataset, HeterogeneousLoader, read_manifest, train_transform

    tf = train_transform(shape["size"])
    exp_ds = ExpressionClipDataset(read_manifest(data["exp_manifest"], "dfew"), data["exp_root"],
                                   num_frames=shape["frames"], train=True, transform=tf)
    au_ds = AUClipDataset(read_manifest(data["au_manifest"], "bp4d"), data["au_root"], num_frames=shape["frames"],
                          train=True, stride=1, transform=tf)
    kw = dict(num_workers=workers, persistent_workers=workers > 0, shuffle=True, drop_last=True)
    loader = HeterogeneousLoader(DataLoader(exp_ds, batch_size=shape["n_exp"], **kw),
                                 DataLoader(au_ds, batch_size=shape["n_au"], **kw))
    while True:
        yield from loader


def _data_group(shape: dict[str, int]) -> str:
    return f"data {shape['n_exp']}+{shape['n_au']}x{shape['frames']}f {shape['size']}px"


DATA_CASES = [pytest.param("tiny", 0, id="tiny-workers0"), pytest.param("tiny", 2, id="tiny-workers2"),
              pytest.param("paper", 0, id="paper-workers0"), pytest.param("paper", 2, id="paper-workers2")]


@pytest.mark.parametrize("case,workers", DATA_CASES)
def test_data_loading(benchmark, bench_timed, exported_data, extra_report, case, workers):
    """One training step's worth of clips (an expression batch + an AU batch) from disk."""
    if not bench_timed and (case == "paper" or workers):
        pytest.skip("smoke mode loads only the tiny case in the main process")
    shape = (DATA_TINY if case == "tiny" else DATA_PAPER) if bench_timed else DATA_SMOKE
    benchmark.group = _data_group(shape)
    data = exported_data[case]
    stream = _pair_stream(data, shape, workers)

    def next_pair() -> int:
        eb, ab = next(stream)
        return eb["clip"].shape[0] + ab["clip"].shape[0]

    # worker prefetch makes rounds bursty (some batches ready, some not): more rounds for a stable median
    n = benchmark.pedantic(next_pair, **_rounds("data_workers" if workers else "data", bench_timed))
    assert n == shape["n_exp"] + shape["n_au"]
    _record_clips(benchmark, extra_report, n, workers=workers, disk_px=data["size"],
                  frame_kib=round(data["frame_bytes"] / 1024, 1))


def test_data_vs_tiny_step(benchmark, bench_timed, tiny_train, extra_report):
    """The model step the tiny data case has to feed (baseline of the data group)."""
    shape = DATA_TINY if bench_timed else DATA_SMOKE
    benchmark.group = _data_group(shape)
    set_role(benchmark, "baseline")
    loss = benchmark.pedantic(_step_fn("facelayers", tiny_train), **_rounds("data", bench_timed))
    assert math.isfinite(loss)
    _record_clips(benchmark, extra_report, tiny_train["clips"])


# ----------------------------------------------------------------------------------------------
# benchmark 2 on GPU: ViT-B/16, 12 + 8 clips x 16 frames (skipped without CUDA)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_train() -> dict[str, Any]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")
    model, opt = R.build(R.vitb_config(num_frames=GPU_TRAIN["frames"]), dev)
    eb, ab = R.make_batch(model, GPU_TRAIN["n_exp"], GPU_TRAIN["n_au"], GPU_TRAIN["frames"], dev)
    return dict(model=model, opt=opt, eb=eb, ab=ab, clips=GPU_TRAIN["n_exp"] + GPU_TRAIN["n_au"], device=dev)


GPU_KINDS = ["facelayers_bf16", "facelayers_bf16_grad_ckpt", "release_fp32"]


@pytest.mark.requires_cuda
@pytest.mark.parametrize("kind", GPU_KINDS)
def test_gpu_train_step_vitb16(benchmark, gpu_train, extra_report, kind):
    """Paper batch on one GPU: facelayers (bf16 autocast, one pass, Triton experts) vs release (fp32,
    two passes, masked loop). Peak memory = torch.cuda.max_memory_allocated of one step."""
    t = gpu_train
    model, opt, eb, ab, dev = t["model"], t["opt"], t["eb"], t["ab"], t["device"]
    benchmark.group = "train step ViT-B/16 GPU 12+8x16f"
    stack = contextlib.ExitStack()
    if kind == "release_fp32":
        set_role(benchmark, "baseline")
        stack.enter_context(R.masked_loop_experts(model))
        fn = lambda: R.release_step(model, opt, eb, ab)  # noqa: E731
    else:
        fn = lambda: R.facelayers_step(model, opt, eb, ab, amp_dtype=torch.bfloat16)  # noqa: E731
    _checkpointing(model, kind.endswith("grad_ckpt"))
    try:
        loss = benchmark.pedantic(fn, rounds=ROUNDS["gpu"], iterations=1, warmup_rounds=2)
        assert math.isfinite(loss)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        peak = torch.cuda.max_memory_allocated(dev)
        _record_clips(benchmark, extra_report, t["clips"], peak_gib=round(peak / 2**30, 2),
                      peak_above_state_gib=round((peak - base) / 2**30, 2))
    finally:
        stack.close()
        _checkpointing(model, False)
