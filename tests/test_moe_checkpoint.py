"""checkpoint_moe_blocks_: recomputation in backward routes every token as its forward did.

Gradients with routing-safe checkpointing equal those without (open_clip tiny and timm tiny; a
one-pass mixed-task batch and two passes under different task contexts; router noise on, so the RNG
replay is covered too); the host's own checkpointing gets them wrong (or fails); torch.compile runs it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _testutils import tiny_clip_kwargs
from torch import nn
from torch.utils.checkpoint import CheckpointError

from facelayers.moe import MoEFFN, checkpoint_moe_blocks_, inject_moe_, moe_task_context

open_clip = pytest.importorskip("open_clip")

TASKS = torch.tensor([1, 0, 1, 0])


def _tiny_clip(**moe) -> nn.Module:
    torch.manual_seed(0)
    model = open_clip.CLIP(**tiny_clip_kwargs())
    inject_moe_(model, blocks="all", num_tasks=2, hidden_dim=8, noise_std=1e-2, **moe)
    return model.train()


def _tiny_timm() -> nn.Module:
    vit_mod = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    model = vit_mod.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    inject_moe_(model, blocks="all", num_tasks=2, hidden_dim=8, noise_std=1e-2)
    return model.train()


def _grads(model: nn.Module, encode, images: torch.Tensor, passes: int | str) -> dict[str, torch.Tensor]:
    """Gradients of one loss. ``passes=1``: one mixed-task batch, backward after the context closed;
    ``2``: one pass per task, backward after both closed; ``"2-inside"``: one pass per task, backward
    still INSIDE the second pass's context (a recomputation of the first pass then sees task 1)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # same router noise in every run
    if passes == 1:
        with moe_task_context(model, TASKS):
            feats = encode(images)
        _loss(feats).backward()
    else:
        with moe_task_context(model, 0):
            f0 = encode(images[TASKS == 0])
        with moe_task_context(model, 1):
            f1 = encode(images[TASKS == 1])
            if passes == "2-inside":
                _loss(torch.cat([f0, f1])).backward()
        if passes == 2:
            _loss(torch.cat([f0, f1])).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss(feats: torch.Tensor) -> torch.Tensor:
    return (feats * torch.linspace(-1, 1, feats.shape[-1])).sum() + feats.pow(2).mean()


def _assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    moe_grads = [n for n in want if ".experts.w1" in n]
    assert moe_grads and all(want[n][t].abs().sum() > 0 for n in moe_grads for t in (0, 1)), "both tasks' experts"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("passes", [1, 2, "2-inside"], ids=["one-pass-mixed", "two-passes", "backward-in-context"])
def test_open_clip_checkpointed_grads_equal_plain(passes):
    plain = _tiny_clip()
    ck = copy.deepcopy(plain)
    names = checkpoint_moe_blocks_(ck)
    assert names == ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1"]
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want = _grads(plain, plain.encode_image, images, passes)
    got = _grads(ck, ck.encode_image, images, passes)
    _assert_same_grads(got, want)
    assert list(ck.state_dict()) == list(plain.state_dict())  # wrapping leaves the keys alone


@pytest.mark.parametrize("passes", [1, 2], ids=["one-pass-mixed", "two-passes"])
def test_timm_checkpointed_grads_equal_plain(passes):
    plain = _tiny_timm()
    ck = copy.deepcopy(plain)
    assert checkpoint_moe_blocks_(ck, blocks=[0, -1]) == ["blocks.0", "blocks.1"]
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    _assert_same_grads(_grads(ck, ck, images, passes), _grads(plain, plain, images, passes))


@pytest.mark.parametrize("passes", [1, 2, "2-inside"], ids=["one-pass-mixed", "two-passes", "backward-in-context"])
def test_host_checkpointing_gets_routing_wrong_and_inject_warns(passes):
    """open_clip's own checkpointing recomputes with whatever ids are current in backward: a
    CheckpointError (no ids: other saved tensors) or, inside another context, silently wrong gradients."""
    torch.manual_seed(0)
    host = open_clip.CLIP(**tiny_clip_kwargs())
    host.set_grad_checkpointing(True)
    # backend "reference" saves tensors whose shapes do not depend on the routing (as the Triton backend):
    # a recomputation under other ids is then invisible to torch's checkpoint checks
    with pytest.warns(UserWarning, match="checkpoint_moe_blocks_"):
        inject_moe_(host, blocks="all", num_tasks=2, hidden_dim=8, noise_std=1e-2, backend="reference")
    host.train()
    plain = copy.deepcopy(host)
    plain.set_grad_checkpointing(False)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want = _grads(plain, plain.encode_image, images, passes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the recomputation runs without task ids (MissingTaskIdsWarning)
        try:
            got = _grads(host, host.encode_image, images, passes)
        except CheckpointError:
            assert passes != "2-inside", "same-shape recomputation should not be detected by torch"
            return  # the recomputation saw other routing and torch noticed
    assert any(not torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-6) for n in want), \
        "host checkpointing unexpectedly replayed the routing"


def test_enable_switches_host_flag_off_and_disable_restores():
    model = _tiny_clip()
    model.set_grad_checkpointing(True)
    with pytest.warns(UserWarning, match="switched off the host's own activation checkpointing"):
        names = checkpoint_moe_blocks_(model)
    assert model.visual.transformer.grad_checkpointing is False
    assert checkpoint_moe_blocks_(model) == []  # already wrapped: nothing changed
    block = model.visual.transformer.resblocks[0]
    assert "forward" in vars(block)
    assert checkpoint_moe_blocks_(model, enable=False) == names
    assert "forward" not in vars(block)
    images = torch.randn(2, 3, 32, 32)
    with moe_task_context(model.visual, [0, 1]):
        assert model.encode_image(images).shape == (2, 32)


class Block(nn.Module):
    """A generic residual block (not open_clip, not timm)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


def _generic(num_tasks: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(), Block())
    inject_moe_(model, filter_fn=lambda m, n: n.endswith(".mlp"), num_tasks=num_tasks, hidden_dim=4)
    return model


def test_filter_fn_any_block_list_and_errors():
    plain = _generic()
    ck = copy.deepcopy(plain)
    assert checkpoint_moe_blocks_(ck, filter_fn=lambda m, n: isinstance(m, Block)) == ["0", "1", "2"]
    x = torch.randn(3, 5, 6)
    grads = []
    for m in (plain, ck):
        with moe_task_context(m, [2, 0, 1]):
            out = m(x)
        out.pow(2).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="either blocks or filter_fn"):
        checkpoint_moe_blocks_(ck, blocks="all", filter_fn=lambda m, n: True)
    with pytest.raises(ValueError, match="no block selected"):
        checkpoint_moe_blocks_(ck, filter_fn=lambda m, n: False)
    with pytest.raises(TypeError, match="pass filter_fn"):
        checkpoint_moe_blocks_(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"expected bool, got int"):
        checkpoint_moe_blocks_(ck, filter_fn=lambda m, n: True, enable=1)


def test_no_grad_runs_plain_forward():
    model = _tiny_clip().eval()
    ref_model = copy.deepcopy(model)
    checkpoint_moe_blocks_(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), moe_task_context(model, [1, 0]), moe_task_context(ref_model, [1, 0]):
        assert torch.equal(model.encode_image(images), ref_model.encode_image(images))


def test_torch_compile_smoke_checkpointed_moe():
    plain = _generic(num_tasks=2)
    ck = copy.deepcopy(plain)
    checkpoint_moe_blocks_(ck, filter_fn=lambda m, n: isinstance(m, Block))
    compiled = torch.compile(ck, backend="eager")
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(3))
    grads = []
    for fn, m in ((plain, plain), (compiled, ck)):
        with moe_task_context(m, [1, 0]):
            out = fn(x)
        out.pow(2).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"d{n}: {m}")
    assert isinstance(ck[0].mlp, MoEFFN) and grads[0]["0.mlp.experts.w1"][1].abs().sum() > 0
