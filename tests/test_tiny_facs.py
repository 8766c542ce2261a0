"""The shipped tiny CLIP pretrained on synthetic FACS captions (facelayers.assets) and the compact
checkpoint format it uses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from facelayers.assets import (
    TINY_FACS_CLIP,
    CompactCheckpointError,
    base_token_embedding,
    file_sha256,
    load_compact_clip,
    load_tiny_facs_clip,
    read_compact_metadata,
    save_compact_clip,
    tiny_facs_recipe,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "zeroshot.md"


@pytest.fixture(scope="module")
def shipped():
    return load_tiny_facs_clip()


def test_shipped_file_is_compact_and_its_hash_is_documented():
    assert TINY_FACS_CLIP.is_file()
    assert TINY_FACS_CLIP.stat().st_size < 1_000_000
    sha = file_sha256(TINY_FACS_CLIP)
    documented = re.findall(r"sha256 `([0-9a-f]{64})`", DOCS.read_text())
    assert documented, "docs/zeroshot.md must state the shipped file's sha256 as: sha256 `<hex>`"
    assert sha in documented
    assert tiny_facs_recipe()["sha256"] == sha


def test_shipped_model_is_the_default_tiny_clip(shipped):
    import open_clip

    from facelayers.models.ssm import TINY_CLIP

    assert isinstance(shipped, open_clip.CLIP)
    assert read_compact_metadata(TINY_FACS_CLIP)["clip_kwargs"] == TINY_CLIP
    ref = open_clip.CLIP(**TINY_CLIP).state_dict()
    got = shipped.state_dict()
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert not shipped.training


def test_shipped_model_runs_and_reproduces_its_recorded_zero_shot_number(shipped):
    from facelayers.zeroshot import lab_zero_shot_auc

    rec = tiny_facs_recipe()["check"]
    out = lab_zero_shot_auc(shipped, subjects=tuple(rec["subjects"]), seed=rec["seed"],
                            sequence_length=rec["sequence_length"])
    assert out["frames"] == rec["frames"]
    assert out["mean"] == pytest.approx(rec["au_auc_mean"], abs=2e-3)
    assert out["mean"] > 0.75  # far above a random tower's 0.5


@pytest.fixture(scope="module")
def tiny_trained():
    from _testutils import tiny_clip_kwargs

    from facelayers.data.synthetic.pretrain import PretrainRecipe, pretrain_tiny_clip

    recipe = PretrainRecipe(seed=3, steps=2, batch_size=8, warmup=1, num_subjects=1, sequences_per_subject=1,
                            sequence_length=12, clip_kwargs=tiny_clip_kwargs())
    model, info = pretrain_tiny_clip(recipe, progress=False, log=None)
    return recipe, model, info


def test_compact_round_trip_is_exact(tmp_path, tiny_trained):
    recipe, model, info = tiny_trained
    assert info["loss"] and info["frames"] == 12
    base = base_token_embedding(recipe.seed, *model.token_embedding.weight.shape)
    changed = (model.token_embedding.weight != base).any(1)
    # only caption tokens moved (no weight decay on the embedding): a few dozen rows of 49 408
    assert 0 < int(changed.sum()) < 200
    path = tmp_path / "m.safetensors"
    save_compact_clip(model, path, clip_kwargs=recipe.resolved_clip_kwargs(), token_seed=recipe.seed)
    loaded = load_compact_clip(path)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    full = 4 * sum(p.numel() for p in model.parameters())
    assert path.stat().st_size < 0.12 * full  # the embedding (over 88 % of the parameters) is not stored
    again = tmp_path / "again.safetensors"
    save_compact_clip(loaded, again, clip_kwargs=recipe.resolved_clip_kwargs(), token_seed=recipe.seed)
    assert again.read_bytes() == path.read_bytes()  # same weights, same bytes


def test_compact_checkpoint_errors(tmp_path, tiny_trained):
    import copy

    recipe, model, _ = tiny_trained
    model = copy.deepcopy(model)
    path = tmp_path / "m.safetensors"
    # a wrong base seed: the rebuilt embedding differs from the recorded hash
    with torch.no_grad():
        model.token_embedding.weight.copy_(base_token_embedding(99, *model.token_embedding.weight.shape))
    meta = save_compact_clip(model, path, clip_kwargs=recipe.resolved_clip_kwargs(), token_seed=99)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    meta["token_seed"] = 98
    save_file(tensors, str(path), metadata={"facelayers.compact_clip": json.dumps(meta)})
    with pytest.raises(CompactCheckpointError, match="does not match the recorded one"):
        load_compact_clip(path)
    with pytest.raises(CompactCheckpointError, match="not found"):
        load_compact_clip(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CompactCheckpointError, match="not a compact CLIP checkpoint"):
        load_compact_clip(tmp_path / "other.safetensors")


def test_pretrain_cli_writes_a_loadable_compact_file(tmp_path, capsys):
    from facelayers.data.synthetic.__main__ import main

    out = tmp_path / "m.safetensors"
    main(["pretrain-clip", "--out", str(out), "--steps", "1", "--batch", "4", "--subjects", "1", "--no-eval",
          "--no-progress"])
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["sha256"] == file_sha256(out) and rec["recipe"]["steps"] == 1 and rec["frames"] == 128
    model = load_compact_clip(out)
    assert model.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(SystemExit):
        main(["pretrain-clip", "--out", str(out), "--steps", "0"])
    assert "expected a positive integer" in capsys.readouterr().err


def test_named_backbone_tiny_facs_builds_the_reference_model_on_the_shipped_weights():
    from facelayers.models.ssm import BackboneUnavailableError, ModelConfig, build_backbone, build_model

    clip = build_backbone("tiny-facs")
    ref = load_tiny_facs_clip()
    assert clip.training, "a backbone for training comes back in train mode"
    for (name, p), (_, q) in zip(clip.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), name
    model = build_model(ModelConfig(backbone="tiny-facs"))
    assert torch.equal(model.visual.conv1.weight, ref.visual.conv1.weight)
    assert model.cfg.clip_kwargs is not None, "the config records the architecture it was built with"
    with pytest.raises(BackboneUnavailableError, match="expected no --pretrained"):
        build_backbone("tiny-facs", "weights.bin")
    with pytest.raises(BackboneUnavailableError, match="default tiny shape"):
        build_backbone("tiny-facs", clip_kwargs={"embed_dim": 8})
