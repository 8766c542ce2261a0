"""Tests of the text side: CLIPTextTower, PromptLearner (CoOp) and TextPrototypes (TSP)."""

from __future__ import annotations

import copy
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from _testutils import tiny_clip_kwargs
from hypothesis import given, settings
from hypothesis import strategies as st

from facelayers import facs
from facelayers.prompts import CLIPTextTower, PromptLearner, StoredPromptLearner, TextPrototypes

DESCS = [
    "cheek raiser, lip corner puller",
    "brow lowerer",
    "relaxed facial muscles, no significant action units",
]

#: Hypothesis strategies of a prompt layout: context length, context position, per-class context, seed.
PROMPT_LAYOUTS = dict(
    n_ctx=st.integers(0, 4),
    position=st.sampled_from(["end", "middle", "front"]),
    class_specific=st.booleans(),
    seed=st.integers(0, 2**16),
)


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


@given(**PROMPT_LAYOUTS)
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


# ----------------------------------------------------------------------------- empty descriptions


@pytest.mark.parametrize("bad", ["", "   ", "\t\n"], ids=["empty", "spaces", "whitespace"])
def test_empty_description_is_a_clear_error(tower, bad):
    expected = f"expected a non-empty description, got {bad!r}"
    for build in (
        lambda: PromptLearner(tower, ["brow lowerer", bad], n_ctx=2),
        lambda: StoredPromptLearner.from_descriptions(tower, [bad], n_ctx=2),
        lambda: facs.check_descriptions(["brow lowerer", bad]),
    ):
        with pytest.raises(ValueError) as err:
            build()
        assert expected in str(err.value), str(err.value)
    w = tower.width
    with pytest.raises(ValueError, match="expected a non-empty description"):
        PromptLearner.from_embeddings(tower, torch.zeros(1, 1, w), torch.zeros(1, 70, w), torch.zeros(2, w),
                                      torch.tensor([4]), descriptions=[bad])


# ----------------------------------------------------------------------------- stored prompts (release)


def _release_assembly(prefix, ctx, suffix, name_lens, position):
    """The release's prompt assembly (ssm/models/prompting.py), written out per class with cat."""
    n_ctx = ctx.shape[-2]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=1)
    rows = []
    for i, n in enumerate(name_lens):
        p, c, s = prefix[i:i + 1], ctx[i:i + 1], suffix[i:i + 1]
        if position == "front":
            rows.append(torch.cat([p, s[:, :n], c, s[:, n:]], dim=1))
        else:
            h = n_ctx // 2
            rows.append(torch.cat([p, c[:, :h], s[:, :n], c[:, h:], s[:, n:]], dim=1))
    return torch.cat(rows, dim=0)


@settings(max_examples=8, deadline=None)
@given(**PROMPT_LAYOUTS)
def test_stored_learner_equals_token_learner_and_release_layout(tower, n_ctx, position, class_specific, seed):
    """Stored-embedding prompts == token-id prompts (features and ctx gradients), layout == the release's."""
    gen = torch.Generator().manual_seed(seed)
    stored = StoredPromptLearner.from_descriptions(tower, DESCS, n_ctx=n_ctx, position=position,
                                                   class_specific=class_specific).train()
    plain = PromptLearner(tower, DESCS, n_ctx=n_ctx, position=position, class_specific=class_specific).train()
    with torch.no_grad():
        stored.ctx.copy_(torch.randn(stored.ctx.shape, generator=gen))
        plain.ctx.copy_(stored.ctx)
    name_lens = [len(tower.tokenizer.encode(d)) for d in DESCS]
    assert stored.pool_index().tolist() == [1 + n_ctx + n for n in name_lens]
    ref_emb = _release_assembly(stored.token_prefix, stored.ctx, stored.token_suffix, name_lens, position)
    assert torch.equal(stored.prompt_embeddings(), ref_emb)
    assert torch.equal(stored.prompt_embeddings(), plain.prompt_embeddings())
    a, b = stored(), plain()
    assert torch.equal(a, b)
    if n_ctx:
        w = torch.randn(a.shape, generator=gen)
        (ga,) = torch.autograd.grad((a * w).sum(), stored.ctx)
        (gb,) = torch.autograd.grad((b * w).sum(), plain.ctx)
        torch.testing.assert_close(ga, gb, rtol=0, atol=0, msg="dctx")


def test_stored_learner_names_shapes_and_repr(tower):
    learner = StoredPromptLearner.from_descriptions(tower, DESCS, n_ctx=8)
    assert isinstance(learner, PromptLearner) and learner.num_classes == 3
    own = {k for k in learner.state_dict() if not k.startswith("tower.")}
    assert own == {"ctx", "token_prefix", "token_suffix"}, own  # the release's names, eot not saved
    assert learner.token_prefix.shape == (3, 1, 64) and learner.token_suffix.shape == (3, 68, 64)
    assert learner.ctx.shape == (3, 8, 64)
    assert [n for n, p in learner.named_parameters() if p.requires_grad] == ["ctx"]
    assert "length=77" in repr(learner) and "n_ctx=8" in repr(learner)
    # the same tensors through from_embeddings give the same features
    again = PromptLearner.from_embeddings(tower, learner.token_prefix, learner.token_suffix, learner.ctx.detach(),
                                          learner.pool_index())
    assert type(again) is StoredPromptLearner
    assert torch.equal(again.eval()(), learner.eval()())
    # reset re-embeds the texts from the tower and redraws the context
    prefix = learner.token_prefix.clone()
    with torch.no_grad():
        learner.token_prefix.zero_()
    learner.reset_parameters()
    assert torch.equal(learner.token_prefix, prefix)
    # eval cache as for PromptLearner
    learner.eval()
    calls = learner.encode_calls
    learner(), learner()
    assert learner.encode_calls == calls + 1


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(prefix=torch.zeros(2, 2, 64)), r"prefix must be \[K, 1, W=64\].*got \(2, 2, 64\)"),
        (dict(suffix=torch.zeros(3, 68, 64)), r"suffix must be \[K=2, S, W=64\].*got \(3, 68, 64\)"),
        (dict(ctx=torch.zeros(2, 8, 32)), r"ctx must be .*got \(2, 8, 32\)"),
        (dict(suffix=torch.zeros(2, 69, 64)), r"78 positions .* context length is 77"),
        (dict(eot=torch.tensor([8, 12])), r"\[9, 77\).*\(0, 8\)"),
        (dict(eot=torch.tensor([12])), r"shape \[K\]=\[2\]"),
        (dict(eot=torch.tensor([12.0, 13.0])), r"integer tensor"),
        (dict(position="left"), "position"),
    ],
)
def test_stored_learner_bad_shapes(tower, change, match):
    args = dict(prefix=torch.zeros(2, 1, 64), suffix=torch.zeros(2, 68, 64), ctx=torch.zeros(2, 8, 64),
                eot=torch.tensor([12, 13]))
    position = change.pop("position", "end")
    args.update(change)
    with pytest.raises(ValueError, match=match):
        StoredPromptLearner(tower, args["prefix"], args["suffix"], args["ctx"], args["eot"], position=position)


def _release_fixtures() -> list:
    import os
    from pathlib import Path

    folder = Path(os.environ.get("FACELAYERS_RELEASE_FIXTURES", Path(__file__).parent / "data" / "ssm_release"))
    return sorted(p for p in folder.glob("*.json") if p.with_suffix(".pth").is_file()) if folder.is_dir() else []


def _load_release_state(path) -> dict:
    """The fixture checkpoint's state dict through torch's weights-only unpickler (no code runs)."""
    import numpy as np

    class _Recorder:  # stands in for the release's main.RecorderMeter (data only)
        pass

    allowed = [(_Recorder, "main.RecorderMeter"), np.dtype, np.ndarray, np._core.multiarray._reconstruct,
               type(np.dtype(np.float32))]
    with torch.serialization.safe_globals(allowed):
        ck = torch.load(path, weights_only=True, map_location="cpu")
    sd = ck["state_dict"] if isinstance(ck, dict) and "state_dict" in ck else ck
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _release_text_reference(sd, prefix, ctx, suffix, token_ids, heads):
    """The release's TextEncoder on its OpenAI-CLIP text transformer, written out in float64."""
    g = {k: v.double() for k, v in sd.items() if k.startswith("text_encoder.")}
    x = torch.cat([prefix, ctx, suffix], dim=1).double() + g["text_encoder.positional_embedding"]
    n, length, w = x.shape
    mask = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)
    blocks = sorted({int(k.split(".")[3]) for k in g if ".resblocks." in k})
    for b in blocks:
        p = f"text_encoder.transformer.resblocks.{b}."
        h = F.layer_norm(x, (w,), g[p + "ln_1.weight"], g[p + "ln_1.bias"])
        q, k, v = (h @ g[p + "attn.in_proj_weight"].T + g[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        split = lambda t: t.reshape(n, length, heads, w // heads).transpose(1, 2)  # noqa: E731
        att = (split(q) @ split(k).transpose(-1, -2)) / math.sqrt(w // heads) + mask
        o = (att.softmax(-1) @ split(v)).transpose(1, 2).reshape(n, length, w)
        x = x + o @ g[p + "attn.out_proj.weight"].T + g[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, (w,), g[p + "ln_2.weight"], g[p + "ln_2.bias"])
        h = h @ g[p + "mlp.c_fc.weight"].T + g[p + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + h @ g[p + "mlp.c_proj.weight"].T + g[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (w,), g["text_encoder.ln_final.weight"], g["text_encoder.ln_final.bias"])
    x = x[torch.arange(n), token_ids.argmax(dim=-1)] @ g["text_encoder.text_projection"]
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("meta_path", _release_fixtures(), ids=lambda p: p.stem)
def test_stored_learner_reproduces_release_text_features(meta_path):
    """Released checkpoint's prompt buffers + text tower -> the release's text features (both learners)."""
    import json

    meta = json.loads(meta_path.read_text())
    arch = meta["clip_architecture_openai"]
    sd = _load_release_state(meta_path.with_suffix(".pth"))
    exp_texts, au_texts = facs.release_descriptions(meta["au_dataset"], meta["expression_dataset"])
    heads = arch["transformer_heads"]
    model = open_clip.CLIP(
        embed_dim=arch["embed_dim"],
        vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=1, head_width=64),
        text_cfg=dict(context_length=arch["context_length"], vocab_size=arch["vocab_size"],
                      width=arch["transformer_width"], heads=heads, layers=arch["transformer_layers"]),
        quick_gelu=True,
    ).eval()
    text_sd = {k.removeprefix("text_encoder."): v for k, v in sd.items() if k.startswith("text_encoder.")}
    missing, unexpected = model.load_state_dict(text_sd, strict=False)
    assert not unexpected and all(k.startswith(("visual.", "token_embedding", "logit_scale")) for k in missing)
    tower = CLIPTextTower.from_open_clip(model)
    n_ctx = meta["prompt"]["n_ctx"]
    for name, texts in (("prompt_learner1", exp_texts), ("prompt_learner2", au_texts)):
        # the converter's path: build from the texts (EOT positions), then load the stored tensors
        learner = StoredPromptLearner.from_descriptions(tower, texts, n_ctx=n_ctx)
        own = {k: sd[f"{name}.{k}"] for k in ("ctx", "token_prefix", "token_suffix")}
        learner.load_state_dict(own, strict=False)
        ids = open_clip.tokenize([" ".join(["X"] * n_ctx) + " " + t for t in texts])
        # the texts fit the checkpoint: equal token ids <=> equal stored embedding rows
        suffix = own["token_suffix"]
        for k in range(len(texts)):
            same_ids = ids[k, 1 + n_ctx:, None] == ids[k, None, 1 + n_ctx:]
            same_rows = (suffix[k, :, None] == suffix[k, None, :]).all(-1)
            assert torch.equal(same_ids, same_rows), f"{name} text {k} {texts[k]!r} does not match the checkpoint"
        assert torch.equal(learner.pool_index(), ids.argmax(dim=-1))
        assert torch.equal(StoredPromptLearner.release_token_ids(tower, texts, n_ctx), ids)
        ref = _release_text_reference(sd, own["token_prefix"], own["ctx"], own["token_suffix"], ids, heads)
        got = learner.eval()()
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6, msg=f"{name} text features")
        direct = PromptLearner.from_embeddings(tower, own["token_prefix"], own["token_suffix"], own["ctx"],
                                               ids.argmax(dim=-1)).eval()
        assert torch.equal(direct(), got)


def test_text_prototypes_release_source(tower):
    tsp = TextPrototypes(tower, facs.BP4D_AUS, facs.EXPRESSIONS_7, source="ssm_release", n_ctx=2)
    exp, au = facs.release_descriptions("bp4d", "dfew")
    assert list(tsp.expression_texts) == exp and list(tsp.au_texts) == au
    assert "source='ssm_release'" in repr(tsp)
    disfa = TextPrototypes(tower, facs.DISFA_AUS, facs.EXPRESSIONS_7, source="ssm_release", n_ctx=0)
    assert list(disfa.expression_texts) == facs.release_descriptions("disfa", 7)[0]
    with pytest.raises(ValueError, match="source"):
        TextPrototypes(tower, facs.BP4D_AUS, facs.EXPRESSIONS_7, source="paper")


def test_stored_learner_meta_construction(clip_model):
    ref = StoredPromptLearner.from_descriptions(CLIPTextTower.from_open_clip(clip_model), DESCS, n_ctx=2,
                                                position="middle").eval()
    with torch.device("meta"):
        meta_model = open_clip.CLIP(**tiny_clip_kwargs())
        tower = CLIPTextTower.from_open_clip(meta_model)
        learner = StoredPromptLearner(tower, torch.zeros(3, 1, 64), torch.zeros(3, 74, 64), torch.zeros(3, 2, 64),
                                      ref.pool_index().tolist(), position="middle")
    assert all(t.device.type == "meta" for t in [*learner.parameters(), *learner.buffers()])
    learner.to_empty(device="cpu")
    tower.load_state_dict(clip_model.state_dict(), strict=False)
    learner.reset_parameters()  # restores the (non-persistent) eot / layout buffers
    learner.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("tower.")}, strict=False)
    assert torch.equal(learner.pool_index(), ref.pool_index())
    assert torch.equal(learner.eval()(), ref())
    with pytest.raises(ValueError, match="meta tensor"):
        StoredPromptLearner(tower, torch.zeros(1, 1, 64), torch.zeros(1, 74, 64), torch.zeros(2, 64),
                            torch.zeros(1, dtype=torch.long, device="meta"))
