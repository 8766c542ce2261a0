"""Tests of the text side: CLIPTextTower, PromptLearner (CoOp) and TextPrototypes (TSP)."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from _testutils import tiny_clip_kwargs
from hypothesis import given, settings
from hypothesis import strategies as st

from facelayers import facs
from facelayers.prompts import CLIPTextTower, PromptLearner, TextPrototypes

DESCS = [
    "cheek raiser, lip corner puller",
    "brow lowerer",
    "relaxed facial muscles, no significant action units",
]


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    return open_clip.CLIP(**tiny_clip_kwargs()).eval()


@pytest.fixture(scope="module")
def tower(clip_model):
    return CLIPTextTower.from_open_clip(clip_model)


def _normalized_encode_text(model, texts):
    with torch.no_grad():
        return F.normalize(model.encode_text(open_clip.tokenize(texts)), dim=-1)


# ----------------------------------------------------------------------------- tower


def test_tower_equals_encode_text_tiny(clip_model, tower):
    ids = open_clip.tokenize(DESCS)
    assert torch.equal(tower.tokenize(DESCS), ids), "tower.tokenize differs from open_clip.tokenize"
    with torch.no_grad():
        ref = clip_model.encode_text(ids)
        out = tower.encode_tokens(ids)
    assert torch.equal(out, ref), f"tower != encode_text, max diff {(out - ref).abs().max().item()}"
    assert tower.output_dim == ref.shape[-1] and tower.width == 64 and tower.context_length == 77


_WORDS = ["brow", "lowerer", "cheek", "raiser", "lip", "corner", "puller", "jaw", "drop", ",", "a", "photo"]


@settings(max_examples=5)
@given(words=st.lists(st.sampled_from(_WORDS), min_size=0, max_size=12), n=st.integers(1, 3))
def test_tower_equals_encode_text_property(clip_model, tower, words, n):
    texts = [" ".join(words[i:]) for i in range(n)]
    ids = open_clip.tokenize(texts)
    with torch.no_grad():
        assert torch.equal(tower.encode_tokens(ids), clip_model.encode_text(ids)), texts


def test_tower_is_frozen_and_shares_weights(clip_model, tower):
    assert tower.token_embedding is clip_model.token_embedding
    assert tower.transformer is clip_model.transformer
    assert all(not p.requires_grad for p in tower.parameters())
    assert "context_length=77" in repr(tower)


def test_vit_b16_text_tower_prompt_learner_parity():
    """ViT-B-16's text tower (random init) through PromptLearner(n_ctx=0) equals encode_text.

    The vision tower is replaced by a tiny one: only the text side is under test and ViT-B-16's
    vision tower would take ~10 s to initialise on 2 cores.
    """
    cfg = open_clip.get_model_config("ViT-B-16")
    assert cfg is not None
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=tiny_clip_kwargs()["vision_cfg"],
        text_cfg=cfg["text_cfg"],
    ).eval()
    assert model.transformer.width == 512 and model.transformer.layers == 12
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    tower = CLIPTextTower.from_open_clip(model)
    texts = DESCS[:2]
    learner = PromptLearner(tower, texts, n_ctx=0).eval()
    with torch.no_grad():
        ref = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        out = learner()
    assert out.shape == (2, cfg["embed_dim"])
    assert torch.equal(out, ref), f"ViT-B-16 parity: max diff {(out - ref).abs().max().item()}"


def test_tower_sequence_first_transformer(clip_model):
    """A transformer running sequence-first (batch_first=False) and a legacy LND-only one."""
    model = copy.deepcopy(clip_model)
    ids = open_clip.tokenize(DESCS)
    with torch.no_grad():
        ref = model.encode_text(ids)
    seq_first = open_clip.transformer.Transformer(width=64, layers=2, heads=2, batch_first=False)
    seq_first.load_state_dict(model.transformer.state_dict())
    model.transformer = seq_first
    tower = CLIPTextTower.from_open_clip(model)
    assert not tower.sequence_first  # it takes [N, L, W] and transposes itself
    with torch.no_grad():
        assert torch.allclose(model.encode_text(ids), ref, atol=1e-5)
        assert torch.equal(tower.encode_tokens(ids), model.encode_text(ids))

    class LegacyLND(torch.nn.Module):  # old open_clip / OpenAI CLIP: [L, N, W] in, no batch_first
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, attn_mask=None):
            assert x.shape[1] == len(DESCS), "legacy transformer must receive [L, N, W]"
            return self.inner(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)

    legacy = CLIPTextTower(
        model.token_embedding, model.positional_embedding, LegacyLND(clip_model.transformer),
        model.ln_final, model.text_projection, model.attn_mask,
    )
    assert legacy.sequence_first
    with torch.no_grad():
        assert torch.equal(legacy.encode_tokens(ids), ref)


def test_tower_custom_text_clip():
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(**tiny_clip_kwargs()).eval()
    tower = CLIPTextTower.from_open_clip(model)
    ids = open_clip.tokenize(DESCS)
    with torch.no_grad():
        assert torch.equal(tower.encode_tokens(ids), model.encode_text(ids))


def test_tower_rejects_unknown_model():
    with pytest.raises(TypeError, match="text tower"):
        CLIPTextTower.from_open_clip(torch.nn.Linear(2, 2))


def test_tokenize_never_truncates(tower):
    long_text = " ".join(["brow"] * 80)
    with pytest.raises(ValueError, match="context length is 77"):
        tower.tokenize([long_text])
    emb = torch.zeros(2, 77, tower.width)
    with pytest.raises(ValueError, match=r"\[K, L, W=64\].*\(2, 77, 63\)"):
        tower.encode(emb[..., :63], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="L=78"):
        tower.encode(torch.zeros(2, 78, tower.width), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[K\]=\[2\], got \(3,\)"):
        tower.encode(emb, torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------- prompt learner


def test_n_ctx_zero_reproduces_encode_text(clip_model, tower):
    learner = PromptLearner(tower, DESCS, n_ctx=0).eval()
    assert learner.ctx.numel() == 0
    assert torch.equal(learner(), _normalized_encode_text(clip_model, DESCS))


@pytest.mark.parametrize(
    "position,template",
    [("end", "a photo of a {}"), ("front", "{} a photo of a"), ("middle", "a photo {} of a")],
)
@pytest.mark.parametrize("class_specific", [True, False], ids=["class-specific", "shared"])
def test_context_placement_matches_text(clip_model, tower, position, template, class_specific):
    """With ctx_init's token embeddings, the learned prompt equals encoding the spelled-out text."""
    learner = PromptLearner(
        tower, DESCS, n_ctx=4, ctx_init="a photo of a", position=position, class_specific=class_specific
    ).eval()
    expected_shape = (3, 4, 64) if class_specific else (4, 64)
    assert learner.ctx.shape == expected_shape
    ref = _normalized_encode_text(clip_model, [template.format(d) for d in DESCS])
    assert torch.equal(learner(), ref), f"position={position}: max diff {(learner() - ref).abs().max().item()}"


def test_description_too_long_raises(tower):
    long_desc = " ".join(["cheek raiser"] * 34)  # 68 tokens: fits alone, not with 8 context tokens
    PromptLearner(tower, [long_desc], n_ctx=0)
    with pytest.raises(ValueError) as err:
        PromptLearner(tower, ["brow lowerer", long_desc], n_ctx=8)
    msg = str(err.value)
    assert "cheek raiser cheek raiser" in msg and "68 tokens" in msg and "78" in msg and "77" in msg


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(position="left"), ValueError, "position"),
        (dict(n_ctx=-1), ValueError, "n_ctx"),
        (dict(n_ctx=8, ctx_init="a photo of a"), ValueError, "4 tokens but n_ctx=8"),
    ],
)
def test_prompt_learner_bad_args(tower, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PromptLearner(tower, DESCS, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        PromptLearner(tower, [])
    with pytest.raises(TypeError):
        PromptLearner(tower, "brow lowerer")


def test_gradients_reach_only_context(clip_model):
    model = copy.deepcopy(clip_model)
    tower = CLIPTextTower.from_open_clip(model)
    learner = PromptLearner(tower, DESCS, n_ctx=3).train()
    frozen_before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx_before = learner.ctx.detach().clone()
    trainable = [n for n, p in learner.named_parameters() if p.requires_grad]
    assert trainable == ["ctx"]
    opt = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(3, tower.output_dim, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.zero_grad()
        loss = (learner() * target).sum()
        loss.backward()
        assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0, "no gradient to ctx"
        grads = [n for n, p in model.named_parameters() if p.grad is not None]
        assert not grads, f"gradients reached frozen tower parameters: {grads}"
        opt.step()
    assert not torch.equal(learner.ctx.detach(), ctx_before), "ctx did not change"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, frozen_before[k])]
    assert not changed, f"frozen tower parameters changed: {changed}"


def _count_encodes(monkeypatch, tower):
    calls = []
    original = tower.encode

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tower, "encode", counting)
    return calls


def test_eval_cache_encodes_once_and_never_serves_stale(clip_model, monkeypatch):
    model = copy.deepcopy(clip_model)
    tower = CLIPTextTower.from_open_clip(model)
    learner = PromptLearner(tower, DESCS, n_ctx=2)
    calls = _count_encodes(monkeypatch, tower)

    learner.eval()
    with torch.no_grad():
        first = learner()
        second = learner()
    assert len(calls) == 1, f"two eval forwards encoded {len(calls)} times"
    assert second is first
    assert learner().requires_grad is False  # eval features are detached (also with grad enabled)
    assert len(calls) == 1

    # train() + an optimizer step: new features after going back to eval.
    learner.train()
    opt = torch.optim.SGD([learner.ctx], lr=10.0)
    (learner() * torch.randn(3, tower.output_dim)).sum().backward()
    opt.step()
    learner.eval()
    third = learner()
    assert len(calls) == 3  # one train forward, one eval re-encode
    assert not torch.allclose(third, first), "features did not change after a step"
    fresh = F.normalize(tower.encode(learner.prompt_embeddings(), tower.pool_index(learner.token_ids)), dim=-1)
    assert torch.equal(third, fresh.detach())

    # In-place change of ctx under no_grad while in eval invalidates the cache.
    n = len(calls)
    with torch.no_grad():
        learner.ctx.add_(0.5)
        fourth = learner()
    assert len(calls) == n + 1 and not torch.allclose(fourth, third)

    # So does a change of the tower weights (e.g. loading pretrained weights after construction).
    with torch.no_grad():
        model.ln_final.weight.mul_(2.0)
        model.ln_final.bias.add_(0.3)
        fifth = learner()
    assert len(calls) == n + 2 and not torch.allclose(fifth, fourth)

    # And a dtype move.
    learner.to(torch.float64)
    sixth = learner()
    assert sixth.dtype == torch.float64 and len(calls) == n + 3
    assert torch.allclose(sixth.float(), fifth, atol=1e-5)


def test_cache_can_be_disabled(tower, monkeypatch):
    learner = PromptLearner(tower, DESCS[:1], n_ctx=1, cache_in_eval=False).eval()
    calls = _count_encodes(monkeypatch, tower)
    out = learner()
    learner()
    assert len(calls) == 2 and out.requires_grad


@given(
    n_ctx=st.integers(0, 4),
    position=st.sampled_from(["end", "middle", "front"]),
    class_specific=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_prompt_layout_property(tower, n_ctx, position, class_specific, seed):
    """Non-context positions hold the description's token embeddings in order; context slots the ctx."""
    gen = torch.Generator().manual_seed(seed)
    descs = [DESCS[i] for i in torch.randperm(3, generator=gen)[:2].tolist()]
    learner = PromptLearner(tower, descs, n_ctx=n_ctx, position=position, class_specific=class_specific)
    with torch.no_grad():
        learner.ctx.copy_(torch.randn(learner.ctx.shape, generator=gen))
        emb = learner.prompt_embeddings()
    plain = tower.tokenize(descs)
    for k, desc in enumerate(descs):
        slots = learner.ctx_slots[k]
        is_ctx = slots >= 0
        assert int(is_ctx.sum()) == n_ctx
        # the non-context tokens are the plain tokenisation, in order, then padding
        n_tok = int((plain[k] != 0).sum())
        kept = learner.token_ids[k][~is_ctx]
        assert torch.equal(kept[:n_tok], plain[k][:n_tok]), desc
        assert torch.equal(emb[k][~is_ctx], tower.token_embedding(kept))
        ctx_k = learner.ctx[k] if class_specific else learner.ctx
        assert torch.equal(emb[k][is_ctx], ctx_k[slots[is_ctx]])
        positions = torch.nonzero(is_ctx).flatten()
        if n_ctx:
            first_desc = 1 if position in ("front",) else 1 + (n_ctx // 2 if position == "middle" else n_ctx)
            assert learner.token_ids[k, first_desc] == plain[k, 1]
            assert positions.min() >= 1 and positions.max() < n_tok + n_ctx
        eot = tower.pool_index(learner.token_ids)[k]
        assert eot == n_tok - 1 + n_ctx


def test_meta_construction_and_to(clip_model):
    ref_tower = CLIPTextTower.from_open_clip(clip_model)
    ref = PromptLearner(ref_tower, DESCS, n_ctx=2).eval()
    with torch.device("meta"):
        meta_model = open_clip.CLIP(**tiny_clip_kwargs())
    tower = CLIPTextTower.from_open_clip(meta_model)
    learner = PromptLearner(tower, DESCS, n_ctx=2)
    assert all(t.device.type == "meta" for t in [*learner.parameters(), *learner.buffers()])
    tsp = TextPrototypes(tower, facs.DISFA_AUS, facs.EXPRESSIONS_7, n_ctx=2)
    assert all(t.device.type == "meta" for t in [*tsp.parameters(), *tsp.buffers()])
    learner.to_empty(device="cpu")
    tower.load_state_dict(ref_tower.state_dict())
    learner.reset_parameters()
    with torch.no_grad():
        learner.ctx.copy_(ref.ctx)
    assert torch.equal(learner.eval()(), ref())
    # explicit meta device on a real tower: only the context goes to meta
    on_meta = PromptLearner(ref_tower, DESCS, n_ctx=2, device="meta")
    assert on_meta.ctx.device.type == "meta" and on_meta.token_ids.device.type == "meta"
    # .to() moves everything
    moved = copy.deepcopy(ref).to(torch.float64)
    assert moved.ctx.dtype == torch.float64 and moved.tower.positional_embedding.dtype == torch.float64
    assert torch.allclose(moved().float(), ref(), atol=1e-5)


# ----------------------------------------------------------------------------- TSP


def test_text_prototypes(clip_model, tower):
    tsp = TextPrototypes(tower, facs.BP4D_AUS, facs.EXPRESSIONS_7, n_ctx=0).eval()
    assert tsp.expression_prompts.tower is tsp.au_prompts.tower is tower
    assert list(tsp.expression_texts) == facs.expression_descriptions(
        facs.EXPRESSIONS_7, style="compound", restrict_to=facs.BP4D_AUS
    )
    assert list(tsp.au_texts) == facs.au_descriptions(facs.BP4D_AUS)
    t_exp, t_au = tsp()
    assert t_exp.shape == (7, tower.output_dim) and t_au.shape == (12, tower.output_dim)
    assert torch.equal(t_exp, _normalized_encode_text(clip_model, list(tsp.expression_texts)))
    assert torch.equal(t_au, _normalized_encode_text(clip_model, list(tsp.au_texts)))


@pytest.mark.parametrize("style", ["compound", "standalone", "words"])
def test_text_prototypes_styles_and_trainables(tower, style):
    tsp = TextPrototypes(tower, facs.DISFA_AUS, facs.EXPRESSIONS_11, style=style, n_ctx=2).train()
    trainable = sorted(n for n, p in tsp.named_parameters() if p.requires_grad)
    assert trainable == ["au_prompts.ctx", "expression_prompts.ctx"]
    t_exp, t_au = tsp()
    assert t_exp.shape == (11, tower.output_dim) and t_au.shape == (8, tower.output_dim)
    torch.testing.assert_close(t_exp.norm(dim=-1), torch.ones(11))
    if style == "words":
        assert tsp.expression_texts[0] == "happiness"
    with pytest.raises(facs.UnknownLabelError):
        TextPrototypes(tower, (1, 99), facs.EXPRESSIONS_7)
