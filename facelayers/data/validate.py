"""Manifest validator: report what is wrong with a manifest and its frames on disk.

:func:`validate_manifest` never stops at the first problem: it returns a
:class:`ValidationReport` listing every issue with its kind, ``file:line`` and the record path. It
raises only when asked (``strict=True``).

Issue kinds:

``malformed_line``
    a line that does not follow the format (wrong field count, a number that is not ASCII digits,
    bad JSON, a DISFA ``AUs`` list of the wrong length, no frame number in an AU image name, a line
    that is not UTF-8, ...).
``label_out_of_range``
    an expression label outside ``[0, K-1]``, an AU value other than 0/1, a DISFA AU id outside the
    vocabulary.
``unsafe_path``
    an absolute path, or one whose ``..`` leaves the dataset root.
``bad_subject``
    an AU sequence folder that does not follow the dataset's subject convention
    (:func:`facelayers.data.parse_subject`).
``empty_manifest``
    the file has no records (``line`` 0).
``duplicate_clip``
    an expression clip listed again (the message says whether the two lines agree; when they do
    not, :func:`facelayers.data.read_manifest` refuses the file).
``missing_frame_folder``
    an expression clip whose folder (or video file) does not exist under ``root``.
``empty_frame_folder``
    an expression folder with no image files.
``frame_count_mismatch``
    the manifest's ``num_frames`` differs from the number of image files in the folder.
``missing_frame_file``
    an AU image that does not exist under ``root``.
``duplicate_frame``
    two AU lines with the same sequence and frame number (same rule as ``duplicate_clip``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .manifests import (
    FORMATS,
    AURecord,
    ExpressionRecord,
    ManifestIssue,
    PathLike,
    _duplicate_message,
    _record_key,
    get_format,
    iter_manifest,
)

__all__ = ["ISSUE_KINDS", "ManifestValidationError", "ValidationIssue", "ValidationReport", "validate_manifest"]

ISSUE_KINDS: tuple[str, ...] = (
    "malformed_line",
    "label_out_of_range",
    "missing_frame_folder",
    "empty_frame_folder",
    "frame_count_mismatch",
    "missing_frame_file",
    "duplicate_frame",
    "duplicate_clip",
    "unsafe_path",
    "bad_subject",
    "empty_manifest",
)


class ManifestValidationError(ValueError):
    """Raised by ``validate_manifest(..., strict=True)`` when issues were found; ``.report`` has them."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.summary())
        self.report = report


@dataclass(frozen=True)
class ValidationIssue:
    """One problem found by :func:`validate_manifest`.

    Attributes:
        kind: One of :data:`ISSUE_KINDS`.
        file: Manifest file.
        line: 1-based line number in ``file`` (0 for a problem of the whole file).
        message: What was expected and what was found.
        path: The record's path (frame folder or image), when the line could be parsed.
    """

    kind: str
    file: str
    line: int
    message: str
    path: str | None = None

    def __str__(self) -> str:
        where = self.file if self.line == 0 else f"{self.file}:{self.line}"
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class ValidationReport:
    """Result of :func:`validate_manifest`.

    Attributes:
        manifest: The manifest file.
        format: Its format name.
        root: The dataset root checked against (``None``: only the manifest was checked).
        num_lines: Non-blank lines read.
        num_records: Lines that parsed into records.
        issues: Every issue found, in file order.
    """

    manifest: str
    format: str
    root: str | None
    num_lines: int = 0
    num_records: int = 0
    issues: list[ValidationIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no issue was found."""
        return not self.issues

    def by_kind(self, kind: str) -> list[ValidationIssue]:
        """Issues of one kind (see :data:`ISSUE_KINDS`)."""
        if kind not in ISSUE_KINDS:
            raise KeyError(f"unknown issue kind {kind!r}; expected one of {ISSUE_KINDS}")
        return [i for i in self.issues if i.kind == kind]

    def counts(self) -> dict[str, int]:
        """Number of issues per kind (kinds with none are omitted)."""
        return dict(Counter(i.kind for i in self.issues))

    def summary(self, max_issues: int = 20) -> str:
        """Readable summary: counts per kind, then the first ``max_issues`` issues."""
        head = (
            f"{self.manifest} ({self.format}): {self.num_records}/{self.num_lines} lines parsed, "
            f"{len(self.issues)} issue(s)"
        )
        if self.root is not None:
            head += f", frames checked under {self.root}"
        if self.ok:
            return head
        counts = ", ".join(f"{k}={v}" for k, v in self.counts().items())
        lines = [head, f"  {counts}"] + [f"  {i}" for i in self.issues[:max_issues]]
        if len(self.issues) > max_issues:
            lines.append(f"  ... and {len(self.issues) - max_issues} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def raise_if_issues(self) -> None:
        """Raise :class:`ManifestValidationError` if there is any issue."""
        if self.issues:
            raise ManifestValidationError(self)


def _count_images(folder: Path, extensions: Sequence[str]) -> int:
    exts = tuple(e.lower() for e in extensions)
    with os.scandir(folder) as it:
        return sum(1 for e in it if e.is_file() and e.name.lower().endswith(exts))


def validate_manifest(
    manifest: PathLike,
    format: str,
    root: PathLike | None = None,
    *,
    strict: bool = False,
    extensions: Sequence[str] = (".jpg", ".jpeg", ".png", ".bmp", ".webp"),
) -> ValidationReport:
    """Check a manifest file and, given ``root``, the frames it points to.

    Args:
        manifest: The manifest file.
        format: ``"dfew"``, ``"ferv39k"``, ``"mafw"``, ``"bp4d"`` or ``"disfa"``.
        root: Dataset root the manifest paths are relative to. ``None`` checks only the lines.
        strict: Raise :class:`ManifestValidationError` (a ``ValueError``) if anything was found.
        extensions: File endings counted as frames in expression folders (case-insensitive).

    Returns:
        A :class:`ValidationReport` (``report.ok``, ``report.counts()``, ``report.by_kind(kind)``).

    Examples::

        >>> report = validate_manifest("DFEW_set_1_train.txt", "dfew", root="data/DFEW/frames")
        >>> print(report.summary())
    """
    fmt = get_format(format)
    name = os.fspath(manifest)
    if root is not None and not os.path.isdir(root):
        what = "a file" if os.path.exists(root) else "no such folder"
        raise NotADirectoryError(f"dataset root {os.fspath(root)!r} is not a folder (expected the folder the "
                                 f"manifest paths are relative to, got {what})")
    report = ValidationReport(manifest=name, format=fmt.name, root=None if root is None else os.fspath(root))
    root_path = None if root is None else Path(root)
    seen: dict[tuple, tuple[int, AURecord | ExpressionRecord]] = {}
    for lineno, item in iter_manifest(manifest, fmt.name):
        report.num_lines += 1
        if isinstance(item, ManifestIssue):
            report.issues.append(ValidationIssue(item.kind, name, lineno, item.message))
            continue
        report.num_records += 1
        key = _record_key(item)
        if key in seen:
            first_line, first = seen[key]
            kind = "duplicate_frame" if isinstance(item, AURecord) else "duplicate_clip"
            report.issues.append(
                ValidationIssue(kind, name, lineno, _duplicate_message(item, first, f"line {first_line}"), item.path)
            )
        else:
            seen[key] = (lineno, item)
        if isinstance(item, AURecord):
            if root_path is not None and not (root_path / item.path).is_file():
                report.issues.append(
                    ValidationIssue("missing_frame_file", name, lineno, f"no image {root_path / item.path}", item.path)
                )
        elif isinstance(item, ExpressionRecord) and root_path is not None:
            target = root_path / item.path
            if target.is_file():  # a video file: frame count is not checked without decoding
                continue
            if not target.is_dir():
                report.issues.append(
                    ValidationIssue("missing_frame_folder", name, lineno, f"no frame folder {target}", item.path)
                )
                continue
            n = _count_images(target, extensions)
            if n == 0:
                report.issues.append(
                    ValidationIssue(
                        "empty_frame_folder", name, lineno, f"no {'/'.join(extensions)} files in {target}", item.path
                    )
                )
            elif n != item.num_frames:
                report.issues.append(
                    ValidationIssue(
                        "frame_count_mismatch", name, lineno,
                        f"manifest says {item.num_frames} frames, {target} holds {n}", item.path,
                    )
                )
    if report.num_lines == 0:
        report.issues.append(
            ValidationIssue(
                "empty_manifest", name, 0,
                f"no records (expected at least one {fmt.name} line '{fmt.line}', got an empty file)",
            )
        )
    if strict:
        report.raise_if_issues()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m facelayers.data MANIFEST FORMAT [ROOT]``; exit status 1 when issues are
    found, 2 for a usage error or a manifest that cannot be opened (one ``error:`` line, no traceback;
    ``--debug`` shows it)."""
    import sys

    from facelayers.models import cli

    def _main(args_: list[str]) -> int:
        parser = cli.ScriptArgumentParser(prog="python -m facelayers.data", description=main.__doc__)
        parser.add_argument("manifest")
        parser.add_argument("format", choices=sorted(FORMATS))
        parser.add_argument("root", nargs="?", default=None, help="dataset root (omit to check only the lines)")
        parser.add_argument("--max-issues", type=cli.nonnegative_int, default=50, help="issues printed (default 50)")
        parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
        args = parser.parse_args(args_)
        if not os.path.isfile(args.manifest):
            what = "a folder" if os.path.isdir(args.manifest) else "no such file"
            raise cli.UsageError(f"cannot read manifest {args.manifest!r} (expected a manifest file, got {what})")
        if args.root is not None and not os.path.isdir(args.root):
            what = "a file" if os.path.exists(args.root) else "no such folder"
            raise cli.UsageError(f"ROOT {args.root!r} is not a folder (expected the dataset root): got {what}")
        try:
            report = validate_manifest(args.manifest, args.format, args.root)
        except OSError as e:
            raise cli.UsageError(f"cannot read manifest {args.manifest!r} (expected a readable text file, "
                                 f"got: {e.strerror or e})") from e
        print(report.summary(max_issues=args.max_issues))
        return 0 if report.ok else 1

    return cli.run_main(_main, list(sys.argv[1:] if argv is None else argv))
