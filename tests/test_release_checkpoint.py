"""The allowlist loader of release ``.pth`` files (facelayers.models.ssm.release_checkpoint) and the
converter CLI's refusals: nothing from a checkpoint is ever executed."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from facelayers.models.ssm.release_checkpoint import (
    CheckpointFormatError,
    ReleaseRecorderMeter,
    UnsafeCheckpointError,
    load_release_checkpoint,
    release_state_dict,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "ssm_release"
FIXTURE = DATA / "bp4d_dfew_tiny.pth"
CONVERT = ROOT / "examples" / "convert_ssm_release.py"


# ------------------------------------------------------------------------------------------------
# helpers: payloads that would run code, pickled as torch checkpoints and as plain pickles
# ------------------------------------------------------------------------------------------------
class _Exec:
    """``__reduce__`` -> builtins.exec(code): writes the marker file when unpickled unsafely."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').write('ran')"

    def __reduce__(self):
        return (exec, (self.code,))


class _Eval:
    """``__reduce__`` -> builtins.eval(expression) writing the marker."""

    def __init__(self, marker: Path) -> None:
        self.expr = f"open({str(marker)!r}, 'w').write('ran')"

    def __reduce__(self):
        return (eval, (self.expr,))


class _System:
    def __init__(self, marker: Path) -> None:
        self.cmd = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Popen:
    def __init__(self, marker: Path) -> None:
        self.argv = ["touch", str(marker)]

    def __reduce__(self):
        import subprocess as sp

        return (sp.Popen, (self.argv,))


def _recorder_named(module: str):
    """A class that pickles as ``<module>.RecorderMeter`` (like the release's training scripts)."""
    mod = types.ModuleType(module)

    class RecorderMeter:
        def __init__(self) -> None:
            self.total_epoch = 3
            self.current_epoch = 1
            self.epoch_losses = np.arange(6, dtype=np.float32).reshape(3, 2)
            self.epoch_accuracy = np.ones((3, 2), dtype=np.float64)

    RecorderMeter.__module__ = module
    RecorderMeter.__qualname__ = "RecorderMeter"
    mod.RecorderMeter = RecorderMeter
    return mod, RecorderMeter


#: payload -> (class, the global the refusal names; protocol-2 pickles write Python 2 module names)
PAYLOADS = {
    "exec": (_Exec, r"(builtins|__builtin__)\.exec"),
    "eval": (_Eval, r"(builtins|__builtin__)\.eval"),
    "os.system": (_System, r"(posix|os)\.system"),
    "subprocess.Popen": (_Popen, r"(subprocess|commands)\.Popen"),
}


# ------------------------------------------------------------------------------------------------
# the release runner's real format
# ------------------------------------------------------------------------------------------------
def test_reads_release_runner_checkpoint():
    ck = load_release_checkpoint(FIXTURE)
    meta = json.loads((DATA / "bp4d_dfew_tiny.json").read_text())
    assert set(ck) == {"epoch", "state_dict", "best_acc", "best_uar", "optimizer", "recorder"}
    assert ck["epoch"] == 12 and ck["best_acc"] == pytest.approx(61.5) and ck["best_uar"] == pytest.approx(52.25)
    assert isinstance(ck["state_dict"], OrderedDict)
    assert all(k.startswith("module.") for k in ck["state_dict"])
    assert len(ck["state_dict"]) == meta["checkpoint"]["state_dict_keys"]
    rec = ck["recorder"]
    assert isinstance(rec, ReleaseRecorderMeter) and rec.module == "main"
    assert isinstance(rec.epoch_losses, np.ndarray) and rec.epoch_losses.shape[0] == rec.total_epoch
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    sd = release_state_dict(ck)
    assert len(sd) == len(ck["state_dict"]) and not any(k.startswith("module.") for k in sd)
    assert sd["prompt_learner1.ctx"].shape == (7, 8, 64)
    # DataParallel keeps the state dict's tensor sharing: the release's shared expert aliases
    a = sd["encoder.transformer.resblocks.0.mlp.shared_fc1.weight"]
    b = sd["encoder.transformer.resblocks.0.mlp.shared_expert.0.weight"]
    assert a.data_ptr() == b.data_ptr()


def test_torch_load_refuses_it_but_we_do_not():
    with pytest.raises(Exception):
        torch.load(FIXTURE, weights_only=True)
    assert load_release_checkpoint(FIXTURE)["epoch"] == 12


@pytest.mark.parametrize("module", ["main", "__main__", "main1"])
def test_round_trip_of_torch_save_values(tmp_path, monkeypatch, module):
    mod, rec_cls = _recorder_named(module)
    if module == "__main__":  # pickle looks the class up by name when saving
        monkeypatch.setattr(sys.modules["__main__"], "RecorderMeter", rec_cls, raising=False)
    else:
        monkeypatch.setitem(sys.modules, module, mod)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    sd = OrderedDict(
        w=torch.nn.Parameter(torch.randn(3, 4, generator=g)),
        t=base.t(),  # non-contiguous view
        row=base[2],  # shares the storage of `t`, with an offset
        half=torch.randn(4, generator=g).half(),
        bf=torch.randn(4, generator=g).bfloat16(),
        idx=torch.arange(7),
        mask=torch.tensor([True, False, True]),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 3),
    )
    sd._metadata = OrderedDict({"": {"version": 1}})  # what nn.Module.state_dict() attaches
    obj = {"state_dict": sd, "epoch": 4, "arr": np.arange(5, dtype=np.int32), "f64": np.float64(0.25),
           "nested": [(1, 2.0, "x"), {"a": None, "b": b"bytes"}], "recorder": rec_cls()}
    path = tmp_path / "ck.pth"
    torch.save(obj, path)
    got = load_release_checkpoint(path)
    for k, v in sd.items():
        assert got["state_dict"][k].dtype == v.dtype, k
        assert torch.equal(got["state_dict"][k], v.detach()), k
    assert got["state_dict"]._metadata == {"": {"version": 1}}
    assert torch.equal(got["state_dict"]["row"], base[2])
    np.testing.assert_array_equal(got["arr"], obj["arr"])
    assert got["f64"] == 0.25 and got["nested"] == obj["nested"] and got["epoch"] == 4
    rec = got["recorder"]
    assert isinstance(rec, ReleaseRecorderMeter) and rec.module == module
    np.testing.assert_array_equal(rec.epoch_losses, np.arange(6, dtype=np.float32).reshape(3, 2))
    assert release_state_dict(got)["idx"].tolist() == list(range(7))


def test_bare_state_dict_with_and_without_dataparallel_prefix(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    torch.save(m.state_dict(), tmp_path / "bare.pth")
    torch.save(torch.nn.DataParallel(m).state_dict(), tmp_path / "dp.pth")
    for name in ("bare.pth", "dp.pth"):
        sd = release_state_dict(load_release_checkpoint(tmp_path / name))
        assert set(sd) == set(m.state_dict())
        for k, v in m.state_dict().items():
            assert torch.equal(sd[k], v)


def test_state_dict_with_non_tensor_values_is_named(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(1), "b": 3}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointFormatError, match=r"\['b'\]"):
        release_state_dict(load_release_checkpoint(tmp_path / "x.pth"))


# ------------------------------------------------------------------------------------------------
# malicious pickles: refused by name, payload never runs
# ------------------------------------------------------------------------------------------------
def test_payload_is_real(tmp_path):
    """Positive control: the exec payload does write its marker when unpickled with pickle."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_Exec(marker)))
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("container", ["torch_zip", "plain_pickle"])
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_malicious_pickle_refused_without_running(tmp_path, name, container):
    marker = tmp_path / "marker"
    cls, pattern = PAYLOADS[name]
    payload = cls(marker)
    obj = {"state_dict": {"w": torch.zeros(2)}, "recorder": payload}
    path = tmp_path / "evil.pth"
    if container == "torch_zip":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps({"recorder": payload}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=rf"refusing to load global {pattern}\b") as err:
        load_release_checkpoint(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_payload_disguised_as_recorder_meter_is_refused(tmp_path):
    """A class pickled as main.RecorderMeter whose reduce calls os.system: the stand-in never runs it."""
    marker = tmp_path / "marker"

    class RecorderMeter(_System):
        pass

    RecorderMeter.__module__ = "main"
    path = tmp_path / "evil.pth"
    torch.save({"recorder": RecorderMeter(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        load_release_checkpoint(path)
    assert not marker.exists()


def _raw_pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


@pytest.mark.parametrize(
    "body, message",
    [
        # torch.Size(()) then BUILD {"x": 1}: refused (only arrays, dtypes, OrderedDict and the stand-in)
        pytest.param(b"ctorch\nSize\n)\x85R}X\x01\x00\x00\x00xK\x01sb", "refusing to set the state of a Size",
                     id="state-of-other-objects"),
        pytest.param(b"ccollections\nOrderedDict\n)R}K\x01K\x02sb", "OrderedDict state",
                     id="ordered-dict-state-must-be-attribute-names"),
        pytest.param(b"c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R", "latin1",
                     id="codecs-encode-only-latin1"),
    ],
)
def test_crafted_pickle_opcodes_are_refused(tmp_path, body, message):
    path = tmp_path / "crafted.pth"
    path.write_bytes(_raw_pickle(body))
    with pytest.raises(UnsafeCheckpointError, match=message):
        load_release_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# damaged files: one clear error
# ------------------------------------------------------------------------------------------------
def test_truncated_file(tmp_path):
    data = FIXTURE.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointFormatError, match="truncated or damaged") as err:
            load_release_checkpoint(path)
        assert "\n" not in str(err.value)


def test_empty_and_foreign_files(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="empty"):
        load_release_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "text.pth").write_text("hello world")
    with pytest.raises(CheckpointFormatError, match="not a torch checkpoint"):
        load_release_checkpoint(tmp_path / "text.pth")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_release_checkpoint(tmp_path / "missing.pth")


def _rewrite_zip(src: Path, dst: Path, edit) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)


def test_truncated_pickle_inside_a_valid_zip(tmp_path):
    dst = tmp_path / "cutpkl.pth"
    _rewrite_zip(FIXTURE, dst, lambda n, d: d[: len(d) // 2] if n.endswith("data.pkl") else d)
    with pytest.raises(CheckpointFormatError, match="truncated or damaged"):
        load_release_checkpoint(dst)


def test_short_or_missing_storage_record(tmp_path):
    short = tmp_path / "short.pth"
    _rewrite_zip(FIXTURE, short, lambda n, d: d[:-4] if n.endswith("/data/0") else d)
    with pytest.raises(CheckpointFormatError, match=r"data/0 has \d+ bytes \(expected"):
        load_release_checkpoint(short)
    gone = tmp_path / "gone.pth"
    _rewrite_zip(FIXTURE, gone, lambda n, d: None if n.endswith("/data/0") else d)
    with pytest.raises(CheckpointFormatError, match="data/0 is missing"):
        load_release_checkpoint(gone)


# ------------------------------------------------------------------------------------------------
# the converter CLI: one-line errors, exit 2, nothing executed
# ------------------------------------------------------------------------------------------------
def _one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "expected" in lines[0] and "got" in lines[0], lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def _convert(capsys, *args: str) -> tuple[int, str]:
    from _testutils import load_example

    rc = load_example("convert_ssm_release").main(list(args))
    return rc, capsys.readouterr().err


@pytest.mark.slow
def test_cli_subprocess_refuses_malicious_pickle(tmp_path):
    """A real process: the payload (os.system) never runs, one line on stderr, exit code 2."""
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "recorder": _System(marker)}, evil)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(CONVERT), str(evil), "--au-dataset", "bp4d", "--exp-dataset", "dfew",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=str(ROOT),
                         timeout=300)
    _one_line_error(res.returncode, res.stderr, "posix.system", "not on the allowlist")
    assert not marker.exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_cli_refuses_every_payload(capsys, tmp_path, name):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"recorder": PAYLOADS[name][0](marker)}, evil)
    rc, err = _convert(capsys, str(evil), "--au-dataset", "bp4d", "--exp-dataset", "dfew", "--out", str(tmp_path / "o"))
    _one_line_error(rc, err, "refusing to load global")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_cli_truncated_and_missing_files(capsys, tmp_path):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(FIXTURE.read_bytes()[:4096])
    out = str(tmp_path / "o")
    rc, err = _convert(capsys, str(cut), "--au-dataset", "bp4d", "--exp-dataset", "dfew", "--out", out)
    _one_line_error(rc, err, "truncated")
    rc, err = _convert(capsys, str(tmp_path / "nope.pth"), "--au-dataset", "bp4d", "--exp-dataset", "dfew", "--out", out)
    _one_line_error(rc, err, "nope.pth")


def test_cli_argument_and_pair_errors(capsys, tmp_path):
    out = str(tmp_path / "o")
    _one_line_error(*_convert(capsys, str(FIXTURE), "--au-dataset", "ck+", "--exp-dataset", "dfew", "--out", out),
                    "expected one of bp4d, disfa, got 'ck+'")
    _one_line_error(*_convert(capsys, str(FIXTURE), "--au-dataset", "bp4d", "--exp-dataset", "dfew", "--out", out,
                              "--dispatch", "smart"), "expected one of release, fixed, got 'smart'")
    _one_line_error(*_convert(capsys, str(FIXTURE), "--au-dataset", "bp4d", "--out", out), "--exp-dataset")
    for bad in ("", "a/b", "../x", ".hidden", "-x", "x."):
        _one_line_error(*_convert(capsys, str(FIXTURE), "--au-dataset", "bp4d", "--exp-dataset", "dfew", "--out", out,
                                  f"--name={bad}"), "--name", "expected a plain file stem", repr(bad))
    _one_line_error(*_convert(capsys, str(FIXTURE), "--au-dataset", "disfa", "--exp-dataset", "dfew", "--out", out),
                    "(expected --au-dataset bp4d, got disfa)")
    _one_line_error(*_convert(capsys, str(FIXTURE), "--au-dataset", "bp4d", "--exp-dataset", "mafw", "--out", out),
                    "expected 11, got 7")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# property: anything torch.save writes from tensors / containers reads back equal
# ------------------------------------------------------------------------------------------------
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool]


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from(_DTYPES),
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    view=st.sampled_from(["plain", "transpose", "slice", "expand"]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(tmp_path_factory, dtype, shape, view, seed):
    g = torch.Generator().manual_seed(seed)
    size = tuple(shape)
    base = (torch.randn(size, generator=g) * 50).to(dtype) if dtype != torch.bool else torch.rand(size, generator=g) > 0.5
    if view == "transpose" and base.dim() >= 2:
        t = base.transpose(0, -1)
    elif view == "slice" and base.dim() >= 1 and base.shape[0] > 1:
        t = base[1:]
    elif view == "expand" and base.dim() >= 1:
        t = base[:1].expand(3, *base.shape[1:]) if base.shape[0] >= 1 else base
    else:
        t = base
    path = tmp_path_factory.mktemp("prop") / "t.pth"
    torch.save({"state_dict": OrderedDict(t=t, base=base), "meta": [shape, view]}, path)
    got = load_release_checkpoint(path)
    assert got["meta"] == [shape, view]
    for key, want in (("t", t), ("base", base)):
        have = got["state_dict"][key]
        assert have.dtype == want.dtype and have.shape == want.shape and have.stride() == want.stride(), key
        assert torch.equal(have, want), key
