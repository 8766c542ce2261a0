"""Manifest parsers/writers, split registry and the validator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from facelayers.data import (
    FORMATS,
    AURecord,
    ExpressionRecord,
    ManifestError,
    ManifestValidationError,
    get_split,
    list_splits,
    parse_frame_index,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from facelayers.facs import BP4D_AUS, DISFA_AUS

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------------------------------------
# the public sample files


def test_read_dfew_sample():
    recs = read_manifest(DATA / "dfew_set_1_train.sample.txt", "dfew")
    assert recs == [
        ExpressionRecord("02522", 66, 5),
        ExpressionRecord("02536", 65, 5),
        ExpressionRecord("02578", 51, 6),
        ExpressionRecord("02581", 27, 5),
        ExpressionRecord("02588", 48, 6),
    ]


def test_read_ferv39k_sample_keeps_nested_paths():
    recs = read_manifest(DATA / "ferv39k_train.sample.txt", "ferv39k")
    assert [r.path for r in recs] == [f"Action/Happy/{c}" for c in ("0267", "0316", "0090", "0220", "0135")]
    assert [r.num_frames for r in recs] == [29, 18, 25, 32, 25]
    assert {r.label for r in recs} == {0}


def test_read_mafw_sample():
    recs = read_manifest(DATA / "mafw_set_1_train.sample.txt", "mafw")
    assert [(r.path, r.num_frames, r.label) for r in recs][:2] == [("03747", 105, 3), ("03785", 110, 3)]
    assert len(recs) == 5


def test_read_bp4d_sample_unpadded_frame_names():
    recs = read_manifest(DATA / "bp4d_train_1f.sample.list", "bp4d")
    assert len(recs) == 8
    first = recs[0]
    assert first == AURecord("2F07_01/768.jpg", "2F07_01", 768, (0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 0, 0))
    # AU order 1,2,4,6,7,10,12,14,15,17,23,24: first line has AU4, AU7, AU10, AU14
    active = [au for au, v in zip(BP4D_AUS, first.labels) if v]
    assert active == [4, 7, 10, 14]
    assert [r.frame_index for r in recs[5:]] == [912, 913, 914]
    assert recs[5].sequence == "2F04_01"


def test_read_disfa_sample_padding_and_unordered_ids():
    recs = read_manifest(DATA / "disfa_test1.sample.jsonl", "disfa")
    assert len(recs) == 9
    assert recs[0] == AURecord("RightVideoSN010/frame_2000.jpg", "RightVideoSN010", 2000, (0,) * 8)
    # [999, 999, 25, 999, 6, 999, 12, 999] -> AU6, AU12, AU25 in DISFA order 1,2,4,6,9,12,25,26
    assert recs[5].frame_index == 783
    assert [au for au, v in zip(DISFA_AUS, recs[5].labels) if v] == [6, 12, 25]
    assert recs[5].labels == (0, 0, 0, 1, 0, 1, 1, 0)


def test_disfa_id_order_does_not_matter(tmp_path):
    p = tmp_path / "a.jsonl"
    lines = [
        {"img_path": "SN001/frame_1.jpg", "AUs": [26, 999, 1, 999, 999, 999, 999, 999]},
        {"img_path": "SN001/frame_2.jpg", "AUs": [1, 26, 999, 999, 999, 999, 999, 999]},
    ]
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    a, b = read_manifest(p, "disfa")
    assert a.labels == b.labels == (1, 0, 0, 0, 0, 0, 0, 1)


@pytest.mark.parametrize(
    "path, expected", [("2F07_01/768.jpg", 768), ("RightVideoSN010/frame_0042.jpg", 42), ("a/b/x12_y7.png", 7)]
)
def test_parse_frame_index(path, expected):
    assert parse_frame_index(path) == expected


def test_unknown_format_lists_valid():
    with pytest.raises(KeyError, match="dfew"):
        read_manifest(DATA / "dfew_set_1_train.sample.txt", "afew")


# ---------------------------------------------------------------------------------------------
# malformed lines: file:line in the error


BAD_LINES = [
    ("dfew", "00001 10 3\n00002 10\n", 2, "expected 3 fields"),
    ("dfew", "00001 ten 3\n", 1, "num_frames must be an integer"),
    ("dfew", "00001 10 3\n\n00003 0 1\n", 3, "num_frames must be >= 1"),
    ("dfew", "00001 10 7\n", 1, r"label must be in \[0, 6\]"),
    ("mafw", "00001 10 11\n", 1, r"label must be in \[0, 10\]"),
    ("ferv39k", "A/B/1 5 -1\n", 1, r"label must be in \[0, 6\]"),
    ("bp4d", "2F07_01/768.jpg 0 0 1\n", 1, "expected 13 fields"),
    ("bp4d", "768.jpg " + "0 " * 12 + "\n", 1, "no sequence folder"),
    ("bp4d", "F/x.jpg " + "0 " * 12 + "\n", 1, "frame number"),
    ("bp4d", "F/1.jpg " + "0 " * 11 + "2\n", 1, "AU24=2"),
    ("disfa", '{"img_path": "SN001/frame_1.jpg", "AUs": [999, 999, 999, 999, 999, 999, 999, 999]}\n'
              '{"img_path": "SN001/frame_2.jpg"\n', 2, "invalid JSON"),
    ("disfa", '{"img_path": "S/frame_1.jpg"}\n', 1, "missing key"),
    ("disfa", '["S/frame_1.jpg", [1]]\n', 1, "expected a JSON object"),
    ("disfa", '{"img_path": "S/frame_1.jpg", "AUs": [5, 999]}\n', 1, r"AU id\(s\) \[5\]"),
    ("disfa", '{"img_path": "S/frame_1.jpg", "AUs": [6, 6]}\n', 1, "more than once"),
    ("disfa", '{"img_path": "S/frame_1.jpg", "AUs": "6"}\n', 1, "list of integers"),
]


@pytest.mark.parametrize("fmt, text, line, msg", BAD_LINES, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_LINES)])
def test_malformed_lines_name_file_and_line(tmp_path, fmt, text, line, msg):
    p = tmp_path / f"bad.{fmt}"
    p.write_text(text)
    with pytest.raises(ManifestError, match=msg) as ei:
        read_manifest(p, fmt)
    assert f"{p}:{line}:" in str(ei.value)
    assert [i.line for i in ei.value.issues] == [line]


def test_all_bad_lines_are_reported(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text("a 1 0\nb 1\nc 1 0\nd x 0\ne 2 99\n")
    with pytest.raises(ManifestError) as ei:
        read_manifest(p, "dfew")
    assert [(i.line, i.kind) for i in ei.value.issues] == [
        (2, "malformed_line"), (4, "malformed_line"), (5, "label_out_of_range")
    ]
    assert isinstance(ei.value, ValueError)


# ---------------------------------------------------------------------------------------------
# round trips (hypothesis)

_name = st.text(alphabet="abcXYZ019_-", min_size=1, max_size=8)


@st.composite
def expression_records(draw, num_classes: int):
    # a manifest has at least one line and lists each clip once (see tests/test_bad_input_data.py)
    n = draw(st.integers(1, 12))
    paths = draw(st.lists(st.lists(_name, min_size=1, max_size=3).map("/".join), min_size=n, max_size=n, unique=True))
    return [
        ExpressionRecord(p, draw(st.integers(1, 10_000)), draw(st.integers(0, num_classes - 1))) for p in paths
    ]


# sequence folders that follow each dataset's subject convention (parse_subject)
_bp4d_seq = st.builds(
    "{}{}{:02d}_{:02d}".format, st.integers(0, 99), st.sampled_from("FMfm"), st.integers(0, 99), st.integers(0, 99)
)
_disfa_seq = st.builds("{}SN{:03d}{}".format, st.sampled_from(["", "RightVideo", "x/LeftVideo"]), st.integers(0, 999),
                       st.sampled_from(["", "_a", "/b"]))


@st.composite
def au_records(draw, m: int, style: str):
    # at least one line; each (sequence, frame) once
    n = draw(st.integers(1, 12))
    keys = draw(st.lists(st.tuples(_bp4d_seq if style == "bp4d" else _disfa_seq, st.integers(0, 10**6)),
                         min_size=n, max_size=n, unique=True))
    out = []
    for seq, idx in keys:
        width = draw(st.integers(0, 6))
        stem = f"{idx:0{width}d}" if style == "bp4d" else f"frame_{idx:0{width}d}"
        labels = tuple(draw(st.lists(st.integers(0, 1), min_size=m, max_size=m)))
        out.append(AURecord(f"{seq}/{stem}.jpg", seq, idx, labels))
    return out


@pytest.mark.parametrize("fmt", ["dfew", "ferv39k", "mafw"])
@given(data=st.data())
def test_expression_round_trip(tmp_path_factory, fmt, data):
    recs = data.draw(expression_records(FORMATS[fmt].num_classes))
    p = tmp_path_factory.mktemp("rt") / "m.txt"
    write_manifest(recs, p, fmt)
    assert read_manifest(p, fmt) == recs


@pytest.mark.parametrize("fmt", ["bp4d", "disfa"])
@given(data=st.data())
def test_au_round_trip(tmp_path_factory, fmt, data):
    recs = data.draw(au_records(len(FORMATS[fmt].aus), fmt))
    p = tmp_path_factory.mktemp("rt") / "m.txt"
    write_manifest(recs, p, fmt)
    assert read_manifest(p, fmt) == recs


def test_disfa_writer_uses_999_padding(tmp_path):
    rec = AURecord("RightVideoSN001/frame_5.jpg", "RightVideoSN001", 5, (1, 0, 0, 1, 0, 0, 0, 1))
    p = write_manifest([rec], tmp_path / "d.jsonl", "disfa")
    assert json.loads(p.read_text()) == {"img_path": rec.path, "AUs": [1, 999, 999, 6, 999, 999, 999, 26]}


def test_sample_files_round_trip_byte_exact(tmp_path):
    for name, fmt in [("dfew_set_1_train.sample.txt", "dfew"), ("bp4d_train_1f.sample.list", "bp4d"),
                      ("ferv39k_train.sample.txt", "ferv39k"), ("mafw_set_1_train.sample.txt", "mafw")]:
        out = write_manifest(read_manifest(DATA / name, fmt), tmp_path / name, fmt)
        assert out.read_text() == (DATA / name).read_text(), name


@pytest.mark.parametrize(
    "fmt, rec, exc, msg",
    [
        ("dfew", ExpressionRecord("a b", 3, 0), ValueError, "whitespace"),
        ("dfew", ExpressionRecord("a", 3, 7), ValueError, "label"),
        ("mafw", AURecord("S/1.jpg", "S", 1, (0,) * 12), TypeError, "ExpressionRecord"),
        ("bp4d", AURecord("S/1.jpg", "S", 1, (0,) * 8), ValueError, "expected 12 labels"),
        ("bp4d", AURecord("S/1.jpg", "T", 1, (0,) * 12), ValueError, "sequence"),
        ("disfa", AURecord("S/frame_1.jpg", "S", 2, (0,) * 8), ValueError, "frame 1"),
        ("disfa", AURecord("S/frame_1.jpg", "S", 1, (2,) + (0,) * 7), ValueError, "0 or 1"),
    ],
)
def test_writer_rejects_unrepresentable_records(tmp_path, fmt, rec, exc, msg):
    with pytest.raises(exc, match=msg):
        write_manifest([rec], tmp_path / "x", fmt)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# split registry


def test_split_registry_counts_and_numbering():
    counts = {d: len(list_splits(d)) for d in FORMATS}
    assert counts == {"dfew": 10, "mafw": 10, "ferv39k": 2, "bp4d": 6, "disfa": 6}
    assert all(s.numbering == "ssm_release" for s in list_splits())
    s = get_split("bp4d", 2, "test")
    assert s.relpath == "bp4d/test_2f_data.list" and s.id == "bp4d/ssm_release/fold2/test"
    assert get_split("disfa", 3, "train").relpath == "disfa/DISFA_train3.json"
    assert get_split("ferv39k", None, "train").relpath == "emotion/FERV39K/FERV39K_train.txt"
    assert get_split("mafw", 5, "test").relpath == "emotion/MAFW/MAFW_set_5_test.txt"


def test_split_unknown_fold_lists_valid():
    with pytest.raises(KeyError, match="fold"):
        get_split("bp4d", 4, "train")
    with pytest.raises(KeyError):
        get_split("dfew", 1, "val")


def test_split_read(tmp_path):
    s = get_split("dfew", 1, "train")
    s.path(tmp_path).parent.mkdir(parents=True)
    s.path(tmp_path).write_text((DATA / "dfew_set_1_train.sample.txt").read_text())
    assert len(s.read(tmp_path)) == 5


# ---------------------------------------------------------------------------------------------
# validator


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)


def test_validator_expression_problems(tmp_path):
    root = tmp_path / "frames"
    for i in range(3):
        _img(root / "ok" / f"{i}.jpg")
        _img(root / "short" / f"{i}.jpg")
    (root / "empty").mkdir()
    m = tmp_path / "m.txt"
    m.write_text("ok 3 0\nshort 5 1\nmissing 4 2\nempty 2 0\nbad line\nok 3 9\n")
    rep = validate_manifest(m, "dfew", root)
    assert rep.counts() == {
        "frame_count_mismatch": 1, "missing_frame_folder": 1, "empty_frame_folder": 1,
        "malformed_line": 1, "label_out_of_range": 1,
    }
    assert [i.line for i in rep.issues] == [2, 3, 4, 5, 6]
    (mismatch,) = rep.by_kind("frame_count_mismatch")
    assert mismatch.path == "short" and "says 5" in mismatch.message and "holds 3" in mismatch.message
    assert f"{m}:5: malformed_line" in str(rep)
    assert not rep.ok and rep.num_lines == 6 and rep.num_records == 4
    with pytest.raises(ManifestValidationError, match="frame_count_mismatch=1") as ei:
        validate_manifest(m, "dfew", root, strict=True)
    assert ei.value.report.counts() == rep.counts()


def test_validator_au_problems(tmp_path):
    root = tmp_path / "imgs"
    _img(root / "SN001" / "frame_1.jpg")
    pad = [999] * 7
    lines = [
        {"img_path": "SN001/frame_1.jpg", "AUs": [999] + pad},
        {"img_path": "SN001/frame_2.jpg", "AUs": [1] + pad},
        {"img_path": "SN001/frame_01.jpg", "AUs": [2] + pad},
        {"img_path": "SN001/frame_3.jpg", "AUs": [3] + pad},
    ]
    m = tmp_path / "d.jsonl"
    m.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rep = validate_manifest(m, "disfa", root)
    assert [(i.kind, i.line) for i in rep.issues] == [
        ("missing_frame_file", 2), ("duplicate_frame", 3), ("missing_frame_file", 3), ("label_out_of_range", 4)
    ]
    assert "line 1" in rep.by_kind("duplicate_frame")[0].message


def test_validator_clean_and_without_root(tmp_path):
    root = tmp_path / "f"
    for i in range(2):
        _img(root / "c" / f"{i:03d}.png")
    m = tmp_path / "m.txt"
    m.write_text("c 2 4\n")
    assert validate_manifest(m, "ferv39k", root, strict=True).ok
    rep = validate_manifest(DATA / "bp4d_train_1f.sample.list", "bp4d")
    assert rep.ok and rep.num_records == 8 and rep.root is None
    with pytest.raises(KeyError):
        rep.by_kind("nope")


def test_validator_command_line(tmp_path, capsys):
    from facelayers.data.validate import main

    assert main([str(DATA / "dfew_set_1_train.sample.txt"), "dfew"]) == 0
    assert "5/5 lines parsed, 0 issue(s)" in capsys.readouterr().out
    assert main([str(DATA / "dfew_set_1_train.sample.txt"), "dfew", str(tmp_path)]) == 1
    assert "missing_frame_folder=5" in capsys.readouterr().out
