"""Weights shipped inside the package, and the compact checkpoint format they use.

* :func:`load_tiny_facs_clip` -- the default tiny CLIP (:data:`facelayers.models.ssm.TINY_CLIP`)
  pretrained on synthetic frames with FACS captions (``docs/zeroshot.md``;
  ``python -m facelayers.data.synthetic pretrain-clip`` regenerates it).
* :func:`save_compact_clip` / :func:`load_compact_clip` -- safetensors + JSON metadata, nothing
  unpickled. The token embedding (93 % of a tiny CLIP) is stored as the rows that differ from a
  seeded base draw (:func:`base_token_embedding`); the loader rebuilds the base, puts the rows back
  and checks the full embedding against its stored SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "COMPACT_FORMAT",
    "TINY_FACS_CLIP",
    "TINY_FACS_RECIPE",
    "CompactCheckpointError",
    "base_token_embedding",
    "file_sha256",
    "load_compact_clip",
    "load_tiny_facs_clip",
    "read_compact_metadata",
    "save_compact_clip",
    "tiny_facs_recipe",
]

_HERE = Path(__file__).resolve().parent
#: The shipped tiny FACS CLIP (compact safetensors).
TINY_FACS_CLIP: Path = _HERE / "tiny_facs_clip.safetensors"
#: Its recipe, training log and recorded zero-shot numbers (JSON).
TINY_FACS_RECIPE: Path = _HERE / "tiny_facs_clip.json"

#: ``format`` tag in the metadata of a compact CLIP checkpoint.
COMPACT_FORMAT = "facelayers.compact_clip.v1"
_ROWS, _VALUES = "token_embedding.rows", "token_embedding.values"
_META_KEY = "facelayers.compact_clip"
_TOKEN_SEED_BASE = 7_700_000  # base-draw seed = this + recipe seed (its own stream, not torch's global RNG)


class CompactCheckpointError(RuntimeError):
    """A compact CLIP checkpoint is missing, malformed, or does not rebuild to its recorded weights."""


def base_token_embedding(seed: int, vocab_size: int = 49408, width: int = 64) -> Tensor:
    """The seeded base token embedding ``[vocab_size, width]``: N(0, 0.02^2) (open_clip's init
    distribution) from a CPU generator seeded with ``7_700_000 + seed``."""
    g = torch.Generator().manual_seed(_TOKEN_SEED_BASE + int(seed))
    return torch.randn(int(vocab_size), int(width), generator=g) * 0.02


def _tensor_sha256(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().float().numpy().tobytes()).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_compact_clip(model: nn.Module, path: str | os.PathLike[str], *, clip_kwargs: dict[str, Any], token_seed: int,
                      info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write an ``open_clip.CLIP`` as a compact safetensors file.

    Every parameter is stored in float32 except ``token_embedding.weight``, stored as the indices
    and values of the rows that differ from :func:`base_token_embedding` ``(token_seed)``. The
    metadata is one JSON entry with sorted keys, so the same weights always give the same bytes.

    Args:
        model: the CLIP (its token embedding must have started from the base draw).
        path: output ``.safetensors`` file.
        clip_kwargs: ``open_clip.CLIP`` kwargs that rebuild the architecture.
        token_seed: seed of the base token embedding.
        info: extra JSON-able metadata (recipe, numbers), stored under ``"info"``.

    Returns:
        The metadata written (strings decoded).
    """
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
    emb = sd.pop("token_embedding.weight")
    base = base_token_embedding(token_seed, emb.shape[0], emb.shape[1])
    rows = torch.nonzero((emb != base).any(1)).flatten()
    sd[_ROWS] = rows.to(torch.int64).contiguous()
    sd[_VALUES] = emb[rows].contiguous()
    meta = {
        "format": COMPACT_FORMAT,
        "clip_kwargs": clip_kwargs,
        "token_seed": int(token_seed),
        "token_embedding_shape": list(emb.shape),
        "token_embedding_sha256": _tensor_sha256(emb),
        "info": info or {},
    }
    import open_clip

    meta["open_clip_version"] = open_clip.__version__
    meta["torch_version"] = torch.__version__.split("+")[0]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # one metadata entry with sorted keys: safetensors writes several entries in hash order, and
    # the same weights must give the same bytes (and SHA-256) on every run
    save_file(sd, str(path), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    return meta


def read_compact_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON metadata of a compact CLIP checkpoint (no tensors are read).

    Raises:
        CompactCheckpointError: missing file or not a compact CLIP checkpoint.
    """
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CompactCheckpointError(f"compact CLIP checkpoint not found (expected a file, got {str(path)!r})")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if _META_KEY not in raw:
        raise CompactCheckpointError(f"{path}: not a compact CLIP checkpoint (expected metadata entry {_META_KEY!r}, "
                                     f"got entries {sorted(raw)})")
    try:
        meta = json.loads(raw[_META_KEY])
    except json.JSONDecodeError as err:
        raise CompactCheckpointError(f"{path}: metadata is not JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != COMPACT_FORMAT:
        meta = meta if isinstance(meta, dict) else {}
        raise CompactCheckpointError(f"{path}: not a compact CLIP checkpoint (expected format {COMPACT_FORMAT!r}, "
                                     f"got {meta.get('format')!r})")
    return meta


def load_compact_clip(path: str | os.PathLike[str], device: torch.device | str | None = None) -> nn.Module:
    """Rebuild the ``open_clip.CLIP`` saved by :func:`save_compact_clip` (eval mode).

    Raises:
        CompactCheckpointError: missing / malformed file, or the rebuilt token embedding does not
            match its recorded SHA-256 (e.g. a torch whose seeded ``randn`` differs).
    """
    import open_clip
    from safetensors.torch import load_file

    meta = read_compact_metadata(path)
    sd = load_file(str(path))
    for k in (_ROWS, _VALUES):
        if k not in sd:
            raise CompactCheckpointError(f"{path}: tensor {k!r} missing (expected a compact CLIP checkpoint)")
    rows, values = sd.pop(_ROWS), sd.pop(_VALUES)
    vocab, width = meta["token_embedding_shape"]
    emb = base_token_embedding(meta["token_seed"], vocab, width)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= vocab):
        raise CompactCheckpointError(f"{path}: token rows out of range (expected 0..{vocab - 1}, got "
                                     f"{int(rows.min())}..{int(rows.max())})")
    emb[rows] = values
    got = _tensor_sha256(emb)
    if got != meta["token_embedding_sha256"]:
        raise CompactCheckpointError(
            f"{path}: the rebuilt token embedding does not match the recorded one (expected sha256 "
            f"{meta['token_embedding_sha256'][:16]}..., got {got[:16]}...); the seeded base draw differs on this "
            f"torch ({torch.__version__}; saved with {meta.get('torch_version')})")
    sd["token_embedding.weight"] = emb
    model = open_clip.CLIP(**meta["clip_kwargs"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CompactCheckpointError(f"{path}: weights do not fit the architecture (missing {missing}, "
                                     f"unexpected {unexpected})")
    model.eval()
    return model.to(device) if device is not None else model


def tiny_facs_recipe() -> dict[str, Any]:
    """The shipped model's recipe, training log and recorded zero-shot numbers
    (``facelayers/assets/tiny_facs_clip.json``)."""
    if not TINY_FACS_RECIPE.is_file():
        raise CompactCheckpointError(f"recipe file missing (expected {TINY_FACS_RECIPE})")
    return json.loads(TINY_FACS_RECIPE.read_text())


def load_tiny_facs_clip(device: torch.device | str | None = None) -> nn.Module:
    """The shipped tiny CLIP pretrained on synthetic FACS captions: an ``open_clip.CLIP`` with the
    default tiny architecture (:data:`facelayers.models.ssm.TINY_CLIP`), eval mode, no download.

    Raises:
        CompactCheckpointError: the packaged file is missing or does not rebuild exactly.
    """
    return load_compact_clip(TINY_FACS_CLIP, device=device)
