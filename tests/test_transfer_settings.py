"""Transfer settings of the reference SSM (issue 20, part B): few-shot expressions (``--exp-shots``),
unseen expression classes (``--unseen-classes``), frozen vision weights (``--freeze-visual``).
Library parts (few_shot_indices, without_classes_indices, apply_transfer_settings), the separate
unseen-class metrics, bad values (exit 2, one line) and a ``--quick`` run of each setting."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _testutils import load_example, one_thread  # noqa: F401  (autouse: one intra-op thread)

from facelayers import facs
from facelayers.data.loader import few_shot_indices, without_classes_indices
from facelayers.models.ssm import data as D

R = load_example("ssm_reference")
S = load_example("ssm_sweep")

UNSEEN = ("contempt", "anxiety", "helplessness", "disappointment")


# ---------------------------------------------------------------------------------------------
# library: index selection


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.integers(1, 4), st.integers(0, 2**16))
def test_few_shot_indices_k_per_class_or_error(labels, k, seed):
    counts = Counter(labels)
    if min(counts.values()) < k:
        with pytest.raises(ValueError, match="fewer than k"):
            few_shot_indices(labels, k, seed)
        return
    idx = few_shot_indices(labels, k, seed)
    assert idx == sorted(set(idx))
    assert Counter(labels[i] for i in idx) == {c: k for c in counts}
    assert few_shot_indices(torch.tensor(labels), k, seed) == idx  # tensor == list, deterministic
    if k > 1:  # smaller k: a subset of the larger draw
        assert set(few_shot_indices(labels, k - 1, seed)) <= set(idx)


def test_few_shot_indices_classes_and_errors():
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 3]
    idx = few_shot_indices(labels, 2, 0, classes=[0, 1])  # other classes not drawn
    assert sorted(Counter(labels[i] for i in idx).items()) == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match=r"got \{3: 1\}"):
        few_shot_indices(labels, 2, 0)
    with pytest.raises(ValueError, match=r"got \{5: 0\}"):  # a required class without any item
        few_shot_indices(labels, 1, 0, classes=[0, 5])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="expected items per class >= 1"):
            few_shot_indices(labels, bad)
    with pytest.raises(ValueError, match="integer"):
        few_shot_indices(torch.tensor([0.0, 1.0]), 1)
    draws = {tuple(few_shot_indices(labels, 1, s, classes=[0])) for s in range(20)}
    assert len(draws) > 1  # the seed changes the draw


def test_without_classes_indices():
    labels = torch.tensor([0, 3, 1, 3, 2])
    assert without_classes_indices(labels, [3]) == [0, 2, 4]
    assert without_classes_indices(labels, []) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="every item is of an excluded class"):
        without_classes_indices([3, 3], [3])


# ---------------------------------------------------------------------------------------------
# library: the datasets of each setting


@pytest.fixture(scope="module")
def mafw_bundle():
    return D.build_synthetic_datasets(frames=2, image_size=16, seed=0, fold=1, quick=True, size=1.0,
                                      val_fraction=0.15, exp_dataset="mafw", tasks=("exp",))


def _counts(ds) -> Counter:
    return Counter(D.expression_labels_of(ds))


def test_synthetic_benchmark_has_the_11_mafw_classes(mafw_bundle):
    assert mafw_bundle.expressions == facs.EXPRESSIONS_11
    for split in (mafw_bundle.train, mafw_bundle.test):
        assert set(_counts(split["exp"])) == set(range(11))


def test_unseen_classes_absent_from_train_and_val_present_in_test(mafw_bundle):
    b = D.apply_transfer_settings(mafw_bundle, unseen_classes=list(UNSEEN))
    ids = {facs.EXPRESSIONS_11.index(n) for n in UNSEEN}
    tr, va, te = _counts(b.train["exp"]), _counts(b.val["exp"]), _counts(b.test["exp"])
    assert not ids & set(tr) and not ids & set(va)
    assert ids <= set(te) and te == _counts(mafw_bundle.test["exp"])  # test untouched
    before = _counts(mafw_bundle.train["exp"])
    assert tr == Counter({c: n for c, n in before.items() if c not in ids})  # seen classes all kept
    assert b.notes["transfer"]["unseen_classes"] == list(UNSEEN)
    item = b.train["exp"][0]  # Subset items are the base dataset's items
    assert int(item["label"]) not in ids


def test_exp_shots_k_per_class_from_training_only(mafw_bundle):
    b = D.apply_transfer_settings(mafw_bundle, exp_shots=2, seed=3)
    assert _counts(b.train["exp"]) == {c: 2 for c in range(11)}
    assert _counts(b.val["exp"]) == _counts(mafw_bundle.val["exp"])
    assert _counts(b.test["exp"]) == _counts(mafw_bundle.test["exp"])
    base = D.expression_labels_of(mafw_bundle.train["exp"])
    assert set(b.train["exp"].indices) <= set(range(len(base)))  # drawn from the training split
    assert D.apply_transfer_settings(mafw_bundle, exp_shots=2, seed=3).train["exp"].indices == b.train["exp"].indices
    both = D.apply_transfer_settings(mafw_bundle, exp_shots=2, unseen_classes=["fear"], seed=0)
    assert _counts(both.train["exp"]) == {c: 2 for c in range(11) if c != 6}
    assert b.notes["transfer"]["train_counts"]["contempt"] == 2
    assert D.apply_transfer_settings(mafw_bundle) is mafw_bundle
    with pytest.raises(ValueError, match="fewer training clips"):
        D.apply_transfer_settings(mafw_bundle, exp_shots=1000)


@pytest.mark.parametrize("names, needle", [
    (["contempt"], "--exp-dataset mafw"),  # a MAFW class in the 7-class vocabulary
    (["joy"], "expected names from"),
    (list(facs.EXPRESSIONS_7), "every class would be unseen"),
    (["fear", "fear"], "more than once"),
    ([], "one or more class names"),
])
def test_unseen_class_ids_errors(names, needle):
    with pytest.raises(ValueError, match=needle):
        D.unseen_class_ids(facs.EXPRESSIONS_7, names)


def test_unseen_class_metrics_known_answer():
    names = ("a", "b", "c", "d")
    cm = torch.tensor([[4, 0, 0, 0],    # a: seen, recall 1
                       [2, 2, 0, 0],    # b: seen, recall 0.5
                       [1, 0, 3, 0],    # c: unseen, recall 0.75
                       [0, 0, 2, 2]])   # d: unseen, recall 0.5 (2 predicted as c: still "some unseen class")
    m = R.unseen_class_metrics(cm, names, ["c", "d"])
    assert m["recall"] == {"c": 0.75, "d": 0.5}
    assert m["uar"] == pytest.approx(0.625) and m["accuracy"] == pytest.approx(5 / 8)
    assert m["predicted_unseen"] == pytest.approx(7 / 8) and m["seen_uar"] == pytest.approx(0.75)
    assert m["h"] == pytest.approx(2 * 0.625 * 0.75 / 1.375) and m["n"] == 8


# ---------------------------------------------------------------------------------------------
# the script: bad values and quick runs


@pytest.mark.parametrize("argv, needle", [
    (["--exp-shots", "0"], "--exp-shots: expected an integer >= 1"),
    (["--exp-dataset", "mafw", "--unseen-classes", "contempt,joy"], "--unseen-classes: not in the vocabulary"),
    (["--unseen-classes", "contempt"], "--exp-dataset mafw"),
    (["--unseen-classes", ",".join(facs.EXPRESSIONS_7)], "every class would be unseen"),
    (["--mode", "stl", "--task", "au", "--exp-shots", "2"], "expected an expression task"),
    (["--exp-shots", "2", "--exp-fraction", "0.5"], "expected no --exp-fraction"),
    (["--freeze-visual", "--lr-visual", "1e-6"], "expected no --lr-visual"),
    (["--freeze-visual", "--recipe", "ssm_release"], "expected --recipe paper"),
    (["--backbone", "tiny-facs", "--tiny", "32,8,64,2"], "tiny-facs backbone has the default tiny shape"),
    (["--quick", "--exp-shots", "500"], "fewer training clips"),  # found when the data is built
    (["--unseen-loss", "seen"], "expected --unseen-classes with it"),
    (["--exp-dataset", "mafw", "--unseen-classes", "contempt", "--recipe", "ssm_release"], "expected --recipe paper"),
])
def test_bad_transfer_values_exit_2_one_line(argv, needle, tmp_path, capsys):
    rc = R.main([*argv, "--out", str(tmp_path / "run"), "--no-progress", "--no-plots"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err


def test_quick_exp_shots_run_trains_on_k_per_class(tmp_path, capsys):
    out = tmp_path / "shots"
    assert R.main(["--quick", "--exp-shots", "2", "--out", str(out), "--no-progress", "--no-plots"]) == 0
    assert "train={'exp': 14," in capsys.readouterr().err  # 2 clips x 7 classes
    m = json.loads((out / "metrics.json").read_text())
    assert m["args"]["exp_shots"] == 2 and "exp_unseen" not in m["test"]


def test_default_backbone_is_the_shipped_tiny_facs_clip(tmp_path):
    """No --backbone: the shipped FACS-pretrained tiny CLIP with its own defaults; --tiny (another
    shape, no pretrained weights for it) falls back to the random-init tiny backbone."""
    base = ["--out", str(tmp_path / "x")]
    a = R.validate_args(R.build_parser().parse_args(base))
    assert a.backbone == R.DEFAULT_BACKBONE == "tiny-facs"
    assert (a.lr, a.lr_visual) == (R.TINY_DEFAULTS["tiny-facs"].lr, R.TINY_FACS_LR_VISUAL)
    assert R.validate_args(R.build_parser().parse_args([*base, "--tiny", "32,8,32,1"])).backbone == "tiny"
    assert R.validate_args(R.build_parser().parse_args([*base, "--backbone", "tiny"])).backbone == "tiny"
    with pytest.raises(R.cli.UsageError, match="brings its own initialisation"):
        R.validate_args(R.build_parser().parse_args([*base, "--pretrained", "openai"]))


def test_quick_freeze_visual_keeps_the_vision_weights(tmp_path):
    """Also the main job's default backbone (no --backbone): its vision weights are the shipped ones."""
    from facelayers.assets import load_tiny_facs_clip

    out = tmp_path / "frozen"
    args = R.validate_args(R.build_parser().parse_args(
        ["--quick", "--freeze-visual", "--out", str(out), "--no-progress", "--no-plots",
         "--mode", "stl", "--task", "exp"]))
    R.run(args)
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoint" / "best.safetensors"))
    ref = load_tiny_facs_clip().visual.state_dict()
    vis = {k: v for k, v in saved.items() if "visual" in k and "conv1.weight" in k}
    assert vis, sorted(saved)[:10]
    for v in vis.values():
        torch.testing.assert_close(v, ref["conv1.weight"], rtol=0, atol=0)
    head = [k for k in saved if "head" in k and k.endswith("weight")]
    assert head  # something new was saved (and trained: lr > 0)


def test_quick_unseen_sweep_row_and_table(tmp_path, capsys):
    """The unseen-class setting as a sweep row: metrics report the 4 unseen classes separately."""
    out = tmp_path / "sweep"
    assert S.main(["--out", str(out), "--setting", "unseen", "--configs", "baseline", "--seeds", "0", "--",
                   "--quick"]) == 0
    printed = capsys.readouterr().out
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert row["setting"] == "unseen" and row["unseen_uar"] is not None and 0 <= row["unseen_uar"] <= 1
    m = json.loads((out / "unseen" / "baseline-seed0" / "metrics.json").read_text())
    u = m["test"]["exp_unseen"]
    assert u["classes"] == list(UNSEEN) and set(u["recall"]) == set(UNSEEN)
    cm = torch.tensor(m["test"]["exp"]["confusion_matrix"])
    assert cm.shape == (11, 11) and int(cm[7:].sum()) == u["n"] > 0
    among = u.pop("among_unseen_uar"), u.pop("among_unseen_accuracy")
    ausuc = u.pop("ausuc")
    assert u == R.unseen_class_metrics(cm, facs.EXPRESSIONS_11, list(UNSEEN))
    # the seen-unseen curve agrees with the meters at its ends: at gamma = 0 the plain argmax
    # (unseen / seen UAR from the confusion matrix), at +inf the argmax among the unseen classes
    su = m["test"]["exp"]["seen_unseen"]
    assert su["ausuc"] == ausuc == row["ausuc"] and 0 <= ausuc <= 1
    assert su["unseen_uar_at_0"] == pytest.approx(u["uar"]) and su["seen_uar_at_0"] == pytest.approx(u["seen_uar"])
    assert su["unseen_uar"][-1] == pytest.approx(among[0]) and su["seen_uar"][-1] == 0.0
    assert su["seen_uar"][0] >= su["seen_uar_at_0"] and su["unseen_uar"][0] == 0.0
    # the unseen clips among the unseen classes only: all of them counted, a UAR in [0, 1]
    assert m["test"]["exp"]["among_unseen"]["n"] == u["n"] and all(0 <= v <= 1 for v in among)
    assert row["among_unseen_uar"] == among[0]
    # training softmax over the 7 seen classes (MAFW's basic ones come first)
    assert m["args"]["exp_train_classes"] == list(range(7)) and m["args"]["unseen_loss"] is None
    summary = (out / "unseen" / "baseline-seed0" / "summary.txt").read_text()
    assert "unseen-class UAR" in summary and "contempt, anxiety" in summary
    assert "| unseen classes (MAFW's 4 compound classes never trained) | Baseline" in printed
    assert "unseen UAR among unseen" in summary and "AUSUC" in summary


def test_quick_unseen_loss_all_trains_every_class(tmp_path):
    """``--unseen-loss all``: the old softmax over all 11 classes (no class subset recorded)."""
    out = tmp_path / "all"
    assert R.main(["--quick", "--exp-dataset", "mafw", "--unseen-classes", ",".join(UNSEEN), "--unseen-loss", "all",
                   "--out", str(out), "--no-progress", "--no-plots", "--mode", "stl", "--task", "exp"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "exp_train_classes" not in m["args"] and m["args"]["unseen_loss"] == "all"
    assert "among_unseen_uar" in m["test"]["exp_unseen"]


def test_sweep_settings_validate_for_the_ablation_configs(tmp_path):
    for setting, (flags, _) in S.SETTINGS.items():
        for name in ("baseline", "tsp", "ssm", "dpm-random", "dpm-frozen", "dpm-nodual", "stl-exp"):
            R.validate_args(R.build_parser().parse_args([*S.CONFIGS[name][0], *flags, "--backbone", "tiny-facs",
                                                         "--out", str(tmp_path / "x")]))


def test_quick_unseen_training_loss_runs_over_the_seen_classes(tmp_path, monkeypatch):
    """Every training step of the unseen-class setting hands the seen classes to the expression loss."""
    calls: list = []
    original = R.compute_losses

    def spy(out, eb, ab, lam, exp_classes=None):
        if eb is not None:
            calls.append(exp_classes)
        return original(out, eb, ab, lam, exp_classes)

    monkeypatch.setattr(R, "compute_losses", spy)
    assert R.main(["--quick", "--exp-dataset", "mafw", "--unseen-classes", ",".join(UNSEEN), "--out",
                   str(tmp_path / "run"), "--no-progress", "--no-plots", "--mode", "stl", "--task", "exp"]) == 0
    assert calls and all(c == list(range(7)) for c in calls), calls[:3]
