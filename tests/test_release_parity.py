"""Converted released checkpoints reproduce the released code's outputs (golden fixtures).

Every fixture in the fixture folder is checked: ``NAME.pth`` (a checkpoint in the release runner's
format) + ``NAME_io.safetensors`` (inputs and the release's outputs, produced by running the released
code: ``/work/shared/tools/make_release_fixtures.py``) + ``NAME.json`` (names the dataset pair). The
folder is ``tests/data/ssm_release/`` unless ``FACELAYERS_RELEASE_FIXTURES`` names another one, so
fixtures of other dataset pairs can be dropped in without code changes.

Each fixture is converted with ``examples/convert_ssm_release.py`` (both ``--dispatch release`` and
``--dispatch fixed``), loaded with ``facelayers.models.ssm.load_model`` and run in eval mode, fp32,
on the CPU: outputs must equal the release's within 1e-5.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _testutils import load_example
from safetensors.torch import load_file

from facelayers.models import ssm
from facelayers.models.ssm import release as R
from facelayers.models.ssm.release_checkpoint import load_release_checkpoint, release_state_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DIR = Path(os.environ.get("FACELAYERS_RELEASE_FIXTURES") or ROOT / "tests" / "data" / "ssm_release")
ATOL = 1e-5
OUTPUTS = ("exp_logits", "exp_text_logits", "au_logits", "au_text_logits", "map_au2exp", "map_exp2au")
DISPATCH_SUFFIX = {"release": "", "fixed": "_fixed_dispatch"}


def _fixture_names() -> list[str]:
    if not FIXTURE_DIR.is_dir():
        return []
    return sorted(p.stem for p in FIXTURE_DIR.glob("*.pth")
                  if (FIXTURE_DIR / f"{p.stem}_io.safetensors").is_file() and (FIXTURE_DIR / f"{p.stem}.json").is_file())


NAMES = _fixture_names()


def test_fixture_folder_has_fixtures():
    """An empty or wrong fixture folder fails here instead of silently running no parity case."""
    assert NAMES, (f"no release fixtures in {FIXTURE_DIR} (expected NAME.pth + NAME_io.safetensors + NAME.json; "
                   "set FACELAYERS_RELEASE_FIXTURES to a folder that has them)")


def _meta(name: str) -> dict:
    return json.loads((FIXTURE_DIR / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``(name, dispatch) -> run folder`` written by the converter CLI (converted once per module)."""
    cache: dict[tuple[str, str], Path] = {}
    convert = load_example("convert_ssm_release")

    def get(name: str, dispatch: str) -> Path:
        if (name, dispatch) not in cache:
            meta = _meta(name)
            out = tmp_path_factory.mktemp(f"{name}-{dispatch}")
            rc = convert.main([str(FIXTURE_DIR / f"{name}.pth"), "--au-dataset", meta["au_dataset"],
                               "--exp-dataset", meta["expression_dataset"], "--out", str(out), "--dispatch", dispatch,
                               "--force"])
            assert rc == 0, f"converter failed on {name} ({dispatch})"
            cache[(name, dispatch)] = out
        return cache[(name, dispatch)]

    return get


@pytest.mark.parametrize("dispatch", ["release", "fixed"])
@pytest.mark.parametrize("name", NAMES)
def test_converted_model_reproduces_release_outputs(converted, name, dispatch):
    folder = converted(name, dispatch)
    io = load_file(str(FIXTURE_DIR / f"{name}_io.safetensors"))
    meta = _meta(name)
    x_exp, x_au = io["x_exp"], io["x_au"]
    b1, b2, t = x_exp.shape[0], x_au.shape[0], x_au.shape[1]
    model = ssm.load_model(folder)
    assert isinstance(model, R.ReleaseSSMModel) and not model.training
    assert model.release.dispatch == dispatch
    assert model.release.au_dataset == meta["au_dataset"].lower()
    suffix = DISPATCH_SUFFIX[dispatch]
    with torch.no_grad():
        out = model(x_exp, x_au)
        full = R.release_outputs(model, x_exp, x_au)
    k, m = io["exp_logits"].shape[1], io["au_logits"].shape[1]
    assert out["exp_logits"].shape == (b1, k) and out["au_logits"].shape == (b2, t, m)
    torch.testing.assert_close(out["exp_logits"], io["exp_logits" + suffix], rtol=0, atol=ATOL)
    torch.testing.assert_close(out["au_logits"], io["au_logits" + suffix].reshape(b2, t, m), rtol=0, atol=ATOL)
    for key in OUTPUTS:
        ref = io[key + suffix]
        got = full[key]
        assert got.numel() == ref.numel(), key
        torch.testing.assert_close(got.reshape(ref.shape), ref, rtol=0, atol=ATOL, msg=lambda s, key=key: f"{key}: {s}")


@pytest.mark.parametrize("name", NAMES)
def test_dispatch_choice_matters(converted, name):
    """The bug changes outputs here (so the parity above can tell the two routers apart), and only
    the released dispatch makes an image's output depend on the other images of its batch."""
    io = load_file(str(FIXTURE_DIR / f"{name}_io.safetensors"))
    x_au = io["x_au"]
    assert (io["au_logits"] - io["au_logits_fixed_dispatch"]).abs().max() > 1e-3
    for dispatch in ("release", "fixed"):
        model = ssm.load_model(converted(name, dispatch))
        with torch.no_grad():
            together = model(au_clips=x_au)["au_logits"][:1]
            alone = model(au_clips=x_au[:1])["au_logits"]
        diff = (together - alone).abs().max().item()
        if dispatch == "fixed":
            assert diff < ATOL, f"fixed dispatch: batch-independent outputs expected, got {diff}"
        else:
            assert diff > 1e-4, f"release dispatch: the batch should leak into an image's output, got {diff}"


@pytest.mark.parametrize("name", NAMES[:1])
def test_converted_folder_holds_the_checkpoint_weights(converted, name):
    """Weights in the run folder are the release's, renamed (spot checks of every part) + JSON."""
    folder = converted(name, "release")
    sd = release_state_dict(load_release_checkpoint(FIXTURE_DIR / f"{name}.pth"))
    ours = load_file(str(folder / "model.safetensors"))
    meta = json.loads((folder / "model.json").read_text())
    arch = R.ReleaseArchitecture.from_json(meta["release"])
    exp_name, au_name = ("dfer_temporal_net", "au_temporal_net") if arch.au_dataset == "bp4d" else (
        "temporal_net", "temporal_net_au")
    pairs = {
        "visual.conv1.weight": sd["encoder.conv1.weight"],
        "exp_head.linear.weight": sd["dfer_head.weight"],
        "au_head.smoothing.weight": sd["au_smooth.weight"],
        "mapping.delta_au2exp": sd["delta_map1"],
        "mapping.alpha_param": sd["alpha"],
        "exp_temporal.gate": sd[f"{exp_name}.gate"],
        "au_temporal.layers.0.channel_gate": sd[f"{au_name}.layers.0.channel_gate"],
        "text.expression_prompts.ctx": sd["prompt_learner1.ctx"],
        "text.au_prompts.token_suffix": sd["prompt_learner2.token_suffix"],
    }
    for key, want in pairs.items():
        assert torch.equal(ours[key], want), key
    blk = arch.moe_blocks[0]
    w1 = ours[f"visual.transformer.resblocks.{blk}.mlp.experts.w1"]
    assert torch.equal(w1[0, 1], sd[f"encoder.transformer.resblocks.{blk}.mlp.private_experts.1.fc1.weight"].t())
    assert meta["config"]["expressions"] == list(arch.expressions) and meta["config"]["aus"] == list(arch.aus)
    assert meta["converted_from"]["file"] == f"{name}.pth" and len(meta["converted_from"]["sha256"]) == 64
    assert R.ReleaseArchitecture.from_json(arch.to_json()) == arch


# ------------------------------------------------------------------------------------------------
# conversion errors name every key at fault
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def release_sd():
    name = NAMES[0] if NAMES else pytest.skip("no fixture")
    meta = _meta(name)
    sd = release_state_dict(load_release_checkpoint(FIXTURE_DIR / f"{name}.pth"))
    arch = R.infer_release_architecture(sd, meta["au_dataset"], meta["expression_dataset"])
    return sd, arch, R.build_release_model(arch)


def test_missing_unexpected_and_mismatched_keys_are_named(release_sd):
    sd, arch, model = release_sd
    exp_name, au_name = ("dfer_temporal_net", "au_temporal_net") if arch.au_dataset == "bp4d" else (
        "temporal_net", "temporal_net_au")
    bad = dict(sd)
    del bad[f"{au_name}.layers.0.channel_gate"]
    del bad["prompt_learner2.ctx"]
    bad["extra.weight"] = torch.zeros(3)
    bad[f"{exp_name}.gate"] = torch.ones(2)
    with pytest.raises(R.ReleaseConversionError) as err:
        R.convert_release_state_dict(bad, model, source="bad.pth")
    msg = str(err.value)
    assert "au_temporal.layers.0.channel_gate" in msg and f"{au_name}.*" in msg
    assert "text.au_prompts.ctx (release prompt_learner2.ctx)" in msg
    assert "unexpected ['extra.weight']" in msg
    assert f"{exp_name}.gate -> exp_temporal.gate: expected [1], got [2]" in msg
    assert msg.startswith("bad.pth does not fit the released")


def test_prior_table_of_another_pair_is_refused(release_sd):
    sd, arch, model = release_sd
    bad = dict(sd)
    bad["init_map"] = sd["init_map"].flip(0)
    with pytest.raises(R.ReleaseConversionError, match="init_map differs from the release prior table"):
        R.convert_release_state_dict(bad, model)
    bad = dict(sd)
    bad["row_targets_au2emo"] = sd["row_targets_au2emo"] + 1
    with pytest.raises(R.ReleaseConversionError, match="row_targets_au2emo is not the row mass"):
        R.convert_release_state_dict(bad, model)


def test_shared_expert_aliases_must_agree(release_sd):
    sd, arch, model = release_sd
    blk = arch.moe_blocks[-1]
    bad = dict(sd)
    key = f"encoder.transformer.resblocks.{blk}.mlp.shared_expert.2.bias"
    bad[key] = sd[key] + 1
    with pytest.raises(R.ReleaseConversionError, match=rf"{key} differs from .*shared_fc2\.bias"):
        R.convert_release_state_dict(bad, model)


def test_architecture_inference_errors(release_sd):
    sd, arch, _ = release_sd
    other = "disfa" if arch.au_dataset == "bp4d" else "bp4d"
    with pytest.raises(R.ReleaseConversionError, match=rf"expected --au-dataset {arch.au_dataset}, got {other}"):
        R.infer_release_architecture(sd, other, arch.expression_dataset)
    with pytest.raises(ValueError, match="expected one of"):
        R.infer_release_architecture(sd, "ck+", arch.expression_dataset)
    with pytest.raises(ValueError, match="dispatch must be one of"):
        R.infer_release_architecture(sd, arch.au_dataset, arch.expression_dataset, dispatch="smart")
    cut = {k: v for k, v in sd.items() if not k.endswith(".mlp.gate.weight")}
    with pytest.raises(R.ReleaseConversionError, match="no MoE block"):
        R.infer_release_architecture(cut, arch.au_dataset, arch.expression_dataset)


def test_architecture_is_read_from_shapes(release_sd):
    """Width, depth, patch, image size, experts, prompts and temporal sizes come from the shapes."""
    sd, arch, _ = release_sd
    meta = _meta(NAMES[0])["clip_architecture_openai"]
    assert (arch.vision_width, arch.vision_layers, arch.patch_size, arch.image_size) == (
        meta["vision_width"], meta["vision_layers"], meta["vision_patch_size"], meta["image_resolution"])
    assert (arch.text_width, arch.text_layers, arch.context_length, arch.embed_dim) == (
        meta["transformer_width"], meta["transformer_layers"], meta["context_length"], meta["embed_dim"])
    assert arch.moe_blocks == tuple(range(max(0, arch.vision_layers - 6), arch.vision_layers))
    assert (arch.num_experts, arch.expert_hidden, arch.n_ctx, arch.num_frames) == (4, 512, 8, 16)
    assert (arch.exp_heads, arch.exp_head_dim, arch.exp_mlp_dim, arch.au_heads, arch.au_radius, arch.smooth_kernel) == (
        8, 64, 1024, 8, 1, 5)


# ------------------------------------------------------------------------------------------------
# the converted model runs in the video script
# ------------------------------------------------------------------------------------------------
def _write_mp4(path: Path, n: int, size: int) -> None:
    import av
    import numpy as np

    g = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for _ in range(n):
            img = g.integers(0, 256, (size, size, 3), dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


@pytest.mark.parametrize("name", NAMES[:1])
def test_predict_video_runs_on_converted_release_model(converted, capsys, tmp_path, name):
    pytest.importorskip("av")
    folder = converted(name, "release")
    model = ssm.load_model(folder)
    video = tmp_path / "clip.mp4"
    _write_mp4(video, 20, model.release.image_size)
    predict = load_example("predict_video")
    out = tmp_path / "pred"
    assert predict.main([str(folder), str(video), "--out", str(out), "--no-plot", "--batch", "16"]) == 0, capsys.readouterr().err
    au = (out / "au_probs.csv").read_text().splitlines()
    exp = (out / "expression_probs.csv").read_text().splitlines()
    assert au[0].split(",")[2:] == [f"AU{a:02d}" for a in model.release.aus]
    assert len(au) == 1 + 20
    assert exp[0].split(",")[4:-1] == list(model.release.expressions) and len(exp) >= 2
    probs = [float(v) for v in au[1].split(",")[2:]]
    assert all(0.0 <= p <= 1.0 for p in probs)


# ------------------------------------------------------------------------------------------------
# the preset and the run folder
# ------------------------------------------------------------------------------------------------
def test_preset_has_the_release_initialisation(release_sd):
    """A freshly built preset starts where the release starts (before any weights are loaded)."""
    from facelayers.moe import ReleaseMisroutedTopKRouter, TaskTopKRouter

    _, arch, _ = release_sd
    torch.manual_seed(0)
    model = R.build_release_model(arch)
    a, b = model.mapping.maps()
    prior = model.mapping.prior
    torch.testing.assert_close(a, prior, rtol=0, atol=1e-7)
    torch.testing.assert_close(b, prior.t(), rtol=0, atol=1e-7)
    assert torch.all(model.au_head.smoothing.weight == 0.2)
    assert torch.all(model.exp_temporal.gate == 1.0)
    x = torch.randn(2, arch.num_frames, arch.embed_dim)
    assert torch.equal(model.au_temporal(x), x)  # identity at init
    moe = [m for m in model.visual.modules() if hasattr(m, "router")]
    assert len(moe) == len(arch.moe_blocks)
    assert all(isinstance(m.router, ReleaseMisroutedTopKRouter) for m in moe)
    assert all(m.gamma.item() == pytest.approx(0.1) for m in moe)
    sd = release_sd[0]
    model.load_release_state_dict({"module." + k: v for k, v in sd.items()})  # DataParallel names load too
    assert torch.equal(model.au_head.smoothing.weight, sd["au_smooth.weight"])
    fixed = R.build_release_model(R.ReleaseArchitecture.from_json({**arch.to_json(), "dispatch": "fixed"}))
    routers = [m.router for m in fixed.visual.modules() if hasattr(m, "router")]
    assert routers and all(type(r) is TaskTopKRouter for r in routers)
    assert model.cfg.num_frames == arch.num_frames and model.cfg.aus == arch.aus and model.cfg.vision_passes == 2


def test_release_model_refuses_bad_calls(release_sd):
    _, arch, model = release_sd
    x = torch.zeros(1, arch.num_frames, 3, arch.image_size, arch.image_size)
    with pytest.raises(ValueError, match="expected vision_passes=2 or None, got 1"):
        model(x, x, vision_passes=1)
    with pytest.raises(ValueError, match=r"au_clips: expected \[B, T, 3, H, W\]"):
        R.release_outputs(model, x, x[0])
    with pytest.raises(ValueError, match=r"expected \[B, T, D\]"):
        model.au_head(torch.zeros(2, arch.embed_dim), torch.zeros(len(arch.aus), arch.embed_dim))
    with pytest.raises(ValueError, match="unknown release architecture keys"):
        R.ReleaseArchitecture.from_json({**arch.to_json(), "heads": 3})
    with pytest.raises(ValueError, match="dispatch must be one of"):
        R.ReleaseArchitecture.from_json({**arch.to_json(), "dispatch": "smart"})


@pytest.mark.parametrize("name", NAMES[:1])
def test_run_folder_json_must_agree_with_the_weights(converted, tmp_path, name):
    import shutil

    from facelayers.io import CheckpointError

    src = converted(name, "release")
    folder = tmp_path / "edited"
    shutil.copytree(src, folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["release"]["dispatch"] = "fixed"
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"release\.dispatch.*expected 'release', got 'fixed'"):
        ssm.load_model(folder)
    from facelayers.io import save_module

    save_module(torch.nn.Linear(2, 2), tmp_path / "other" / "model.safetensors", metadata={"facelayers.kind": "ssm_reference"})
    with pytest.raises(CheckpointError, match="not a converted release model .*got 'ssm_reference'"):
        R.load_release_model(tmp_path / "other")
    assert R.is_release_checkpoint(src) and not R.is_release_checkpoint(tmp_path)


@pytest.mark.parametrize("name", NAMES[:1])
def test_cli_name_and_force_options(capsys, tmp_path, name):
    meta = _meta(name)
    convert = load_example("convert_ssm_release")
    args = [str(FIXTURE_DIR / f"{name}.pth"), "--au-dataset", meta["au_dataset"], "--exp-dataset",
            meta["expression_dataset"], "--out", str(tmp_path), "--name", "released"]
    assert convert.main(args) == 0
    assert (tmp_path / "released.safetensors").is_file() and (tmp_path / "released.json").is_file()
    capsys.readouterr()
    assert convert.main(args) == 2  # an existing model is not overwritten ...
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "released.safetensors exists" in err and "\n" not in err
    assert convert.main([*args, "--force"]) == 0  # ... unless asked to
    model = ssm.load_model(tmp_path, "released")
    assert isinstance(model, R.ReleaseSSMModel)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES[:1])
def test_predict_video_command_line(converted, tmp_path, name):
    """``python examples/predict_video.py DIR clip.mp4`` as a real process on a converted fixture."""
    import subprocess
    import sys

    pytest.importorskip("av")
    folder = converted(name, "release")
    video = tmp_path / "clip.mp4"
    _write_mp4(video, 18, R.ReleaseArchitecture.from_json(json.loads((folder / "model.json").read_text())["release"]).image_size)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "predict_video.py"), str(folder), str(video),
                          "--out", str(tmp_path / "pred"), "--no-plot"], capture_output=True, text=True, env=env,
                         cwd=str(ROOT), timeout=300)
    assert res.returncode == 0, res.stderr
    assert len((tmp_path / "pred" / "au_probs.csv").read_text().splitlines()) == 1 + 18
