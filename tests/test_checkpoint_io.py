"""Self-checking checkpoints (issue 15): a saved model refuses an edited config, relabelled
vocabularies, another frame count, non-finite weights and broken files, naming file and field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _testutils import break_weights_file

from facelayers import facs
from facelayers.io import CheckpointError, inspect_safetensors, load_module, read_json, save_module
from facelayers.models import ssm

TINY = ssm.tiny_clip_kwargs(image_size=16, patch_size=8, width=32, layers=1)


def _cfg(**kw) -> ssm.ModelConfig:
    base = dict(mode="baseline", num_frames=4, moe_blocks="all", temporal_heads=2, clip_kwargs=TINY)
    base.update(kw)
    return ssm.ModelConfig(**base)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt")
    ssm.save_model(ssm.build_model(_cfg()), str(folder), {"epoch": 3}, name="model")
    return folder


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    """A fresh copy of the saved checkpoint to tamper with."""
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def _edit_json(folder: Path, **changes) -> None:
    path = folder / "model.json"
    meta = json.loads(path.read_text())
    meta["config"].update(changes)
    path.write_text(json.dumps(meta))


def _rewrite_weights(folder: Path, edit) -> None:
    """Rewrite model.safetensors with ``edit(tensors)`` applied, keeping its metadata."""
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def test_roundtrip_and_metadata(saved):
    model = ssm.load_model(str(saved))
    header = inspect_safetensors(saved / "model.safetensors")
    assert json.loads(header.metadata["facelayers.aus"]) == list(facs.BP4D_AUS)
    assert json.loads(header.metadata["facelayers.expressions"]) == list(facs.EXPRESSIONS_7)
    assert json.loads(header.metadata["facelayers.config"])["num_frames"] == 4
    assert model.cfg.num_frames == 4 and not model.training


def test_swapped_aus_in_json_is_refused(ckpt):
    aus = list(facs.BP4D_AUS)
    aus[0], aus[1] = aus[1], aus[0]
    _edit_json(ckpt, aus=aus)
    with pytest.raises(CheckpointError) as err:
        ssm.load_model(str(ckpt))
    msg = str(err.value)
    assert err.value.field == "aus" and "model.json" in msg
    assert str(list(facs.BP4D_AUS)) in msg and str(aus) in msg  # expected and got


def test_swapped_expressions_in_json_is_refused(ckpt):
    exp = list(facs.EXPRESSIONS_7)
    exp[0], exp[3] = exp[3], exp[0]
    _edit_json(ckpt, expressions=exp)
    with pytest.raises(CheckpointError, match="expressions") as err:
        ssm.load_model(str(ckpt))
    assert err.value.field == "expressions"


def test_other_frame_count_in_json_is_refused(ckpt):
    _edit_json(ckpt, num_frames=16)
    with pytest.raises(CheckpointError) as err:
        ssm.load_model(str(ckpt))
    assert err.value.field == "num_frames"
    assert "expected 4, got 16" in str(err.value) and "model.json" in str(err.value)


def test_execution_option_may_change(ckpt):
    _edit_json(ckpt, moe_backend="reference", vision_passes=2)
    model = ssm.load_model(str(ckpt))
    assert model.cfg.moe_backend == "reference" and model.vision_passes == 2


def test_non_finite_weights_are_refused(ckpt):
    def poison(t):
        key = next(k for k in sorted(t) if k.endswith("exp_head.weight"))
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")

    _rewrite_weights(ckpt, poison)
    with pytest.raises(CheckpointError, match="non-finite") as err:
        ssm.load_model(str(ckpt))
    assert err.value.field == "exp_head.weight" and "model.safetensors" in str(err.value)


def test_weights_of_another_architecture_are_refused(ckpt, tmp_path):
    """Consistent JSON + metadata for 2 experts, tensors of 4: the tensor and the field are named."""
    other = tmp_path / "other"
    ssm.save_model(ssm.build_model(_cfg(num_experts=2, top_k=1)), str(other), name="model")
    with safe_open(str(other / "model.safetensors"), framework="pt") as f:
        meta2 = f.metadata()
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(other / "model.safetensors"), metadata=meta2)
    with pytest.raises(CheckpointError, match="num_experts") as err:
        ssm.load_model(str(other))
    assert ".mlp." in err.value.field  # an expert-bank / router tensor of an MoE layer
    assert "expected [" in str(err.value) and "got [" in str(err.value)


@pytest.mark.parametrize("kind", ["zero_bytes", "truncated", "pickle", "zip", "garbage"])
def test_broken_weights_files_are_refused(ckpt, kind):
    path = ckpt / "model.safetensors"
    break_weights_file(path, kind, keep_fraction=3)
    with pytest.raises(CheckpointError) as err:
        ssm.load_model(str(ckpt))
    assert str(path) in str(err.value) and "expected" in str(err.value)


def test_broken_json_is_refused(ckpt):
    (ckpt / "model.json").write_text('{"config": {"mode": "baseline",')
    with pytest.raises(CheckpointError, match=r"not valid JSON .*line 1") as err:
        ssm.load_model(str(ckpt))
    assert "model.json" in str(err.value)


def test_foreign_safetensors_without_metadata_is_refused(ckpt):
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(ckpt / "model.safetensors"))  # no metadata
    with pytest.raises(CheckpointError, match="facelayers.kind"):
        ssm.load_model(str(ckpt))


def test_load_module_leaves_module_untouched_on_failure(tmp_path):
    src, dst = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        src.weight[0, 0] = float("inf")
    save_module(src, tmp_path / "m.safetensors", metadata={"k": "v"})
    before = dst.weight.detach().clone()
    with pytest.raises(CheckpointError, match="non-finite"):
        load_module(dst, tmp_path / "m.safetensors")
    assert torch.equal(dst.weight, before)
    wrong = torch.nn.Linear(4, 2)
    with pytest.raises(CheckpointError, match=r"expected \[2, 4\], got \[2, 3\]"):
        load_module(wrong, tmp_path / "m.safetensors", check_finite=False)


def test_shared_tensors_stored_once_and_restored(tmp_path):
    """The frozen text tower shared by both prompt learners is stored once (safetensors.save_model)."""
    torch.manual_seed(1)
    model = ssm.build_model(_cfg(mode="ssm", num_frames=2))
    ssm.save_model(model, str(tmp_path), name="m")
    header = inspect_safetensors(tmp_path / "m.safetensors")
    n_state = len(model.state_dict())
    assert len(header.shapes) < n_state
    loaded = ssm.load_model(str(tmp_path), "m")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_read_json_errors_name_the_file(tmp_path):
    p = tmp_path / "x.json"
    with pytest.raises(CheckpointError, match="not found"):
        read_json(p)
    p.write_text("")
    with pytest.raises(CheckpointError, match="empty"):
        read_json(p)
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CheckpointError, match="UTF-8"):
        read_json(p)


def test_legacy_checkpoint_is_refused_then_upgraded(tmp_path):
    """A checkpoint of the earlier format (no config copy in the metadata, an alias table in the
    JSON) is refused with a pointer to upgrade_checkpoint, which converts it explicitly."""
    torch.manual_seed(2)
    model = ssm.build_model(_cfg(mode="ssm", num_frames=2)).eval()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    aliases = {k: k.replace("text.expression_prompts.tower", "text.au_prompts.tower")
               for k in sd if k.startswith("text.expression_prompts.tower")}
    for k in aliases:
        del sd[k]
    save_file(sd, str(tmp_path / "best.safetensors"), metadata={"format": "pt", "facelayers": "ssm_reference"})
    (tmp_path / "best.json").write_text(json.dumps({"config": model.cfg.to_json(), "aliases": aliases, "epoch": 2}))
    with pytest.raises(CheckpointError, match="upgrade_checkpoint"):
        ssm.load_model(str(tmp_path), "best")
    out = ssm.upgrade_checkpoint(str(tmp_path), "best", out=str(tmp_path / "new"))
    loaded = ssm.load_model(out, "best")
    assert json.loads((tmp_path / "new" / "best.json").read_text())["epoch"] == 2
    x = torch.randn(1, 2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, x)["au_logits"], model(x, x)["au_logits"], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="not a legacy"):
        ssm.upgrade_checkpoint(out, "best")
