"""Manifest parsers and writers for the public DFER and AU split files.

Five line formats are supported (samples of each are in ``tests/data/``):

========== ============================================ ===========================================
format     one line                                     record
========== ============================================ ===========================================
dfew       ``frame_dir num_frames label``               :class:`ExpressionRecord` (7 classes)
ferv39k    ``Scene/Class/clip num_frames label``        :class:`ExpressionRecord` (7 classes)
mafw       ``frame_dir num_frames label``               :class:`ExpressionRecord` (11 classes)
bp4d       ``Subject_Task/frame.jpg b1 ... b12``        :class:`AURecord` (AUs 1,2,4,6,7,10,12,14,15,17,23,24)
disfa      ``{"img_path": "...", "AUs": [6, 999, ...]}`` :class:`AURecord` (AUs 1,2,4,6,9,12,25,26)
========== ============================================ ===========================================

Expression labels are 0-based in the order of :data:`facelayers.facs.EXPRESSIONS_7` /
:data:`facelayers.facs.EXPRESSIONS_11`. AU labels are tuples of 0/1 in the order of
:data:`facelayers.facs.BP4D_AUS` / :data:`facelayers.facs.DISFA_AUS`. DISFA lines list the *active*
AU ids in arbitrary slots, padded with ``999``.

AU records carry the subject they show (:attr:`AURecord.subject`), parsed from the sequence
folder by the dataset's convention (:func:`parse_subject`): BP4D ``<prefix><F|M><NN>_<task>``
(``2F07_01`` -> ``F07``), DISFA ``...SN<NNN>...`` (``RightVideoSN010`` -> ``SN010``).
:func:`group_by_subject` groups records by it.

Parsing is strict: paths must be relative and stay inside the dataset root, numbers are ASCII
digits, DISFA ``AUs`` lists have one slot per vocabulary AU, a clip or frame listed twice with
different contents is an error, and an empty file is an error. Every problem is reported as
``file:line: reason (expected ..., got ...)``.

Split identifiers (:class:`Split`, :func:`get_split`, :func:`list_splits`) name the fold files of
the released SSM experiments (repository ``MSA-LMC/SSM``, folder ``splits/``) and say that their
numbering is that release's.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal, Union

from facelayers.facs import BP4D_AUS, DISFA_AUS, EXPRESSIONS_7, EXPRESSIONS_11

__all__ = [
    "AURecord",
    "ExpressionRecord",
    "FORMATS",
    "ManifestError",
    "ManifestFormat",
    "ManifestIssue",
    "SPLITS",
    "Split",
    "get_format",
    "get_split",
    "group_by_subject",
    "iter_manifest",
    "list_splits",
    "parse_frame_index",
    "parse_subject",
    "read_manifest",
    "write_manifest",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The padding value of DISFA ``AUs`` lists.
DISFA_PADDING = 999


@dataclass(frozen=True)
class ExpressionRecord:
    """One clip of an expression manifest (DFEW, FERV39K, MAFW).

    Attributes:
        path: Frame folder (or video file) as written in the manifest, relative to the dataset root.
        num_frames: Frame count stated by the manifest (may disagree with the disk; see
            :func:`facelayers.data.validate_manifest`).
        label: 0-based class index.
    """

    path: str
    num_frames: int
    label: int


@dataclass(frozen=True)
class AURecord:
    """One labelled frame of an AU manifest (BP4D, DISFA).

    Attributes:
        path: Image path as written in the manifest, relative to the dataset root.
        sequence: The folder part of ``path`` (one video / subject-task sequence).
        frame_index: Integer frame number: the last run of digits in the file stem
            (``768.jpg`` -> 768, ``frame_2000.jpg`` -> 2000).
        labels: 0/1 per AU, in the dataset's AU vocabulary order.
        subject: The person shown, parsed from ``sequence`` by the dataset's convention
            (:func:`parse_subject`: BP4D ``2F07_01`` -> ``"F07"``, DISFA ``RightVideoSN010`` ->
            ``"SN010"``). :func:`read_manifest` always fills it; a record built by hand may leave
            it ``None``. It is derived from ``path``, so it takes no part in ``==``.
    """

    path: str
    sequence: str
    frame_index: int
    labels: tuple[int, ...]
    subject: str | None = field(default=None, compare=False)


Record = Union[ExpressionRecord, AURecord]


@dataclass(frozen=True)
class ManifestFormat:
    """Description of one manifest line format.

    Attributes:
        name: Format key (``"dfew"``, ...).
        kind: ``"expression"`` (clip-level class label) or ``"au"`` (frame-level AU labels).
        classes: Expression names in label order (expression formats), else ``None``.
        aus: AU codes in label order (AU formats), else ``None``.
        line: Human-readable line layout.
        subject: Human-readable subject convention of the sequence folders (AU formats), else
            ``None``; :func:`parse_subject` applies it.
    """

    name: str
    kind: Literal["expression", "au"]
    classes: tuple[str, ...] | None
    aus: tuple[int, ...] | None
    line: str
    subject: str | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)


#: The five supported manifest formats, keyed by name.
FORMATS: dict[str, ManifestFormat] = {
    "dfew": ManifestFormat("dfew", "expression", EXPRESSIONS_7, None, "frame_dir num_frames label"),
    "ferv39k": ManifestFormat("ferv39k", "expression", EXPRESSIONS_7, None, "Scene/Class/clip num_frames label"),
    "mafw": ManifestFormat("mafw", "expression", EXPRESSIONS_11, None, "frame_dir num_frames label"),
    "bp4d": ManifestFormat(
        "bp4d", "au", None, BP4D_AUS, "Sequence/frame.jpg " + " ".join(f"b{i + 1}" for i in range(len(BP4D_AUS))),
        "sequence folder '<prefix digits><F|M><2 digits>_<2 digits task>' such as '2F07_01' (subject 'F07')",
    ),
    "disfa": ManifestFormat(
        "disfa", "au", None, DISFA_AUS, '{"img_path": "Sequence/frame_N.jpg", "AUs": [active ids, 999 padding]}',
        "sequence folder containing 'SN<3 digits>' such as 'RightVideoSN010' (subject 'SN010')",
    ),
}


class ManifestError(ValueError):
    """A manifest could not be parsed or written; the message names ``file:line`` for each problem."""

    def __init__(self, message: str, issues: Sequence[ManifestIssue] = ()) -> None:
        super().__init__(message)
        self.issues = list(issues)


@dataclass(frozen=True)
class ManifestIssue:
    """One problem found while parsing a manifest line.

    Attributes:
        kind: ``"malformed_line"``, ``"label_out_of_range"``, ``"unsafe_path"`` (absolute, or
            leaves the dataset root), ``"bad_subject"`` (sequence folder off the dataset's subject
            convention), ``"duplicate_clip"`` / ``"duplicate_frame"`` (listed again with different
            contents) or ``"empty_manifest"`` (``line`` 0: the whole file).
        file: Manifest path.
        line: 1-based line number (0 for a problem of the whole file).
        message: What was expected and what was found.
    """

    kind: str
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        where = self.file if self.line == 0 else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


def get_format(format: str) -> ManifestFormat:
    """Return the :class:`ManifestFormat` called ``format`` (case-insensitive).

    Raises:
        KeyError: for an unknown name; the message lists the valid ones.
    """
    if not isinstance(format, str):
        raise TypeError(f"format must be a str (expected one of {sorted(FORMATS)}, got {type(format).__name__})")
    key = format.lower()
    if key not in FORMATS:
        raise KeyError(f"unknown manifest format {format!r} (expected one of {sorted(FORMATS)}, got {format!r})")
    return FORMATS[key]


_DIGITS = re.compile(r"[0-9]+")  # ASCII only: ``\d`` would also take other scripts' digits
_ASCII_DIGITS = frozenset("0123456789")


def _non_ascii_digits(text: str) -> list[str]:
    return sorted({c for c in text if c.isdigit() and c not in _ASCII_DIGITS})


def parse_frame_index(path: str) -> int:
    """Frame number of an image path: the last run of ASCII digits in the file stem.

    ``"2F07_01/768.jpg"`` -> 768, ``"RightVideoSN010/frame_0042.jpg"`` -> 42.

    Raises:
        ValueError: if the stem has no digits, or has digits of another script (``'٣'``).
    """
    return _frame_index_of_stem(PurePosixPath(path.replace("\\", "/")).stem, path)


def _frame_index_of_stem(stem: str, path: str) -> int:
    odd = _non_ascii_digits(stem)
    if odd:
        raise ValueError(
            f"cannot read a frame number from {path!r}: expected ASCII digits 0-9 in the file name, "
            f"got non-ASCII digit(s) {odd}"
        )
    numbers_ = _DIGITS.findall(stem)
    if not numbers_:
        raise ValueError(f"cannot read a frame number from {path!r}: expected digits in the file name")
    return int(numbers_[-1])


_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")


def _check_relative_path(path: str) -> str | None:
    """Reason why ``path`` cannot be a manifest path, or ``None``. Manifest paths are resolved as
    ``root / path``; an absolute path or a ``..`` component would read outside the dataset root."""
    if not path:
        return "path must not be empty"
    if "\x00" in path:
        return f"path must not contain a NUL character (expected a text path, got {path!r})"
    norm = path.replace("\\", "/")
    if norm.startswith("/") or _WINDOWS_DRIVE.match(norm):
        return f"path must be relative to the dataset root (expected e.g. 'clip/frame.jpg', got absolute path {path!r})"
    if ".." in norm.split("/"):
        return f"path must stay inside the dataset root (expected no '..' component, got {path!r})"
    return None


def _split_au_path(path: str) -> tuple[str, int]:
    """``(sequence, frame_index)`` of an AU image path; raises ValueError with the reason."""
    norm = path.replace("\\", "/")
    pure = PurePosixPath(norm)
    sequence = str(pure.parent)
    if sequence in ("", ".") or not pure.name:
        raise ValueError(f"expected '<sequence>/<frame>.<ext>', got {path!r} (no sequence folder)")
    return sequence, _frame_index_of_stem(pure.stem, path)


# ----------------------------------------------------------------------------------------------
# subjects: one parser per AU dataset (the conventions of the released split files)

# re.ASCII: no Unicode case folding (``'ſ'`` would otherwise match ``s``).
_BP4D_SEQUENCE = re.compile(r"[0-9]+([FM])([0-9]{2})_([0-9]{2})", re.IGNORECASE | re.ASCII)
_DISFA_SUBJECT = re.compile(r"SN([0-9]{3})(?![0-9])", re.IGNORECASE | re.ASCII)


def _bp4d_subject(sequence: str) -> str:
    folder = sequence.replace("\\", "/").rstrip("/").split("/")[-1]
    m = _BP4D_SEQUENCE.fullmatch(folder)
    if m is None:
        raise ValueError(
            f"BP4D sequence folder must be '<prefix digits><F|M><2 digits>_<2 digits task>' "
            f"(expected e.g. '2F07_01', got {folder!r})"
        )
    return f"{m.group(1).upper()}{m.group(2)}"


def _disfa_subject(sequence: str) -> str:
    found = sorted({f"SN{m.group(1)}" for m in _DISFA_SUBJECT.finditer(sequence)})
    if len(found) != 1:
        got = f"{sequence!r}" if not found else f"{sequence!r} with several ids {found}"
        raise ValueError(
            f"DISFA sequence folder must name one subject 'SN<3 digits>' (expected e.g. 'RightVideoSN010', got {got})"
        )
    return found[0]


_SUBJECT_PARSERS: dict[str, Callable[[str], str]] = {"bp4d": _bp4d_subject, "disfa": _disfa_subject}


def parse_subject(sequence: str, format: str) -> str:
    """Subject id of an AU sequence folder, by the dataset's convention.

    * ``"bp4d"``: the last folder must be ``<prefix digits><F|M><NN>_<task NN>``, as in the
      released split files (``2F07_01``); the subject is ``<F|M><NN>``: ``"F07"``. (The released
      loader, ``ssm/data/bp4d.py``, spells the same person ``F007``.)
    * ``"disfa"``: the folder path must contain exactly one ``SN<NNN>`` (``RightVideoSN010``);
      the subject is ``"SN010"`` (as in the released ``ssm/data/disfa.py``).

    Letters are matched case-insensitively and returned upper-case; digits must be ASCII.

    Args:
        sequence: The folder part of an image path (:attr:`AURecord.sequence`); a full image path
            also works for DISFA.
        format: ``"bp4d"`` or ``"disfa"``.

    Raises:
        ValueError: the folder does not follow the convention (the message shows the expected form).
        KeyError: unknown format; TypeError: ``format`` of an expression dataset.
    """
    fmt = get_format(format)
    if fmt.name not in _SUBJECT_PARSERS:
        raise TypeError(f"subjects are parsed for AU formats only (expected one of the AU formats {sorted(_SUBJECT_PARSERS)}, got {format!r})")
    if not isinstance(sequence, str):
        raise TypeError(f"sequence must be a str (expected e.g. '2F07_01'), got {type(sequence).__name__}")
    return _SUBJECT_PARSERS[fmt.name](sequence)


def group_by_subject(records: Iterable[AURecord], format: str | None = None) -> dict[str, list[AURecord]]:
    """Group AU records by :attr:`AURecord.subject`.

    Use it to split by person (a subject-independent validation split never shares a subject with
    training); :func:`facelayers.data.subject_split` does that split.

    Args:
        records: AU records, e.g. from :func:`read_manifest` (which fills ``subject``).
        format: ``"bp4d"`` or ``"disfa"``: parse the subject of records whose ``subject`` is
            ``None`` (hand-built records) with :func:`parse_subject`. Without it such a record is
            an error.

    Returns:
        ``{subject: records}`` with subjects in sorted order and records in input order.

    Raises:
        TypeError: a record that is not an :class:`AURecord`.
        ValueError: a record without a subject (and no ``format``), or whose folder does not
            follow ``format``'s convention.
    """
    groups: dict[str, list[AURecord]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, AURecord):
            raise TypeError(f"record {i}: expected an AURecord, got {type(rec).__name__}")
        subject = rec.subject
        if subject is None:
            if format is None:
                raise ValueError(
                    f"record {i} ({rec.path!r}) has no subject (expected a record from read_manifest, or "
                    f"format='bp4d'/'disfa' to parse it, got subject=None)"
                )
            try:
                subject = parse_subject(rec.sequence, format)
            except ValueError as e:
                raise ValueError(f"record {i}: {e}") from None
        groups.setdefault(subject, []).append(rec)
    return {k: groups[k] for k in sorted(groups)}


# ----------------------------------------------------------------------------------------------
# line parsers: each returns a record or raises _LineError(kind, message)


class _LineError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


_ASCII_INT = re.compile(r"-?[0-9]+")


def _parse_int(token: str, what: str) -> int:
    # int() also takes '1_44', '+3', ' 3' and digits of other scripts ('٣'): refuse all of them.
    if _ASCII_INT.fullmatch(token) is None:
        raise _LineError(
            "malformed_line", f"{what} must be an integer (expected ASCII digits 0-9 such as '12', got {token!r})"
        )
    return int(token)


def _check_path(path: str) -> None:
    reason = _check_relative_path(path)
    if reason is not None:
        raise _LineError("malformed_line" if not path or "\x00" in path else "unsafe_path", reason)


def _au_subject(sequence: str, fmt: ManifestFormat) -> str:
    try:
        return _SUBJECT_PARSERS[fmt.name](sequence)
    except ValueError as e:
        raise _LineError("bad_subject", str(e)) from None


def _parse_expression_line(text: str, fmt: ManifestFormat) -> ExpressionRecord:
    fields = text.split()
    if len(fields) != 3:
        raise _LineError(
            "malformed_line", f"expected 3 fields '{fmt.line}', got {len(fields)}: {text.strip()!r}"
        )
    path, n_tok, label_tok = fields
    _check_path(path)
    num_frames = _parse_int(n_tok, "num_frames")
    label = _parse_int(label_tok, "label")
    if num_frames < 1:
        raise _LineError("malformed_line", f"num_frames must be >= 1 (expected a frame count >= 1, got {num_frames})")
    assert fmt.num_classes is not None
    if not 0 <= label < fmt.num_classes:
        raise _LineError(
            "label_out_of_range", f"label must be in [0, {fmt.num_classes - 1}] for {fmt.name} (expected 0..{fmt.num_classes - 1}, got {label})"
        )
    return ExpressionRecord(path=path, num_frames=num_frames, label=label)


def _parse_bp4d_line(text: str, fmt: ManifestFormat) -> AURecord:
    assert fmt.aus is not None
    fields = text.split()
    m = len(fmt.aus)
    if len(fields) != 1 + m:
        raise _LineError(
            "malformed_line", f"expected {1 + m} fields (path + {m} AU labels), got {len(fields)}: {text.strip()!r}"
        )
    path = fields[0]
    _check_path(path)
    try:
        sequence, frame_index = _split_au_path(path)
    except ValueError as e:
        raise _LineError("malformed_line", str(e)) from None
    tokens = fields[1:]
    if all(tok == "0" or tok == "1" for tok in tokens):  # the common case, without regex per token
        labels = tuple(int(tok == "1") for tok in tokens)
    else:
        labels = tuple(_parse_int(tok, f"label of AU{au}") for tok, au in zip(tokens, fmt.aus))
    bad = [(au, v) for au, v in zip(fmt.aus, labels) if v not in (0, 1)]
    if bad:
        desc = ", ".join(f"AU{au}={v}" for au, v in bad)
        raise _LineError("label_out_of_range", f"AU labels must be 0 or 1 (expected 0 or 1, got {desc})")
    subject = _au_subject(sequence, fmt)
    return AURecord(path=path, sequence=sequence, frame_index=frame_index, labels=labels, subject=subject)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    if dups:  # json.loads would silently keep the last value
        raise _LineError("malformed_line", f"key(s) {dups} appear more than once in the JSON object")
    return dict(pairs)


def _parse_disfa_line(text: str, fmt: ManifestFormat) -> AURecord:
    assert fmt.aus is not None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise _LineError("malformed_line", f"invalid JSON (expected one JSON object per line, got: {e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _LineError("malformed_line", f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("img_path", "AUs") if k not in obj]
    if missing:
        raise _LineError("malformed_line", f"missing key(s) {missing}; expected 'img_path' and 'AUs'")
    path, ids = obj["img_path"], obj["AUs"]
    if not isinstance(path, str):
        raise _LineError("malformed_line", f"'img_path' must be a string (expected str, got {type(path).__name__})")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise _LineError("malformed_line", f"'AUs' must be a list of integers (expected e.g. [1, 999, ...], got {ids!r})")
    _check_path(path)
    try:
        sequence, frame_index = _split_au_path(path)
    except ValueError as e:
        raise _LineError("malformed_line", str(e)) from None
    active = [i for i in ids if i != DISFA_PADDING]
    unknown = sorted({i for i in active if i not in fmt.aus})
    if unknown:
        raise _LineError(
            "label_out_of_range",
            f"AU id(s) {unknown} not in the {fmt.name} vocabulary (expected ids from {list(fmt.aus)} or the padding {DISFA_PADDING}, got {unknown})",
        )
    dups = sorted({i for i in active if active.count(i) > 1})
    if dups:
        raise _LineError("malformed_line", f"AU id(s) {dups} listed more than once")
    if len(ids) != len(fmt.aus):
        raise _LineError(
            "malformed_line",
            f"'AUs' must have one slot per {fmt.name} AU, active ids padded with {DISFA_PADDING} "
            f"(expected {len(fmt.aus)} entries, got {len(ids)}: {ids!r})",
        )
    subject = _au_subject(sequence, fmt)
    labels = tuple(int(au in active) for au in fmt.aus)
    return AURecord(path=path, sequence=sequence, frame_index=frame_index, labels=labels, subject=subject)


def _line_parser(fmt: ManifestFormat):
    if fmt.kind == "expression":
        return _parse_expression_line
    return _parse_bp4d_line if fmt.name == "bp4d" else _parse_disfa_line


_BOM = b"\xef\xbb\xbf"


def _iter_text_lines(path: PathLike) -> Iterator[tuple[int, str | UnicodeDecodeError]]:
    """``(line_number, text)`` of each line, decoded as UTF-8 one line at a time, so that a decoding
    error names its line; a leading byte-order mark is dropped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, e


def iter_manifest(path: PathLike, format: str) -> Iterator[tuple[int, Record | ManifestIssue]]:
    """Parse a manifest line by line without raising on bad lines.

    Blank lines are skipped. Yields ``(line_number, record)`` for good lines and
    ``(line_number, ManifestIssue)`` for bad ones (1-based line numbers), a line that is not UTF-8
    included. Each line is checked on its own: repeated clips/frames and an empty file are checked
    by :func:`read_manifest` and :func:`facelayers.data.validate_manifest`.
    """
    fmt = get_format(format)
    parse = _line_parser(fmt)
    name = os.fspath(path)
    for lineno, text in _iter_text_lines(path):
        if isinstance(text, UnicodeDecodeError):
            bad = text.object[text.start:text.end]
            message = (
                f"line is not valid UTF-8 (expected UTF-8 text, got byte(s) {bad.hex(' ')} at byte {text.start + 1})"
            )
            yield lineno, ManifestIssue("malformed_line", name, lineno, message)
            continue
        if not text.strip():
            continue
        try:
            yield lineno, parse(text, fmt)
        except _LineError as e:
            yield lineno, ManifestIssue(e.kind, name, lineno, e.message)


def _record_key(rec: Record) -> tuple:
    """What identifies a clip (its folder) or a frame (sequence + frame number) in a manifest."""
    if isinstance(rec, ExpressionRecord):
        return ("clip", str(PurePosixPath(rec.path.replace("\\", "/"))))
    return ("frame", rec.sequence, rec.frame_index)


def _describe(rec: Record) -> str:
    if isinstance(rec, ExpressionRecord):
        return f"clip {rec.path!r}"
    return f"frame {rec.frame_index} of sequence {rec.sequence!r}"


def _contents(rec: Record) -> str:
    if isinstance(rec, ExpressionRecord):
        return f"num_frames={rec.num_frames} label={rec.label}"
    return f"path={rec.path!r} labels={tuple(rec.labels)}"


def _same_contents(a: Record, b: Record) -> bool:
    if isinstance(a, ExpressionRecord) and isinstance(b, ExpressionRecord):
        return (a.num_frames, a.label) == (b.num_frames, b.label)
    return (a.path, tuple(a.labels)) == (b.path, tuple(b.labels))  # type: ignore[union-attr]


def _duplicate_message(rec: Record, first: Record, where_first: str) -> str:
    """Message for ``rec`` repeating ``first`` (listed at ``where_first``)."""
    if _same_contents(rec, first):
        return f"{_describe(rec)} is listed again, identical to {where_first}"
    return (
        f"{_describe(rec)} is listed again with different contents than {where_first} "
        f"(expected {_contents(first)} as there, got {_contents(rec)})"
    )


def read_manifest(path: PathLike, format: str) -> list[ExpressionRecord] | list[AURecord]:
    """Read a public split file into typed records.

    Args:
        path: The manifest file (UTF-8; a byte-order mark is allowed).
        format: One of ``"dfew"``, ``"ferv39k"``, ``"mafw"`` (-> :class:`ExpressionRecord`),
            ``"bp4d"``, ``"disfa"`` (-> :class:`AURecord`, with :attr:`AURecord.subject` set).

    Returns:
        Records in file order (blank lines skipped). A line that repeats an earlier clip/frame
        exactly is kept (nothing is dropped) and a ``UserWarning`` names it.

    Raises:
        ManifestError: if any line is malformed, has a label out of range, a path that is absolute
            or leaves the dataset root, a sequence folder off the dataset's subject convention, or
            repeats a clip/frame with different contents (the message names both lines); or if
            the file has no records. The message lists every problem as ``file:line: reason``
            (first 20 shown); ``.issues`` holds them all.
        KeyError: for an unknown ``format``.
        OSError: the file cannot be opened.

    Examples::

        >>> recs = read_manifest("splits/emotion/DFEW/DFEW_set_1_train.txt", "dfew")
        >>> recs[0]
        ExpressionRecord(path='02522', num_frames=66, label=5)
    """
    fmt = get_format(format)
    name = os.fspath(path)
    records: list = []
    issues: list[ManifestIssue] = []
    seen: dict[tuple, tuple[int, Record]] = {}
    repeats: list[str] = []
    num_lines = 0
    for lineno, item in iter_manifest(path, fmt.name):
        num_lines += 1
        if isinstance(item, ManifestIssue):
            issues.append(item)
            continue
        key = _record_key(item)
        if key in seen:
            first_line, first = seen[key]
            message = _duplicate_message(item, first, f"{name}:{first_line}")
            if _same_contents(item, first):
                repeats.append(f"{name}:{lineno}: {message}")
            else:
                kind = "duplicate_clip" if isinstance(item, ExpressionRecord) else "duplicate_frame"
                issues.append(ManifestIssue(kind, name, lineno, message))
                continue
        else:
            seen[key] = (lineno, item)
        records.append(item)
    if not num_lines:
        issues.append(
            ManifestIssue(
                "empty_manifest", name, 0,
                f"no records (expected at least one {fmt.name} line '{fmt.line}', got an empty file)",
            )
        )
    if issues:
        shown = "\n".join(str(i) for i in issues[:20])
        more = f"\n... and {len(issues) - 20} more" if len(issues) > 20 else ""
        raise ManifestError(f"{len(issues)} problem(s) in {name} (format {format!r}):\n{shown}{more}", issues)
    if repeats:
        more = f" (and {len(repeats) - 1} more)" if len(repeats) > 1 else ""
        warnings.warn(
            f"{len(repeats)} line(s) of {name} repeat an earlier clip/frame exactly and are kept: "
            f"{repeats[0]}{more}; validate_manifest lists them all",
            UserWarning,
            stacklevel=2,
        )
    return records


# ----------------------------------------------------------------------------------------------
# writer


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_int(v: object, what: str, where: str) -> int:
    if not _is_int(v):
        raise TypeError(f"{where}: {what} must be an int (expected an integer, got {type(v).__name__} {v!r})")
    return int(v)  # type: ignore[call-overload]


def _format_record(rec: Record, fmt: ManifestFormat, i: int) -> str:
    where = f"record {i}"
    if fmt.kind == "expression":
        if not isinstance(rec, ExpressionRecord):
            raise TypeError(f"{where}: wrong record type for format {fmt.name!r} (expected ExpressionRecord, got {type(rec).__name__})")
        if not isinstance(rec.path, str) or not rec.path or any(c.isspace() for c in rec.path):
            raise ValueError(f"{where}: bad path (expected a non-empty path without whitespace, got {rec.path!r})")
        reason = _check_relative_path(rec.path)
        if reason is not None:
            raise ValueError(f"{where}: {reason}")
        num_frames = _check_int(rec.num_frames, "num_frames", where)
        label = _check_int(rec.label, "label", where)
        if num_frames < 1:
            raise ValueError(f"{where}: num_frames must be >= 1 (expected a frame count >= 1, got {num_frames})")
        assert fmt.num_classes is not None
        if not 0 <= label < fmt.num_classes:
            raise ValueError(f"{where}: label must be in [0, {fmt.num_classes - 1}] for {fmt.name} (expected 0..{fmt.num_classes - 1}, got {label})")
        return f"{rec.path} {num_frames} {label}"

    if not isinstance(rec, AURecord):
        raise TypeError(f"{where}: wrong record type for format {fmt.name!r} (expected AURecord, got {type(rec).__name__})")
    assert fmt.aus is not None
    if len(rec.labels) != len(fmt.aus):
        raise ValueError(f"{where}: expected {len(fmt.aus)} labels for {fmt.name} {list(fmt.aus)}, got {len(rec.labels)}")
    labels = [_check_int(v, "each AU label", where) for v in rec.labels]
    if any(v not in (0, 1) for v in labels):
        raise ValueError(f"{where}: AU labels must be 0 or 1 (expected 0 or 1, got {tuple(rec.labels)})")
    if not isinstance(rec.path, str):
        raise TypeError(f"{where}: path must be a str (expected str, got {type(rec.path).__name__})")
    if fmt.name == "bp4d" and (not rec.path or any(c.isspace() for c in rec.path)):
        raise ValueError(f"{where}: bad path (expected a non-empty path without whitespace, got {rec.path!r})")
    reason = _check_relative_path(rec.path)
    if reason is not None:
        raise ValueError(f"{where}: {reason}")
    frame_index = _check_int(rec.frame_index, "frame_index", where)
    try:
        sequence, parsed_index = _split_au_path(rec.path)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if (sequence, parsed_index) != (rec.sequence, frame_index):
        raise ValueError(
            f"{where}: path {rec.path!r} gives sequence {sequence!r} and frame {parsed_index}, "
            f"but the record says {rec.sequence!r} and {rec.frame_index}"
        )
    try:
        subject = _SUBJECT_PARSERS[fmt.name](sequence)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if rec.subject is not None and rec.subject != subject:
        raise ValueError(
            f"{where}: path {rec.path!r} gives subject {subject!r} by the {fmt.name} convention, "
            f"but the record says {rec.subject!r}"
        )
    if fmt.name == "bp4d":
        return rec.path + " " + " ".join(str(v) for v in labels)
    ids = [au if v else DISFA_PADDING for au, v in zip(fmt.aus, labels)]
    return json.dumps({"img_path": rec.path, "AUs": ids})


def write_manifest(records: Iterable[Record], path: PathLike, format: str) -> Path:
    """Write records in one of the public manifest formats (inverse of :func:`read_manifest`).

    DISFA lines put each active AU in its vocabulary slot and ``999`` elsewhere. Parent folders
    are created. Every record is checked before anything is written, so that what is written
    reads back with :func:`read_manifest`.

    Args:
        records: :class:`ExpressionRecord` for ``dfew``/``ferv39k``/``mafw``, :class:`AURecord`
            for ``bp4d``/``disfa`` (at least one).
        path: Output file.
        format: Format name.

    Returns:
        The written path.

    Raises:
        TypeError: wrong record type for the format; a frame count, label or frame index that is
            not an ``int`` (``bool``, ``float`` and ``str`` are refused, never converted).
        ValueError: no records; a record that the format cannot represent (label out of range,
            whitespace in a path, an absolute path or one with ``..``, ``sequence``/``frame_index``
            inconsistent with ``path``, a sequence folder off the dataset's subject convention or a
            ``subject`` that disagrees with it, ...); or a clip/frame given twice with different
            contents. The message names the record(s).
    """
    fmt = get_format(format)
    records = list(records)
    if not records:
        raise ValueError(f"no records to write to {os.fspath(path)} (expected at least one, got none)")
    lines = [_format_record(r, fmt, i) for i, r in enumerate(records)]
    seen: dict[tuple, int] = {}
    for i, rec in enumerate(records):
        key = _record_key(rec)
        if key in seen and not _same_contents(rec, records[seen[key]]):
            raise ValueError(f"record {i}: {_duplicate_message(rec, records[seen[key]], f'record {seen[key]}')}")
        seen.setdefault(key, i)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------------------
# split identifiers


@dataclass(frozen=True)
class Split:
    """One fold file of the released SSM experiments.

    Attributes:
        dataset: Format / dataset name (``"dfew"``, ``"ferv39k"``, ``"mafw"``, ``"bp4d"``, ``"disfa"``).
        fold: Fold number as numbered by ``numbering`` (1-based), ``None`` for FERV39K's single split.
        subset: ``"train"`` or ``"test"``.
        relpath: File path inside the release's ``splits/`` folder.
        numbering: Whose fold numbering this is. ``"ssm_release"``: the file names of the released
            SSM code (``MSA-LMC/SSM``); other papers may number the same folds differently.
        image_root: Where the release resolves the manifest's paths (relative to its repository).
    """

    dataset: str
    fold: int | None
    subset: Literal["train", "test"]
    relpath: str
    numbering: str = "ssm_release"
    image_root: str = ""

    @property
    def id(self) -> str:
        """``"<dataset>/<numbering>/fold<k>/<subset>"`` (``.../all/...`` for FERV39K)."""
        fold = "all" if self.fold is None else f"fold{self.fold}"
        return f"{self.dataset}/{self.numbering}/{fold}/{self.subset}"

    def path(self, splits_dir: PathLike) -> Path:
        """The split file under a local copy of the release's ``splits/`` folder."""
        return Path(splits_dir) / self.relpath

    def read(self, splits_dir: PathLike) -> list[ExpressionRecord] | list[AURecord]:
        """:func:`read_manifest` of :meth:`path` in this split's format."""
        return read_manifest(self.path(splits_dir), self.dataset)


def _build_splits() -> dict[str, Split]:
    out: list[Split] = []
    for subset in ("train", "test"):
        for k in range(1, 6):
            out.append(Split("dfew", k, subset, f"emotion/DFEW/DFEW_set_{k}_{subset}.txt", image_root="data/DFEW/frames"))
            out.append(Split("mafw", k, subset, f"emotion/MAFW/MAFW_set_{k}_{subset}.txt", image_root="data/MAFW/frames"))
        out.append(Split("ferv39k", None, subset, f"emotion/FERV39K/FERV39K_{subset}.txt", image_root="data/FERV39K/frames"))
        for k in range(1, 4):
            out.append(Split("bp4d", k, subset, f"bp4d/{subset}_{k}f_data.list", image_root="data/BP4D/Images"))
            # The release names these .json but they are JSON lines (one object per line).
            out.append(Split("disfa", k, subset, f"disfa/DISFA_{subset}{k}.json", image_root="data/DISFA/images_aligned"))
    return {s.id: s for s in out}


#: Registry of the released fold files, keyed by :attr:`Split.id`.
SPLITS: dict[str, Split] = _build_splits()


def list_splits(dataset: str | None = None) -> list[Split]:
    """All registered splits, or those of one dataset."""
    if dataset is None:
        return list(SPLITS.values())
    get_format(dataset)
    return [s for s in SPLITS.values() if s.dataset == dataset.lower()]


def get_split(dataset: str, fold: int | None, subset: str, numbering: str = "ssm_release") -> Split:
    """Look up a split by dataset, fold and subset.

    Args:
        dataset: ``"dfew"`` (folds 1-5), ``"mafw"`` (1-5), ``"ferv39k"`` (``fold=None``),
            ``"bp4d"`` (1-3), ``"disfa"`` (1-3).
        fold: Fold number in ``numbering``'s numbering.
        subset: ``"train"`` or ``"test"``.
        numbering: Whose fold numbering (only ``"ssm_release"`` is registered).

    Raises:
        KeyError: no such split; the message lists the valid folds of that dataset.
    """
    fmt = get_format(dataset)
    key = Split(fmt.name, fold, subset, "", numbering).id  # type: ignore[arg-type]
    if key not in SPLITS:
        valid = sorted({(s.fold, s.subset) for s in SPLITS.values() if s.dataset == fmt.name and s.numbering == numbering}, key=str)
        raise KeyError(f"no split {key!r} (expected (fold, subset) in {valid} for {fmt.name} under numbering {numbering!r}, got ({fold!r}, {subset!r}))")
    return SPLITS[key]
