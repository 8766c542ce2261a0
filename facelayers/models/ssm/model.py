"""The reference SSM model, composed of parts built elsewhere (:mod:`.builders`).

::

    expression clips [B1,T,3,H,W] ─┐                          ┌─ exp_temporal -> z_exp [B1,D] ─ exp_head
    AU clips         [B2,T,3,H,W] ─┴─ ONE vision pass ────────┤
                                     (MoE FFNs, task routed)  └─ au_temporal  -> z_au [B2,D] / [B2,T,D] ─ au_head
    text() -> T_exp [K,D], T_au [M,D] -> mapping -> T_exp', T_au' (the cosine heads' prototypes)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from facelayers.params import pretrained_and_new

if TYPE_CHECKING:  # pragma: no cover
    from .config import ModelConfig

__all__ = ["SSMModel"]


def _moe_layers(module: nn.Module) -> list[nn.Module]:
    from facelayers.moe import iter_moe_layers

    return list(iter_moe_layers(module))


class SSMModel(nn.Module):
    """Reference SSM: a (MoE) vision encoder shared by both tasks, one temporal head and one
    classifier head per task, optional text prototypes and a mapping between them.

    Every part is built outside and injected (see :func:`~facelayers.models.ssm.build_model`);
    a task whose temporal head is ``None`` is not served by the model.

    Args:
        visual: frames ``[N, 3, H, W] -> [N, D]`` (open_clip vision tower, MoE-injected or not).
        exp_temporal: ``[B, T, D] -> [B, D]`` (e.g. :class:`~facelayers.temporal.ClipTemporalHead`) or ``None``.
        au_temporal: ``[B, T, D] -> [B, D]`` or ``[B, T, D]`` (e.g.
            :class:`~facelayers.temporal.FrameTemporalHead`) or ``None``.
        exp_head: ``head(z)`` (no ``text``) or ``head(z, T_exp')`` -> logits ``[B, K]``; ``None`` with
            ``exp_temporal=None``.
        au_head: as ``exp_head`` for the AUs -> ``[B, M]`` or ``[B, T, M]``.
        text: ``text() -> (T_exp [K, D], T_au [M, D])`` (TSP) or ``None`` (linear heads).
        mapping: ``mapping(T_exp, T_au) -> (T_exp', T_au')`` (DPM or a sibling) or ``None``.
        config: the :class:`~facelayers.models.ssm.ModelConfig` the parts were built from (stored
            with checkpoints; :func:`~facelayers.models.ssm.build_model` sets it).
        vision_passes: default of :meth:`forward` (1 or 2; ``config.vision_passes`` when given).

    Attributes:
        tasks: ``("exp", "au")``, ``("exp",)`` or ``("au",)``; MoE task slot = position in it.
        dim: ``D``, the vision encoder's output width (``visual.output_dim`` when it has one).
    """

    def __init__(
        self,
        visual: nn.Module,
        exp_temporal: nn.Module | None,
        au_temporal: nn.Module | None,
        exp_head: nn.Module | None,
        au_head: nn.Module | None,
        text: nn.Module | None = None,
        mapping: nn.Module | None = None,
        *,
        config: ModelConfig | None = None,
        vision_passes: int | None = None,
    ) -> None:
        super().__init__()
        if exp_temporal is None and au_temporal is None:
            raise ValueError("SSMModel needs at least one task (expected exp_temporal and/or au_temporal, got neither)")
        for task, temporal, head in (("exp", exp_temporal, exp_head), ("au", au_temporal, au_head)):
            if (temporal is None) != (head is None):
                raise ValueError(f"{task}_temporal and {task}_head go together (expected both or neither, got "
                                 f"{type(temporal).__name__} and {type(head).__name__})")
        if mapping is not None and text is None:
            raise ValueError("a mapping needs text prototypes (expected text=..., got None)")
        # registration order = state-dict / parameter order of earlier versions (kept for checkpoints)
        self.visual = visual
        self.text = text
        self.mapping = mapping
        self.exp_temporal = exp_temporal
        self.au_temporal = au_temporal
        self.exp_head = exp_head
        self.au_head = au_head
        self.tasks: tuple[str, ...] = tuple(t for t, m in (("exp", exp_temporal), ("au", au_temporal)) if m is not None)
        out = getattr(visual, "output_dim", None)
        self.dim = int(out) if out is not None else None
        self.cfg = config
        self._vision_passes = 1
        if vision_passes is not None or config is None:
            self.vision_passes = 1 if vision_passes is None else vision_passes
        self._routing_depth = 0

    @property
    def vision_passes(self) -> int:
        """Default of :meth:`forward`'s ``vision_passes`` (the config's when the model has one)."""
        return int(self.cfg.vision_passes) if self.cfg is not None else self._vision_passes

    @vision_passes.setter
    def vision_passes(self, value: int) -> None:
        if value not in (1, 2):
            raise ValueError(f"vision_passes must be 1 or 2, got {value!r}")
        self._vision_passes = int(value)
        if self.cfg is not None:
            self.cfg.vision_passes = int(value)

    # -- routing -----------------------------------------------------------------------------
    @property
    def has_moe(self) -> bool:
        """True when the vision encoder holds MoE layers (forward then routes per task)."""
        return bool(_moe_layers(self.visual))

    def _task_slot(self, task: str) -> int:
        return self.tasks.index(task)

    def task_ids(self, n_exp: int, n_au: int, num_frames: int, device: torch.device | str | None = None) -> Tensor:
        """Per-frame task ids ``[(n_exp + n_au) * num_frames]`` of the concatenated batch
        ``[exp frames..., au frames...]``."""
        ids = []
        if n_exp:
            ids.append(torch.full((n_exp * num_frames,), self._task_slot("exp"), dtype=torch.long, device=device))
        if n_au:
            ids.append(torch.full((n_au * num_frames,), self._task_slot("au"), dtype=torch.long, device=device))
        if not ids:
            raise ValueError("task_ids: expected n_exp > 0 and/or n_au > 0, got 0 and 0")
        return torch.cat(ids)

    @contextlib.contextmanager
    def routing(self, n_exp: int, n_au: int, num_frames: int, device: torch.device | str | None = None) -> Iterator[None]:
        """Route the next concatenated vision pass(es) per sample (optional: :meth:`forward` routes
        by itself; activation checkpointing does not need it open across ``backward()``)."""
        if not self.has_moe:
            yield
            return
        from facelayers.moe import moe_task_context

        with moe_task_context(self.visual, self.task_ids(n_exp, n_au, num_frames, device)):
            self._routing_depth += 1
            try:
                yield
            finally:
                self._routing_depth -= 1

    # -- text --------------------------------------------------------------------------------
    def text_features(self) -> tuple[Tensor | None, Tensor | None]:
        """``(T_exp' [K, D], T_au' [M, D])`` after TSP and the mapping (``None`` without text)."""
        if self.text is None:
            return None, None
        t_exp, t_au = self.text()
        if self.mapping is not None:
            t_exp, t_au = self.mapping(t_exp, t_au)
        return t_exp, t_au

    # -- forward -----------------------------------------------------------------------------
    def encode_frames(self, frames: Tensor) -> Tensor:
        """``[N, 3, H, W] -> [N, D]`` through the (MoE) vision encoder, under the current routing."""
        return self.visual(frames)

    def encode_task_frames(self, frames: Tensor, task: str) -> Tensor:
        """``[N, 3, H, W] -> [N, D]`` with every frame routed as ``task`` (frames are encoded
        independently, so per-frame features can be reused by overlapping windows)."""
        if task not in self.tasks:
            raise ValueError(f"task must be one of {self.tasks}, got {task!r}")
        if self.has_moe:
            from facelayers.moe import moe_task_context

            with moe_task_context(self.visual, self._task_slot(task)):
                return self.encode_frames(frames)
        return self.encode_frames(frames)

    def forward(self, exp_clips: Tensor | None = None, au_clips: Tensor | None = None, *,
                vision_passes: int | None = None) -> dict[str, Tensor]:
        """One vision pass for both tasks (or one per task, the released code's execution).

        Args:
            exp_clips: ``[B1, T, 3, H, W]`` or ``None``.
            au_clips: ``[B2, T', 3, H, W]`` or ``None``.
            vision_passes: 1 = ONE concatenated pass, per-sample task routing; 2 = expression
                frames, then AU frames, each pass routed as its task (same results); default
                :attr:`vision_passes`.

        Returns:
            dict with ``exp_logits [B1, K]`` and/or ``au_logits [B2, M]`` (``[B2, T', M]`` when the
            AU temporal head keeps every frame).
        """
        if exp_clips is None and au_clips is None:
            raise ValueError("SSMModel.forward: expected expression and/or AU clips, got neither")
        if exp_clips is not None and self.exp_temporal is None:
            raise ValueError(f"this model was built for tasks {self.tasks}; got expression clips")
        if au_clips is not None and self.au_temporal is None:
            raise ValueError(f"this model was built for tasks {self.tasks}; got AU clips")
        parts, shapes = [], []
        for name, c in (("exp_clips", exp_clips), ("au_clips", au_clips)):
            if c is None:
                shapes.append((0, 0))
                continue
            if c.dim() != 5 or c.shape[2] != 3:
                raise ValueError(f"{name}: expected [B, T, 3, H, W], got {tuple(c.shape)}")
            shapes.append((c.shape[0], c.shape[1]))
            parts.append(c.flatten(0, 1))
        if len(parts) == 2 and parts[0].shape[1:] != parts[1].shape[1:]:
            raise ValueError(f"expression and AU frames must share [3, H, W]; got {tuple(parts[0].shape[1:])} "
                             f"and {tuple(parts[1].shape[1:])}")
        passes = self.vision_passes if vision_passes is None else vision_passes
        if passes not in (1, 2):
            raise ValueError(f"vision_passes must be 1 or 2, got {passes!r}")
        (b1, t1), (b2, t2) = shapes
        if passes == 2 and len(parts) == 2:
            feats = torch.cat([self.encode_task_frames(parts[0], "exp"), self.encode_task_frames(parts[1], "au")])
        elif passes == 2:
            feats = self.encode_task_frames(parts[0], "exp" if b1 else "au")
        elif self._routing_depth == 0 and self.has_moe:
            frames = torch.cat(parts) if len(parts) == 2 else parts[0]
            from facelayers.moe import moe_task_context

            ids = [self.task_ids(b, 0, t, frames.device) if task == "exp" else self.task_ids(0, b, t, frames.device)
                   for task, (b, t) in (("exp", (b1, t1)), ("au", (b2, t2))) if b]
            with moe_task_context(self.visual, torch.cat(ids) if len(ids) == 2 else ids[0]):
                feats = self.encode_frames(frames)
        else:
            feats = self.encode_frames(torch.cat(parts) if len(parts) == 2 else parts[0])
        out: dict[str, Tensor] = {}
        t_exp, t_au = self.text_features()
        if b1:
            out["exp_logits"] = self.exp_logits_from_features(feats[: b1 * t1].reshape(b1, t1, -1), t_exp)
        if b2:
            out["au_logits"] = self.au_logits_from_features(feats[b1 * t1 :].reshape(b2, t2, -1), t_au)
        return out

    def exp_logits_from_features(self, f: Tensor, t_exp: Tensor | None = None) -> Tensor:
        """Frame features ``[B, T, D]`` -> expression logits ``[B, K]``."""
        return self._task_logits(f, t_exp, 0, self.exp_temporal, self.exp_head, "expression")

    def au_logits_from_features(self, f: Tensor, t_au: Tensor | None = None) -> Tensor:
        """Frame features ``[B, T, D]`` -> AU logits ``[B, M]`` (centre) or ``[B, T, M]`` (all)."""
        return self._task_logits(f, t_au, 1, self.au_temporal, self.au_head, "AU")

    def _task_logits(self, f: Tensor, t: Tensor | None, text_index: int, temporal: nn.Module | None,
                     head: nn.Module, what: str) -> Tensor:
        """One task's temporal head then classifier head; ``t`` defaults to ``text_features()[text_index]``."""
        if temporal is None:
            raise ValueError(f"this model was built for tasks {self.tasks}; got {what} features")
        if t is None and self.text is not None:
            t = self.text_features()[text_index]
        z = temporal(f)
        return head(z, t) if t is not None else head(z)

    # -- execution options (no effect on results) ----------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> list[str]:
        """Activation checkpointing of the vision blocks, MoE-routing safe
        (:func:`~facelayers.models.ssm.builders.checkpoint_vision_blocks_`); returns the blocks changed."""
        from .builders import checkpoint_vision_blocks_

        names = checkpoint_vision_blocks_(self.visual, enable=enable)
        if self.cfg is not None:
            self.cfg.grad_checkpoint = bool(enable)
        return names

    def set_cache_in_eval(self, enable: bool = True) -> int:
        """Eval-mode text-feature cache of every ``PromptLearner`` on/off (drops cached features);
        returns the number of learners changed."""
        from facelayers.prompts import PromptLearner

        n = 0
        for m in self.modules():
            if isinstance(m, PromptLearner):
                m.cache_in_eval = bool(enable)
                m.train(m.training)  # train()/eval() drop the cache
                n += 1
        if self.cfg is not None:
            self.cfg.cache_in_eval = bool(enable)
        return n

    def set_moe_backend(self, backend: str) -> int:
        """Grouped-expert backend of every ``MoEFFN`` (one of ``facelayers.ops.grouped_experts.available_backends()``);
        returns the number of MoE layers changed."""
        from facelayers.ops.grouped_experts import available_backends

        if backend not in available_backends():
            raise ValueError(f"moe_backend must be one of {available_backends()}, got {backend!r}")
        n = 0
        for m in _moe_layers(self.visual):
            m.backend = backend
            n += 1
        if self.cfg is not None:
            self.cfg.moe_backend = backend
        return n

    # -- parameter groups --------------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split into ``"visual"`` (pretrained backbone weights, the MoE
        shared experts included) and ``"new"`` (MoE private experts / routers / gates, temporal
        heads, prompt contexts, mapping, heads); see :func:`facelayers.params.pretrained_and_new`."""
        new: list[nn.Parameter] = []
        if self.has_moe:
            from facelayers.moe import moe_parameter_groups

            for ps in moe_parameter_groups(self.visual).values():
                new.extend(ps)
        groups = pretrained_and_new(self, pretrained_prefixes=("visual.",), new_params=new)
        return {"visual": groups["pretrained"], "new": groups["new"]}

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, dim={self.dim}, vision_passes={self.vision_passes}"
