"""The reference SSM run two ways: facelayers' execution and the released code's execution strategy.

Helpers of ``benchmarks/test_bench_ssm.py`` (the end-to-end benchmarks of issue 9). Both ways run the
SAME model object (``facelayers.models.ssm``), built once, so any difference in speed or memory
comes from how it is executed:

==========================  =========================================  ==========================================
                            facelayers (``facelayers_step``)           release-style (``release_step``)
==========================  =========================================  ==========================================
vision passes per step      ONE concatenated pass, per-sample task     TWO passes: expression clips, then AU
                            routing (``model(e, a)``)                  clips (``model(e, a, vision_passes=2)``)
private experts             ``grouped_expert_mlp`` (sort once;         masked per-expert loop with ``unique()``
                            Triton on CUDA)                            (``masked_loop_experts``)
text prompts                encoded once per forward in training,      re-encoded on every forward, evaluation
                            cached in eval mode                        included (``set_cache_in_eval(False)``)
precision                   bf16 autocast on CUDA                      fp32
activation checkpointing    optional (``set_grad_checkpointing``)      off
==========================  =========================================  ==========================================

Every switch is the model's own (``facelayers.models.ssm.SSMModel``): ``vision_passes=2`` runs the
vision encoder on the expression frames, then on the AU frames (the order of ``Bp4dSSM.forward`` in
the released ``ssm/models/bp4d.py``, read for understanding, not copied); ``set_cache_in_eval``;
``set_grad_checkpointing``; ``set_moe_backend`` with the masked per-expert loop, which is not a library
backend: ``release_dispatch.py`` registers it with ``facelayers.ops.grouped_experts.register_backend``
under ``RELEASE_BACKEND`` (:func:`masked_loop_experts` sets it per layer). The masked loop is the one of ``release_dispatch.py``
(``masked_loop``: a Python loop over (slot, expert) with boolean masks and a host sync, as the
release dispatches, but with correct routing).

Memory on CPU: :func:`peak_rss_delta` -- the process's resident-set high-water mark (``VmHWM``,
reset through ``/proc/self/clear_refs``) during one step, minus the resident set right before it
(after ``gc`` and ``malloc_trim``), i.e. the extra memory a step needs on top of weights, gradients
and optimizer state. ``tracemalloc`` is not used: it does not see torch's allocator.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from facelayers.models import ssm as B

__all__ = [
    "tiny_config",
    "vitb_config",
    "build",
    "make_batch",
    "facelayers_step",
    "two_pass_step",
    "release_step",
    "release_forward",
    "masked_loop_experts",
    "set_text_cache",
    "peak_rss_delta",
    "rss_measurable",
]

LAM = 2.0
CLIP_GRAD = 1.0


# ----------------------------------------------------------------------------------------------
# model and data
# ----------------------------------------------------------------------------------------------


def tiny_config(num_frames: int = 8, **overrides: Any) -> B.ModelConfig:
    """The example's default tiny configuration (``resolve_defaults`` of ``ssm_reference.py``):
    tiny random-init CLIP (32 px, 2 blocks), MoE in every block, 4 temporal heads, full SSM."""
    kw: dict[str, Any] = dict(backbone="tiny", num_frames=num_frames, moe_blocks="all", temporal_heads=4)
    kw.update(overrides)
    return B.ModelConfig(**kw)


def vitb_config(num_frames: int = 16, **overrides: Any) -> B.ModelConfig:
    """The paper's configuration: open_clip ViT-B/16 (random init here), MoE in the last 6 blocks."""
    kw: dict[str, Any] = dict(backbone="ViT-B-16", num_frames=num_frames, moe_blocks="last:6", temporal_heads=8)
    kw.update(overrides)
    return B.ModelConfig(**kw)


def build(cfg: B.ModelConfig, device: torch.device | str = "cpu", *, seed: int = 0,
          optimizer: bool = True) -> tuple[B.SSMModel, torch.optim.Optimizer | None]:
    """Model (random init, no download) and the example's AdamW groups (paper learning rates)."""
    torch.manual_seed(seed)
    model = B.build_model(cfg, pretrained=None).to(device)
    opt = None
    if optimizer:
        opt = B.build_optimizer(model, lr=1e-4, lr_visual=1e-6, weight_decay=1e-4)
    return model, opt


def make_batch(model: B.SSMModel, n_exp: int, n_au: int, frames: int, device: torch.device | str = "cpu",
               *, seed: int = 0) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
    """Random batches in the data contract: expression ``{clip [B1,T,3,H,W], label [B1]}``, AU
    ``{clip [B2,T,3,H,W], labels [B2,M]}`` at the model's image size."""
    g = torch.Generator().manual_seed(seed)
    s = model.cfg.image_size
    k, m = len(model.cfg.expressions), len(model.cfg.aus)
    eb = ab = None
    if n_exp:
        eb = dict(clip=torch.randn(n_exp, frames, 3, s, s, generator=g).to(device),
                  label=torch.randint(0, k, (n_exp,), generator=g).to(device))
    if n_au:
        ab = dict(clip=torch.randn(n_au, frames, 3, s, s, generator=g).to(device),
                  labels=torch.randint(0, 2, (n_au, m), generator=g).float().to(device))
    return eb, ab


def _compute_losses(out: dict[str, Tensor], eb: dict | None, ab: dict | None) -> Tensor:
    from facelayers.losses import au_loss, expression_loss, joint_loss

    l_exp = expression_loss(out["exp_logits"].float(), eb["label"]) if eb is not None else None
    l_au = au_loss(out["au_logits"].float(), ab["labels"]) if ab is not None else None
    return joint_loss(l_exp, l_au, lam=LAM)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# facelayers' execution (the training loop of examples/ssm_reference.py, one step)
# ----------------------------------------------------------------------------------------------


def facelayers_step(model: B.SSMModel, opt: torch.optim.Optimizer, eb: dict, ab: dict, *,
                    amp_dtype: torch.dtype | None = None) -> float:
    """One optimizer step as ``train_one_epoch`` does it: ONE concatenated vision pass
    (``vision_passes=1``), optional autocast."""
    return _step(model, opt, eb, ab, passes=1, amp_dtype=amp_dtype)


def _step(model: B.SSMModel, opt: torch.optim.Optimizer, eb: dict, ab: dict, *, passes: int,
          amp_dtype: torch.dtype | None) -> float:
    device = eb["clip"].device
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        out = model(eb["clip"], ab["clip"], vision_passes=passes)
    loss = _compute_losses(out, eb, ab)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP_GRAD)
    opt.step()
    _sync(device)
    return float(loss.detach())


# ----------------------------------------------------------------------------------------------
# release-style execution
# ----------------------------------------------------------------------------------------------


def release_forward(model: B.SSMModel, exp_clips: Tensor | None, au_clips: Tensor | None) -> dict[str, Tensor]:
    """The released forward's order of work: ``model(exp_clips, au_clips, vision_passes=2)``."""
    return model(exp_clips, au_clips, vision_passes=2)


def two_pass_step(model: B.SSMModel, opt: torch.optim.Optimizer, eb: dict, ab: dict, *,
                  amp_dtype: torch.dtype | None = None) -> float:
    """Like :func:`facelayers_step` but with two vision passes (the only difference)."""
    return _step(model, opt, eb, ab, passes=2, amp_dtype=amp_dtype)


def release_step(model: B.SSMModel, opt: torch.optim.Optimizer, eb: dict, ab: dict) -> float:
    """Release-style step: two vision passes, fp32 (no autocast). Run it inside
    :func:`masked_loop_experts` for the release's expert dispatch."""
    return two_pass_step(model, opt, eb, ab, amp_dtype=None)


@contextlib.contextmanager
def masked_loop_experts(model: B.SSMModel) -> Iterator[None]:
    """Run every ``MoEFFN`` of ``model`` on the release's masked per-expert loop (the backend
    ``release_dispatch.RELEASE_BACKEND``, registered by ``release_dispatch``), restoring each layer's
    backend on exit. Nothing is patched."""
    from facelayers.moe import iter_moe_layers

    from release_dispatch import register_release_backend

    layers = list(iter_moe_layers(model))
    before = [m.backend for m in layers]
    name = register_release_backend()
    try:
        for m in layers:
            m.backend = name
        yield
    finally:
        for m, b in zip(layers, before):
            m.backend = b


def set_text_cache(model: B.SSMModel, enabled: bool) -> int:
    """Eval-mode text cache on (facelayers) or off (release: re-encode on every forward):
    ``model.set_cache_in_eval``. Returns the number of prompt learners changed."""
    return model.set_cache_in_eval(enabled)


# ----------------------------------------------------------------------------------------------
# CPU memory: resident-set high-water mark of one call
# ----------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_measurable() -> bool:
    """True where the peak RSS can be reset and read (Linux >= 4.0 with a writable clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_rss_delta(fn: Callable[[], Any], repeats: int = 3, *, trim: bool = True) -> dict[str, float]:
    """Median over ``repeats`` calls of (peak RSS during ``fn()``) - (RSS right before), in MiB.

    Before each call, ``gc.collect()`` and glibc's ``malloc_trim(0)`` return freed memory to the OS
    (``trim=False`` skips that: faster, but then memory freed earlier and reused by ``fn`` is not
    counted). Also returns the resident set before the last call (``rss_before_mib``). Raises
    ``OSError`` where :func:`rss_measurable` is False.
    """
    deltas, before = [], 0
    for _ in range(repeats):
        if trim:
            _trim()
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        fn()
        deltas.append(_status_kib("VmHWM") - before)
    deltas.sort()
    return dict(peak_delta_mib=deltas[len(deltas) // 2] / 1024.0, rss_before_mib=before / 1024.0)


def timed(fn: Callable[[], Any], rounds: int) -> float:
    """Median wall time of ``rounds`` calls (seconds); for quick sanity checks outside pytest-benchmark."""
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]
