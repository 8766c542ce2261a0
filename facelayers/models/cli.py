"""A small validation layer for command-line scripts (``examples/ssm_reference.py``,
``examples/predict_video.py``): argparse ``type=`` functions that refuse nonsense values, an
argument parser whose errors are exceptions, and :func:`run_main`, which turns every user error
into ONE line ``error: <what> (expected ..., got ...)`` on stderr and exit code 2 (``--debug``
shows the traceback instead).

Examples::

    parser = ScriptArgumentParser(prog="train.py")
    parser.add_argument("--epochs", type=positive_int, default=10)
    parser.add_argument("--out", type=output_folder, default="runs/x")

    def main(argv=None):
        return run_main(lambda a: _main(parser.parse_args(a)), argv)
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Sequence

__all__ = [
    "UsageError",
    "ScriptArgumentParser",
    "positive_int",
    "nonnegative_int",
    "positive_float",
    "nonnegative_float",
    "open_unit_float",
    "unit_float",
    "finite_float",
    "probability",
    "ema_decay",
    "output_folder",
    "output_file",
    "existing_file",
    "existing_folder",
    "existing_path",
    "device_arg",
    "check_device",
    "user_errors",
    "run_main",
    "one_line",
]


class UsageError(ValueError):
    """A user error in a script's arguments or inputs (printed as ``error: ...``, exit code 2)."""


_ARGPARSE_REWRITES = (
    (re.compile(r"^(argument \S+): invalid choice: (.+?) \(choose from (.+)\)$"), r"\1: invalid choice (expected one of \3, got \2)"),
    (re.compile(r"^unrecognized arguments: (.+)$"), r"unrecognized arguments (expected the options of --help, got \1)"),
    (re.compile(r"^the following arguments are required: (.+)$"), r"missing arguments (expected \1, got none)"),
    (re.compile(r"^(argument \S+): invalid (\w+) value: (.+)$"), r"\1: invalid value (expected a valid \2, got \3)"),
    (re.compile(r"^(argument \S+): expected (.+) arguments?$"), r"\1: missing value (expected \2 argument(s), got none)"),
    (re.compile(r"^(argument \S+): ignored explicit argument (.+)$"), r"\1: takes no value (expected none, got \2)"),
    (re.compile(r"^(argument \S+): not allowed with (argument \S+)$"), r"\1: not allowed with \2 (expected one of them, got both)"),
)


class ScriptArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that raises :class:`UsageError` instead of printing usage and
    exiting, so :func:`run_main` reports every error the same way (``--help`` still exits 0).
    Option names are never abbreviated (``--epoch`` is not silently ``--epochs``), and argparse's
    own messages are reworded as ``... (expected ..., got ...)``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        for pattern, repl in _ARGPARSE_REWRITES:
            if pattern.match(message):
                message = pattern.sub(repl, message)
                break
        raise UsageError(message)


_INT64 = 2**63


def _number_type(name: str, kind: type, what: str, ok: Callable[[float], bool]) -> Callable[[str], float | int]:
    """An argparse ``type=`` function parsing ``kind`` (int or finite float) and requiring ``ok``."""

    def parse(text: str) -> float | int:
        try:
            v = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (kind is float and not math.isfinite(v)) or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if kind is int and not -_INT64 <= v < _INT64:  # torch seeds, sizes and counts are int64
            raise argparse.ArgumentTypeError(f"expected {what} and < 2**63, got {text!r}")
        return v

    parse.__name__ = parse.__qualname__ = name
    parse.__doc__ = f"argparse ``type=``: {what}."
    return parse


positive_int = _number_type("positive_int", int, "an integer >= 1", lambda v: v >= 1)
nonnegative_int = _number_type("nonnegative_int", int, "an integer >= 0", lambda v: v >= 0)
finite_float = _number_type("finite_float", float, "a finite number", lambda v: True)
positive_float = _number_type("positive_float", float, "a finite number > 0", lambda v: v > 0)
nonnegative_float = _number_type("nonnegative_float", float, "a finite number >= 0", lambda v: v >= 0)
open_unit_float = _number_type("open_unit_float", float, "a number in (0, 1)", lambda v: 0.0 < v < 1.0)
unit_float = _number_type("unit_float", float, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0)
probability = _number_type("probability", float, "a probability in [0, 1]", lambda v: 0.0 <= v <= 1.0)
ema_decay = _number_type("ema_decay", float, "a number in [0, 1) (0 = off, the release uses 0.99)",
                         lambda v: 0.0 <= v < 1.0)


def _under_existing_folder(text: str, kind: str) -> str:
    """``text`` if the nearest existing parent of the (new or existing) ``kind`` path is a folder."""
    parent = os.path.dirname(os.path.abspath(text))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"expected a {kind} path, got {text!r} (its parent {parent!r} is a file)")
    return text


def output_folder(text: str) -> str:
    """A folder to write into: it may exist (as a folder) or not, but must not be a file, and its
    nearest existing parent must be a folder."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder path, got ''")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected a folder (new or existing), got the file {text!r}")
    return _under_existing_folder(text, "folder")


def output_file(text: str) -> str:
    """A file to write: it may exist (as a file) or not, but must not be a folder, and its nearest
    existing parent must be a folder."""
    if not text or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"expected a file path, got {text!r}")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected a file path, got the folder {text!r}")
    return _under_existing_folder(text, "file")


def _existing(text: str, kind: str, is_kind: Callable[[str], bool], other: str) -> str:
    """``text`` if it names an existing ``kind`` (``is_kind`` holds); else "not found" or "the <other>"."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"expected an existing {kind}, got {text!r} (not found)")
    if not is_kind(text):
        raise argparse.ArgumentTypeError(f"expected a {kind}, got the {other} {text!r}")
    return text


def existing_file(text: str) -> str:
    """An existing file."""
    return _existing(text, "file", os.path.isfile, "folder")


def existing_folder(text: str) -> str:
    """An existing folder."""
    return _existing(text, "folder", os.path.isdir, "file")


def existing_path(text: str) -> str:
    """An existing file or folder."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"expected an existing file or folder, got {text!r} (not found)")
    return text


def check_device(text: str) -> str:
    """A torch device string that exists here: ``cpu``, ``cuda``, ``cuda:N`` (N < device count),
    ``mps`` where available.

    Raises:
        UsageError: unknown device, or one this machine does not have.
    """
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: unknown device (expected cpu, cuda or cuda:N, got {text!r})") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError(f"--device: no CUDA device on this machine (expected cpu, got {text!r})")
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device: CUDA device index out of range (expected cuda:0..cuda:{n - 1}, got {text!r})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"--device: MPS is not available on this machine (expected cpu, got {text!r})")
    elif dev.type != "cpu":
        raise UsageError(f"--device: unsupported device type (expected cpu, cuda or cuda:N, got {text!r})")
    return text


def device_arg(text: str) -> str:
    """argparse ``type=`` form of :func:`check_device`."""
    try:
        return check_device(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1]) from None


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user gave something wrong" (reported without a traceback)."""
    from facelayers.io import CheckpointError

    types_: list[type[BaseException]] = [UsageError, CheckpointError, FileNotFoundError, IsADirectoryError,
                                         NotADirectoryError, PermissionError]
    try:
        from facelayers.data.manifests import ManifestError

        types_.append(ManifestError)
    except ImportError:  # pragma: no cover
        pass
    from facelayers.models.ssm.builders import BackboneUnavailableError
    from facelayers.models.ssm.data import DataUnavailableError
    from facelayers.data.datasets import FrameCountMismatchError
    from facelayers.models.ssm.inference import VideoReadError

    types_ += [BackboneUnavailableError, DataUnavailableError, VideoReadError, FrameCountMismatchError]
    return tuple(types_)


def one_line(err: BaseException) -> str:
    """The first line of an error's message (``file: reason`` for OS errors)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    return " ".join(text.split())


def run_main(main: Callable[[list[str]], int], argv: Sequence[str] | None = None, *,
             extra_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``main(argv)``; a user error (:func:`user_errors` + ``extra_errors``) prints ONE line
    ``error: <message>`` on stderr and returns 2, unless ``--debug`` is in ``argv`` (then it is
    raised with its traceback). ``KeyboardInterrupt`` returns 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    known = user_errors() + tuple(extra_errors)
    try:
        return main(argv)
    except known as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
