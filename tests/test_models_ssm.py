"""facelayers.models.ssm as a library: the model from injected parts, the builders, parameter
groups, the subject-independent split, window planners, the DPM builder."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from facelayers import facs
from facelayers.models import ssm
from facelayers.models.ssm import data as ssm_data
from facelayers.models.ssm import inference
from facelayers.params import optimizer_param_groups, pretrained_and_new

TINY = ssm.tiny_clip_kwargs(image_size=16, patch_size=8, width=32, layers=1)


def _cfg(**kw) -> ssm.ModelConfig:
    base = dict(mode="ssm", num_frames=3, moe_blocks="all", temporal_heads=2, clip_kwargs=TINY)
    base.update(kw)
    return ssm.ModelConfig(**base)


def test_build_model_equals_parts_assembled_by_hand():
    """build_model is exactly the builders called in order and injected into SSMModel."""
    cfg = _cfg()
    torch.manual_seed(0)
    ref = ssm.build_model(cfg)
    torch.manual_seed(0)
    cfg2 = _cfg()
    clip = ssm.build_backbone("tiny", clip_kwargs=cfg2.clip_kwargs)
    visual = ssm.build_vision_encoder(clip, cfg2)
    text = ssm.build_text_side(clip, cfg2)
    mapping = ssm.build_mapping(cfg2)
    exp_t, au_t = ssm.build_temporal_heads(cfg2, 32)
    exp_h, au_h = ssm.build_heads(cfg2, 32)
    model = ssm.SSMModel(visual, exp_t, au_t, exp_h, au_h, text=text, mapping=mapping, config=cfg2)
    sd_ref, sd = ref.state_dict(), model.state_dict()
    assert list(sd) == list(sd_ref)
    for k in sd:
        torch.testing.assert_close(sd[k], sd_ref[k], rtol=0, atol=0, msg=k)


class MeanPool(nn.Module):
    """A custom temporal head: [B, T, D] -> [B, D]."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f.mean(1)


def test_custom_parts_swap_in():
    cfg = _cfg(mode="baseline")
    clip = ssm.build_backbone("tiny", clip_kwargs=TINY)
    visual = ssm.build_vision_encoder(clip, cfg)
    model = ssm.SSMModel(visual, MeanPool(), MeanPool(), nn.Linear(32, 7), nn.Linear(32, 12))
    assert model.tasks == ("exp", "au") and model.has_moe and model.cfg is None
    out = model(torch.randn(2, 3, 3, 16, 16), torch.randn(1, 5, 3, 16, 16))
    assert out["exp_logits"].shape == (2, 7) and out["au_logits"].shape == (1, 12)
    au_only = ssm.SSMModel(clip.visual, None, MeanPool(), None, nn.Linear(32, 12))
    assert au_only.tasks == ("au",)
    with pytest.raises(ValueError, match="tasks"):
        au_only(torch.randn(1, 2, 3, 16, 16), None)


def test_model_constructor_checks():
    lin = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="at least one task"):
        ssm.SSMModel(lin, None, None, None, None)
    with pytest.raises(ValueError, match="exp_temporal and exp_head go together"):
        ssm.SSMModel(lin, MeanPool(), None, None, None)
    with pytest.raises(ValueError, match="mapping needs text"):
        ssm.SSMModel(lin, MeanPool(), None, lin, None, mapping=lin)
    with pytest.raises(ValueError, match="vision_passes"):
        ssm.SSMModel(lin, MeanPool(), None, lin, None, vision_passes=3)


def test_pretrained_and_new_groups():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    model[2].weight.requires_grad_(False)
    model[1].bias = model[0].bias  # shared: counted once
    g = pretrained_and_new(model, pretrained_prefixes=("0.", "1."), new_params=[model[1].weight])
    assert [id(p) for p in g["pretrained"]] == [id(model[0].weight), id(model[0].bias)]
    assert [id(p) for p in g["new"]] == [id(model[1].weight), id(model[2].bias)]
    groups = optimizer_param_groups({"pretrained": g["pretrained"], "new": g["new"], "empty": []},
                                    {"pretrained": 1e-6, "new": 1e-4})
    assert [(x["name"], x["lr"]) for x in groups] == [("pretrained", 1e-6), ("new", 1e-4)]
    with pytest.raises(TypeError, match="sequence of strings"):
        pretrained_and_new(model, pretrained_prefixes="0.")
    with pytest.raises(KeyError, match="no learning rate"):
        optimizer_param_groups({"x": [model[0].weight]}, {})


def test_release_dpm_keeps_the_neutral_row_fixed():
    """--dpm-variant ssm_release: the builder goes through from_facs, so the neutral row stays at the
    prior while the other rows learn (issue 14: the old builder forgot fixed_rows)."""
    cfg = _cfg(dpm_variant="ssm_release")
    mapping = ssm.build_mapping(cfg)
    neutral = list(cfg.expressions).index("neutral")
    a0 = mapping.maps()[0].detach().clone()
    opt = torch.optim.SGD(mapping.parameters(), lr=10.0)
    g = torch.Generator().manual_seed(0)
    t_exp, t_au = torch.randn(7, 16, generator=g), torch.randn(12, 16, generator=g)
    for _ in range(3):
        e, a = mapping(t_exp, t_au)
        (e.pow(3).sum() + a.pow(3).sum()).backward()
        opt.step()
        opt.zero_grad()
    a1 = mapping.maps()[0].detach()
    torch.testing.assert_close(a1[neutral], a0[neutral], rtol=0, atol=0, msg="neutral row moved")
    assert (a1 - a0).abs().sum() > 0, "no other row learned"


def test_moe_block_indices():
    assert ssm.moe_block_indices("none", 4) == []
    assert ssm.moe_block_indices("all", 3) == [0, 1, 2]
    assert ssm.moe_block_indices("last:2", 4) == [2, 3]
    assert ssm.moe_block_indices("0,-1", 4) == [0, 3]
    for bad in ("last:9", "0,7", "first:2", "a,b", "1,1"):
        with pytest.raises(ValueError):
            ssm.moe_block_indices(bad, 4)


def _bp4d_records(tmp_path):
    from facelayers.data import read_manifest

    lines = []
    for seq in ("2F07_07", "2F07_08", "1M03_01", "1M03_02", "3F11_05", "2M08_01", "2M08_04", "1F02_03"):
        for fr in range(2):
            lines.append(f"{seq}/{fr + 10}.jpg " + " ".join(["0"] * 12))
    path = tmp_path / "train.list"
    path.write_text("\n".join(lines) + "\n")
    return read_manifest(path, "bp4d")


def test_validation_split_groups_bp4d_subjects(tmp_path):
    """2F07_07 and 2F07_08 are the same subject F07: never one in train and one in validation
    (the old split grouped by the whole folder name and leaked subjects)."""
    recs = _bp4d_records(tmp_path)
    assert {r.subject for r in recs} == {"F07", "M03", "F11", "M08", "F02"}
    for seed in range(12):
        tr, va = ssm_data.split_by_subject(recs, 0.4, seed)
        assert tr and va and len(tr) + len(va) == len(recs)
        assert not {r.subject for r in tr} & {r.subject for r in va}, f"seed {seed}: a subject on both sides"
        assert not {r.sequence for r in tr} & {r.sequence for r in va}
    with pytest.raises(ValueError, match="at least 2 subjects"):
        ssm_data.split_by_subject([r for r in recs if r.subject == "F07"], 0.5, 0)


def test_dfew_manifest_given_as_mafw_is_refused(tmp_path):
    from facelayers.data import read_manifest

    path = tmp_path / "dfew_as_mafw.txt"
    path.write_text("".join(f"{i:05d} 16 {i % 7}\n" for i in range(60)))
    recs = read_manifest(path, "mafw")
    with pytest.raises(ssm_data.DataUnavailableError, match=r"expected a MAFW manifest.*got what looks like"):
        ssm_data.check_expression_vocabulary(recs, "mafw", path)
    ssm_data.check_expression_vocabulary(recs, "dfew", path)  # the right name: fine
    ssm_data.check_expression_vocabulary(recs[:10], "mafw", path)  # too few clips to tell: accepted


@given(n=st.integers(1, 30), t=st.integers(1, 9))
def test_au_window_indices_centre_each_frame(n, t):
    idx = inference.au_window_indices(n, t)
    c = t // 2
    ref = (torch.arange(n).unsqueeze(1) + torch.arange(t).unsqueeze(0) - c).clamp(0, n - 1)
    assert torch.equal(idx, ref)


@given(n=st.integers(1, 40), t=st.integers(1, 8), window=st.integers(1, 50), stride=st.integers(1, 20))
def test_expression_windows_cover_the_video(n, t, window, stride):
    wins = inference.expression_windows(n, t, window, stride)
    assert wins[0][0] == 0 and wins[-1][1] == n
    for s, e, idx in wins:
        assert e - s == min(window, n) and len(idx) == t and all(s <= i < e for i in idx)


def test_window_planners_refuse_nonsense():
    with pytest.raises(ValueError, match="stride"):
        inference.expression_windows(10, 4, 8, 0)
    with pytest.raises(ValueError, match="window"):
        inference.expression_windows(10, 4, -1, 2)
    model = ssm.build_model(_cfg(mode="baseline", num_frames=2))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        inference.predict_video(model, torch.zeros(0, 3, 16, 16))
    with pytest.raises(ValueError, match="batch"):
        inference.predict_video(model, torch.zeros(2, 3, 16, 16), batch=0)


def test_config_validation_names_the_field():
    for bad, field in ((dict(num_frames=0), "num_frames"), (dict(top_k=5), "top_k"), (dict(tau=-1.0), "tau"),
                       (dict(au_select="middle"), "au_select"), (dict(dpm_variant="x"), "dpm_variant")):
        with pytest.raises(ValueError, match=field):
            _cfg(**bad).validate()
    with pytest.raises(ValueError, match="unknown model config keys"):
        ssm.ModelConfig.from_json({"frames": 4})
    with pytest.raises(ValueError, match="patch_size must divide"):
        ssm.tiny_clip_kwargs(32, 5, 64, 2)
    assert ssm.ModelConfig.from_json(_cfg().to_json()) == _cfg()
    assert facs.EXPRESSIONS_7 == _cfg().expressions


def test_missing_media_named_before_training(tmp_path):
    from facelayers.data import read_manifest

    (tmp_path / "root" / "00001").mkdir(parents=True)
    path = tmp_path / "m.txt"
    path.write_text("00001 16 0\n00002 16 1\n")
    recs = read_manifest(path, "dfew")
    with pytest.raises(ssm_data.DataUnavailableError, match=r"1 of 2 folders missing .*got none for \['00002'\]"):
        ssm_data.check_media_present(recs, tmp_path / "root", path)
    (tmp_path / "root" / "00002").mkdir()
    ssm_data.check_media_present(recs, tmp_path / "root", path)
