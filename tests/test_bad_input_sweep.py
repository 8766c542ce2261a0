"""Regression tests for what a careless-user sweep (issue 15, H15: ~370 script runs and ~280 API
calls with bad input) still let through: the ``python -m`` entry points (validator, synthetic
benchmark, zero-shot) printed tracebacks or argparse's multi-line usage, integer options accepted
values that overflow torch, and some layers / helpers answered with a cryptic torch error or
silently accepted nonsense. Each case asserts the error type and that the message names what was
expected and what came."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import facelayers as F
from facelayers.models import cli


def _one_error_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {lines}"
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in err, line
    assert "expected" in line and "got" in line, line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def _expected_got(msg: str, *needles: str) -> None:
    assert "expected" in msg and "got" in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


# ----------------------------------------------------------------------------------------------
# facelayers.models.cli
# ----------------------------------------------------------------------------------------------


def test_integer_options_refuse_values_torch_cannot_hold():
    """``--seed 2**70`` used to reach ``torch.manual_seed`` and end in an OverflowError traceback."""
    for parse in (cli.nonnegative_int, cli.positive_int):
        with pytest.raises(argparse.ArgumentTypeError) as ei:
            parse(str(2**70))
        _expected_got(str(ei.value), "2**63", str(2**70))
    assert cli.nonnegative_int(str(2**63 - 1)) == 2**63 - 1


def test_output_file_refuses_folders_and_paths_under_files(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="the folder") as ei:
        cli.output_file(str(tmp_path))
    _expected_got(str(ei.value))
    with pytest.raises(argparse.ArgumentTypeError, match="is a file") as ei:
        cli.output_file(str(tmp_path / "f" / "x.json"))
    _expected_got(str(ei.value))
    assert cli.output_file(str(tmp_path / "new" / "x.json")).endswith("x.json")


# ----------------------------------------------------------------------------------------------
# python -m facelayers.data (validator)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv_tail, needle", [
    (["dfew", "--max-issues", "abc"], "--max-issues"),
    (["dfew", "--max-issues", "-1"], "--max-issues"),
    (["ck+"], "format"),
    (["dfew", ".", "extra"], "extra"),
])
def test_validator_usage_errors_are_one_line(tmp_path, capsys, argv_tail, needle):
    from facelayers.data.validate import main

    m = tmp_path / "m.txt"
    m.write_text("00001 4 1\n")
    argv = [str(m), *[str(tmp_path) if a == "." else a for a in argv_tail]]
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err, needle)


def test_validator_folder_as_manifest(tmp_path, capsys):
    from facelayers.data.validate import main

    assert main([str(tmp_path), "dfew"]) == 2
    _one_error_line(capsys.readouterr().err, "a folder")


def test_validate_manifest_refuses_a_root_that_is_not_a_folder(tmp_path):
    """It used to report every line as a missing folder instead of saying the root is wrong."""
    m = tmp_path / "m.txt"
    m.write_text("00001 4 1\n")
    with pytest.raises(NotADirectoryError) as ei:
        F.validate_manifest(m, "dfew", root=tmp_path / "nope")
    _expected_got(str(ei.value), "nope")
    with pytest.raises(NotADirectoryError) as ei:
        F.validate_manifest(m, "dfew", root=m)
    _expected_got(str(ei.value), "a file")


# ----------------------------------------------------------------------------------------------
# python -m facelayers.data.synthetic
# ----------------------------------------------------------------------------------------------


def _synthetic_error(argv, capsys, *needles):
    from facelayers.data.synthetic.__main__ import main

    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    return _one_error_line(capsys.readouterr().err, *needles)


@pytest.mark.parametrize("argv, needle", [
    (["--figure", "{t}/f.png", "--image-size", "100000"], "--image-size"),  # used to try a 2 TB allocation
    (["--figure", "{t}/f.png", "--image-size", "3"], "--image-size"),  # used to be a ValueError traceback
    (["--figure", "{t}"], "the folder"),  # used to be accepted
    (["--figure", "{t}/f.txt"], ".png"),  # used to be a matplotlib traceback
    (["--figure", "{t}/f.png", "--seed", "-1"], "--seed"),
    (["pretrain-clp", "--out", "x"], "pretrain-clp"),  # used to complain about a missing --figure
    (["pretrain-clip", "--out", "{t}/m.safetensors", "--batch", "1"], "batch_size"),  # contrastive loss 0
    (["pretrain-clip", "--out", "{t}/m.txt"], ".safetensors"),
    (["pretrain-clip", "--out", "{t}"], "the folder"),  # used to be a SafetensorError traceback
    (["pretrain-clip", "--out", "{t}/m.safetensors", "--lr", "nan"], "--lr"),
    (["pretrain-clip", "--out", "{t}/m.safetensors", "--subset-p", "1.5"], "--subset-p"),
    (["pretrain-clip", "--out", "{t}/m.safetensors", "--warmup", "-1"], "--warmup"),
])
def test_synthetic_cli_bad_arguments(tmp_path, capsys, argv, needle):
    _synthetic_error([a.format(t=tmp_path) for a in argv], capsys, needle)


def test_pretrain_recipe_refuses_one_image_batches():
    from facelayers.data.synthetic.pretrain import PretrainRecipe

    with pytest.raises(ValueError) as ei:
        PretrainRecipe(batch_size=1).validate()
    _expected_got(str(ei.value), ">= 2", "1")
    with pytest.raises(ValueError) as ei:
        PretrainRecipe(weight_decay=math.nan).validate()
    _expected_got(str(ei.value), "weight_decay")


def test_subprocess_synthetic_bad_image_size(tmp_path):
    r = subprocess.run([sys.executable, "-m", "facelayers.data.synthetic", "--figure", str(tmp_path / "f.png"),
                        "--image-size", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    _one_error_line(r.stderr, "--image-size")


# ----------------------------------------------------------------------------------------------
# python -m facelayers.zeroshot
# ----------------------------------------------------------------------------------------------


def _zeroshot_error(argv, capsys, *needles):
    from facelayers.zeroshot import main

    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    return _one_error_line(capsys.readouterr().err, *needles)


@pytest.mark.parametrize("content, needle", [
    (b"", "0 bytes"),
    (b"\x80\x04\x95" + b"\x00" * 40, "never unpickles"),
    (b"PK\x03\x04" + b"\x00" * 40, "never unpickles"),
    (b"\xff" * 5000, "truncated"),
])
def test_zeroshot_refuses_broken_checkpoints_in_one_line(tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    _zeroshot_error(["--checkpoint", str(bad)], capsys, "bad.safetensors", needle)


def test_zeroshot_refuses_a_foreign_safetensors_file(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    _zeroshot_error(["--checkpoint", str(tmp_path / "other.safetensors")], capsys, "not a compact CLIP checkpoint")


@pytest.mark.parametrize("argv, needle", [
    (["--checkpoint", "{t}/nope.safetensors"], "not found"),
    (["--checkpoint", "{t}"], "the folder"),
    (["--checkpoint", "{t}/f", "--random"], "not allowed with"),
    (["--seed", "3"], "--random"),  # --seed used to be silently ignored without --random
    (["--random", "--seed", "abc"], "--seed"),
    (["--random", "--json", "{t}"], "--json"),
    (["--random", "--figure", "{t}/f/x.png"], "--figure"),
    (["--rnd"], "--rnd"),
])
def test_zeroshot_bad_arguments(tmp_path, capsys, argv, needle):
    (tmp_path / "f").write_text("x")
    _zeroshot_error([a.format(t=tmp_path) for a in argv], capsys, needle)


# ----------------------------------------------------------------------------------------------
# layers and helpers
# ----------------------------------------------------------------------------------------------


def test_router_checks_its_inputs():
    r = F.TaskTopKRouter(16, 4, num_tasks=2)
    with pytest.raises(ValueError) as ei:  # was a matmul RuntimeError
        r(torch.randn(5, 18))
    _expected_got(str(ei.value), "[N, 16]", "[5, 18]")
    with pytest.raises(ValueError) as ei:  # was silently routed per row of a 3-d tensor
        r(torch.randn(2, 5, 16))
    _expected_got(str(ei.value), "[2, 5, 16]")
    with pytest.raises(ValueError) as ei:  # was an index RuntimeError deep in gather
        r(torch.randn(5, 16), torch.full((5,), 3))
    _expected_got(str(ei.value), "0..1", "3")
    with pytest.raises(ValueError) as ei:
        r(torch.randn(5, 16), torch.zeros(4, dtype=torch.long))
    _expected_got(str(ei.value), "[5]", "[4]")
    with pytest.raises(TypeError) as ei:
        r(torch.randn(5, 16), torch.zeros(5))
    _expected_got(str(ei.value), "integer", "float32")


@pytest.mark.parametrize("kwargs, needle", [
    (dict(noise_std=math.nan), "noise_std"), (dict(gamma_init=math.inf), "gamma_init"),
])
def test_moe_refuses_non_finite_settings(kwargs, needle):
    shared = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    with pytest.raises(ValueError) as ei:
        F.MoEFFN(shared, 16, hidden_dim=8, **kwargs)
    _expected_got(str(ei.value), needle)
    with pytest.raises(ValueError):
        F.TaskTopKRouter(16, 4, noise_std=math.nan)


@pytest.mark.parametrize("make", [
    lambda: F.TemporalTransformer(16, heads=2, max_frames=4),
    lambda: F.GatedClsTemporalHead(16, heads=2, max_frames=4),
    lambda: F.LocalFrameAttention(16, heads=2),
])
def test_temporal_modules_check_the_input_dtype(make):
    m = make()
    with pytest.raises(TypeError) as ei:  # was "mixed dtype (CPU)" from layer_norm
        m(torch.randn(2, 4, 16, dtype=torch.float64))
    _expected_got(str(ei.value), "torch.float32", "torch.float64")
    with pytest.raises(TypeError) as ei:
        m(torch.ones(2, 4, 16, dtype=torch.long))
    _expected_got(str(ei.value), "torch.int64")
    m.double()(torch.randn(2, 4, 16, dtype=torch.float64))  # a converted module accepts its dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes are expected under autocast
        make()(torch.randn(2, 4, 16, dtype=torch.bfloat16))


def test_cosine_heads_refuse_empty_prototypes():
    with pytest.raises(ValueError) as ei:  # returned an empty [B, 0] logit tensor
        F.CosineClassifier(16)(torch.randn(2, 16), torch.randn(0, 16))
    _expected_got(str(ei.value), "K >= 1", "(0, 16)")


def test_prior_mapping_refuses_non_finite_factors():
    prior = F.prior_matrix(F.EXPRESSIONS_7, F.BP4D_AUS)
    for kwargs, needle in ((dict(alpha=math.nan), "alpha"), (dict(beta=math.inf), "beta"), (dict(tau=math.inf), "tau")):
        with pytest.raises(ValueError) as ei:
            F.DynamicPriorMapping(prior, **kwargs)
        _expected_got(str(ei.value), needle)
    with pytest.raises(ValueError, match="alpha"):
        F.LinearSemanticMapping(7, 12, alpha=math.nan)


def test_mix_clips_refuses_out_of_range_partners():
    with pytest.raises(ValueError) as ei:  # was an IndexError from the fancy index
        F.mix_clips(torch.randn(4, 3), 0.5, torch.tensor([0, 1, 2, 9]))
    _expected_got(str(ei.value), "0..3", "9")


def test_optimizer_param_groups_refuses_bad_learning_rates_and_groups():
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    for lr in (math.nan, -1.0, math.inf):
        with pytest.raises(ValueError) as ei:
            F.optimizer_param_groups({"a": [p]}, {"a": lr})
        _expected_got(str(ei.value), "'a'")
    with pytest.raises(KeyError) as ei:  # a typo in a group name used to be ignored
        F.optimizer_param_groups({"visual": [p]}, {"visual": 1e-6, "nwe": 1e-4})
    _expected_got(str(ei.value), "nwe")
    with pytest.raises(ValueError) as ei:
        F.optimizer_param_groups({"a": [p], "b": [p, q]}, {"a": 1.0, "b": 1.0})
    _expected_got(str(ei.value), "'a'", "'b'")
    assert [g["lr"] for g in F.optimizer_param_groups({"a": [p], "b": [q], "c": []}, {"a": 0.0, "b": 1.0})] == [0.0, 1.0]


def test_au_auc_refuses_empty_input():
    with pytest.raises(ValueError) as ei:  # returned NaN for every AU
        F.au_auc(torch.zeros(0, 12), torch.zeros(0, 12))
    _expected_got(str(ei.value), "N >= 1")


def test_save_module_names_a_bad_destination(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(IsADirectoryError) as ei:
        F.save_module(nn.Linear(2, 2), tmp_path)
    _expected_got(str(ei.value), "folder")
    with pytest.raises(NotADirectoryError) as ei:
        F.save_module(nn.Linear(2, 2), tmp_path / "f" / "m.safetensors")
    _expected_got(str(ei.value), str(tmp_path / "f"))


@pytest.mark.parametrize("call, exc, needles", [
    (lambda: F.prior_matrix(["happy"], F.BP4D_AUS), F.UnknownLabelError, ("happiness", "'happy'")),
    (lambda: F.prior_matrix(F.EXPRESSIONS_7, [99]), F.UnknownLabelError, ("AU12", "99")),
    (lambda: F.prior_matrix(F.EXPRESSIONS_7, []), ValueError, ("at least one",)),
    (lambda: F.au_descriptions([1.0]), TypeError, ("float",)),
    (lambda: F.get_split("dfew", 9, "train"), KeyError, ("(9, 'train')",)),
    (lambda: F.read_manifest("x.txt", "afew"), KeyError, ("'afew'",)),
    (lambda: F.HeterogeneousLoader([1], [2], exp_fraction=0), ValueError, ("exp_fraction",)),
])
def test_messages_name_expected_and_got(call, exc, needles):
    with pytest.raises(exc) as ei:
        call()
    msg = str(ei.value)
    _expected_got(msg, *needles)


def test_manifest_line_errors_name_expected_and_got(tmp_path):
    for fmt, text, needles in (("dfew", "00001 10 7\n", ("0..6", "got 7")), ("dfew", "00001 0 1\n", (">= 1", "got 0")),
                               ("bp4d", "2F01_01/1.jpg " + "2 " * 12 + "\n", ("0 or 1", "AU1=2"))):
        p = tmp_path / f"m.{fmt}"
        p.write_text(text)
        with pytest.raises(F.ManifestError) as ei:
            F.read_manifest(p, fmt)
        _expected_got(str(ei.value), f"{p}:1:", *needles)


def test_empty_pretrained_name_is_not_random_init():
    """``--backbone ViT-B-16 --pretrained ''`` used to build a random-init ViT-B-16 without a word."""
    from facelayers.models.ssm import BackboneUnavailableError, build_backbone

    for name in ("ViT-B-16", "tiny"):
        with pytest.raises(BackboneUnavailableError) as ei:
            build_backbone(name, "")
        _expected_got(str(ei.value), "''")
