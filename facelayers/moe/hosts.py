"""Host models MoE layers are injected into: where their blocks are, block specs, their own checkpointing flags."""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

__all__ = [
    "find_block_container",
    "select_blocks",
    "filtered_module_names",
    "host_checkpointing_on",
    "HOST_CHECKPOINT_FLAGS",
    "BlockSpec",
]

BlockSpec = str | Sequence[int] | Callable[[int], bool] | None

#: Where hosts keep their own activation-checkpointing flag: (owner path relative to the model,
#: attribute). open_clip: ``Transformer.grad_checkpointing``; timm ViTs: ``model.grad_checkpointing``.
HOST_CHECKPOINT_FLAGS: tuple[tuple[str, str], ...] = (
    ("visual.transformer", "grad_checkpointing"),
    ("transformer", "grad_checkpointing"),
    ("", "grad_checkpointing"),
)


def find_block_container(model: nn.Module) -> tuple[str, nn.Module, str]:
    """``(prefix, block list, family)`` of an open_clip CLIP / VisionTransformer / Transformer
    (``visual.transformer.resblocks``, ``transformer.resblocks``, ``resblocks``; family "open_clip") or a
    timm ViT (``blocks``; family "timm")."""
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module):
        tr = getattr(visual, "transformer", None)
        if isinstance(getattr(tr, "resblocks", None), nn.Module):
            return "visual.transformer.resblocks", tr.resblocks, "open_clip"
    tr = getattr(model, "transformer", None)
    if isinstance(getattr(tr, "resblocks", None), nn.Module):
        return "transformer.resblocks", tr.resblocks, "open_clip"
    if isinstance(getattr(model, "resblocks", None), nn.Module):
        return "resblocks", model.resblocks, "open_clip"
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0 and all(
        isinstance(getattr(b, "mlp", None), nn.Module) for b in blocks
    ):
        return "blocks", blocks, "timm"
    raise TypeError(
        f"{type(model).__name__} is not a recognised open_clip CLIP/VisionTransformer/Transformer "
        "(visual.transformer.resblocks[i]) or timm VisionTransformer (blocks[i]) "
        "(expected one of those, got an unknown model); pass filter_fn=lambda module, name: ... to choose modules"
    )


def select_blocks(blocks: BlockSpec, n: int, *, default: str) -> list[int]:
    """Block indices from a spec: "all", "last:<n>", a list of ints (negative allowed) or ``i -> bool``."""
    if blocks is None:
        blocks = default
    if callable(blocks) and not isinstance(blocks, str):
        return [i for i in range(n) if blocks(i)]
    if isinstance(blocks, str):
        if blocks == "all":
            return list(range(n))
        if blocks.startswith("last:"):
            try:
                count = int(blocks[len("last:"):])
            except ValueError:
                raise ValueError(f"blocks must look like 'last:6' (expected 'last:<int>', got {blocks!r})") from None
            if not 1 <= count <= n:
                raise ValueError(f"blocks={blocks!r} asks for the last {count} blocks but the model has {n} "
                                 f"(expected 1 <= count <= {n}, got {count})")
            return list(range(n - count, n))
        raise ValueError(f"blocks must be 'all', 'last:<n>', a list of block indices or a callable "
                         f"(expected one of those, got {blocks!r})")
    if not isinstance(blocks, Sequence):
        raise TypeError(f"blocks must be 'all', 'last:<n>', a list of block indices or a callable "
                        f"(expected one of those, got {type(blocks).__name__})")
    idx = []
    for i in blocks:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"block indices must be ints (expected int, got {type(i).__name__} {i!r})")
        if not -n <= i < n:
            raise ValueError(f"block index {i} out of range for a model with {n} blocks "
                             f"(expected -{n} <= index < {n}, got {i})")
        idx.append(i % n)
    if len(set(idx)) != len(idx):
        raise ValueError(f"duplicate block indices (expected distinct indices, got {list(blocks)})")
    return sorted(idx)


def filtered_module_names(
    model: nn.Module, filter_fn: Callable[[nn.Module, str], bool], blocks: BlockSpec = None
) -> list[str]:
    """Qualified names of the modules ``filter_fn(module, name)`` picks, in model order; nothing below a
    picked module is visited. ``blocks`` must be ``None`` (the two selectors exclude each other)."""
    if blocks is not None:
        raise ValueError("pass either blocks or filter_fn, not both (expected one, got both)")
    names: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in names):
            continue
        if filter_fn(mod, name):
            names.append(name)
    return names


def host_checkpointing_on(model: nn.Module) -> list[str]:
    """``"<owner>.grad_checkpointing"`` of every host checkpointing flag that is on in ``model``."""
    found = []
    for owner_path, attr in HOST_CHECKPOINT_FLAGS:
        try:
            owner = model.get_submodule(owner_path) if owner_path else model
        except AttributeError:
            continue
        if getattr(owner, attr, False) is True:
            found.append(f"{owner_path + '.' if owner_path else ''}{attr}")
    return found


