"""Read the released SSM runner's ``.pth`` checkpoints without executing anything from the file.

The released research code (MSA-LMC/SSM, ``ssm/runner.py``) saves its checkpoints with
``torch.save`` as a pickled dict::

    {"epoch": int, "state_dict": OrderedDict (saved through nn.DataParallel: keys start with
     "module."), "best_acc": float, "best_uar": float, "optimizer": AdamW state_dict,
     "recorder": main.RecorderMeter (an object of the training script holding numpy arrays)}

and a bare ``state_dict`` for its AU-selected snapshot. ``torch.load(weights_only=True)`` refuses
these files (the ``RecorderMeter`` class), and ``torch.load(weights_only=False)`` would run whatever
the pickle asks for. :func:`load_release_checkpoint` reads them with a restricted unpickler of its
own: every global the pickle names goes through an allowlist (tensor / storage rebuild functions,
``collections.OrderedDict``, numpy array reconstruction, torch dtypes, and a stand-in for
``RecorderMeter`` that only records its state, :class:`ReleaseRecorderMeter`). Any other global
(``os.system``, ``builtins.eval``, ``subprocess.Popen``, the real ``RecorderMeter`` class, ...) is
refused *before* it is looked up, with an :class:`UnsafeCheckpointError` naming it. Tensor
rebuilding is done here as well (views of the archive's raw storages, bounds-checked), so no torch
loading machinery is involved. Only ``BUILD`` (``__setstate__``) on the stand-in, numpy arrays /
dtypes and ``OrderedDict`` is allowed.

Supported containers: the zip archive written by ``torch.save`` since torch 1.6 (what the release
runner writes) and a plain pickle without tensors. The pre-1.6 tar/legacy format is refused with a
clear error.

Examples::

    >>> ckpt = load_release_checkpoint("checkpoint.pth")     # the whole pickled dict
    >>> sd = release_state_dict(ckpt)                          # "module." stripped, tensors only
    >>> ckpt["recorder"]                                      # ReleaseRecorderMeter(main.RecorderMeter, ...)
"""

from __future__ import annotations

import _codecs
import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CheckpointFormatError",
    "ReleaseRecorderMeter",
    "UnsafeCheckpointError",
    "allowed_globals",
    "load_release_checkpoint",
    "release_state_dict",
]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle names a global that is not on the allowlist (it was not imported or called)."""


class CheckpointFormatError(ValueError):
    """The file is not a readable checkpoint (truncated, damaged, unsupported container)."""


class ReleaseRecorderMeter:
    """Harmless stand-in for the release's ``RecorderMeter`` (``main`` / ``__main__`` / ``main1``).

    It runs no code of the original class: unpickling creates an empty instance and stores the
    pickled state (a dict of numbers and numpy arrays: the training curves) in :attr:`state`.
    """

    __slots__ = ("module", "state")

    def __init__(self, module: str = "main") -> None:
        self.module = module
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if not isinstance(state, dict):
            raise UnsafeCheckpointError(f"RecorderMeter state must be a dict (expected dict, got {type(state).__name__})")
        self.state = dict(state)

    def __getattr__(self, name: str) -> Any:
        # curves stored by the release (e.g. epoch_losses, epoch_accuracy) read as attributes
        if name in ("module", "state"):
            raise AttributeError(name)
        try:
            return self.state[name]
        except KeyError:
            raise AttributeError(f"RecorderMeter state has no {name!r} (has {sorted(self.state)})") from None

    def __repr__(self) -> str:
        return f"ReleaseRecorderMeter({self.module}.RecorderMeter, fields={sorted(self.state)})"


def _recorder_class(module: str) -> type:
    # one subclass per pickled module name so the stand-in remembers where it came from
    return type("RecorderMeter", (ReleaseRecorderMeter,), {"__slots__": (), "_origin": module,
                                                        "__new__": _recorder_new})


def _recorder_new(cls: type, *args: Any, **kwargs: Any) -> ReleaseRecorderMeter:
    obj = object.__new__(cls)
    ReleaseRecorderMeter.__init__(obj, getattr(cls, "_origin", "main"))
    return obj


_RECORDERS = {m: _recorder_class(m) for m in ("main", "__main__", "main1")}


class _StorageType:
    """Marker returned for ``torch.FloatStorage`` & co.: carries only the dtype (not callable)."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}


class _Storage:
    """A flat tensor over one storage record of the archive."""

    __slots__ = ("flat", "key")

    def __init__(self, key: str, flat: Tensor) -> None:
        self.key, self.flat = key, flat


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    backward_hooks: Any = None, metadata: Any = None) -> Tensor:
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(f"tensor rebuild needs an archive storage (expected a storage, got {type(storage).__name__})")
    if not (isinstance(storage_offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(isinstance(v, int) and v >= 0 for v in (*size, *stride))):
        raise UnsafeCheckpointError(f"malformed tensor metadata in storage {storage.key} "
                                    f"(expected int offset and int size/stride tuples, got {storage_offset!r}, {size!r}, {stride!r})")
    flat = storage.flat
    extent = storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else 0
    if storage_offset < 0 or extent > flat.numel():
        raise CheckpointFormatError(f"tensor of size {list(size)} at offset {storage_offset} does not fit storage "
                                    f"{storage.key} (expected at most {flat.numel()} elements, needs {extent})")
    return torch.as_strided(flat, size, stride, storage_offset)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None) -> Tensor:
    if not isinstance(data, Tensor):
        raise UnsafeCheckpointError(f"parameter rebuild needs a tensor (expected Tensor, got {type(data).__name__})")
    return data


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); nothing else is allowed
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"_codecs.encode is only allowed for latin1 strings (expected (str, 'latin1'), got "
                                    f"({type(obj).__name__}, {encoding!r}))")
    return _codecs.encode(obj, encoding, errors)


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if not (isinstance(cls, type) and issubclass(cls, ReleaseRecorderMeter) and base is object and state is None):
        raise UnsafeCheckpointError(f"copyreg._reconstructor is only allowed for the RecorderMeter stand-in "
                                    f"(expected (RecorderMeter, object, None), got ({cls!r}, {base!r}, {state!r}))")
    return cls.__new__(cls)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = _numpy_reconstruct
        out[(mod, "scalar")] = _numpy_scalar
    return out


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafeCheckpointError(f"numpy reconstruction of {subtype!r} refused (expected numpy.ndarray)")
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct(np.ndarray, shape, dtype)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafeCheckpointError(f"numpy scalar of dtype {dtype!r} refused (expected a numeric numpy dtype)")
    if not isinstance(data, bytes):
        raise UnsafeCheckpointError(f"numpy scalar payload must be bytes (expected bytes, got {type(data).__name__})")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def allowed_globals() -> dict[tuple[str, str], Any]:
    """``{(module, name): object}`` the restricted unpickler may return for a ``GLOBAL``."""
    out: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("_codecs", "encode"): _codecs_encode,
        ("copyreg", "_reconstructor"): _copyreg_reconstructor,
        ("torch", "Size"): torch.Size,
    }
    for name, dt in _STORAGE_DTYPES.items():
        out[("torch", name)] = _StorageType(name, dt)
    out[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage", torch.uint8)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            out[("torch", name)] = getattr(torch, name)
    out.update(_numpy_globals())
    for mod, cls in _RECORDERS.items():
        out[(mod, "RecorderMeter")] = cls
    return out


_ALLOWED = allowed_globals()
_BUILD_OK = (ReleaseRecorderMeter, np.ndarray, np.dtype, OrderedDict)


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[misc,name-defined]
    """Pure-Python unpickler: allowlisted globals only, guarded BUILD, storages from the archive."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, data: bytes, source: str, records: Mapping[str, Any] | None) -> None:
        super().__init__(io.BytesIO(data))
        self.source = source
        self.records = records  # key -> callable returning the bytes of that storage record
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global {module}.{name} from {self.source}: it is not on the allowlist "
                f"(expected tensors, storages, OrderedDict, numpy arrays or main.RecorderMeter, got {module}.{name}); "
                "nothing from the file was executed") from None

    def persistent_load(self, pid: Any) -> Any:
        if self.records is None:
            raise UnsafeCheckpointError(f"{self.source}: persistent storage reference outside a torch zip archive "
                                        f"(expected a torch.save archive, got {pid!r})")
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise UnsafeCheckpointError(f"{self.source}: unexpected persistent id (expected ('storage', type, key, "
                                        f"location, numel), got {pid!r})")
        _, stype, key, _location, numel = pid
        if key in self.storages:
            return self.storages[key]
        if key not in self.records:
            raise CheckpointFormatError(f"{self.source}: storage record data/{key} is missing (expected it in the archive)")
        raw = self.records[key]()
        itemsize = torch.empty((), dtype=stype.dtype).element_size()
        if len(raw) != numel * itemsize:
            raise CheckpointFormatError(f"{self.source}: storage data/{key} has {len(raw)} bytes "
                                        f"(expected {numel} x {itemsize} bytes of {stype.dtype})")
        flat = torch.frombuffer(bytearray(raw), dtype=stype.dtype) if numel else torch.empty(0, dtype=stype.dtype)
        st = _Storage(key, flat)
        self.storages[key] = st
        return st

    def _guarded_build(self) -> None:
        # BUILD pops the state and applies it to the object under it
        inst = self.stack[-2] if len(self.stack) >= 2 else None
        if not isinstance(inst, _BUILD_OK):
            raise UnsafeCheckpointError(f"{self.source}: refusing to set the state of a {type(inst).__name__} "
                                        "(expected a numpy array, numpy dtype, OrderedDict or RecorderMeter)")
        if isinstance(inst, OrderedDict):
            state = self.stack.pop()
            if not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
                raise UnsafeCheckpointError(f"{self.source}: OrderedDict state must map attribute names "
                                            f"(expected dict[str, ...], got {type(state).__name__})")
            for k, v in state.items():
                setattr(inst, k, v)
            return
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = _guarded_build


def _describe(path: str | os.PathLike) -> str:
    return os.fspath(path)


def load_release_checkpoint(path: str | os.PathLike) -> Any:
    """Unpickle a release checkpoint with the allowlist (nothing in the file is ever executed).

    Args:
        path: a ``.pth`` written by ``torch.save`` (zip archive), e.g. the release runner's
            ``checkpoint.pth`` / ``best_emotion.pth`` / ``best_au.pth``.

    Returns:
        The pickled object: usually a dict; tensors are CPU tensors (whatever device they were saved
        from), numpy arrays stay numpy arrays, a pickled ``RecorderMeter`` becomes a
        :class:`ReleaseRecorderMeter`.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the pickle names a global outside :func:`allowed_globals` (named in
            the message), or tries to set the state of another kind of object.
        CheckpointFormatError: truncated / damaged file, unsupported container, bad storage record.
    """
    src = _describe(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {src} (expected a .pth file)")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointFormatError(f"{src} is empty (expected a torch.save checkpoint, got 0 bytes)")
    if zipfile.is_zipfile(path):
        return _load_zip(path, src)
    with open(path, "rb") as f:
        head = f.read()
    if head.startswith(b"PK"):
        raise CheckpointFormatError(f"{src} is a truncated or damaged zip archive (expected a complete torch.save "
                                    f"checkpoint, got {size} bytes without a readable zip directory)")
    if not head.startswith(b"\x80"):
        raise CheckpointFormatError(f"{src} is not a torch checkpoint (expected a torch.save zip archive or a pickle, "
                                    f"got a file starting with {head[:8]!r})")
    return _unpickle(head, src, records=None, legacy_ok=True)


def _unpickle(data: bytes, src: str, records: Mapping[str, Any] | None, legacy_ok: bool = False) -> Any:
    up = _RestrictedUnpickler(data, src, records)
    try:
        obj = up.load()
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except (EOFError, pickle.UnpicklingError, IndexError, ValueError, TypeError, AttributeError, KeyError,
            struct.error, MemoryError, OverflowError, RuntimeError) as err:
        raise CheckpointFormatError(f"{src} is truncated or damaged (expected a complete pickle, got "
                                    f"{type(err).__name__}: {err})") from None
    if legacy_ok and isinstance(obj, int) and obj == 0x1950A86A20F9469CFC6C:
        raise CheckpointFormatError(f"{src} uses torch's pre-1.6 legacy format (expected a torch.save zip archive); "
                                    "re-save it with a current torch in a trusted environment")
    return obj


def _load_zip(path: str | os.PathLike, src: str) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointFormatError(f"{src} is a truncated or damaged zip archive (expected a torch.save checkpoint, "
                                    f"got: {err})") from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointFormatError(f"{src} is a zip archive but not a torch checkpoint (expected one "
                                        f"<archive>/data.pkl, got {len(pkl)})")
        prefix = pkl[0][: -len("data.pkl")]
        bo = prefix + "byteorder"
        if bo in names:
            order = zf.read(bo).decode("ascii", "replace").strip()
            if order != "little":
                raise CheckpointFormatError(f"{src} stores tensors in {order}-endian byte order (expected little)")
        records = {n[len(prefix) + len("data/"):]: n for n in names if n.startswith(prefix + "data/")}

        def reader(name: str) -> Any:
            def read() -> bytes:
                try:
                    return zf.read(name)
                except (zipfile.BadZipFile, OSError, EOFError) as err:
                    raise CheckpointFormatError(f"{src}: record {name} is truncated or damaged ({err})") from None
            return read

        try:
            data = zf.read(pkl[0])
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise CheckpointFormatError(f"{src}: record {pkl[0]} is truncated or damaged ({err})") from None
        return _unpickle(data, src, {k: reader(n) for k, n in records.items()})


def release_state_dict(checkpoint: Any, *, source: str = "checkpoint") -> dict[str, Tensor]:
    """The model weights of a release checkpoint, without the ``nn.DataParallel`` ``module.`` prefix.

    Args:
        checkpoint: what :func:`load_release_checkpoint` returned: the runner's dict (its
            ``"state_dict"`` entry is used) or a bare state dict.
        source: a name for error messages.

    Returns:
        ``{name: tensor}`` in the release's own key names (``prompt_learner1.ctx``, ``encoder.conv1.weight``, ...).

    Raises:
        CheckpointFormatError: no state dict, or a non-tensor value (named).
    """
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        sd = checkpoint["state_dict"]
    else:
        sd = checkpoint
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointFormatError(f"{source} holds no state dict (expected a dict with 'state_dict' or a dict of "
                                    f"tensors, got {type(sd).__name__})")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointFormatError(f"{source}: state dict entries {bad[:5]} are not tensors (expected str -> Tensor)")
    keys = list(sd)
    if all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)
