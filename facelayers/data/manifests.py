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

Split identifiers (:class:`Split`, :func:`get_split`, :func:`list_splits`) name the fold files of
the released SSM experiments (repository ``MSA-LMC/SSM``, folder ``splits/``) and say that their
numbering is that release's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
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
    "iter_manifest",
    "list_splits",
    "parse_frame_index",
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
    """

    path: str
    sequence: str
    frame_index: int
    labels: tuple[int, ...]


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
    """

    name: str
    kind: Literal["expression", "au"]
    classes: tuple[str, ...] | None
    aus: tuple[int, ...] | None
    line: str

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)


#: The five supported manifest formats, keyed by name.
FORMATS: dict[str, ManifestFormat] = {
    "dfew": ManifestFormat("dfew", "expression", EXPRESSIONS_7, None, "frame_dir num_frames label"),
    "ferv39k": ManifestFormat("ferv39k", "expression", EXPRESSIONS_7, None, "Scene/Class/clip num_frames label"),
    "mafw": ManifestFormat("mafw", "expression", EXPRESSIONS_11, None, "frame_dir num_frames label"),
    "bp4d": ManifestFormat("bp4d", "au", None, BP4D_AUS, "Sequence/frame.jpg " + " ".join(f"b{i + 1}" for i in range(len(BP4D_AUS)))),
    "disfa": ManifestFormat("disfa", "au", None, DISFA_AUS, '{"img_path": "Sequence/frame_N.jpg", "AUs": [active ids, 999 padding]}'),
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
        kind: ``"malformed_line"`` or ``"label_out_of_range"``.
        file: Manifest path.
        line: 1-based line number.
        message: What was expected and what was found.
    """

    kind: str
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


def get_format(format: str) -> ManifestFormat:
    """Return the :class:`ManifestFormat` called ``format`` (case-insensitive).

    Raises:
        KeyError: for an unknown name; the message lists the valid ones.
    """
    if not isinstance(format, str):
        raise TypeError(f"format must be a str, one of {sorted(FORMATS)}; got {type(format).__name__}")
    key = format.lower()
    if key not in FORMATS:
        raise KeyError(f"unknown manifest format {format!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[key]


_DIGITS = re.compile(r"\d+")


def parse_frame_index(path: str) -> int:
    """Frame number of an image path: the last run of digits in the file stem.

    ``"2F07_01/768.jpg"`` -> 768, ``"RightVideoSN010/frame_0042.jpg"`` -> 42.

    Raises:
        ValueError: if the stem has no digits.
    """
    stem = PurePosixPath(path.replace("\\", "/")).stem
    numbers = _DIGITS.findall(stem)
    if not numbers:
        raise ValueError(f"cannot read a frame number from {path!r}: expected digits in the file name")
    return int(numbers[-1])


def _split_au_path(path: str) -> tuple[str, int]:
    """``(sequence, frame_index)`` of an AU image path; raises ValueError with the reason."""
    norm = path.replace("\\", "/")
    pure = PurePosixPath(norm)
    sequence = str(pure.parent)
    if sequence in ("", ".") or not pure.name:
        raise ValueError(f"expected '<sequence>/<frame>.<ext>', got {path!r} (no sequence folder)")
    return sequence, parse_frame_index(norm)


# ----------------------------------------------------------------------------------------------
# line parsers: each returns a record or raises _LineError(kind, message)


class _LineError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _parse_int(token: str, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise _LineError("malformed_line", f"{what} must be an integer, got {token!r}") from None


def _parse_expression_line(text: str, fmt: ManifestFormat) -> ExpressionRecord:
    fields = text.split()
    if len(fields) != 3:
        raise _LineError(
            "malformed_line", f"expected 3 fields '{fmt.line}', got {len(fields)}: {text.strip()!r}"
        )
    path, n_tok, label_tok = fields
    num_frames = _parse_int(n_tok, "num_frames")
    label = _parse_int(label_tok, "label")
    if num_frames < 1:
        raise _LineError("malformed_line", f"num_frames must be >= 1, got {num_frames}")
    assert fmt.num_classes is not None
    if not 0 <= label < fmt.num_classes:
        raise _LineError(
            "label_out_of_range", f"label must be in [0, {fmt.num_classes - 1}] for {fmt.name}, got {label}"
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
    try:
        sequence, frame_index = _split_au_path(path)
    except ValueError as e:
        raise _LineError("malformed_line", str(e)) from None
    labels = tuple(_parse_int(tok, f"label of AU{au}") for tok, au in zip(fields[1:], fmt.aus))
    bad = [(au, v) for au, v in zip(fmt.aus, labels) if v not in (0, 1)]
    if bad:
        desc = ", ".join(f"AU{au}={v}" for au, v in bad)
        raise _LineError("label_out_of_range", f"AU labels must be 0 or 1, got {desc}")
    return AURecord(path=path, sequence=sequence, frame_index=frame_index, labels=labels)


def _parse_disfa_line(text: str, fmt: ManifestFormat) -> AURecord:
    assert fmt.aus is not None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _LineError("malformed_line", f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _LineError("malformed_line", f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("img_path", "AUs") if k not in obj]
    if missing:
        raise _LineError("malformed_line", f"missing key(s) {missing}; expected 'img_path' and 'AUs'")
    path, ids = obj["img_path"], obj["AUs"]
    if not isinstance(path, str):
        raise _LineError("malformed_line", f"'img_path' must be a string, got {type(path).__name__}")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise _LineError("malformed_line", f"'AUs' must be a list of integers, got {ids!r}")
    try:
        sequence, frame_index = _split_au_path(path)
    except ValueError as e:
        raise _LineError("malformed_line", str(e)) from None
    active = [i for i in ids if i != DISFA_PADDING]
    unknown = sorted({i for i in active if i not in fmt.aus})
    if unknown:
        raise _LineError(
            "label_out_of_range",
            f"AU id(s) {unknown} not in the {fmt.name} vocabulary {list(fmt.aus)} (padding is {DISFA_PADDING})",
        )
    dups = sorted({i for i in active if active.count(i) > 1})
    if dups:
        raise _LineError("malformed_line", f"AU id(s) {dups} listed more than once")
    labels = tuple(int(au in active) for au in fmt.aus)
    return AURecord(path=path, sequence=sequence, frame_index=frame_index, labels=labels)


def _line_parser(fmt: ManifestFormat):
    if fmt.kind == "expression":
        return _parse_expression_line
    return _parse_bp4d_line if fmt.name == "bp4d" else _parse_disfa_line


def iter_manifest(path: PathLike, format: str) -> Iterator[tuple[int, Record | ManifestIssue]]:
    """Parse a manifest line by line without raising on bad lines.

    Blank lines are skipped. Yields ``(line_number, record)`` for good lines and
    ``(line_number, ManifestIssue)`` for bad ones (1-based line numbers). Used by
    :func:`read_manifest` and :func:`facelayers.data.validate_manifest`.
    """
    fmt = get_format(format)
    parse = _line_parser(fmt)
    name = os.fspath(path)
    with open(path, encoding="utf-8-sig") as f:  # tolerate a byte-order mark
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield lineno, parse(text, fmt)
            except _LineError as e:
                yield lineno, ManifestIssue(e.kind, name, lineno, e.message)


def read_manifest(path: PathLike, format: str) -> list[ExpressionRecord] | list[AURecord]:
    """Read a public split file into typed records.

    Args:
        path: The manifest file.
        format: One of ``"dfew"``, ``"ferv39k"``, ``"mafw"`` (-> :class:`ExpressionRecord`),
            ``"bp4d"``, ``"disfa"`` (-> :class:`AURecord`).

    Returns:
        Records in file order (blank lines skipped).

    Raises:
        ManifestError: if any line is malformed or has a label out of range. The message lists
            every bad line as ``file:line: reason`` (first 20 shown); ``.issues`` holds them all.
        KeyError: for an unknown ``format``.

    Examples::

        >>> recs = read_manifest("splits/emotion/DFEW/DFEW_set_1_train.txt", "dfew")
        >>> recs[0]
        ExpressionRecord(path='02522', num_frames=66, label=5)
    """
    records: list = []
    issues: list[ManifestIssue] = []
    for _, item in iter_manifest(path, format):
        if isinstance(item, ManifestIssue):
            issues.append(item)
        else:
            records.append(item)
    if issues:
        shown = "\n".join(str(i) for i in issues[:20])
        more = f"\n... and {len(issues) - 20} more" if len(issues) > 20 else ""
        raise ManifestError(
            f"{len(issues)} bad line(s) in {os.fspath(path)} (format {format!r}):\n{shown}{more}", issues
        )
    return records


# ----------------------------------------------------------------------------------------------
# writer


def _format_record(rec: Record, fmt: ManifestFormat, i: int) -> str:
    where = f"record {i}"
    if fmt.kind == "expression":
        if not isinstance(rec, ExpressionRecord):
            raise TypeError(f"{where}: format {fmt.name!r} needs ExpressionRecord, got {type(rec).__name__}")
        if not rec.path or any(c.isspace() for c in rec.path):
            raise ValueError(f"{where}: path must be non-empty without whitespace, got {rec.path!r}")
        if int(rec.num_frames) < 1:
            raise ValueError(f"{where}: num_frames must be >= 1, got {rec.num_frames}")
        assert fmt.num_classes is not None
        if not 0 <= int(rec.label) < fmt.num_classes:
            raise ValueError(f"{where}: label must be in [0, {fmt.num_classes - 1}] for {fmt.name}, got {rec.label}")
        return f"{rec.path} {int(rec.num_frames)} {int(rec.label)}"

    if not isinstance(rec, AURecord):
        raise TypeError(f"{where}: format {fmt.name!r} needs AURecord, got {type(rec).__name__}")
    assert fmt.aus is not None
    if len(rec.labels) != len(fmt.aus):
        raise ValueError(f"{where}: expected {len(fmt.aus)} labels for {fmt.name} {list(fmt.aus)}, got {len(rec.labels)}")
    if any(int(v) not in (0, 1) for v in rec.labels):
        raise ValueError(f"{where}: AU labels must be 0 or 1, got {tuple(rec.labels)}")
    if fmt.name == "bp4d" and (not rec.path or any(c.isspace() for c in rec.path)):
        raise ValueError(f"{where}: path must be non-empty without whitespace, got {rec.path!r}")
    try:
        sequence, frame_index = _split_au_path(rec.path)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if (sequence, frame_index) != (rec.sequence, int(rec.frame_index)):
        raise ValueError(
            f"{where}: path {rec.path!r} gives sequence {sequence!r} and frame {frame_index}, "
            f"but the record says {rec.sequence!r} and {rec.frame_index}"
        )
    if fmt.name == "bp4d":
        return rec.path + " " + " ".join(str(int(v)) for v in rec.labels)
    ids = [au if int(v) else DISFA_PADDING for au, v in zip(fmt.aus, rec.labels)]
    return json.dumps({"img_path": rec.path, "AUs": ids})


def write_manifest(records: Iterable[Record], path: PathLike, format: str) -> Path:
    """Write records in one of the public manifest formats (inverse of :func:`read_manifest`).

    DISFA lines put each active AU in its vocabulary slot and ``999`` elsewhere. Parent folders
    are created. Every record is checked before anything is written.

    Args:
        records: :class:`ExpressionRecord` for ``dfew``/``ferv39k``/``mafw``, :class:`AURecord`
            for ``bp4d``/``disfa``.
        path: Output file.
        format: Format name.

    Returns:
        The written path.

    Raises:
        TypeError: wrong record type for the format.
        ValueError: a record that the format cannot represent (label out of range, whitespace in a
            path, ``sequence``/``frame_index`` inconsistent with ``path``, ...), naming the record.
    """
    fmt = get_format(format)
    lines = [_format_record(r, fmt, i) for i, r in enumerate(records)]
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
        raise KeyError(f"no split {key!r}; {fmt.name} has (fold, subset) in {valid} under numbering {numbering!r}")
    return SPLITS[key]
