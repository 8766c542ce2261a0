"""Self-checking checkpoints of the reference SSM: ``{name}.safetensors`` (weights) +
``{name}.json`` (``{"config": ModelConfig, ...extra}``), never a pickle.

The weights file carries its own copy of the config and of both vocabularies in its safetensors
metadata (``facelayers.config``, ``facelayers.expressions``, ``facelayers.aus``). Loading checks,
before the model runs:

1. both files parse (missing, empty, truncated, corrupt, pickled or zip files are refused);
2. the JSON config agrees with the weights file's metadata field by field (a relabelled vocabulary,
   another ``num_frames`` or backbone in an edited JSON is an error; execution options
   :data:`~facelayers.models.ssm.config.EXECUTION_FIELDS` may differ);
3. every tensor has the shape the config's model expects (vocabulary sizes, expert counts, widths,
   positional embeddings), nothing is missing or left over;
4. every weight is finite.

Every error is a :class:`~facelayers.io.CheckpointError` naming the file and the field or tensor.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from facelayers.io import CheckpointError, SafetensorsHeader, inspect_safetensors, load_module, read_json, save_module, write_json

from .config import EXECUTION_FIELDS, ModelConfig
from .model import SSMModel

__all__ = [
    "VocabularyMismatchError",
    "CHECKPOINT_KIND",
    "save_model",
    "load_model",
    "load_weights",
    "read_checkpoint_config",
    "verify_checkpoint",
    "check_vocabularies",
    "resolve_checkpoint",
    "upgrade_checkpoint",
]

#: ``facelayers.kind`` metadata value of a reference-SSM weights file.
CHECKPOINT_KIND = "ssm_reference"
_META_CONFIG = "facelayers.config"
_META_EXP = "facelayers.expressions"
_META_AUS = "facelayers.aus"
_META_KIND = "facelayers.kind"


class VocabularyMismatchError(CheckpointError):
    """A checkpoint was trained with other AU / expression vocabularies than the model."""


def _paths(folder: str | os.PathLike, name: str) -> tuple[str, str]:
    folder = os.fspath(folder)
    return os.path.join(folder, f"{name}.json"), os.path.join(folder, f"{name}.safetensors")


def save_model(model: SSMModel, folder: str | os.PathLike, extra: dict[str, Any] | None = None, name: str = "model") -> None:
    """``{folder}/{name}.safetensors`` (weights; config and vocabularies in its metadata) +
    ``{folder}/{name}.json`` (``{"config": ..., **extra}``), each written atomically.

    Raises:
        ValueError: the model has no config (build it with :func:`build_model`).
    """
    if model.cfg is None:
        raise ValueError("save_model needs model.cfg (expected a model from build_model, got cfg=None)")
    cfg = model.cfg.to_json()
    json_path, st_path = _paths(folder, name)
    metadata = {
        "format": "pt",
        _META_KIND: CHECKPOINT_KIND,
        _META_CONFIG: json.dumps(cfg, sort_keys=True),
        _META_EXP: json.dumps(list(model.cfg.expressions)),
        _META_AUS: json.dumps([int(a) for a in model.cfg.aus]),
    }
    save_module(model, st_path, metadata=metadata)
    write_json(json_path, {"config": cfg, **(extra or {})})


def read_checkpoint_config(folder: str | os.PathLike, name: str = "model") -> dict[str, Any]:
    """The parsed ``{name}.json`` (a dict with a ``"config"`` object).

    Raises:
        CheckpointError: missing or invalid JSON, or no ``"config"`` object in it.
    """
    json_path, _ = _paths(folder, name)
    if not os.path.isfile(json_path):
        raise CheckpointError(json_path, f"no checkpoint config (expected {name}.json beside {name}.safetensors, got no such file)")
    meta = read_json(json_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        got = type(meta.get("config")).__name__ if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(json_path, f"expected a JSON object with a 'config' object, got {got}", field="config")
    return meta


def _config_from_json(json_path: str, d: dict[str, Any]) -> ModelConfig:
    try:
        cfg = ModelConfig.from_json(d)
        cfg.validate()
    except (ValueError, TypeError, KeyError) as err:
        msg = str(err).strip("'\"")
        m = re.match(r"(\w+) must", msg)
        raise CheckpointError(json_path, f"invalid model config: {msg}", field=m.group(1) if m else "config") from None
    return cfg


def _meta_json(st_path: str, header: SafetensorsHeader, key: str) -> Any:
    raw = header.metadata.get(key)
    if raw is None:
        raise CheckpointError(st_path, f"has no {key!r} metadata (expected a weights file written by "
                                       "facelayers.models.ssm.save_model, got a file without it)", field=key)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(st_path, f"metadata {key!r} is not valid JSON (expected JSON, got: {err.msg})",
                              field=key) from None


def _check_against_metadata(json_path: str, st_path: str, cfg: dict[str, Any], header: SafetensorsHeader) -> None:
    """The JSON config must say what the weights file says about itself."""
    kind = header.metadata.get(_META_KIND)
    if kind is None and header.metadata.get("facelayers") == CHECKPOINT_KIND:
        raise CheckpointError(st_path, "written by an older facelayers without the config copy that makes it "
                                       "self-checking (expected metadata facelayers.kind, got a legacy checkpoint); "
                                       "check its JSON, then convert it once with "
                                       "facelayers.models.ssm.upgrade_checkpoint", field=_META_KIND)
    if kind != CHECKPOINT_KIND:
        raise CheckpointError(st_path, f"is not a reference-SSM weights file (expected metadata {_META_KIND}="
                                       f"{CHECKPOINT_KIND!r}, got {kind!r})", field=_META_KIND)
    for key, field in ((_META_EXP, "expressions"), (_META_AUS, "aus")):
        stored = _meta_json(st_path, header, key)
        said = cfg.get(field)
        if said != stored:
            raise CheckpointError(json_path, f"vocabulary disagrees with the weights file {os.path.basename(st_path)} "
                                             f"(expected {stored}, got {said})", field=field)
    stored_cfg = _meta_json(st_path, header, _META_CONFIG)
    if not isinstance(stored_cfg, dict):
        raise CheckpointError(st_path, f"metadata {_META_CONFIG!r} is not an object (got {type(stored_cfg).__name__})",
                              field=_META_CONFIG)
    for field in sorted(set(stored_cfg) | set(cfg)):
        if field in EXECUTION_FIELDS:
            continue
        if cfg.get(field) != stored_cfg.get(field):
            raise CheckpointError(json_path, f"disagrees with the weights file {os.path.basename(st_path)} "
                                             f"(expected {stored_cfg.get(field)!r}, got {cfg.get(field)!r})", field=field)


def verify_checkpoint(folder: str | os.PathLike, name: str = "model") -> tuple[ModelConfig, dict[str, Any], SafetensorsHeader]:
    """Checks 1-2 of the module docstring (no model built, no tensor read).

    Returns:
        ``(config, the JSON dict, the weights file's header)``.

    Raises:
        CheckpointError: naming the file and field.
    """
    json_path, st_path = _paths(folder, name)
    meta = read_checkpoint_config(folder, name)
    header = inspect_safetensors(st_path)
    _check_against_metadata(json_path, st_path, meta["config"], header)
    cfg = _config_from_json(json_path, meta["config"])
    return cfg, meta, header


def check_vocabularies(model_cfg: ModelConfig, ckpt_cfg: dict[str, Any], source: str = "checkpoint") -> None:
    """Raise :class:`VocabularyMismatchError` naming both vocabularies when they differ."""
    ck_exp = tuple(ckpt_cfg.get("expressions", ()))
    ck_aus = tuple(int(a) for a in ckpt_cfg.get("aus", ()))
    problems = []
    field = None
    if "exp" in model_cfg.tasks and ck_exp != tuple(model_cfg.expressions):
        problems.append(f"expressions: {source} has {list(ck_exp)}, model has {list(model_cfg.expressions)}")
        field = "expressions"
    if "au" in model_cfg.tasks and ck_aus != tuple(model_cfg.aus):
        problems.append(f"AUs: {source} has {list(ck_aus)}, model has {list(model_cfg.aus)}")
        field = field or "aus"
    if problems:
        raise VocabularyMismatchError(source, "checkpoint vocabulary does not match the model: " + "; ".join(problems),
                                      field=field)


_FIELD_HINTS = (
    (re.compile(r"\.mlp\.(router|w1|w2|b1|b2|gamma|experts|shared_gate)"), "num_experts / moe_hidden / moe_blocks"),
    (re.compile(r"^text\.expression"), "expressions / n_ctx"),
    (re.compile(r"^text\.au"), "aus / n_ctx"),
    (re.compile(r"^mapping\."), "expressions / aus / mapping"),
    (re.compile(r"^exp_head"), "expressions"),
    (re.compile(r"^au_head"), "aus"),
    (re.compile(r"temporal"), "num_frames / temporal_heads / temporal_depth"),
    (re.compile(r"^visual\."), "backbone / clip_kwargs"),
)


def _hint(key: str) -> str:
    for pat, fields in _FIELD_HINTS:
        if pat.search(key):
            return f"; check config field(s) {fields}"
    return ""


def load_weights(model: SSMModel, folder: str | os.PathLike, name: str = "model", *, strict: bool = True) -> dict[str, Any]:
    """Load ``{name}.safetensors`` into ``model`` after every check of the module docstring and a
    vocabulary check against ``model.cfg``; returns the JSON dict.

    Raises:
        VocabularyMismatchError: the checkpoint's vocabularies differ from the model's.
        CheckpointError: any other problem, naming the file and field / tensor.
    """
    json_path, st_path = _paths(folder, name)
    cfg, meta, header = verify_checkpoint(folder, name)
    if model.cfg is not None:
        check_vocabularies(model.cfg, meta["config"], source=json_path)
    load_module(model, st_path, strict=strict, header=header, hint=_hint)
    return meta


def load_model(folder: str | os.PathLike, name: str = "model", *, device: str | torch.device = "cpu") -> SSMModel:
    """Rebuild the model from ``{name}.json`` (no download: random init, then the saved weights,
    after every check of the module docstring); eval mode on ``device``. A converted released
    model (``facelayers.kind = "ssm_release"``, docs/release.md) is rebuilt by
    :func:`facelayers.models.ssm.release.load_release_model` with its own checks.

    ``folder`` may also be a run folder, a checkpoint folder or a ``.safetensors`` path
    (see :func:`resolve_checkpoint`) when ``name`` is left at its default.
    """
    if name == "model" and not os.path.isfile(_paths(folder, name)[1]):
        folder, name = resolve_checkpoint(folder)
    from .release import is_release_checkpoint, load_release_model

    if is_release_checkpoint(folder, name):  # a converted released model (metadata kind "ssm_release")
        return load_release_model(folder, name, device=device)
    cfg, _, _ = verify_checkpoint(folder, name)
    from .builders import build_model

    model = build_model(cfg, pretrained=None)
    load_weights(model, folder, name)
    return model.to(device).eval()


def upgrade_checkpoint(folder: str | os.PathLike, name: str = "model", *, out: str | os.PathLike | None = None) -> str:
    """Convert a checkpoint written before the self-check metadata existed (metadata
    ``facelayers=ssm_reference``, an ``aliases`` table in its JSON) into the current format.

    Its JSON is TRUSTED (nothing else says what the weights are): look at it first. The weights
    must fit the model the JSON describes (shapes, no missing / unexpected tensors, finite values);
    older MoE parameter names are mapped by ``MoEFFN``'s own state-dict remap.

    Args:
        folder, name: the legacy ``{name}.safetensors`` + ``{name}.json``.
        out: folder to write the converted pair to (default: in place).

    Returns:
        The folder written to.

    Raises:
        CheckpointError: not a legacy checkpoint, or weights that do not fit its JSON.
    """
    from safetensors.torch import load_file

    from .builders import build_model

    json_path, st_path = _paths(folder, name)
    meta = read_checkpoint_config(folder, name)
    header = inspect_safetensors(st_path)
    if header.metadata.get("facelayers") != CHECKPOINT_KIND or _META_KIND in header.metadata:
        raise CheckpointError(st_path, f"not a legacy reference-SSM checkpoint (expected metadata facelayers="
                                       f"{CHECKPOINT_KIND!r} without {_META_KIND}, got {header.metadata})")
    cfg = _config_from_json(json_path, meta["config"])
    model = build_model(cfg, pretrained=None)
    from facelayers.io import check_finite_tensors

    check_finite_tensors(st_path)
    sd = load_file(st_path)
    for alias, key in meta.get("aliases", {}).items():
        if key not in sd:
            raise CheckpointError(json_path, f"alias {alias!r} points to a missing tensor (expected one of the file's "
                                             f"tensors, got {key!r})", field="aliases")
        sd[alias] = sd[key]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(st_path, f"does not fit the model its JSON describes (expected no missing / unexpected "
                              f"tensors, got missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    extra = {k: v for k, v in meta.items() if k not in ("config", "aliases")}
    target = os.fspath(out) if out is not None else os.fspath(folder)
    save_model(model, target, extra, name=name)
    return target


def resolve_checkpoint(path: str | os.PathLike) -> tuple[str, str]:
    """``-> (folder, name)`` of a ``{name}.safetensors`` + ``{name}.json`` pair, from a run folder
    (``checkpoint/best``, then ``last``), a checkpoint folder (``best``, ``last``, ``model``), or a
    ``.safetensors`` / ``.json`` file path.

    Raises:
        CheckpointError: nothing usable at ``path``.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        for ext in (".safetensors", ".json"):
            if path.endswith(ext):
                return os.path.dirname(os.path.abspath(path)), os.path.basename(path)[: -len(ext)]
        raise CheckpointError(path, "not a checkpoint (expected a run folder, a checkpoint folder or a "
                                    f".safetensors file, got a file named {os.path.basename(path)!r})")
    if not os.path.isdir(path):
        raise CheckpointError(path, "not found (expected a run folder, a checkpoint folder or a .safetensors file, got no such path)")
    for folder in (os.path.join(path, "checkpoint"), path):
        for name in ("best", "last", "model"):
            if os.path.isfile(os.path.join(folder, f"{name}.safetensors")):
                return folder, name
    raise CheckpointError(path, "no checkpoint found (expected a run folder, a checkpoint folder with "
                                "best.safetensors / last.safetensors, or a .safetensors file, got none of them)")
