"""Text side of SSM: a frozen CLIP text tower, CoOp prompt learners and textual semantic prototypes.

SSM classifies both tasks against text features of FACS descriptions (paper Sec. III-B/C):

* :class:`CLIPTextTower` -- the frozen CLIP text encoder ``E_t`` (paper eq. 11) split open so that
  it can encode *token embeddings* rather than token ids: token embedding, positional embedding,
  causal transformer, ``ln_final``, end-of-text pooling and projection. Given the plain token
  embeddings of a tokenised text it returns exactly ``model.encode_text(tokens)``.
* :class:`PromptLearner` -- CoOp (paper eq. 10, eqs. 17-18): ``c`` learnable context vectors are
  inserted around each fixed description and the result is encoded by the tower, giving
  L2-normalised features ``[K, D]``. Only the context vectors train.
* :class:`StoredPromptLearner` -- the released SSM code's prompt learners: prompts stored as embedded
  ``token_prefix`` / ``token_suffix`` buffers beside the context (its checkpoints have no token
  embedding); built with :meth:`PromptLearner.from_embeddings` or
  :meth:`StoredPromptLearner.from_descriptions`, its features equal the release's.
* :class:`TextPrototypes` -- the Textual Semantic Prototype module (TSP, Sec. III-C): one prompt
  learner for the ``K`` expression descriptions and one for the ``M`` AU descriptions, built from
  :mod:`facelayers.facs` and sharing one tower; ``forward() -> (T_exp [K, D], T_au [M, D])``.

In eval mode a :class:`PromptLearner` encodes its prompts once and serves cached features until it
is put back in training mode or any tensor it depends on (context vectors, tower weights, token ids)
changes -- checked through the tensors' version counters, so an in-place update under ``no_grad``
invalidates the cache too.

Examples::

    >>> import open_clip
    >>> from facelayers import CLIPTextTower, PromptLearner
    >>> model = open_clip.create_model("ViT-B-16", pretrained=None)
    >>> tower = CLIPTextTower.from_open_clip(model)
    >>> learner = PromptLearner(tower, ["cheek raiser, lip corner puller", "brow lowerer"], n_ctx=8)
    >>> learner().shape
    torch.Size([2, 512])
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import facs

__all__ = ["CLIPTextTower", "PromptLearner", "StoredPromptLearner", "TextPrototypes", "PROMPT_POSITIONS"]

#: Where the fixed description sits relative to the context vectors (CoOp's ``class_token_position``).
PROMPT_POSITIONS: tuple[str, ...] = ("end", "middle", "front")
_POOL_TYPES = ("argmax", "eos", "first", "last")


@functools.lru_cache(maxsize=4)
def _default_tokenizer(context_length: int) -> Any:
    # open_clip's SimpleTokenizer ships its BPE vocabulary inside the package: no network access.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class CLIPTextTower(nn.Module):
    """A frozen CLIP text encoder that encodes token embeddings (paper eq. 11, ``E_t``).

    Holds the text modules of a CLIP model -- by reference, so no weights are copied -- and exposes
    the encoder from the token-embedding level on, which is what prompt learning needs.
    :meth:`encode` applied to ``token_embedding(tokens)`` performs the same operations in the same
    order as open_clip's ``CLIP.encode_text(tokens)`` and returns a bit-identical result.

    Build it with :meth:`from_open_clip`; the constructor takes the parts for other CLIP
    implementations.

    Args:
        token_embedding: ``nn.Embedding(vocab, W)``, or ``None`` for a tower fed only with stored prompt
            embeddings (:class:`StoredPromptLearner`, e.g. the released checkpoints, which hold none).
        positional_embedding: ``[L, W]`` parameter or tensor.
        transformer: the text transformer; called as ``transformer(x, attn_mask=mask)``.
        ln_final: final layer norm over ``W``.
        text_projection: ``[W, D]`` matrix, an ``nn.Linear(W, D)``, or ``None`` (then ``D = W``).
        attn_mask: additive causal mask ``[L, L]`` or ``None`` (bidirectional).
        pool_type: how the sentence feature is pooled: ``"argmax"`` (position of the largest token
            id: CLIP's end-of-text token), ``"eos"`` (first ``eos_id``), ``"first"`` or ``"last"``.
        eos_id: end-of-text id for ``pool_type="eos"``.
        sequence_first: the transformer takes ``[L, N, W]`` input (the layout of old open_clip and
            OpenAI CLIP, whose transformers have no ``batch_first`` attribute). ``None`` detects it:
            a transformer with a ``batch_first`` attribute (open_clip >= 2.23) takes ``[N, L, W]``
            whatever its internal layout, one without it takes ``[L, N, W]``.
        tokenizer: a CLIP BPE tokenizer with ``encode(text) -> list[int]``, ``sot_token_id`` and
            ``eot_token_id`` (open_clip's ``SimpleTokenizer``). ``None``: open_clip's
            ``SimpleTokenizer`` (vocabulary of 49408, shipped with open_clip, works offline).
        freeze: set ``requires_grad=False`` on every tower parameter (in place: the tower shares them
            with the CLIP model).
    """

    def __init__(
        self,
        token_embedding: nn.Embedding | None,
        positional_embedding: Tensor,
        transformer: nn.Module,
        ln_final: nn.Module,
        text_projection: Tensor | nn.Module | None,
        attn_mask: Tensor | None,
        *,
        pool_type: str = "argmax",
        eos_id: int | None = None,
        sequence_first: bool | None = None,
        tokenizer: Any | None = None,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        if pool_type not in _POOL_TYPES:
            raise ValueError(f"pool_type must be one of {_POOL_TYPES} (expected one of {_POOL_TYPES}, got {pool_type!r})")
        if pool_type == "eos" and eos_id is None:
            raise ValueError("pool_type='eos' needs eos_id")
        if positional_embedding.ndim != 2:
            raise ValueError(
                f"positional_embedding must be [L, W], got shape {tuple(positional_embedding.shape)}"
            )
        self.token_embedding = token_embedding
        if isinstance(positional_embedding, nn.Parameter):
            self.positional_embedding = positional_embedding
        else:
            self.register_buffer("positional_embedding", positional_embedding, persistent=False)
        self.transformer = transformer
        self.ln_final = ln_final
        if text_projection is None or isinstance(text_projection, (nn.Parameter, nn.Module)):
            self.text_projection = text_projection
        else:
            self.register_buffer("text_projection", text_projection, persistent=False)
        self.register_buffer("attn_mask", attn_mask, persistent=False)
        # Remember whether the mask is CLIP's causal mask so that reset_parameters() can rebuild the
        # (non-persistent) buffer after meta-device construction and to_empty().
        self._causal_mask = attn_mask is not None and (
            attn_mask.device.type == "meta"
            or torch.equal(attn_mask.detach().cpu().float(), self._build_causal_mask(attn_mask.shape[-1]))
        )
        self.pool_type = pool_type
        self.eos_id = eos_id
        if sequence_first is None:
            sequence_first = not hasattr(transformer, "batch_first")
        self.sequence_first = bool(sequence_first)
        self._tokenizer = tokenizer
        if freeze:
            for p in self.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_open_clip(cls, model: nn.Module, tokenizer: Any | None = None, *, freeze: bool = True) -> CLIPTextTower:
        """Wrap the text tower of an open_clip ``CLIP`` or ``CustomTextCLIP`` (``TextTransformer``).

        The tower references the model's modules (no copy); with ``freeze=True`` their parameters
        get ``requires_grad=False`` in place.

        Args:
            model: ``open_clip.CLIP`` or ``open_clip.CustomTextCLIP`` whose ``text`` is an open_clip
                ``TextTransformer`` without a class token or padding mask (Hugging Face text towers
                are not supported).
            tokenizer: see the class docstring; ``None`` picks open_clip's ``SimpleTokenizer`` when the
                vocabulary has 49408 entries.
            freeze: see the class docstring.

        Raises:
            TypeError: the model has no supported text tower.
        """
        src = model
        if not hasattr(model, "token_embedding") and hasattr(model, "text"):
            src = model.text
            if getattr(src, "cls_emb", None) is not None or getattr(src, "use_pad_mask", False):
                raise TypeError(
                    "text towers with a class token or padding mask (CoCa-style) are not supported by "
                    "CLIPTextTower"
                )
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        missing = [n for n in needed if not hasattr(src, n)]
        if missing:
            raise TypeError(
                f"{type(model).__name__} has no open_clip text tower (missing {missing}); expected "
                "open_clip.CLIP or CustomTextCLIP with a TextTransformer text tower"
            )
        pool_type = getattr(src, "text_pool_type", getattr(src, "pool_type", "argmax"))
        eos_id = getattr(src, "text_eos_id", getattr(src, "eos_id", None))
        if pool_type not in _POOL_TYPES:
            raise TypeError(f"text pooling {pool_type!r} is not supported; supported: {_POOL_TYPES}")
        if tokenizer is None:
            vocab = src.token_embedding.num_embeddings
            if vocab != 49408:
                raise TypeError(
                    f"the text vocabulary has {vocab} entries, not the 49408 of CLIP's BPE tokenizer; "
                    "pass the model's tokenizer explicitly"
                )
        return cls(
            src.token_embedding,
            src.positional_embedding,
            src.transformer,
            src.ln_final,
            getattr(src, "text_projection", None),
            getattr(src, "attn_mask", None),
            pool_type=pool_type,
            eos_id=eos_id,
            tokenizer=tokenizer,
            freeze=freeze,
        )

    @staticmethod
    def _build_causal_mask(length: int) -> Tensor:
        return torch.full((length, length), float("-inf")).triu_(1)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Rebuild the causal attention mask buffer (needed after ``to_empty()``).

        The tower owns no trainable state: its weights are the CLIP model's; load them as usual.
        """
        if self._causal_mask and self.attn_mask is not None and self.attn_mask.device.type != "meta":
            self.attn_mask.copy_(self._build_causal_mask(self.attn_mask.shape[-1]))

    # ------------------------------------------------------------------ properties
    @property
    def context_length(self) -> int:
        """Maximum sequence length ``L`` (rows of the positional embedding)."""
        return int(self.positional_embedding.shape[0])

    @property
    def width(self) -> int:
        """Token width ``W``."""
        return int(self.positional_embedding.shape[1])

    @property
    def output_dim(self) -> int:
        """Feature size ``D`` of :meth:`encode`."""
        proj = self.text_projection
        if proj is None:
            return self.width
        if isinstance(proj, nn.Linear):
            return int(proj.out_features)
        return int(proj.shape[1])

    @property
    def cast_dtype(self) -> torch.dtype:
        """dtype the transformer runs in (open_clip's ``get_cast_dtype``)."""
        get = getattr(self.transformer, "get_cast_dtype", None)
        return get() if callable(get) else self.token_embedding.weight.dtype

    @property
    def tokenizer(self) -> Any:
        """The BPE tokenizer (``encode``, ``sot_token_id``, ``eot_token_id``)."""
        if self._tokenizer is None:
            self._tokenizer = _default_tokenizer(self.context_length)
        return self._tokenizer

    # ------------------------------------------------------------------ tokens
    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        """Token ids ``[N, L]`` as open_clip's tokenizer builds them, but never truncated.

        Raises:
            ValueError: a text does not fit the context length (names it and both lengths).
        """
        if isinstance(texts, str):
            texts = [texts]
        tok = self.tokenizer
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]
            if len(ids) > self.context_length:
                raise ValueError(
                    f"text {text!r} needs {len(ids)} tokens (with start/end tokens) but the context "
                    f"length is {self.context_length}"
                )
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def pool_index(self, token_ids: Tensor) -> Tensor:
        """Index ``[N]`` of the pooled (end-of-text) position of each row of ``token_ids [N, L]``."""
        if self.pool_type == "argmax":
            return token_ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (token_ids == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(token_ids.shape[0], dtype=torch.long, device=token_ids.device)
        return torch.full((token_ids.shape[0],), token_ids.shape[1] - 1, dtype=torch.long, device=token_ids.device)

    # ------------------------------------------------------------------ encoding
    def encode(self, token_embeddings: Tensor, eot_index: Tensor) -> Tensor:
        """Encode token embeddings.

        Args:
            token_embeddings: ``[K, L, W]`` with ``L <= context_length``.
            eot_index: ``[K]`` position pooled for each sequence (its end-of-text token).

        Returns:
            ``[K, D]`` text features (not normalised), in the tower's cast dtype.
        """
        if token_embeddings.ndim != 3 or token_embeddings.shape[-1] != self.width:
            raise ValueError(
                f"token_embeddings must be [K, L, W={self.width}], got shape {tuple(token_embeddings.shape)}"
            )
        k, length, _ = token_embeddings.shape
        if length > self.context_length:
            raise ValueError(
                f"token_embeddings has L={length} positions but the context length is {self.context_length}"
            )
        if eot_index.shape != (k,):
            raise ValueError(f"eot_index has the wrong shape (expected shape [K]=[{k}], got {tuple(eot_index.shape)})")
        cast = self.cast_dtype
        pos = self.positional_embedding
        mask = self.attn_mask
        if length != self.context_length:
            pos = pos[:length]
            mask = None if mask is None else mask[:length, :length]
        x = token_embeddings.to(cast)
        x = x + pos.to(cast)
        if self.sequence_first:
            x = x.permute(1, 0, 2)
            x = self.transformer(x, attn_mask=mask)
            x = x.permute(1, 0, 2)
        else:
            x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(k, device=x.device), eot_index.to(x.device)]
        proj = self.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Module) else x @ proj
        return x

    def encode_tokens(self, token_ids: Tensor) -> Tensor:
        """``encode(token_embedding(token_ids), pool_index(token_ids))``: ``[N, L] -> [N, D]``.

        Equals open_clip's ``model.encode_text(token_ids)``.
        """
        return self.encode(self.token_embedding(token_ids), self.pool_index(token_ids))

    def forward(self, token_embeddings: Tensor, eot_index: Tensor) -> Tensor:
        """Alias of :meth:`encode`."""
        return self.encode(token_embeddings, eot_index)

    def extra_repr(self) -> str:
        return (
            f"context_length={self.context_length}, width={self.width}, output_dim={self.output_dim}, "
            f"pool_type={self.pool_type!r}, sequence_first={self.sequence_first}"
        )


class _PromptLearnerBase(nn.Module):
    """What every prompt learner shares: the tower, the context, encoding and the eval-mode cache.

    Subclasses provide :meth:`prompt_embeddings` (``[K, L, W]``), :meth:`pool_index` (``[K]``),
    :attr:`num_classes` and ``reset_parameters``.
    """

    def __init__(self, tower: CLIPTextTower, *, n_ctx: int, class_specific: bool, position: str,
                 cache_in_eval: bool) -> None:
        super().__init__()
        if position not in PROMPT_POSITIONS:
            raise ValueError(f"position must be one of {PROMPT_POSITIONS} (expected one of {PROMPT_POSITIONS}, got {position!r})")
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 0:
            raise ValueError(f"n_ctx must be an int >= 0 (expected an int >= 0, got {n_ctx!r})")
        self.tower = tower
        self.n_ctx = n_ctx
        self.class_specific = bool(class_specific)
        self.position = position
        self.cache_in_eval = bool(cache_in_eval)
        self._cache: tuple[tuple, Tensor] | None = None
        self.encode_calls = 0  # number of tower encodes run so far (for diagnostics and tests)

    @property
    def num_classes(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def output_dim(self) -> int:
        """``D``."""
        return self.tower.output_dim

    def prompt_embeddings(self) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def pool_index(self) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _encode(self) -> Tensor:
        self.encode_calls += 1
        x = self.prompt_embeddings()
        feats = self.tower.encode(x, self.pool_index())
        return F.normalize(feats, dim=-1)

    def _cache_key(self) -> tuple | None:
        try:
            key = [(t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape))
                   for t in (*self.parameters(), *self.buffers())]
        except RuntimeError:  # inference tensors have no version counter: never cache them
            return None
        dev = self.ctx.device.type
        try:
            autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        except (RuntimeError, TypeError, AttributeError):
            autocast = None
        return (tuple(key), torch.is_inference_mode_enabled(), autocast)

    def forward(self) -> Tensor:
        """L2-normalised text features ``[K, D]``.

        In training mode (or with ``cache_in_eval=False``) the prompts are encoded at every call and
        gradients flow to ``ctx``. In eval mode the features are encoded once and the cached,
        detached tensor is returned until ``train()`` or a change of any parameter or buffer.
        """
        if self.training or not self.cache_in_eval:
            self._cache = None
            return self._encode()
        key = self._cache_key()
        if key is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():
            feats = self._encode()
        if key is not None:
            self._cache = (key, feats)
        return feats

    def train(self, mode: bool = True) -> _PromptLearnerBase:
        self._cache = None
        return super().train(mode)

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> _PromptLearnerBase:
        self._cache = None
        return super()._apply(fn, *args, **kwargs)


class PromptLearner(_PromptLearnerBase):
    """CoOp prompt learner over fixed descriptions (paper eq. 10 and eqs. 17-18).

    Each description ``d_k`` becomes ``[SOT, p_1, ..., p_c, d_k, EOT]`` (``position="end"``, the
    paper's default), ``[SOT, d_k, p_1..p_c, EOT]`` (``"front"``) or ``[SOT, p_1..p_{c/2}, d_k,
    p_{c/2+1}..p_c, EOT]`` (``"middle"``), where ``p`` are learnable context vectors in the token
    embedding space. The sequence is encoded by the frozen ``tower`` and L2-normalised.

    The frozen token embeddings of the descriptions are looked up from the tower at every encode
    (cheap next to the transformer), so loading new tower weights after construction is safe. Only
    ``ctx`` is a parameter of this module (the tower's are frozen).

    Args:
        tower: the text encoder (shared between learners; a submodule of each).
        descriptions: ``K`` fixed texts (``d_k``), used verbatim.
        n_ctx: number of context vectors ``c`` (paper: 8). ``0`` gives the plain descriptions:
            ``forward()`` then equals the normalised ``encode_text`` of the descriptions.
        ctx_init: initialise the context from this phrase's token embeddings instead of
            ``N(0, 0.02^2)``; the phrase must tokenise to exactly ``n_ctx`` tokens.
        class_specific: one context per description (``[K, c, W]``, the released SSM default) or
            one shared context (``[c, W]``, CoOp's unified context).
        position: ``"end"`` | ``"middle"`` | ``"front"``: where the description goes.
        cache_in_eval: in eval mode, encode once and serve the cached (detached) features until a
            dependency changes. Set ``False`` to encode at every call (e.g. to take gradients in
            eval mode).
        device: device of the context vectors (default: the tower's).
        dtype: dtype of the context vectors (default: the tower's token embedding dtype).

    Raises:
        ValueError: a description does not fit the context length with ``n_ctx`` context tokens
            (the message names it and the lengths; nothing is truncated), bad ``position``,
            negative ``n_ctx``, ``ctx_init`` of the wrong length, no descriptions, or an empty /
            whitespace-only description (``expected a non-empty description, got ''``).
        TypeError: ``descriptions`` is a single string or holds a non-string.
    """

    def __init__(
        self,
        tower: CLIPTextTower,
        descriptions: Sequence[str],
        *,
        n_ctx: int = 8,
        ctx_init: str | None = None,
        class_specific: bool = True,
        position: str = "end",
        cache_in_eval: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(tower, n_ctx=n_ctx, class_specific=class_specific, position=position,
                         cache_in_eval=cache_in_eval)
        descriptions = list(facs.check_descriptions(descriptions))
        self.descriptions = tuple(descriptions)
        self.ctx_init = ctx_init

        tok = tower.tokenizer
        length = tower.context_length
        self._ctx_init_ids: list[int] | None = None
        if ctx_init is not None:
            ids = list(tok.encode(ctx_init))
            if len(ids) != n_ctx:
                raise ValueError(
                    f"ctx_init {ctx_init!r} tokenises to {len(ids)} tokens but n_ctx={n_ctx}; "
                    f"pass n_ctx={len(ids)}"
                )
            self._ctx_init_ids = ids
        token_rows, slot_rows = [], []
        half = n_ctx // 2
        for text in descriptions:
            desc = list(tok.encode(text))
            need = len(desc) + n_ctx + 2
            if need > length:
                raise ValueError(
                    f"description {text!r} has {len(desc)} tokens; with {n_ctx} context tokens and the "
                    f"start/end tokens it needs {need} positions but the context length is {length} "
                    "(shorten it or lower n_ctx)"
                )
            ctx_ids = [-1 - j for j in range(n_ctx)]  # negative marks context slot j
            if position == "end":
                seq = ctx_ids + desc
            elif position == "front":
                seq = desc + ctx_ids
            else:
                seq = ctx_ids[:half] + desc + ctx_ids[half:]
            seq = [tok.sot_token_id, *seq, tok.eot_token_id]
            seq = seq + [0] * (length - len(seq))
            token_rows.append([max(t, 0) for t in seq])  # context slots hold the pad id 0
            slot_rows.append([-t - 1 if t < 0 else -1 for t in seq])
        # Kept on the CPU so that reset_parameters() can restore the buffers after to_empty().
        self._token_ids_cpu = torch.tensor(token_rows, dtype=torch.long)
        self._slots_cpu = torch.tensor(slot_rows, dtype=torch.long)
        factory = {
            "device": device if device is not None else tower.token_embedding.weight.device,
            "dtype": dtype if dtype is not None else tower.token_embedding.weight.dtype,
        }
        shape = (len(descriptions), n_ctx, tower.width) if self.class_specific else (n_ctx, tower.width)
        self.ctx = nn.Parameter(torch.empty(shape, **factory))
        buf_device = factory["device"]
        self.register_buffer("token_ids", torch.empty(len(descriptions), length, dtype=torch.long, device=buf_device),
                             persistent=False)
        self.register_buffer("ctx_slots", torch.empty(len(descriptions), length, dtype=torch.long, device=buf_device),
                             persistent=False)
        self.reset_parameters()

    @classmethod
    def from_embeddings(
        cls,
        tower: CLIPTextTower,
        prefix: Tensor,
        suffix: Tensor,
        ctx: Tensor,
        eot_index: Tensor | Sequence[int],
        **kwargs: Any,
    ) -> StoredPromptLearner:
        """A learner over stored prompt embeddings (the released SSM's prompt learners).

        Shorthand for :class:`StoredPromptLearner` ``(tower, prefix, suffix, ctx, eot_index,
        **kwargs)``; see there for the arguments.
        """
        return StoredPromptLearner(tower, prefix, suffix, ctx, eot_index, **kwargs)

    @property
    def num_classes(self) -> int:
        """``K``, the number of descriptions."""
        return len(self.descriptions)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise the context (N(0, 0.02^2), or ``ctx_init``'s embeddings) and restore buffers.

        After ``to_empty()`` call this once the tower weights are in place (``ctx_init`` reads them).
        """
        self.tower.reset_parameters()
        if self.token_ids.device.type != "meta":
            self.token_ids.copy_(self._token_ids_cpu)
            self.ctx_slots.copy_(self._slots_cpu)
        if self._ctx_init_ids is not None and self.n_ctx > 0:
            weight = self.tower.token_embedding.weight
            ids = torch.tensor(self._ctx_init_ids, dtype=torch.long, device=weight.device)
            emb = self.tower.token_embedding(ids).to(device=self.ctx.device, dtype=self.ctx.dtype)
            self.ctx.copy_(emb.expand_as(self.ctx))
        else:
            nn.init.normal_(self.ctx, std=0.02)
        self._cache = None

    def prompt_embeddings(self) -> Tensor:
        """The prompt token embeddings ``[K, L, W]`` (descriptions with context vectors inserted)."""
        emb = self.tower.token_embedding(self.token_ids)
        if self.n_ctx == 0:
            return emb
        ctx = self.ctx.to(emb.dtype)
        if not self.class_specific:
            ctx = ctx.unsqueeze(0).expand(self.num_classes, -1, -1)
        slots = self.ctx_slots
        is_ctx = slots >= 0
        idx = slots.clamp_min(0).unsqueeze(-1).expand(-1, -1, emb.shape[-1])
        return torch.where(is_ctx.unsqueeze(-1), ctx.gather(1, idx), emb)

    def pool_index(self) -> Tensor:
        """Position ``[K]`` of each prompt's end-of-text token (the pooled position)."""
        return self.tower.pool_index(self.token_ids)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, n_ctx={self.n_ctx}, ctx_init={self.ctx_init!r}, "
            f"class_specific={self.class_specific}, position={self.position!r}, "
            f"cache_in_eval={self.cache_in_eval}"
        )



class StoredPromptLearner(PromptLearner):
    """CoOp prompt learner over *stored* prompt embeddings (the released SSM's prompt learners).

    The released SSM code keeps no token ids in its checkpoints: each prompt learner stores its
    fixed prompt tokens already embedded, as a start-of-text ``token_prefix [K, 1, W]`` and a
    ``token_suffix [K, L-1-c, W]`` (the description tokens, end-of-text and padding), beside the
    learnable context ``ctx`` (released code, ``ssm/models/prompting.py``). This learner assembles
    the prompt exactly as the release does and encodes it through ``tower`` with end-of-text
    pooling at ``eot_index``, so its features equal the release's text features (normalised):

    * ``"end"``: ``[prefix, ctx_1..c, suffix]``;
    * ``"front"``: ``[prefix, suffix[:n_k], ctx_1..c, suffix[n_k:]]``;
    * ``"middle"``: ``[prefix, ctx_1..c/2, suffix[:n_k], ctx_{c/2+1}..c, suffix[n_k:]]``,

    where ``n_k = eot_index[k] - 1 - c`` is the length of description ``k`` in tokens (the release
    pools at ``argmax`` of the token ids of ``"X X ... X <description>"``, i.e. at ``1 + c + n_k``
    in every layout).

    Buffer and parameter names are the release's (``token_prefix``, ``token_suffix``, ``ctx``), so a
    released prompt learner's state dict loads as it is; ``eot_index`` is not saved (the release
    keeps its token ids outside the state dict): give it at construction, or build the learner
    with :meth:`from_descriptions`, which computes it from the texts. The tower's token embedding
    is never used by this learner (the release checkpoints do not contain one).

    Args:
        tower: the frozen text encoder.
        prefix: ``[K, 1, W]`` embedded start-of-text tokens.
        suffix: ``[K, S, W]`` embedded description + end-of-text + padding tokens, with
            ``1 + c + S <= tower.context_length`` (the release: ``S = L - 1 - c``).
        ctx: initial context ``[K, c, W]`` (class-specific) or ``[c, W]`` (shared); copied into the
            ``ctx`` parameter.
        eot_index: ``[K]`` end-of-text positions in the assembled prompt, each in ``[1 + c,
            1 + c + S)``.
        descriptions: the ``K`` texts the embeddings belong to (informative; checked non-empty).
        position: ``"end"`` | ``"middle"`` | ``"front"`` (the release's ``class_token_position``).
        cache_in_eval: see :class:`PromptLearner`.
        device: device of the parameter and buffers (default: ``prefix``'s).
        dtype: dtype of the parameter and buffers (default: ``prefix``'s).

    Raises:
        ValueError: shapes that do not fit together or the tower (the message names the tensor,
            the expected and the given shape), ``eot_index`` out of range, bad ``position``.

    Examples::

        >>> learner = PromptLearner.from_embeddings(tower, prefix, suffix, ctx, eot_index)
        >>> learner().shape      # [K, D], L2-normalised
    """

    def __init__(
        self,
        tower: CLIPTextTower,
        prefix: Tensor,
        suffix: Tensor,
        ctx: Tensor,
        eot_index: Tensor | Sequence[int],
        *,
        descriptions: Sequence[str] | None = None,
        position: str = "end",
        cache_in_eval: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        width = tower.width
        for name, t in (("prefix", prefix), ("suffix", suffix), ("ctx", ctx)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor (expected Tensor, got {type(t).__name__})")
        if prefix.ndim != 3 or prefix.shape[1] != 1 or prefix.shape[2] != width:
            raise ValueError(f"prefix must be [K, 1, W={width}] (expected that shape, got {tuple(prefix.shape)})")
        k = int(prefix.shape[0])
        if k < 1:
            raise ValueError(f"prefix must hold at least one prompt (expected K >= 1, got {tuple(prefix.shape)})")
        if suffix.ndim != 3 or suffix.shape[0] != k or suffix.shape[2] != width:
            raise ValueError(f"suffix must be [K={k}, S, W={width}] (expected that shape, got {tuple(suffix.shape)})")
        if ctx.ndim == 3:
            class_specific = True
            if ctx.shape[0] != k or ctx.shape[2] != width:
                raise ValueError(
                    f"ctx must be [K={k}, n_ctx, W={width}] or [n_ctx, W={width}] (expected one of them, "
                    f"got {tuple(ctx.shape)})"
                )
        elif ctx.ndim == 2:
            class_specific = False
            if ctx.shape[1] != width:
                raise ValueError(
                    f"ctx must be [K={k}, n_ctx, W={width}] or [n_ctx, W={width}] (expected one of them, "
                    f"got {tuple(ctx.shape)})"
                )
        else:
            raise ValueError(
                f"ctx must be [K={k}, n_ctx, W={width}] or [n_ctx, W={width}] (expected one of them, "
                f"got {tuple(ctx.shape)})"
            )
        n_ctx = int(ctx.shape[-2])
        length = 1 + n_ctx + int(suffix.shape[1])
        if length > tower.context_length:
            raise ValueError(
                f"prefix + ctx + suffix give {length} positions but the tower's context length is "
                f"{tower.context_length} (expected 1 + n_ctx + S <= {tower.context_length}, got 1 + "
                f"{n_ctx} + {suffix.shape[1]})"
            )
        super(PromptLearner, self).__init__(tower, n_ctx=n_ctx, class_specific=class_specific,
                                            position=position, cache_in_eval=cache_in_eval)
        self.descriptions = None if descriptions is None else facs.check_descriptions(descriptions)
        if self.descriptions is not None and len(self.descriptions) != k:
            raise ValueError(f"expected {k} descriptions (one per prompt), got {len(self.descriptions)}")
        self.ctx_init = None
        if isinstance(eot_index, Tensor) and eot_index.device.type == "meta":
            raise ValueError(
                "eot_index must hold real positions (expected a CPU or GPU tensor or a list, got a meta tensor)"
            )
        eot = torch.as_tensor(eot_index, device="cpu").detach()
        if eot.dtype not in (torch.int32, torch.int64) or eot.shape != (k,):
            raise ValueError(
                f"eot_index must be an integer tensor of shape [K]=[{k}] (expected that, got "
                f"{eot.dtype} {tuple(eot.shape)})"
            )
        eot = eot.long()
        bad = [(i, int(e)) for i, e in enumerate(eot.tolist()) if not 1 + n_ctx <= e < length]
        if bad:
            raise ValueError(
                f"eot_index must lie in [1 + n_ctx, 1 + n_ctx + S) = [{1 + n_ctx}, {length}) "
                f"(expected positions after the context, got (prompt, index) {bad})"
            )
        self._eot_cpu = eot
        self._layout_cpu = self._layout(eot, n_ctx, length, position)
        self._identity_layout = bool(torch.equal(self._layout_cpu, torch.arange(length, device="cpu").expand(k, -1)))
        factory = {
            "device": device if device is not None else prefix.device,
            "dtype": dtype if dtype is not None else prefix.dtype,
        }
        self.ctx = nn.Parameter(ctx.detach().to(**factory).clone())
        self.register_buffer("token_prefix", prefix.detach().to(**factory).clone())
        self.register_buffer("token_suffix", suffix.detach().to(**factory).clone())
        buf_device = factory["device"]
        self.register_buffer("eot_index", eot.to(buf_device), persistent=False)
        self.register_buffer("layout_index", self._layout_cpu.to(buf_device), persistent=False)
        self._source_ids_cpu: Tensor | None = None  # token ids when built by from_descriptions

    @staticmethod
    def _layout(eot: Tensor, n_ctx: int, length: int, position: str) -> Tensor:
        """``[K, length]`` positions in ``cat([prefix, ctx, suffix], 1)`` of each prompt position."""
        rows = []
        ctx = list(range(1, 1 + n_ctx))
        half = n_ctx // 2
        for e in eot.tolist():
            n = e - 1 - n_ctx  # description length in tokens
            desc = list(range(1 + n_ctx, 1 + n_ctx + n))
            rest = list(range(1 + n_ctx + n, length))
            if position == "end":
                row = [0, *ctx, *desc, *rest]
            elif position == "front":
                row = [0, *desc, *ctx, *rest]
            else:
                row = [0, *ctx[:half], *desc, *ctx[half:], *rest]
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long, device="cpu")

    @classmethod
    def from_descriptions(
        cls,
        tower: CLIPTextTower,
        descriptions: Sequence[str],
        *,
        n_ctx: int = 8,
        class_specific: bool = True,
        position: str = "end",
        cache_in_eval: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> StoredPromptLearner:
        """Build the stored embeddings from texts with the tower's token embedding, as the release.

        The release tokenises ``"X X ... X <description>"`` (``n_ctx`` placeholders) to the full
        context length, embeds it, and keeps position 0 as ``token_prefix`` and positions
        ``1 + n_ctx`` on as ``token_suffix``; the context starts ``N(0, 0.02^2)``. Use this to build
        a release-layout learner (then load a checkpoint's ``ctx`` / ``token_prefix`` /
        ``token_suffix`` into it) or to train one from CLIP weights. :meth:`reset_parameters`
        re-embeds the texts from the tower.

        Raises:
            ValueError: empty descriptions, a description that does not fit the context length
                with ``n_ctx`` context tokens, ``n_ctx < 0``.
        """
        texts = facs.check_descriptions(descriptions)
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 0:
            raise ValueError(f"n_ctx must be an int >= 0 (expected an int >= 0, got {n_ctx!r})")
        ids = cls.release_token_ids(tower, texts, n_ctx)
        weight = tower.token_embedding.weight
        factory = {
            "device": device if device is not None else weight.device,
            "dtype": dtype if dtype is not None else weight.dtype,
        }
        with torch.no_grad():
            emb = tower.token_embedding(ids.to(weight.device)).to(**factory)
        shape = (len(texts), n_ctx, tower.width) if class_specific else (n_ctx, tower.width)
        ctx = torch.empty(shape, **factory)
        nn.init.normal_(ctx, std=0.02)
        learner = cls(tower, emb[:, :1], emb[:, 1 + n_ctx:], ctx, ids.argmax(dim=-1), descriptions=texts,
                      position=position, cache_in_eval=cache_in_eval, **factory)
        learner._source_ids_cpu = ids
        return learner

    @staticmethod
    def release_token_ids(tower: CLIPTextTower, texts: Sequence[str], n_ctx: int) -> Tensor:
        """Token ids ``[K, L]`` of ``"X X ... X <text>"`` (``n_ctx`` placeholders; the release's template).

        ``release_token_ids(...).argmax(-1)`` is the release's end-of-text index ``[K]`` (CLIP's
        end-of-text token has the largest id), i.e. ``eot_index`` for :class:`StoredPromptLearner`.

        Raises:
            ValueError: a text does not fit the context length (named), or the tokenizer does not
                split the placeholders into one token each.
        """
        placeholder = " ".join(["X"] * n_ctx)
        if n_ctx and len(tower.tokenizer.encode(placeholder)) != n_ctx:
            raise ValueError(
                f"the tokenizer splits {placeholder!r} into {len(tower.tokenizer.encode(placeholder))} "
                f"tokens (expected one token per 'X', n_ctx={n_ctx})"
            )
        prompts = [placeholder + " " + t for t in texts]
        try:
            return tower.tokenize(prompts)
        except ValueError as err:
            raise ValueError(f"{err} (with {n_ctx} context placeholders; shorten it or lower n_ctx)") from None

    @property
    def num_classes(self) -> int:
        """``K``, the number of prompts."""
        return int(self.token_prefix.shape[0])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise the context ``N(0, 0.02^2)`` and restore the derived index buffers.

        The stored embeddings are restored only for a learner built by :meth:`from_descriptions`
        (re-embedded from the tower's token embedding); otherwise they are data: load them.
        """
        self.tower.reset_parameters()
        if self.eot_index.device.type != "meta":
            self.eot_index.copy_(self._eot_cpu)
            self.layout_index.copy_(self._layout_cpu)
        if self._source_ids_cpu is not None and self.token_prefix.device.type != "meta":
            weight = self.tower.token_embedding.weight
            emb = self.tower.token_embedding(self._source_ids_cpu.to(weight.device)).to(self.token_prefix)
            self.token_prefix.copy_(emb[:, :1])
            self.token_suffix.copy_(emb[:, 1 + self.n_ctx:])
        nn.init.normal_(self.ctx, std=0.02)
        self._cache = None

    def prompt_embeddings(self) -> Tensor:
        """The assembled prompts ``[K, 1 + n_ctx + S, W]`` (the release's ``PromptLearner.forward``)."""
        prefix, suffix = self.token_prefix, self.token_suffix
        ctx = self.ctx.to(prefix.dtype)
        if not self.class_specific:
            ctx = ctx.unsqueeze(0).expand(self.num_classes, -1, -1)
        x = torch.cat([prefix, ctx, suffix], dim=1)
        if self._identity_layout:
            return x
        idx = self.layout_index.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return x.gather(1, idx)

    def pool_index(self) -> Tensor:
        """End-of-text positions ``[K]`` (as given, or computed by :meth:`from_descriptions`)."""
        return self.eot_index

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, n_ctx={self.n_ctx}, class_specific={self.class_specific}, "
            f"position={self.position!r}, length={1 + self.n_ctx + self.token_suffix.shape[1]}, "
            f"cache_in_eval={self.cache_in_eval}"
        )


class TextPrototypes(nn.Module):
    """Textual Semantic Prototypes (TSP, paper Sec. III-C): expression and AU prompt learners.

    Builds the ``K`` expression descriptions and ``M`` AU descriptions from :mod:`facelayers.facs`
    (Table S4, or the released code's strings) in one of the paper's description styles, and one
    :class:`PromptLearner` for each, both encoding through the same ``tower``.

    Args:
        tower: the shared frozen text encoder.
        au_vocab: the ``M`` AU codes, e.g. ``facs.BP4D_AUS``.
        expression_vocab: the ``K`` expression names, e.g. ``facs.EXPRESSIONS_7``.
        style: expression description style, ``"compound"`` (paper default: the AU phrases of
            Table S4), ``"standalone"`` or ``"words"`` (paper Table VIII). AU descriptions are the
            FACS descriptions in every style.
        restrict_to_vocab: for ``"compound"``, keep only the phrases of AUs in ``au_vocab``
            (Table S4's "dataset-constrained approximations"); neutral keeps its description.
            With ``source="ssm_release"`` it picks the release's BP4D or DISFA table.
        include_name: prefix compound descriptions with the expression name (as the released code).
            ``None``: no prefix for Table S4, the name for the release strings (which always have it).
        source: ``"table_s4"`` (the paper) or ``"ssm_release"``: the exact description strings of
            the released code (:func:`facelayers.facs.release_descriptions`; compound style only).
        release_table: for ``"ssm_release"``: ``(au_dataset, expression dataset or class count)``,
            e.g. ``("bp4d", "dfew")``; default inferred from the vocabularies (see
            :func:`facelayers.facs.expression_descriptions`).
        n_ctx, ctx_init, class_specific, position, cache_in_eval: passed to both learners.
        device: device of the context vectors.
        dtype: dtype of the context vectors.

    Raises:
        ValueError: an empty description, a bad style / source, or vocabularies the chosen source
            does not describe.
    """

    def __init__(
        self,
        tower: CLIPTextTower,
        au_vocab: Sequence[int | str],
        expression_vocab: Sequence[str],
        *,
        style: str = "compound",
        restrict_to_vocab: bool = True,
        include_name: bool | None = None,
        source: str = "table_s4",
        release_table: tuple[str, str | int] | None = None,
        n_ctx: int = 8,
        ctx_init: str | None = None,
        class_specific: bool = True,
        position: str = "end",
        cache_in_eval: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.au_vocab = facs.check_vocabulary(au_vocab, "au")
        self.expression_vocab = facs.check_vocabulary(expression_vocab, "expression")
        self.style = style
        self.source = source
        restrict = self.au_vocab if (style == "compound" and restrict_to_vocab) else None
        self.expression_texts = facs.check_descriptions(
            facs.expression_descriptions(self.expression_vocab, style=style, restrict_to=restrict,
                                         include_name=include_name, source=source,
                                         release_table=release_table)
        )
        self.au_texts = facs.check_descriptions(facs.au_descriptions(self.au_vocab, source=source))
        common = dict(n_ctx=n_ctx, ctx_init=ctx_init, class_specific=class_specific, position=position,
                      cache_in_eval=cache_in_eval, device=device, dtype=dtype)
        self.expression_prompts = PromptLearner(tower, self.expression_texts, **common)
        self.au_prompts = PromptLearner(tower, self.au_texts, **common)

    @property
    def tower(self) -> CLIPTextTower:
        """The shared text tower."""
        return self.expression_prompts.tower

    def reset_parameters(self) -> None:
        """Re-initialise both learners' contexts."""
        self.expression_prompts.reset_parameters()
        self.au_prompts.reset_parameters()

    def forward(self) -> tuple[Tensor, Tensor]:
        """Return ``(T_exp [K, D], T_au [M, D])``, L2-normalised (paper eq. 11)."""
        return self.expression_prompts(), self.au_prompts()

    def extra_repr(self) -> str:
        return (
            f"expressions={len(self.expression_vocab)}, aus={len(self.au_vocab)}, style={self.style!r}, "
            f"source={self.source!r}"
        )
