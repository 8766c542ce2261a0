"""Checkpoints as safetensors + JSON, with checks: nothing is ever unpickled, and a file that is
missing, empty, truncated, corrupt, a pickle in disguise, holds non-finite numbers or does not fit
the model is refused with a :class:`CheckpointError` naming the file (and the field or tensor).

Weights go through ``safetensors.torch.save_model`` / ``load_model`` (which handle tensors shared
under several names, e.g. one frozen text tower used by two prompt learners, without any alias
table of our own); small structured data (configs, optimizer hyper-parameters) is JSON.

Examples::

    >>> save_module(model, "run/model.safetensors", metadata={"facelayers.kind": "my_model"})
    >>> header = inspect_safetensors("run/model.safetensors")   # shapes + metadata, no tensor read
    >>> load_module(model, "run/model.safetensors")             # shape check, finite check, load
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "SafetensorsHeader",
    "inspect_safetensors",
    "check_finite_tensors",
    "save_module",
    "load_module",
    "read_json",
    "write_json",
    "save_optimizer",
    "load_optimizer",
]


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file (and field / tensor).

    Attributes:
        path: the offending file.
        field: the JSON field, metadata key or tensor name at fault (or ``None``).
    """

    def __init__(self, path: str | os.PathLike, message: str, *, field: str | None = None) -> None:
        self.path = os.fspath(path)
        self.field = field
        where = f"{self.path}" + (f" [{field}]" if field else "")
        super().__init__(f"{where}: {message}")


# ----------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------


def _make_parent(path: str) -> None:
    """Create ``path``'s folder; a file in the way is a clear error, not ``FileExistsError``."""
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise NotADirectoryError(f"{path}: cannot create its folder (expected {probe} to be a folder, got a file)")
    os.makedirs(parent, exist_ok=True)


def _atomic_write(path: str, write: Any) -> None:
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder (expected a file path to write, got an existing folder)")
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (temporary file + rename)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    _atomic_write(os.fspath(path), write)


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file.

    Raises:
        CheckpointError: missing, a folder, unreadable, not UTF-8 or not valid JSON (with line and column).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "file not found (expected a JSON file, got no such file)")
    if os.path.isdir(path):
        raise CheckpointError(path, "is a folder (expected a JSON file, got a folder)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise CheckpointError(path, f"not a UTF-8 text file (expected JSON, got bytes at offset {err.start})") from None
    except OSError as err:
        raise CheckpointError(path, f"cannot be read ({err.strerror})") from None
    if not text.strip():
        raise CheckpointError(path, "is empty (expected a JSON object, got 0 bytes)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(path, f"not valid JSON (expected JSON, got: {err.msg} at line {err.lineno} "
                                    f"column {err.colno})") from None


# ----------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors file declares, read without loading a tensor.

    Attributes:
        metadata: the ``__metadata__`` string map (``{}`` when absent).
        shapes: tensor name -> shape.
        dtypes: tensor name -> safetensors dtype string (``"F32"``, ...).
    """

    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]


_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _sniff(path: str) -> None:
    """Refuse what is obviously not a safetensors file, naming what it looks like."""
    if not os.path.exists(path):
        raise CheckpointError(path, "file not found (expected a .safetensors weights file, got no such file)")
    if os.path.isdir(path):
        raise CheckpointError(path, "is a folder (expected a .safetensors weights file, got a folder)")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(path, "is empty (expected a safetensors file, got 0 bytes)")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04"):
        raise CheckpointError(path, "not a safetensors file (expected a safetensors file, got a zip archive such as "
                                    "a torch.save() pickle; facelayers never unpickles)")
    if head[:2] in _PICKLE_MAGIC:
        raise CheckpointError(path, "not a safetensors file (expected a safetensors file, got a Python pickle; "
                                    "facelayers never unpickles)")
    if size < 8:
        raise CheckpointError(path, f"is truncated (expected a safetensors file of at least 8 bytes, got {size})")
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise CheckpointError(path, f"is truncated or not a safetensors file (expected a header of {n} bytes "
                                    f"after the 8-byte length, got a file of {size} bytes)")


def inspect_safetensors(path: str | os.PathLike) -> SafetensorsHeader:
    """Header of a safetensors file (metadata, tensor names, shapes, dtypes); no tensor is read.

    Raises:
        CheckpointError: missing, empty, truncated, a pickle / zip, or an unparsable header.
    """
    path = os.fspath(path)
    _sniff(path)
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                sl = f.get_slice(k)
                shapes[k] = tuple(int(d) for d in sl.get_shape())
                dtypes[k] = str(sl.get_dtype())
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(path, f"not a valid safetensors file (expected a safetensors header, got: {msg})") from None
    return SafetensorsHeader(meta, shapes, dtypes)


def check_finite_tensors(path: str | os.PathLike) -> None:
    """Refuse a weights file holding NaN or infinite values (one tensor at a time, memory-mapped).

    Raises:
        CheckpointError: naming the first offending tensor and how many values are not finite.
    """
    path = os.fspath(path)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if t.is_floating_point() or t.is_complex():
                    bad = int((~torch.isfinite(t)).sum())
                    if bad:
                        raise CheckpointError(path, f"holds non-finite weights (expected finite values, got {bad} "
                                                    f"NaN/inf of {t.numel()})", field=k)
    except (SafetensorError, OSError) as err:  # truncated data section
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(path, f"cannot read the tensors (expected a complete safetensors file, got: {msg})") from None


def save_module(module: nn.Module, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> None:
    """``module``'s state dict -> ``path`` through ``safetensors.torch.save_model`` (shared tensors
    stored once), atomically; ``metadata`` (str -> str) goes into the file's header.

    Raises:
        TypeError: a metadata key or value that is not a string.
    """
    from safetensors.torch import save_model

    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map str to str (expected str: str, got {k!r}: {type(v).__name__})")
    path = os.fspath(path)
    _make_parent(path)
    _atomic_write(path, lambda tmp: save_model(module, tmp, metadata=meta))


def _expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_module(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    check_finite: bool = True,
    device: str | int = "cpu",
    header: SafetensorsHeader | None = None,
    hint: Callable[[str], str] | None = None,
) -> tuple[list[str], list[str]]:
    """Load ``path`` into ``module`` after checking it fits: every tensor in the file has the shape
    the module expects, nothing is missing or left over (``strict``), every value is finite
    (``check_finite``). Nothing is copied into ``module`` unless every check passes. Built on
    ``safetensors.torch.load_model`` (names of tensors shared in ``module`` and stored once are
    resolved by it).

    Args:
        module: the module to fill.
        path: the weights file.
        strict: missing or unexpected tensors are errors.
        check_finite: NaN / inf weights are errors.
        device: where the loaded tensors go.
        header: :func:`inspect_safetensors` of ``path`` when the caller already has it.
        hint: ``hint(tensor_name) -> str`` appended to a shape / key error (e.g. which config
            field decides that tensor's shape).

    Returns:
        ``(missing, unexpected)`` key lists (empty with ``strict=True``).

    Raises:
        CheckpointError: naming the file and the first tensor that does not fit.
    """
    path = os.fspath(path)
    header = header if header is not None else inspect_safetensors(path)
    expected = _expected_shapes(module)
    extra = hint or (lambda key: "")
    for k, shape in header.shapes.items():
        if k in expected and expected[k] != shape:
            raise CheckpointError(path, f"tensor shape does not fit the model (expected {list(expected[k])}, "
                                        f"got {list(shape)}){extra(k)}", field=k)
    if check_finite:
        check_finite_tensors(path)
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(module, path, strict=False, device=device)
    except (RuntimeError, OSError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(path, f"cannot be loaded ({msg})") from None
    missing, unexpected = sorted(missing), sorted(unexpected)
    if strict and (missing or unexpected):
        def short(keys: list[str]) -> str:
            return str(keys[:6])[:-1] + (f", ... {len(keys) - 6} more]" if len(keys) > 6 else "]")

        raise CheckpointError(path, f"does not fit the model (expected its {len(expected)} tensors, got missing "
                                    f"{short(missing)}, unexpected {short(unexpected)}){extra((missing or unexpected)[0])}",
                              field=(missing or unexpected)[0])
    return missing, unexpected


# ----------------------------------------------------------------------------------------------
# optimizer state: tensors -> safetensors, the rest -> JSON
# ----------------------------------------------------------------------------------------------


def save_optimizer(optimizer: torch.optim.Optimizer, folder: str | os.PathLike, extra: Mapping[str, Any] | None = None,
                   *, name: str = "optimizer", trainer_name: str = "trainer") -> None:
    """Optimizer state tensors -> ``{folder}/{name}.safetensors``; parameter groups, non-tensor
    state and ``extra`` -> ``{folder}/{trainer_name}.json``."""
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [dict(g) for g in sd["param_groups"]]
    _atomic_write(os.path.join(folder, f"{name}.safetensors"), lambda tmp: save_file(tensors, tmp))
    write_json(os.path.join(folder, f"{trainer_name}.json"), {"param_groups": groups, "scalars": scalars, **(extra or {})})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: str | os.PathLike, *, name: str = "optimizer",
                   trainer_name: str = "trainer") -> dict[str, Any]:
    """Inverse of :func:`save_optimizer`; returns the ``{trainer_name}.json`` dict.

    Raises:
        CheckpointError: unreadable files, or a state that does not fit ``optimizer``.
    """
    from safetensors.torch import load_file

    folder = os.fspath(folder)
    jpath = os.path.join(folder, f"{trainer_name}.json")
    meta = read_json(jpath)
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list):
        raise CheckpointError(jpath, "expected a JSON object with a 'param_groups' list", field="param_groups")
    spath = os.path.join(folder, f"{name}.safetensors")
    inspect_safetensors(spath)
    tensors = load_file(spath)
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for pid, d in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as err:
        raise CheckpointError(jpath, f"optimizer state does not fit the optimizer ({err})", field="param_groups") from None
    return meta

