"""inject_moe_ on open_clip and timm: bit-identity at zero private branch, encode_text, training, helpers."""

from __future__ import annotations

import pytest
import torch
from _testutils import tiny_clip_kwargs
from torch import nn

from facelayers.moe import (
    MoEFFN,
    inject_moe_,
    load_pre_injection_state_dict,
    map_pre_injection_state_dict,
    moe_parameter_groups,
    moe_task_context,
)

open_clip = pytest.importorskip("open_clip")


def _zero_gamma_(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoEFFN):
                m.gamma.zero_()


def _zero_private_(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoEFFN):
                for p in (m.w1, m.b1, m.w2, m.b2):
                    p.zero_()


@pytest.mark.slow
def test_open_clip_vit_b16_zero_gamma_bit_identical():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model.encode_image(x)
    names = inject_moe_(model, num_tasks=2, hidden_dim=512)
    assert names == [f"visual.transformer.resblocks.{i}.mlp" for i in range(6, 12)]
    _zero_gamma_(model)
    with torch.no_grad(), moe_task_context(model.visual, torch.tensor([1])):  # mixed tasks: tiny-model tests
        out = model.encode_image(x)
    assert torch.equal(out, ref)
    loads = [m.last_load for m in model.modules() if isinstance(m, MoEFFN)]
    assert all(load[1].sum().item() == 197 * 2 and load[0].sum().item() == 0 for load in loads)


@pytest.mark.slow
def test_timm_vit_clip_zero_private_weights_bit_identical():
    timm = pytest.importorskip("timm")
    # Built on the meta device and filled from a seeded generator: timm's own init (trunc_normal_ over
    # 86 M parameters) costs seconds and is irrelevant to the property tested.
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_clip_224", pretrained=False)
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    x = torch.randn(1, 3, 224, 224, generator=g)
    with torch.no_grad():
        ref = model(x)
    names = inject_moe_(model, blocks="last:6", hidden_dim=512)
    assert names == [f"blocks.{i}.mlp" for i in range(6, 12)]
    assert model.blocks[11].mlp.fc1 is model.blocks[11].mlp.shared.fc1
    _zero_private_(model)  # gamma stays 0.1
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, ref)


def test_tiny_clip_zero_gamma_and_zero_private_bit_identical(tiny_clip):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = tiny_clip.encode_image(x)
    inject_moe_(tiny_clip, blocks="all", num_tasks=2, hidden_dim=8)
    with torch.no_grad(), moe_task_context(tiny_clip.visual, [1, 0, 1]):
        assert not torch.equal(tiny_clip.encode_image(x), ref)  # the private branch is live at init
        _zero_gamma_(tiny_clip)
        assert torch.equal(tiny_clip.encode_image(x), ref)
        for m in tiny_clip.modules():
            if isinstance(m, MoEFFN):
                m.gamma.data.fill_(0.5)
        _zero_private_(tiny_clip)
        assert torch.equal(tiny_clip.encode_image(x), ref)


def test_shared_expert_is_the_original_module_quick_gelu_kept():
    torch.manual_seed(0)
    model = open_clip.CLIP(**tiny_clip_kwargs(), quick_gelu=True)
    original = model.visual.transformer.resblocks[1].mlp
    assert type(original.gelu).__name__ == "QuickGELU"
    inject_moe_(model, blocks=[-1], hidden_dim=8)
    moe = model.visual.transformer.resblocks[1].mlp
    assert isinstance(moe, MoEFFN) and moe.shared is original
    assert type(moe.shared.gelu).__name__ == "QuickGELU"
    assert moe.dim == 64 and moe.batch_first is True
    assert not isinstance(model.visual.transformer.resblocks[0].mlp, MoEFFN)


def test_encode_text_works_with_text_blocks_injected(tiny_clip):
    tokens = open_clip.get_tokenizer("ViT-B-16")(["a photo of a smiling face", "a frown"])
    with torch.no_grad():
        ref = tiny_clip.encode_text(tokens)
    names = inject_moe_(
        tiny_clip,
        filter_fn=lambda module, name: name.startswith("transformer.resblocks.") and name.endswith(".mlp"),
        hidden_dim=8,
    )
    assert names == ["transformer.resblocks.0.mlp", "transformer.resblocks.1.mlp"]
    assert tiny_clip.transformer.get_cast_dtype() == torch.float32  # reads resblocks[0].mlp.c_fc.weight
    _zero_gamma_(tiny_clip)
    with torch.no_grad():
        assert torch.equal(tiny_clip.encode_text(tokens), ref)


def test_injected_tiny_clip_trains_and_moe_params_get_grads():
    torch.manual_seed(0)
    model = open_clip.CLIP(**tiny_clip_kwargs())
    inject_moe_(model, blocks="last:2", num_tasks=2, hidden_dim=16)
    model.train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=g)
    tasks = torch.tensor([0, 0, 1, 1])
    target = torch.randn(4, 32, generator=g)
    opt = torch.optim.Adam(model.visual.parameters(), lr=5e-3)
    losses = []
    for step in range(4):
        with moe_task_context(model.visual, tasks):
            feats = model.encode_image(images)
        loss = (feats - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for m in model.modules():
                if isinstance(m, MoEFFN):
                    for name in ("w1", "b1", "w2", "b2", "router_weight", "gamma"):
                        grad = getattr(m, name).grad
                        assert grad is not None and grad.abs().sum() > 0, f"no gradient for {name}"
                    # each task used its own experts
                    assert (m.w1.grad[0].abs().sum() > 0) and (m.w1.grad[1].abs().sum() > 0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], f"loss did not decrease: {losses}"


def test_open_clip_seq_first_transformer_mixed_tasks_equal_separate():
    from open_clip.transformer import Transformer

    torch.manual_seed(0)
    tr = Transformer(width=16, layers=2, heads=2, batch_first=False).eval()
    inject_moe_(tr, blocks="all", num_tasks=2, hidden_dim=8)
    moe = tr.resblocks[0].mlp
    assert moe.batch_first is False  # inferred from Transformer.batch_first (blocks see [L, B, D])
    x = torch.randn(4, 3, 16, dtype=torch.float32)  # open_clip Transformer input is [B, L, D]
    tasks = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        with moe_task_context(tr, tasks):
            mixed = tr(x)
        for t in (0, 1):
            with moe_task_context(tr, t):
                alone = tr(x[tasks == t])
            torch.testing.assert_close(mixed[tasks == t], alone, rtol=1e-5, atol=1e-5)


def test_state_dict_saved_before_injection_loads():
    torch.manual_seed(0)
    source = open_clip.CLIP(**tiny_clip_kwargs()).eval()
    sd = source.state_dict()
    torch.manual_seed(1)
    target = open_clip.CLIP(**tiny_clip_kwargs()).eval()
    inject_moe_(target, blocks="all", hidden_dim=8)
    mapped = map_pre_injection_state_dict(sd, target)
    assert "visual.transformer.resblocks.0.mlp.shared.c_fc.weight" in mapped
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" not in mapped
    missing = load_pre_injection_state_dict(target, sd)
    assert sorted(missing) == sorted(
        f"visual.transformer.resblocks.{i}.mlp.{n}"
        for i in range(2)
        for n in ("router.weight", "router.bias", "experts.w1", "experts.b1", "experts.w2", "experts.b2", "gamma")
    )
    _zero_gamma_(target)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target.encode_image(x), source.encode_image(x))
    bad = dict(sd)
    bad["visual.not_a_param"] = torch.zeros(1)
    with pytest.raises(KeyError, match="unexpected"):
        load_pre_injection_state_dict(target, bad)


def test_parameter_groups():
    model = open_clip.CLIP(**tiny_clip_kwargs())
    inject_moe_(model, blocks="all", hidden_dim=8)
    groups = moe_parameter_groups(model, include_shared=True)
    moes = [m for m in model.modules() if isinstance(m, MoEFFN)]
    assert len(groups["experts"]) == 4 * len(moes) and groups["experts"][0] is moes[0].w1
    assert len(groups["routers"]) == 2 * len(moes) and len(groups["gamma"]) == len(moes)
    assert groups["shared"][0] is moes[0].shared.c_fc.weight
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    with pytest.raises(ValueError, match="no MoEFFN"):
        moe_parameter_groups(nn.Linear(2, 2))


def test_block_specs_and_errors():
    def fresh():
        torch.manual_seed(0)
        return open_clip.CLIP(**tiny_clip_kwargs())

    assert inject_moe_(fresh(), blocks=lambda i: i == 0, hidden_dim=4) == ["visual.transformer.resblocks.0.mlp"]
    assert inject_moe_(fresh().visual, blocks="last:1", hidden_dim=4) == ["transformer.resblocks.1.mlp"]
    with pytest.raises(ValueError, match="asks for the last 6 blocks but the model has 2"):
        inject_moe_(fresh(), hidden_dim=4)  # default "last:6"
    with pytest.raises(ValueError, match="out of range"):
        inject_moe_(fresh(), blocks=[2], hidden_dim=4)
    with pytest.raises(ValueError, match="either blocks or filter_fn"):
        inject_moe_(fresh(), blocks="all", filter_fn=lambda m, n: False)
    with pytest.raises(ValueError, match="no module selected"):
        inject_moe_(fresh(), filter_fn=lambda m, n: False)
    model = fresh()
    inject_moe_(model, blocks="all", hidden_dim=4)
    with pytest.raises(ValueError, match="applied twice"):
        inject_moe_(model, blocks="all", hidden_dim=4)
    with pytest.raises(TypeError, match="pass filter_fn"):
        inject_moe_(nn.Sequential(nn.Linear(4, 4)), hidden_dim=4)
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        inject_moe_(fresh(), blocks="all", num_experts=2, top_k=3)
    # generic model through filter_fn: dim inferred from the first Linear
    seq = nn.Sequential(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6)))
    assert inject_moe_(seq, filter_fn=lambda m, n: n == "0", hidden_dim=4, activation="relu") == ["0"]
    assert seq[0].dim == 6 and seq(torch.randn(2, 6)).shape == (2, 6)
