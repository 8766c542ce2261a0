"""Bad inputs found by the careless-user sweep of issue 15 that the owners fix (helper H15's
"FOR OWNERS" list, /work/notes/h15.md): ``predict_video.py`` windows and faceless frames,
``ssm_sweep.py`` arguments and results file, ``convert_ssm_release.py --name``, the expression
dataset's frame counts and error wording, ``ssm_reference.py`` options that had no effect.

Scripts: one line ``error: ... (expected ..., got ...)`` on stderr, exit code 2, no traceback.
Library: a ValueError / TypeError / FileNotFoundError naming what was expected and what came."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _testutils import check_script_error as _check_error, forbid_calls, load_example, save_tiny_checkpoint

from facelayers.data import ExpressionRecord
from facelayers.data.datasets import (
    AUClipDataset,
    ExpressionClipDataset,
    FrameCountMismatchError,
    check_frame_counts,
    segment_indices,
)
from facelayers.models import ssm
from facelayers.models.ssm import inference as I

ROOT = Path(__file__).resolve().parents[1]
P = load_example("predict_video")
S = load_example("ssm_sweep")
C = load_example("convert_ssm_release")


def _frames(folder: Path, n: int, size: int = 16) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (10 * i, 20, 30)).save(folder / f"{i:03d}.jpg")
    return folder


# ----------------------------------------------------------------------------------------------
# predict_video.py (P1-P4)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny both-task model (T = 2, 16-px input) saved as a checkpoint folder."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("pv") / "checkpoint", seed=0)


@pytest.fixture(scope="module")
def au_only_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pv_au") / "checkpoint"
    cfg = ssm.ModelConfig(mode="stl", tasks=("au",), num_frames=2, temporal_heads=2, moe_blocks="all",
                          clip_kwargs=ssm.tiny_clip_kwargs(16, 8, 32, 1))
    ssm.save_model(ssm.build_model(cfg), str(folder), name="best")
    return folder


def test_p1_faceless_small_frames_are_no_face_error(checkpoint, tmp_path, capsys):
    """P1: 16x16 flat frames with --detect-faces: MTCNN's image pyramid is empty for frames smaller
    than its smallest face (was: a torch.cat traceback); now "no face found" naming the input."""
    pytest.importorskip("facenet_pytorch")
    frames = _frames(tmp_path / "flat", 5)
    rc = P.main([str(checkpoint), str(frames), "--detect-faces", "--out", str(tmp_path / "o"), "--no-plot"])
    _check_error(rc, capsys.readouterr().err, str(frames), "no face", "got none in 5 frames")


def test_p1_detector_small_frames_have_no_detections():
    pytest.importorskip("facenet_pytorch")
    from facelayers.faces import MTCNNDetector

    det = MTCNNDetector(min_face_size=20)
    out = det(torch.full((3, 19, 24, 3), 128, dtype=torch.uint8))
    assert [len(d) for d in out] == [0, 0, 0]


def test_p2_stride_larger_than_window_is_refused_up_front(checkpoint, tmp_path, capsys):
    """P2: --stride 5 with --window 2 left frames without any expression window."""
    frames = _frames(tmp_path / "f", 5)
    rc = P.main([str(checkpoint), str(frames), "--window", "2", "--stride", "5", "--out", str(tmp_path / "o")])
    _check_error(rc, capsys.readouterr().err, "--stride", "expected stride <= 2, got 5")
    assert not (tmp_path / "o").exists()


def test_p2_stride_larger_than_default_window(checkpoint, tmp_path, capsys):
    frames = _frames(tmp_path / "f", 9)
    rc = P.main([str(checkpoint), str(frames), "--stride", "5", "--out", str(tmp_path / "o"), "--no-plot"])
    _check_error(rc, capsys.readouterr().err, "--stride", "expected stride <= 4, got 5")  # window 2 T = 4


def test_p2_library_refuses_stride_over_window():
    torch.manual_seed(0)
    cfg = ssm.ModelConfig(mode="baseline", num_frames=2, image_size=16, moe_blocks="all", temporal_heads=2,
                          clip_kwargs=ssm.tiny_clip_kwargs(16, 8, 32, 1))
    model = ssm.build_model(cfg)
    with pytest.raises(ValueError, match=r"expected stride <= window = 2, got stride = 5"):
        I.predict_video(model, torch.rand(5, 3, 16, 16), window=2, stride=5)
    with pytest.raises(ValueError, match=r"expected stride <= window = 4, got stride = 7"):
        I.predict_video(model, torch.rand(5, 3, 16, 16), stride=7)  # default window 2 T


def test_p3_p4_short_video_rules_are_said_on_stderr(checkpoint, tmp_path, capsys):
    """P3: a window longer than the video is one window over all of it; P4: a video shorter than
    T repeats frames. Both documented rules now print a note (was: silent)."""
    frames = _frames(tmp_path / "one", 1)
    rc = P.main([str(checkpoint), str(frames), "--window", "100", "--out", str(tmp_path / "o"), "--no-plot",
                 "--no-detect-faces"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "note: the expression window (100 frames) is longer than the video (1 frames)" in err
    assert "fewer than the model's T = 2" in err
    rows = (tmp_path / "o" / "expression_probs.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("0,1,")  # one window: frames 0..1 (exclusive end)


def test_window_options_for_a_model_without_expressions(au_only_checkpoint, tmp_path, capsys):
    frames = _frames(tmp_path / "f", 3)
    rc = P.main([str(au_only_checkpoint), str(frames), "--window", "4", "--out", str(tmp_path / "o"),
                 "--no-detect-faces"])
    _check_error(rc, capsys.readouterr().err, "--window", "has no effect", "got tasks au")


# ----------------------------------------------------------------------------------------------
# convert_ssm_release.py (C1)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "-x"])
def test_c1_convert_refuses_names_that_are_not_a_file_stem(name, tmp_path, capsys):
    ck = tmp_path / "x.pth"
    ck.write_bytes(b"not read: the name is checked first")
    rc = C.main([str(ck), "--au-dataset", "bp4d", "--exp-dataset", "dfew", "--out", str(tmp_path / "o"),
                 f"--name={name}"])
    _check_error(rc, capsys.readouterr().err, "--name", "plain file stem")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# ssm_sweep.py (S1-S5)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_runs(monkeypatch):
    """Fail if the sweep starts a run (every case must be refused before)."""
    forbid_calls(monkeypatch, [(S, "run_sweep"), (S.R, "run")], "a run started")


ROW = {"config": "ssm", "seed": 0, "uar": 0.5, "war": 0.6, "au_f1": None, "au_auc": None}


@pytest.mark.parametrize("text, needle", [
    ("{broken\n", "results.jsonl:1: not JSON"),
    (json.dumps(ROW) + '\n{"a": 1}\n', "results.jsonl:2: incomplete row"),
    (json.dumps({**ROW, "uar": "x"}) + "\n", "uar (expected a number or null, got 'x')"),
    (json.dumps({**ROW, "seed": "0"}) + "\n", "seed (expected an integer, got '0')"),
    (json.dumps({**ROW, "config": 3}) + "\n", "config (expected a string, got 3)"),
    ("[1, 2]\n", "not a row (expected a JSON object, got list)"),
])
def test_s1_s2_table_refuses_a_broken_results_file(text, needle, tmp_path, capsys, no_runs):
    (tmp_path / "results.jsonl").write_text(text)
    _check_error(S.main(["--out", str(tmp_path), "--table"]), capsys.readouterr().err, needle)


def test_s1_broken_results_file_refused_before_a_sweep_runs(tmp_path):
    """``run_sweep`` reads results.jsonl (to skip runs already there) before the first run."""
    from facelayers.models.cli import UsageError

    (tmp_path / "results.jsonl").write_text(json.dumps(ROW) + "\n{broken\n")
    with pytest.raises(UsageError, match=r"results.jsonl:2: not JSON \(expected one JSON row per line"):
        S._done(str(tmp_path / "results.jsonl"))


def test_table_reads_good_rows(tmp_path, capsys, no_runs):
    rows = [ROW, {**ROW, "seed": 1, "uar": 0.7}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert S.main(["--out", str(tmp_path), "--table"]) == 0
    assert "60.0 ± 14.1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needles", [
    (["--seeds"], ("--seeds", "expected at least one value, got none")),
    (["--configs"], ("--configs", "expected at least one value, got none")),
    (["--seeds", "1", "1"], ("--seeds", "got 1 more than once")),
    (["--configs", "ssm", "tsp", "ssm"], ("--configs", "got ssm more than once")),
    (["--", "--seed", "3"], ("--seed", "set by the sweep")),
    (["--", "--epochs", "2", "--out=x"], ("--out", "got --out=x")),
    (["--table", "--seeds", "1"], ("--seeds", "has no effect with --table")),
    (["--table", "--", "--epochs", "2"], ("--table", "--epochs 2")),
])
def test_s3_s4_s5_sweep_arguments(argv, needles, tmp_path, capsys, no_runs):
    (tmp_path / "results.jsonl").write_text(json.dumps(ROW) + "\n")  # so --table alone would work
    _check_error(S.main(["--out", str(tmp_path), *argv]), capsys.readouterr().err, *needles)


# ----------------------------------------------------------------------------------------------
# facelayers.data.datasets: frame counts (R7) and the (expected ..., got ...) wording
# ----------------------------------------------------------------------------------------------


def test_r7_check_frame_counts_refuses_a_short_folder(tmp_path):
    _frames(tmp_path / "00000", 4)
    _frames(tmp_path / "00001", 6)
    recs = [ExpressionRecord("00001", 6, 1), ExpressionRecord("00000", 40, 1)]
    with pytest.raises(FrameCountMismatchError,
                       match=r"train.txt: record 1: clip '00000': manifest says 40 frames, found 4 .*"
                             r"\(expected 40 frame files, got 4\)"):
        check_frame_counts(recs, tmp_path, manifest="train.txt")
    check_frame_counts([ExpressionRecord("00001", 5, 0)], tmp_path)  # more on disk: accepted by default
    with pytest.raises(FrameCountMismatchError, match="expected 5 frame files, got 6"):
        check_frame_counts([ExpressionRecord("00001", 5, 0)], tmp_path, allow_more=False)
    check_frame_counts([ExpressionRecord("missing", 5, 0)], tmp_path)  # reported when read, not here


def test_expression_dataset_checks_its_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset root not found: .*nope \(expected an existing folder, "
                                                r"got no such path\)"):
        ExpressionClipDataset([ExpressionRecord("a", 3, 0)], tmp_path / "nope")


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: segment_indices(0, 4, False), ValueError, r"num_frames_in_clip .*\(expected an integer >= 1, got 0\)"),
    (lambda: segment_indices(10.5, 4, False), ValueError, r"\(expected an integer >= 1, got 10.5\)"),
    (lambda: segment_indices(5, 0, False), ValueError, r"num_frames .*\(expected an integer >= 1, got 0\)"),
    (lambda root: ExpressionClipDataset([], root), ValueError, r"\(expected a non-empty list of ExpressionRecord, got none\)"),
    (lambda root: ExpressionClipDataset([ExpressionRecord("a", 3, 0)], root, frame_count="x"), ValueError,
     r"frame_count .*\(expected one of them, got 'x'\)"),
    (lambda root: AUClipDataset([], root), ValueError, r"\(expected a non-empty list of AURecord, got none\)"),
    (lambda root: ExpressionClipDataset([ExpressionRecord("a", 3, 0)], root, num_frames=0), ValueError,
     r"\(expected an integer >= 1, got 0\)"),
])
def test_dataset_errors_say_expected_and_got(call, exc, pattern, tmp_path):
    with pytest.raises(exc, match=pattern):
        call(tmp_path) if call.__code__.co_argcount else call()


def test_frame_count_mismatch_wording(tmp_path):
    _frames(tmp_path / "a", 4)
    ds = ExpressionClipDataset([ExpressionRecord("a", 40, 0)], tmp_path, num_frames=2, frame_count="error")
    with pytest.raises(FrameCountMismatchError, match=r"manifest says 40 frames, found 4 \(expected 40 frame files, got 4\)"):
        ds[0]
    with pytest.raises(IndexError, match=r"expected -1 <= index < 1, got 3"):
        ds[3]


# ----------------------------------------------------------------------------------------------
# ssm_reference.py (R2-R8): options without effect, test = train, bounds, resume
# ----------------------------------------------------------------------------------------------

R = load_example("ssm_reference")


@pytest.fixture
def no_build(monkeypatch):
    """Any attempt to build data or a model before the arguments are checked fails the test."""
    forbid_calls(monkeypatch, [(R, "build_backbone"), (R.ssm_data, "build_datasets")],
                 "data or model built before the arguments were checked")


NO_EFFECT = {
    "baseline_mapping": (["--mode", "baseline", "--mapping", "mlp"], "--mapping", "expected --mode ssm, got --mode baseline"),
    "stl_num_experts": (["--mode", "stl", "--num-experts", "8"], "--num-experts", "got --mode stl"),
    "task_without_stl": (["--task", "au"], "--task", "expected --mode stl, got --mode ssm"),
    "no_tsp_mapping": (["--no-tsp", "--mapping", "mlp"], "--mapping", "expected no --no-tsp"),
    "baseline_dpm_variant": (["--mode", "baseline", "--dpm-variant", "ssm_release"], "--dpm-variant", "--mode baseline"),
    "no_dpm_freeze": (["--no-dpm", "--freeze-dpm"], "--freeze-dpm", "expected no --no-dpm, got --no-dpm"),
    "no_dpm_alpha": (["--no-dpm", "--alpha", "0.3"], "--alpha", "expected no --no-dpm"),
    "no_dpm_prior_source": (["--no-dpm", "--prior-source", "ssm_release"], "--prior-source", "--no-dpm"),
    "baseline_n_ctx": (["--mode", "baseline", "--n-ctx", "4"], "--n-ctx", "--mode baseline"),
    "stl_vision_passes": (["--mode", "stl", "--vision-passes", "2"], "--vision-passes", "--mode stl"),
    "stl_moe_blocks": (["--mode", "stl", "--moe-blocks", "0"], "--moe-blocks", "--mode stl"),
    "stl_exp_au_fraction": (["--mode", "stl", "--task", "exp", "--au-fraction", "0.5"], "--au-fraction", "an au task"),
    "stl_exp_batch_au": (["--mode", "stl", "--task", "exp", "--batch-au", "4"], "--batch-au", "an au task"),
    "stl_exp_au_select": (["--mode", "stl", "--task", "exp", "--au-select", "all"], "--au-select", "an au task"),
    "stl_au_exp_dataset": (["--mode", "stl", "--task", "au", "--exp-dataset", "mafw"], "--exp-dataset", "an exp task"),
    "linear_mapping_no_dual": (["--mapping", "linear", "--no-dual"], "--no-dual", "expected --mapping dpm"),
    "frames_bound": (["--frames", "100000"], "--frames", "expected 1..256, got 100000"),
    "synthetic_size_huge": (["--synthetic-size", "1e9"], "--synthetic-size", "expected at most 64"),
    "synthetic_size_tiny": (["--synthetic-size", "1e-9"], "--synthetic-size", "at least 35 expression clips"),
    "quick_size_clamped": (["--quick", "--synthetic-size", "0.5"], "--synthetic-size", "at least 5 AU subjects"),
}


@pytest.mark.parametrize("case", sorted(NO_EFFECT))
def test_r2_r5_r6_reference_refuses(case, tmp_path, capsys, no_build):
    argv, *needles = NO_EFFECT[case]
    _check_error(R.main([*argv, "--out", str(tmp_path / "run")]), capsys.readouterr().err, *needles)


def test_r2_defaults_and_meaningful_combinations_pass(tmp_path, no_build):
    """Only options the user set are checked: the sweep's settings still validate."""
    for argv in ([], ["--mode", "stl", "--task", "au"], ["--mode", "baseline"], ["--no-dpm"], ["--mapping", "mlp"],
                 ["--dpm-init", "random"], ["--freeze-dpm"], ["--synthetic-size", "0.5"]):
        R.validate_args(R.build_parser().parse_args([*argv, "--out", str(tmp_path / "run")]))


@pytest.fixture
def real_exp(tmp_path) -> list[str]:
    root = tmp_path / "dfew"
    for c in range(3):
        _frames(root / f"{c:05d}", 4)
    (tmp_path / "train.txt").write_text("00000 4 1\n00001 4 2\n")
    (tmp_path / "test.txt").write_text("00002 4 3\n")
    return ["--data", "real", "--mode", "stl", "--task", "exp", "--exp-root", str(root),
            "--exp-manifest", str(tmp_path / "train.txt"), "--exp-test-manifest", str(tmp_path / "test.txt")]


def test_r3_test_manifest_equal_to_training_manifest(real_exp, tmp_path, capsys, no_build):
    argv = list(real_exp)
    argv[argv.index("--exp-test-manifest") + 1] = argv[argv.index("--exp-manifest") + 1]
    _check_error(R.main([*argv, "--out", str(tmp_path / "run")]), capsys.readouterr().err,
                 "--exp-test-manifest", "expected a separate test manifest")


def test_r4_fold_with_real_data(real_exp, tmp_path, capsys, no_build):
    _check_error(R.main([*real_exp, "--fold", "7", "--out", str(tmp_path / "run")]), capsys.readouterr().err,
                 "--fold", "expected --data synthetic, got --data real")


def test_r7_clip_folder_shorter_than_its_manifest_line(real_exp, tmp_path, capsys, no_build):
    (tmp_path / "train.txt").write_text("00000 4 1\n00001 40 2\n")
    _check_error(R.main([*real_exp, "--out", str(tmp_path / "run")]), capsys.readouterr().err,
                 "train.txt: record 1: clip '00001'", "expected 40 frame files, got 4")


def test_r8_resume_without_checkpoint_says_so(tmp_path, capsys, no_build):
    R.validate_args(R.build_parser().parse_args(["--resume", "--out", str(tmp_path / "run")]))
    assert "note: --resume: no checkpoint in" in capsys.readouterr().err
