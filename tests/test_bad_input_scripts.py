"""The example scripts refuse bad arguments and bad files with ONE line ``error: ... (expected ...,
got ...)`` on stderr and exit code 2, before building data or models; never a traceback unless
``--debug`` (issue 15). The scripts' ``main(argv)`` runs in-process (loaded from their path);
two cases run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _testutils import break_weights_file, check_script_error as _check_error, forbid_calls, load_example, save_tiny_checkpoint

from facelayers.models import ssm
from facelayers.models.cli import UsageError

ROOT = Path(__file__).resolve().parents[1]
R = load_example("ssm_reference")
P = load_example("predict_video")
_BUILD_BACKBONE, _BUILD_DATASETS = R.build_backbone, R.ssm_data.build_datasets  # before any patching


@pytest.fixture(autouse=True)
def _no_side_effects(monkeypatch):
    """Any attempt to build data or a model before the arguments are checked fails the test."""
    forbid_calls(monkeypatch, [(R, "build_backbone"), (R.ssm_data, "build_datasets")],
                 "data or model built before the arguments were checked")


REFERENCE_CASES = {
    "epochs_zero": (["--epochs", "0"], "--epochs"),
    "epochs_negative": (["--epochs", "-1"], "--epochs"),
    "max_steps_zero": (["--max-steps", "0"], "--max-steps"),
    "clip_grad_negative": (["--clip-grad", "-1"], "--clip-grad"),
    "gamma_negative": (["--gamma", "-1"], "--gamma"),
    "milestone_negative": (["--milestones", "5", "-3"], "--milestones"),
    "milestones_unsorted": (["--milestones", "8", "4"], "--milestones"),
    "synthetic_size_zero": (["--synthetic-size", "0"], "--synthetic-size"),
    "tiny_patch_not_dividing": (["--tiny", "32,5,64,2"], "--tiny"),
    "tiny_malformed": (["--tiny", "32,8"], "--tiny"),
    "batch_exp_zero": (["--batch-exp", "0"], "--batch-exp"),
    "batch_au_negative": (["--batch-au", "-4"], "--batch-au"),
    "lr_nan": (["--lr", "nan"], "--lr"),
    "lr_zero": (["--lr-visual", "0"], "--lr-visual"),
    "val_fraction_one": (["--val-fraction", "1"], "--val-fraction"),
    "exp_fraction_zero": (["--exp-fraction", "0"], "--exp-fraction"),
    "fold_out_of_range": (["--fold", "4"], "--fold"),
    "frames_zero": (["--frames", "0"], "--frames"),
    "top_k_over_experts": (["--num-experts", "2", "--top-k", "3"], "--top-k"),
    "moe_blocks_out_of_range": (["--moe-blocks", "last:9"], "--moe-blocks"),
    "moe_blocks_garbage": (["--moe-blocks", "first:2"], "--moe-blocks"),
    "temporal_heads_not_dividing": (["--temporal-heads", "3"], "--temporal-heads"),
    "drop_expert_out_of_range": (["--debug-drop-expert", "0:7"], "--debug-drop-expert"),
    "drop_expert_malformed": (["--debug-drop-expert", "zero"], "--debug-drop-expert"),
    "threads_zero": (["--threads", "0"], "--threads"),
    "workers_negative": (["--workers", "-1"], "--workers"),
    "seed_text": (["--seed", "abc"], "--seed"),
    "unknown_backbone": (["--backbone", "NoSuchNet-B-99"], "--backbone"),
    "pretrained_on_tiny": (["--pretrained", "openai"], "--pretrained"),
    "pretrained_unknown_tag": (["--backbone", "ViT-B-16", "--pretrained", "opnai"], "--pretrained"),
    "pretrained_missing_file": (["--backbone", "ViT-B-16", "--pretrained", "/no/such/ViT-B-16.pt"], "--pretrained"),
    "release_dpm_alpha": (["--dpm-variant", "ssm_release", "--alpha", "1.5"], "--alpha"),
    "unknown_option": (["--epoch", "3"], "--epoch"),
    "bad_choice": (["--mode", "joint"], "--mode"),
    "real_data_missing_options": (["--data", "real"], "--data real"),
    "device_unknown": (["--device", "tpu"], "--device"),
    "n_ctx_too_long": (["--n-ctx", "80"], "--n-ctx"),
    "tiny_with_named_backbone": (["--backbone", "ViT-B-16", "--tiny", "32,8,64,2"], "--tiny"),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_reference_rejects(case, capsys, tmp_path):
    argv, needle = REFERENCE_CASES[case]
    rc = R.main([*argv, "--out", str(tmp_path / "run")])
    _check_error(rc, capsys.readouterr().err, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_reference_rejects_cuda_without_gpu(capsys, tmp_path):
    rc = R.main(["--device", "cuda", "--out", str(tmp_path / "run")])
    _check_error(rc, capsys.readouterr().err, "--device", "cuda")


def test_reference_rejects_out_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    _check_error(R.main(["--out", str(f)]), capsys.readouterr().err, "--out", str(f))


def test_reference_rejects_missing_manifest(capsys, tmp_path):
    rc = R.main(["--data", "real", "--exp-manifest", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r")])
    _check_error(rc, capsys.readouterr().err, "--exp-manifest", "nope.txt")


def test_reference_rejects_broken_resume_checkpoint(capsys, tmp_path):
    ckpt = tmp_path / "run" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer.json").write_text("{}")
    (ckpt / "last.json").write_text(json.dumps({"config": {}}))
    (ckpt / "last.safetensors").write_bytes(b"")
    rc = R.main(["--resume", "--out", str(tmp_path / "run")])
    _check_error(rc, capsys.readouterr().err, "last.safetensors", "0 bytes")


def test_reference_debug_shows_the_error(tmp_path):
    with pytest.raises(UsageError, match="--epochs"):
        R.main(["--epochs", "0", "--debug", "--out", str(tmp_path / "r")])


def test_reference_rejects_dfew_manifest_given_as_mafw(capsys, tmp_path, monkeypatch):
    """Detected when the manifest is read, before any model is built (the tiny backbone only fixes
    the image size)."""
    monkeypatch.setattr(R, "build_backbone", _BUILD_BACKBONE)
    monkeypatch.setattr(R.ssm_data, "build_datasets", _BUILD_DATASETS)
    monkeypatch.setattr(R, "assemble_model", lambda *a, **k: pytest.fail("model built"))
    (tmp_path / "frames").mkdir()
    for name in ("train.txt", "test.txt"):
        (tmp_path / name).write_text("".join(f"{i:05d} 16 {i % 7}\n" for i in range(60)))
    rc = R.main(["--data", "real", "--mode", "stl", "--task", "exp", "--exp-dataset", "mafw",
                 "--exp-root", str(tmp_path / "frames"), "--exp-manifest", str(tmp_path / "train.txt"),
                 "--exp-test-manifest", str(tmp_path / "test.txt"), "--out", str(tmp_path / "r"), "--no-progress"])
    _check_error(rc, capsys.readouterr().err, "train.txt", "MAFW")


# ----------------------------------------------------------------------------------------------
# predict_video.py
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("pv") / "checkpoint")


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("frames")
    for i in range(3):
        Image.new("RGB", (16, 16), (10 * i, 20, 30)).save(folder / f"{i:03d}.jpg")
    return folder


PREDICT_CASES = {
    "window_zero": (["--window", "0"], "--window"),
    "stride_negative": (["--stride", "-2"], "--stride"),
    "batch_zero": (["--batch", "0"], "--batch"),
    "fps_negative": (["--fps", "-25"], "--fps"),
    "fps_zero": (["--fps", "0"], "--fps"),
    "device_unknown": (["--device", "gpu0"], "--device"),
}


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_predict_rejects(case, capsys, tmp_path, checkpoint, frames_dir):
    argv, needle = PREDICT_CASES[case]
    rc = P.main([str(checkpoint), str(frames_dir), "--out", str(tmp_path / "o"), *argv])
    _check_error(rc, capsys.readouterr().err, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_predict_rejects_cuda_without_gpu(capsys, tmp_path, checkpoint, frames_dir):
    rc = P.main([str(checkpoint), str(frames_dir), "--device", "cuda:0", "--out", str(tmp_path / "o")])
    _check_error(rc, capsys.readouterr().err, "--device")


def test_predict_rejects_out_that_is_a_file(capsys, tmp_path, checkpoint, frames_dir):
    f = tmp_path / "file.txt"
    f.write_text("x")
    _check_error(P.main([str(checkpoint), str(frames_dir), "--out", str(f)]), capsys.readouterr().err, "--out")


def test_predict_rejects_missing_inputs(capsys, tmp_path, checkpoint, frames_dir):
    _check_error(P.main([str(tmp_path / "nope"), str(frames_dir)]), capsys.readouterr().err, "nope")
    _check_error(P.main([str(checkpoint), str(tmp_path / "missing.mp4")]), capsys.readouterr().err, "missing.mp4")


def _broken_checkpoint(src: Path, dst: Path, kind: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    st, js = dst / "best.safetensors", dst / "best.json"
    if kind == "broken_json":
        js.write_text('{"config": {"mode": ')
    else:
        break_weights_file(st, "pickle" if kind == "pickled" else kind)
    return st if kind != "broken_json" else js


@pytest.mark.parametrize("kind", ["zero_bytes", "truncated", "corrupt_header", "pickled", "broken_json"])
def test_predict_rejects_broken_checkpoint(kind, capsys, tmp_path, checkpoint, frames_dir):
    bad = _broken_checkpoint(checkpoint, tmp_path / "ck", kind)
    rc = P.main([str(tmp_path / "ck"), str(frames_dir), "--out", str(tmp_path / "o")])
    _check_error(rc, capsys.readouterr().err, bad.name)


def test_predict_rejects_truncated_jpeg(capsys, tmp_path, checkpoint, frames_dir):
    import shutil

    folder = Path(shutil.copytree(frames_dir, tmp_path / "frames"))
    jpg = folder / "001.jpg"
    jpg.write_bytes(jpg.read_bytes()[:60])
    rc = P.main([str(checkpoint), str(folder), "--out", str(tmp_path / "o")])
    _check_error(rc, capsys.readouterr().err, "001.jpg")


def test_predict_runs_on_good_input(capsys, tmp_path, checkpoint, frames_dir):
    """The checks do not refuse a good run."""
    assert P.main([str(checkpoint), str(frames_dir), "--out", str(tmp_path / "o"), "--no-plot", "--fps", "25"]) == 0
    assert (tmp_path / "o" / "au_probs.csv").is_file()


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=120)


def test_subprocess_reference_bad_argument():
    proc = _run("ssm_reference.py", "--epochs", "0")
    _check_error(proc.returncode, proc.stderr, "--epochs")


def test_subprocess_predict_text_file_named_mp4(tmp_path, checkpoint):
    video = tmp_path / "clip.mp4"
    video.write_text("this is not a video\n")
    proc = _run("predict_video.py", str(checkpoint), str(video), "--out", str(tmp_path / "o"))
    _check_error(proc.returncode, proc.stderr, "clip.mp4")


# ----------------------------------------------------------------------------------------------
# the validation layer itself (facelayers.models.cli)
# ----------------------------------------------------------------------------------------------


def test_cli_types_and_run_main(capsys, tmp_path):
    import argparse

    from facelayers.models import cli

    assert cli.positive_int("3") == 3 and cli.nonnegative_float("0") == 0.0 and cli.unit_float("1") == 1.0
    for fn, bad in ((cli.positive_int, "0"), (cli.positive_int, "1.5"), (cli.nonnegative_int, "-1"),
                    (cli.positive_float, "inf"), (cli.finite_float, "nan"), (cli.open_unit_float, "1"),
                    (cli.unit_float, "0")):
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected .*, got"):
            fn(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="got the file"):
        cli.output_folder(str(Path(__file__)))

    def main(argv):
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "x.jpg"))

    assert cli.run_main(main, []) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'x.jpg'}: No such file or directory"
    with pytest.raises(FileNotFoundError):
        cli.run_main(main, ["--debug"])

    def bug(argv):
        raise ZeroDivisionError("a bug, not a user error")

    with pytest.raises(ZeroDivisionError):  # programming errors keep their traceback
        cli.run_main(bug, [])


def test_reference_accepts_an_existing_pretrained_file(tmp_path, monkeypatch):
    """An existing weights file passes the argument checks (it is read by build_backbone later)."""
    weights = tmp_path / "ViT-B-16.bin"
    weights.write_bytes(b"x")
    args = R.validate_args(R.build_parser().parse_args(["--backbone", "ViT-B-16", "--pretrained", str(weights),
                                                        "--out", str(tmp_path / "r")]))
    assert args.pretrained == str(weights) and args.frames == 16 and args.moe_blocks == "last:6"


def test_reference_resume_with_other_options_is_refused(capsys, tmp_path):
    """--resume continues the run in --out: other architecture options are an error, before building."""
    from facelayers.io import save_optimizer

    out = tmp_path / "run"
    args = R.validate_args(R.build_parser().parse_args(["--quick", "--out", str(out)]))
    cfg = R.model_config(args, ssm.ModelConfig().expressions, ssm.ModelConfig().aus)
    cfg.clip_kwargs = ssm.TINY_CLIP
    model = ssm.build_model(cfg)
    ssm.save_model(model, str(out / "checkpoint"), name="last")
    save_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), str(out / "checkpoint"), {"epoch": 0})
    R.validate_args(R.build_parser().parse_args(["--quick", "--out", str(out), "--resume"]))  # same options: fine
    rc = R.main(["--quick", "--out", str(out), "--resume", "--num-experts", "3"])
    _check_error(rc, capsys.readouterr().err, "--resume", "num_experts")
