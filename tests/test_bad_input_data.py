"""Bad input to the data layer: every case is a clear error naming what was expected and what came.

Covers issue 15's data-layer part: subjects parsed by each dataset's convention (the BP4D subject
leak), repeated clips/frames, paths outside the dataset root, non-ASCII numbers, DISFA ``AUs``
lists of the wrong length, non-integer counts given to the writer, undecodable and empty files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facelayers.data import (
    AURecord,
    ExpressionRecord,
    ManifestError,
    group_by_subject,
    parse_subject,
    read_manifest,
    subject_split,
    validate_manifest,
    write_manifest,
)

DATA = Path(__file__).parent / "data"
ZEROS12 = " ".join(["0"] * 12)
PAD = [999] * 8


def _bp4d(lines: list[str]) -> str:
    return "".join(f"{p} {ZEROS12}\n" for p in lines)


def _disfa(paths: list[str], aus: list[int] | None = None) -> str:
    return "".join(json.dumps({"img_path": p, "AUs": aus or PAD}) + "\n" for p in paths)


def _read_error(tmp_path: Path, fmt: str, text: str | bytes) -> tuple[Path, ManifestError]:
    p = tmp_path / f"m.{fmt}"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError) as ei:
        read_manifest(p, fmt)
    return p, ei.value


# ---------------------------------------------------------------------------------------------
# subjects (the BP4D validation-split leak: the whole folder name is not the subject)


@pytest.mark.parametrize(
    "sequence, fmt, subject",
    [
        ("2F07_07", "bp4d", "F07"),
        ("2F07_01", "bp4d", "F07"),
        ("2M18_10", "bp4d", "M18"),
        ("12f03_01", "bp4d", "F03"),  # letters are case-insensitive, returned upper-case
        ("Images/2F23_10", "bp4d", "F23"),  # the last folder carries the convention
        ("RightVideoSN010", "disfa", "SN010"),
        ("LeftVideoSN001_comp", "disfa", "SN001"),
        ("aligned/rightvideosn027", "disfa", "SN027"),
    ],
)
def test_parse_subject_by_dataset_convention(sequence, fmt, subject):
    assert parse_subject(sequence, fmt) == subject


def test_sample_records_carry_their_subject():
    bp4d = read_manifest(DATA / "bp4d_train_1f.sample.list", "bp4d")
    assert [r.subject for r in bp4d] == ["F07"] * 5 + ["F04"] * 3
    disfa = read_manifest(DATA / "disfa_test1.sample.jsonl", "disfa")
    assert {r.subject for r in disfa} == {"SN010"}


def test_two_tasks_of_one_person_are_one_subject(tmp_path):
    p = tmp_path / "m.list"
    p.write_text(_bp4d(["2F07_01/1.jpg", "2F07_07/1.jpg", "2M02_01/1.jpg"]))
    groups = group_by_subject(read_manifest(p, "bp4d"))
    assert {k: [r.sequence for r in v] for k, v in groups.items()} == {
        "F07": ["2F07_01", "2F07_07"], "M02": ["2M02_01"]
    }


def test_subject_split_never_shares_a_subject(tmp_path):
    """The released list has every subject in several task folders; grouping by folder leaked."""
    paths = [f"2{g}{n:02d}_{t:02d}/{f}.jpg" for g in "FM" for n in range(1, 6) for t in (1, 3, 7) for f in (1, 2)]
    p = tmp_path / "train.list"
    p.write_text(_bp4d(paths))
    recs = read_manifest(p, "bp4d")
    for seed in range(5):
        train, val = subject_split(recs, 0.3, seed=seed)
        assert len(train) + len(val) == len(recs)
        tr_subjects, va_subjects = {r.subject for r in train}, {r.subject for r in val}
        assert len(va_subjects) == 3 and not tr_subjects & va_subjects, (tr_subjects, va_subjects)
        # every task folder of a held-out person is held out with it
        assert {r.sequence[1:4] for r in val} == va_subjects
    again = subject_split(recs, 0.3, seed=4)
    assert again == subject_split(recs, 0.3, seed=4)
    assert [r.path for r in again[0]] == [r.path for r in recs if r in again[0]]  # input order kept


def test_subject_split_of_hand_built_records_needs_a_format():
    recs = [AURecord(f"2F0{i}_01/1.jpg", f"2F0{i}_01", 1, (0,)) for i in range(1, 5)]
    with pytest.raises(ValueError, match=r"has no subject \(expected a record from read_manifest.*got subject=None\)"):
        group_by_subject(recs)
    train, val = subject_split(recs, 0.25, seed=0, format="bp4d")
    assert len(val) == 1 and len(train) == 3
    with pytest.raises(ValueError, match=r"record 0: BP4D sequence folder .*got 'T1'"):
        group_by_subject([AURecord("F001/T1/1.jpg", "F001/T1", 1, (0,))], format="bp4d")
    with pytest.raises(TypeError, match="expected an AURecord, got ExpressionRecord"):
        group_by_subject([ExpressionRecord("a", 1, 0)])


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, True, "0.2"])
def test_subject_split_rejects_bad_fraction(fraction):
    recs = [AURecord(f"2F0{i}_01/1.jpg", f"2F0{i}_01", 1, (0,), f"F0{i}") for i in range(1, 4)]
    msg = rf"val_fraction must be a number in \(0, 1\) \(expected e.g. 0.15, got {fraction!r}\)"
    with pytest.raises(ValueError, match=msg):
        subject_split(recs, fraction)


def test_subject_split_needs_two_subjects():
    recs = [AURecord(f"2F01_0{t}/1.jpg", f"2F01_0{t}", 1, (0,), "F01") for t in range(1, 4)]
    with pytest.raises(ValueError, match=r"at least 2 subjects \(expected >= 2, got 1: \['F01'\]\)"):
        subject_split(recs, 0.5)


@pytest.mark.parametrize(
    "path, got",
    [
        ("F001/T1/1.jpg", "'T1'"),  # the original BP4D layout is not the split files' convention
        ("S001_T1/1.jpg", "'S001_T1'"),
        ("2F7_01/1.jpg", "'2F7_01'"),
        ("2F07_1/1.jpg", "'2F07_1'"),
        ("2X07_01/1.jpg", "'2X07_01'"),
        ("F07_01/1.jpg", "'F07_01'"),
        ("2F07_01a/1.jpg", "'2F07_01a'"),
        ("2F\u0660\u0667_01/1.jpg", "'2F\u0660\u0667_01'"),  # Arabic-Indic digits
    ],
)
def test_bp4d_folder_off_convention_is_an_error(tmp_path, path, got):
    p, err = _read_error(tmp_path, "bp4d", _bp4d(["2F07_01/1.jpg", path]))
    assert [(i.kind, i.line) for i in err.issues] == [("bad_subject", 2)]
    assert f"{p}:2:" in str(err)
    assert "expected e.g. '2F07_01'" in str(err) and f"got {got}" in str(err)


@pytest.mark.parametrize(
    "path, got",
    [("Video1/frame_1.jpg", "got 'Video1'"), ("SN0101/frame_1.jpg", "got 'SN0101'"),
     ("SN001/RightVideoSN002/frame_1.jpg", "several ids ['SN001', 'SN002']"), ("SN01/frame_1.jpg", "got 'SN01'")],
)
def test_disfa_folder_off_convention_is_an_error(tmp_path, path, got):
    p, err = _read_error(tmp_path, "disfa", _disfa(["SN001/frame_1.jpg", path]))
    assert [(i.kind, i.line) for i in err.issues] == [("bad_subject", 2)]
    assert f"{p}:2:" in str(err) and "expected e.g. 'RightVideoSN010'" in str(err) and got in str(err)


def test_parse_subject_rejects_wrong_arguments():
    with pytest.raises(TypeError, match=r"AU formats \['bp4d', 'disfa'\], got 'dfew'"):
        parse_subject("02522", "dfew")
    with pytest.raises(TypeError, match="sequence must be a str .* got int"):
        parse_subject(7, "bp4d")
    with pytest.raises(KeyError, match="expected one of"):
        parse_subject("2F07_01", "bp4e")


def test_writer_checks_the_subject(tmp_path):
    ok = AURecord("2F07_01/1.jpg", "2F07_01", 1, (0,) * 12, subject="F07")
    back = read_manifest(write_manifest([ok], tmp_path / "a.list", "bp4d"), "bp4d")
    assert back == [ok] and back[0].subject == "F07"
    with pytest.raises(ValueError, match=r"record 0: path '2F07_01/1.jpg' gives subject 'F07' .* record says 'F7'"):
        write_manifest([AURecord("2F07_01/1.jpg", "2F07_01", 1, (0,) * 12, subject="F7")], tmp_path / "b", "bp4d")
    with pytest.raises(ValueError, match=r"record 0: BP4D sequence folder .*got 'S1'"):
        write_manifest([AURecord("S1/1.jpg", "S1", 1, (0,) * 12)], tmp_path / "c", "bp4d")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------
# a clip or frame listed twice


def test_expression_clip_listed_twice_with_other_contents(tmp_path):
    p, err = _read_error(tmp_path, "dfew", "a 3 0\nb 4 1\na 5 0\n")
    (issue,) = err.issues
    assert (issue.kind, issue.line) == ("duplicate_clip", 3)
    msg = str(err)
    assert f"{p}:3:" in msg and f"{p}:1" in msg
    assert "expected num_frames=3 label=0" in msg and "got num_frames=5 label=0" in msg


def test_au_frame_listed_twice_with_other_labels_or_file(tmp_path):
    text = "2F07_01/1.jpg " + ZEROS12 + "\n2F07_01/1.jpg " + ZEROS12[:-1] + "1\n2F07_01/01.jpg " + ZEROS12 + "\n"
    p, err = _read_error(tmp_path, "bp4d", text)
    assert [(i.kind, i.line) for i in err.issues] == [("duplicate_frame", 2), ("duplicate_frame", 3)]
    msg = str(err)
    assert f"{p}:2: frame 1 of sequence '2F07_01'" in msg and f"{p}:1" in msg
    assert "expected path='2F07_01/1.jpg' labels=(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)" in msg
    assert "got path='2F07_01/01.jpg'" in msg and "labels=(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)" in msg


def test_disfa_frame_listed_twice(tmp_path):
    text = _disfa(["SN001/frame_1.jpg"]) + _disfa(["SN001/frame_1.jpg"], [6] + [999] * 7)
    p, err = _read_error(tmp_path, "disfa", text)
    assert [(i.kind, i.line) for i in err.issues] == [("duplicate_frame", 2)]
    assert f"{p}:1" in str(err) and "got path='SN001/frame_1.jpg' labels=(0, 0, 0, 1, 0, 0, 0, 0)" in str(err)


def test_identical_repeat_is_kept_with_a_warning_and_reported(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text("a 3 0\nb 4 1\na 3 0\n")
    with pytest.warns(UserWarning, match=rf"{p}:3: clip 'a' is listed again, identical to {p}:1"):
        recs = read_manifest(p, "dfew")
    assert [r.path for r in recs] == ["a", "b", "a"]  # nothing dropped
    rep = validate_manifest(p, "dfew")
    assert [(i.kind, i.line) for i in rep.issues] == [("duplicate_clip", 3)]
    assert "identical to line 1" in rep.issues[0].message


def test_validator_reports_conflicting_repeats(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text("a 3 0\na/ 3 2\n")  # the same folder spelled with a trailing slash
    rep = validate_manifest(p, "dfew")
    assert [(i.kind, i.line) for i in rep.issues] == [("duplicate_clip", 2)]
    assert "expected num_frames=3 label=0 as there, got num_frames=3 label=2" in rep.issues[0].message


def test_writer_refuses_conflicting_repeats(tmp_path):
    recs = [ExpressionRecord("a", 3, 0), ExpressionRecord("a", 3, 1)]
    with pytest.raises(ValueError, match=r"record 1: clip 'a' .* than record 0 \(expected num_frames=3 label=0"):
        write_manifest(recs, tmp_path / "m.txt", "dfew")
    assert not (tmp_path / "m.txt").exists()


# ---------------------------------------------------------------------------------------------
# paths must stay inside the dataset root


@pytest.mark.parametrize(
    "fmt, text, expected",
    [
        ("dfew", "/data/DFEW/02522 3 0\n", "got absolute path '/data/DFEW/02522'"),
        ("dfew", "C:\\DFEW\\02522 3 0\n", "got absolute path 'C:\\\\DFEW\\\\02522'"),
        ("ferv39k", "../Action/Happy/1 3 0\n", "expected no '..' component, got '../Action/Happy/1'"),
        ("mafw", "a/../../b 3 0\n", "expected no '..' component, got 'a/../../b'"),
        ("bp4d", f"/abs/2F07_01/1.jpg {ZEROS12}\n", "got absolute path '/abs/2F07_01/1.jpg'"),
        ("bp4d", f"..\\2F07_01\\1.jpg {ZEROS12}\n", "expected no '..' component"),
        ("disfa", _disfa(["../SN001/frame_1.jpg"]), "got '../SN001/frame_1.jpg'"),
    ],
)
def test_paths_outside_the_root_are_refused(tmp_path, fmt, text, expected):
    p, err = _read_error(tmp_path, fmt, text)
    assert [(i.kind, i.line) for i in err.issues] == [("unsafe_path", 1)]
    assert f"{p}:1:" in str(err) and expected in str(err)
    assert validate_manifest(p, fmt).counts() == {"unsafe_path": 1}


@pytest.mark.parametrize("path", ["/abs/clip", "../clip", "a/../../clip"])
def test_writer_refuses_paths_outside_the_root(tmp_path, path):
    with pytest.raises(ValueError, match=rf"record 0: path must .*got .*{path!r}"):
        write_manifest([ExpressionRecord(path, 3, 0)], tmp_path / "m.txt", "dfew")


# ---------------------------------------------------------------------------------------------
# numbers: ASCII digits only


def test_python_int_accepts_what_a_manifest_must_not():
    # why the parser checks the characters itself
    assert int("1_44") == 144 and int("\u0663") == 3 and int("+3") == 3


@pytest.mark.parametrize(
    "fmt, text, what, token",
    [
        ("dfew", "a 1_44 0\n", "num_frames", "1_44"),
        ("dfew", "a 3 0_1\n", "label", "0_1"),
        ("dfew", "a \u0663 0\n", "num_frames", "\u0663"),
        ("mafw", "a 12 \u0661\n", "label", "\u0661"),
        ("ferv39k", "a/b/c +3 0\n", "num_frames", "+3"),
        ("bp4d", "2F07_01/1.jpg 0_1" + " 0" * 11 + "\n", "label of AU1", "0_1"),
        ("bp4d", "2F07_01/1.jpg" + " 0" * 11 + " \u0661\n", "label of AU24", "\u0661"),
    ],
)
def test_numbers_must_be_ascii_digits(tmp_path, fmt, text, what, token):
    p, err = _read_error(tmp_path, fmt, text)
    assert [(i.kind, i.line) for i in err.issues] == [("malformed_line", 1)]
    assert f"{p}:1: {what} must be an integer (expected ASCII digits 0-9 such as '12', got {token!r})" in str(err)


@pytest.mark.parametrize("name", ["\u0663.jpg", "1\u0663.jpg", "frame_\u0967\u0968.jpg"])
def test_frame_numbers_must_be_ascii_digits(tmp_path, name):
    p, err = _read_error(tmp_path, "bp4d", _bp4d([f"2F07_01/{name}"]))
    assert f"{p}:1:" in str(err) and "expected ASCII digits 0-9 in the file name, got non-ASCII digit(s)" in str(err)


# ---------------------------------------------------------------------------------------------
# DISFA lines


@pytest.mark.parametrize("aus", [[1, 999], [999] * 7, [999] * 9, []])
def test_disfa_au_list_of_wrong_length(tmp_path, aus):
    p, err = _read_error(tmp_path, "disfa", _disfa(["SN001/frame_1.jpg"], aus) if aus else
                         json.dumps({"img_path": "SN001/frame_1.jpg", "AUs": []}) + "\n")
    assert [(i.kind, i.line) for i in err.issues] == [("malformed_line", 1)]
    assert f"{p}:1:" in str(err) and f"(expected 8 entries, got {len(aus)}: {aus!r})" in str(err)


def test_disfa_repeated_json_key(tmp_path):
    text = '{"img_path": "SN001/frame_1.jpg", "AUs": [999, 999, 999, 999, 999, 999, 999, 999], "AUs": [1]}\n'
    p, err = _read_error(tmp_path, "disfa", text)
    assert f"{p}:1: key(s) ['AUs'] appear more than once" in str(err)


# ---------------------------------------------------------------------------------------------
# writer: integer fields are ints


@pytest.mark.parametrize(
    "rec, what, got",
    [
        (ExpressionRecord("a", 3.0, 0), "num_frames", "float 3.0"),  # type: ignore[arg-type]
        (ExpressionRecord("a", True, 0), "num_frames", "bool True"),  # type: ignore[arg-type]
        (ExpressionRecord("a", "3", 0), "num_frames", "str '3'"),  # type: ignore[arg-type]
        (ExpressionRecord("a", 3, 1.0), "label", "float 1.0"),  # type: ignore[arg-type]
    ],
)
def test_writer_refuses_non_integer_counts(tmp_path, rec, what, got):
    with pytest.raises(TypeError, match=rf"record 0: {what} must be an int \(expected an integer, got {got}\)"):
        write_manifest([rec], tmp_path / "m.txt", "dfew")
    assert not (tmp_path / "m.txt").exists()


def test_writer_refuses_non_integer_au_fields(tmp_path):
    with pytest.raises(TypeError, match=r"frame_index must be an int \(expected an integer, got str '1'\)"):
        bad = AURecord("2F07_01/1.jpg", "2F07_01", "1", (0,) * 12)  # type: ignore[arg-type]
        write_manifest([bad], tmp_path / "a", "bp4d")
    with pytest.raises(TypeError, match=r"each AU label must be an int \(expected an integer, got bool True\)"):
        write_manifest([AURecord("2F07_01/1.jpg", "2F07_01", 1, (True,) + (0,) * 11)], tmp_path / "a", "bp4d")


def test_writer_accepts_numpy_integers(tmp_path):
    rec = ExpressionRecord("a", np.int64(3), np.int32(1))  # type: ignore[arg-type]
    assert (write_manifest([rec], tmp_path / "m.txt", "dfew")).read_text() == "a 3 1\n"


# ---------------------------------------------------------------------------------------------
# encoding and empty files


def test_undecodable_line_names_file_and_line(tmp_path):
    p, err = _read_error(tmp_path, "dfew", b"a 3 0\nb\xff\xfe 3 0\nc 3 0\n")
    assert [(i.kind, i.line) for i in err.issues] == [("malformed_line", 2)]
    assert f"{p}:2: line is not valid UTF-8 (expected UTF-8 text, got byte(s) ff at byte 2)" in str(err)


def test_utf16_file_is_refused_and_bom_is_accepted(tmp_path):
    p, err = _read_error(tmp_path, "dfew", "a 3 0\n".encode("utf-16"))
    assert err.issues[0].line == 1 and "not valid UTF-8" in str(err)
    q = tmp_path / "bom.txt"
    q.write_bytes(b"\xef\xbb\xbfa 3 0\n")
    assert read_manifest(q, "dfew") == [ExpressionRecord("a", 3, 0)]


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_manifest_names_the_file(tmp_path, text):
    p, err = _read_error(tmp_path, "bp4d", text)
    assert [(i.kind, i.line) for i in err.issues] == [("empty_manifest", 0)]
    assert f"{p}: no records (expected at least one bp4d line" in str(err) and "got an empty file" in str(err)
    rep = validate_manifest(p, "bp4d")
    assert rep.counts() == {"empty_manifest": 1} and f"{p}: empty_manifest:" in str(rep)


def test_writer_refuses_no_records(tmp_path):
    with pytest.raises(ValueError, match=r"no records to write to .*m.txt \(expected at least one, got none\)"):
        write_manifest([], tmp_path / "m.txt", "dfew")
    assert not (tmp_path / "m.txt").exists()


# ---------------------------------------------------------------------------------------------
# command line


def test_command_line_bad_files_give_one_error_line(tmp_path, capsys):
    from facelayers.data.validate import main

    assert main([str(tmp_path / "nope.txt"), "dfew"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read manifest") and "nope.txt" in err and "Traceback" not in err
    (tmp_path / "m.txt").write_text("a 3 0\n")
    assert main([str(tmp_path / "m.txt"), "dfew", str(tmp_path / "m.txt")]) == 2
    assert "is not a folder (expected the dataset root)" in capsys.readouterr().err
