"""``--pretrained FILE`` of the reference script never runs code from the file: open_clip loads it
with ``torch.load(weights_only=True)``, whose unpickler refuses any callable but tensors and
containers. A pickle whose payload would write a marker file is refused with one ``error:`` line
and exit code 2, and the marker never appears."""

from __future__ import annotations

import pickle

from _testutils import load_example, one_thread  # noqa: F401  (autouse: one intra-op thread)

R = load_example("ssm_reference")


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_pretrained_pickle_payload_never_runs(tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "weights.pt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": _Payload(str(marker))}, f, protocol=2)
    rc = R.main(["--backbone", "ViT-B-32", "--pretrained", str(evil), "--quick", "--out", str(tmp_path / "run"),
                 "--no-progress", "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 2
    assert not marker.exists()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "could not load weights" in lines[0] and str(evil) in lines[0], err
    assert "Traceback" not in err
    # control: the same payload does run when unpickled without restriction (the test can fail)
    with open(evil, "rb") as f:
        pickle.load(f)  # noqa: S301  (our own file, in a temporary folder)
    assert marker.exists()
