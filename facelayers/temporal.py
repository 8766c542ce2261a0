"""Temporal modules over per-frame features (SSM paper eqs. 3-5, and the released code's modules).

The SSM model encodes every frame of a clip with a shared image encoder and then lets the frames of
one clip attend to each other:

* :class:`TemporalTransformer` -- a small pre-norm transformer over ``[B, T, D]`` frame features with
  a learned positional embedding, built on :func:`torch.nn.functional.scaled_dot_product_attention`.
* :class:`ClipTemporalHead` -- ``[B, T, D] -> [B, D]``: one representation per clip (paper eq. 3,
  the expression branch ``Phi_exp``), pooled with a learned CLS token or a (masked) mean.
* :class:`FrameTemporalHead` -- ``[B, T, D] -> [B, D]``: the temporally enhanced feature of the
  centre frame ``floor(T / 2)`` (paper eqs. 4-5, the AU branch ``Phi_au``), or ``[B, T, D]`` for every
  frame (``select="all"``, what the released SSM code supervises).

Both heads run one :class:`TemporalTransformer`, built from their arguments or passed in built
(``transformer=``), so a model can swap or share the body without touching the heads.

The released SSM code (``ssm/models/temporal.py``) uses two different modules; each is a class here:

* :class:`LocalFrameAttention` / :class:`LocalFrameTemporalHead` -- the release's AU module
  (``Temporal_Transformer_All``): a +-r-frame local attention whose output is a gated interpolation
  towards the attended raw frames, the exact identity at initialisation. Not a transformer.
* :class:`GatedClsTemporalHead` -- the release's expression module (``Temporal_Transformer_Cls``):
  CLS-token transformer ending in ``LN(cls_out + gate * cls_in)``.

Padding convention: ``key_padding_mask`` is a bool tensor ``[B, T]`` where ``True`` marks a *padded*
frame (the convention of :class:`torch.nn.MultiheadAttention`). Padded frames are never attended to,
so they cannot change any other output; the outputs *at* padded positions are set to zero. Every clip
needs at least one valid frame. That last condition is a check on tensor *values*: it runs only when
the mask lives on the CPU (free there); on an accelerator it would force a host synchronisation on
every call and is skipped (a fully padded clip then gives NaN where it is pooled).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TemporalBlock",
    "TemporalTransformer",
    "ClipTemporalHead",
    "FrameTemporalHead",
    "LocalFrameAttention",
    "LocalFrameTemporalHead",
    "GatedClsTemporalHead",
]


def _check_frames(x: Tensor, dim: int, max_frames: int | None, name: str = "x",
                  param: Tensor | None = None) -> tuple[int, int]:
    """Metadata-only checks of ``[B, T, D]`` frame features (no host sync); with ``param``, also that
    ``x`` has the module's floating dtype (outside autocast, where mixed dtypes are expected)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor (expected shape [B, T, {dim}], got {type(x).__name__})")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point (expected a float tensor, got dtype {x.dtype})")
    if (param is not None and x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type)):
        raise TypeError(f"{name} dtype does not match the module's parameters (expected {param.dtype}, got "
                        f"{x.dtype}); convert the module with .to({x.dtype}) or the input with .to({param.dtype})")
    if x.ndim != 3:
        raise ValueError(f"{name} must be 3-d (expected shape [B, T, D={dim}], got shape {tuple(x.shape)})")
    b, t, d = x.shape
    if d != dim:
        raise ValueError(
            f"{name} has the wrong feature size D={dim} (expected shape [B, T, {dim}], got shape {tuple(x.shape)})"
        )
    if t < 1:
        raise ValueError(f"{name} must hold at least one frame (expected T >= 1, got shape {tuple(x.shape)})")
    if max_frames is not None and t > max_frames:
        raise ValueError(
            f"{name} has T={t} frames but this module was built with max_frames={max_frames} "
            f"(expected T <= {max_frames}, got T={t}); build it with max_frames >= {t}"
        )
    return b, t


def _check_padding_mask(mask: Tensor | None, b: int, t: int) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"key_padding_mask must be a Tensor (expected bool [B, T]=[{b}, {t}], got {type(mask).__name__})"
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be bool, True = padded frame (expected dtype torch.bool, got {mask.dtype})"
        )
    if tuple(mask.shape) != (b, t):
        raise ValueError(f"key_padding_mask has the wrong shape (expected [B, T]=[{b}, {t}], got {tuple(mask.shape)})")
    if mask.device.type == "cpu":  # a value check: free on the CPU, a host sync on an accelerator
        full = mask.all(dim=1)
        if full.any():
            bad = torch.nonzero(full).flatten().tolist()
            raise ValueError(
                "every clip needs at least one valid (unpadded) frame "
                f"(expected at least one False per row, got clips {bad} fully padded)"
            )
    return mask


def _positive_int(name: str, val: object) -> int:
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        raise ValueError(f"{name} must be a positive int (expected an int >= 1, got {val!r})")
    return val


class TemporalBlock(nn.Module):
    """One pre-norm transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.

    Args:
        dim: feature size ``D``.
        heads: attention heads.
        mlp_dim: hidden size of the MLP.
        dropout: dropout on attention weights and on both residual branches (training only).
        qkv_bias: bias in the fused query/key/value projection.
        head_dim: size of one head; ``None`` means ``dim // heads`` (then ``dim % heads == 0``).
            The inner attention width is ``heads * head_dim`` (the released code fixes 64).
        act_layer: activation module class of the MLP (``nn.GELU``: exact erf GELU;
            ``functools.partial(nn.GELU, approximate="tanh")`` for the released code's).
        out_proj: project the attention output back with a linear layer. ``False`` (only when
            ``heads * head_dim == dim``) uses the heads' concatenation directly, as the released
            code does for a single head of full width.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shapes:
        ``forward(x [B, L, D], attn_mask [B, 1, 1, L] | None) -> [B, L, D]``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        *,
        head_dim: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        out_proj: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if dim % heads != 0:
                raise ValueError(
                    f"dim must be divisible by heads (expected dim % heads == 0, got dim={dim}, heads={heads})"
                )
            head_dim = dim // heads
        inner = heads * head_dim
        if not out_proj and inner != dim:
            raise ValueError(
                f"out_proj=False needs heads * head_dim == dim (expected {dim}, got {heads} * {head_dim} = {inner})"
            )
        fk = {"device": device, "dtype": dtype}
        self.dim = dim
        self.heads = heads
        self.head_dim = head_dim
        self.dropout = float(dropout)
        self.norm1 = nn.LayerNorm(dim, **fk)
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias, **fk)
        self.proj = nn.Linear(inner, dim, **fk) if out_proj else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **fk)
        self.fc1 = nn.Linear(dim, mlp_dim, **fk)
        self.act = act_layer()
        self.fc2 = nn.Linear(mlp_dim, dim, **fk)

    def reset_parameters(self) -> None:
        for m in (self.norm1, self.qkv, self.proj, self.norm2, self.fc1, self.fc2):
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Args:
            x: ``[B, L, D]`` tokens.
            attn_mask: optional bool ``[B, 1, 1, L]``, ``True`` = this key may be attended to.

        Returns:
            ``[B, L, D]``.
        """
        b, n, _ = x.shape
        p = self.dropout if self.training else 0.0
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        x = x + F.dropout(self.proj(a.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)), p, self.training)
        h = F.dropout(self.act(self.fc1(self.norm2(x))), p, self.training)
        return x + F.dropout(self.fc2(h), p, self.training)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, dropout={self.dropout}"


class TemporalTransformer(nn.Module):
    """Pre-norm transformer over the frames of a clip, with a learned positional embedding.

    ``x + pos[:T]`` goes through ``depth`` :class:`TemporalBlock` s and a final LayerNorm. Any number
    of frames ``1 <= T <= max_frames`` is accepted (the first ``T`` positions are used).

    Args:
        dim: feature size ``D`` of the frame features.
        depth: number of blocks (paper default 1).
        heads: attention heads (paper default 8); ``dim % heads == 0``.
        mlp_dim: MLP hidden size; ``None`` means ``4 * dim``.
        max_frames: number of learned positions, i.e. the largest accepted ``T``.
        dropout: dropout inside the blocks (training only).
        qkv_bias: bias in the query/key/value projections.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shapes:
        ``forward(x [B, T, D], key_padding_mask [B, T] | None) -> [B, T, D]``.

    Examples::

        >>> tt = TemporalTransformer(64, heads=4, max_frames=16)
        >>> tt(torch.randn(2, 16, 64)).shape
        torch.Size([2, 16, 64])
        >>> pad = torch.zeros(2, 16, dtype=torch.bool); pad[1, 10:] = True  # clip 1 has 10 frames
        >>> tt(torch.randn(2, 16, 64), key_padding_mask=pad).shape
        torch.Size([2, 16, 64])
    """

    def __init__(
        self,
        dim: int,
        depth: int = 1,
        heads: int = 8,
        mlp_dim: int | None = None,
        max_frames: int = 16,
        dropout: float = 0.0,
        *,
        qkv_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("dim", dim), ("depth", depth), ("heads", heads), ("max_frames", max_frames)):
            _positive_int(name, val)
        if dim % heads != 0:
            raise ValueError(
                f"dim must be divisible by heads (expected dim % heads == 0, got dim={dim}, heads={heads})"
            )
        mlp_dim = 4 * dim if mlp_dim is None else mlp_dim
        if not isinstance(mlp_dim, int) or mlp_dim < 1:
            raise ValueError(f"mlp_dim must be a positive int or None (expected an int >= 1, got {mlp_dim!r})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout is out of range (expected a value in [0, 1), got {dropout})")
        fk = {"device": device, "dtype": dtype}
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.mlp_dim = mlp_dim
        self.max_frames = max_frames
        self.dropout = float(dropout)
        self.qkv_bias = bool(qkv_bias)
        self.pos_embed = nn.Parameter(torch.empty(max_frames, dim, **fk))
        self.blocks = nn.ModuleList(
            TemporalBlock(dim, heads, mlp_dim, dropout=dropout, qkv_bias=qkv_bias, **fk) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, **fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for blk in self.blocks:
            blk.reset_parameters()
        self.norm.reset_parameters()

    def encode(self, x: Tensor, key_padding_mask: Tensor | None = None, prefix: Tensor | None = None) -> Tensor:
        """Run the transformer, optionally with extra position-free tokens in front of the frames.

        Args:
            x: ``[B, T, D]`` frame features, ``T <= max_frames``.
            key_padding_mask: optional bool ``[B, T]``, ``True`` = padded frame (never attended to;
                its output is zero).
            prefix: optional ``[P, D]`` learned tokens (e.g. a CLS token) prepended after the
                positional embedding is added to the frames; they are never padded.

        Returns:
            ``[B, P + T, D]`` (``P = 0`` without a prefix).
        """
        b, t = _check_frames(x, self.dim, self.max_frames, param=self.pos_embed)
        mask = _check_padding_mask(key_padding_mask, b, t)
        h = x + self.pos_embed[:t].to(x.dtype)
        n_prefix = 0
        if prefix is not None:
            if prefix.ndim != 2 or prefix.shape[1] != self.dim:
                raise ValueError(f"prefix has the wrong shape (expected [P, {self.dim}], got {tuple(prefix.shape)})")
            n_prefix = prefix.shape[0]
            h = torch.cat([prefix.to(h.dtype).unsqueeze(0).expand(b, -1, -1), h], dim=1)
        attn_mask = None
        if mask is not None:
            keep = ~mask
            if n_prefix:
                keep = torch.cat([keep.new_ones(b, n_prefix), keep], dim=1)
            attn_mask = keep[:, None, None, :]
        for blk in self.blocks:
            h = blk(h, attn_mask)
        h = self.norm(h)
        if mask is not None:
            full = mask if not n_prefix else torch.cat([mask.new_zeros(b, n_prefix), mask], dim=1)
            h = h.masked_fill(full.unsqueeze(-1), 0.0)
        return h

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Args:
            x: ``[B, T, D]`` frame features, ``1 <= T <= max_frames``.
            key_padding_mask: optional bool ``[B, T]``, ``True`` = padded frame.

        Returns:
            ``[B, T, D]`` temporally enhanced frame features (zeros at padded frames).
        """
        return self.encode(x, key_padding_mask)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, depth={self.depth}, heads={self.heads}, mlp_dim={self.mlp_dim}, "
            f"max_frames={self.max_frames}"
        )


# Build arguments of the TemporalTransformer a head builds when none is injected, and their defaults.
_TRANSFORMER_DEFAULTS = {"depth": 1, "heads": 8, "mlp_dim": None, "max_frames": 16, "dropout": 0.0, "qkv_bias": True}


def _temporal_body(
    dim: int,
    transformer: TemporalTransformer | None,
    build_args: dict[str, object],
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> TemporalTransformer:
    """The head's transformer: ``transformer`` as given (checked against ``dim`` and any build
    argument that was passed), or a new one built from the arguments (defaults where ``None``)."""
    given = {k: v for k, v in build_args.items() if v is not None}
    if transformer is None:
        return TemporalTransformer(dim, **(_TRANSFORMER_DEFAULTS | given), device=device, dtype=dtype)
    if not isinstance(transformer, TemporalTransformer):
        raise TypeError(
            f"transformer must be a built module (expected a TemporalTransformer or None, got {type(transformer).__name__})"
        )
    if transformer.dim != dim:
        raise ValueError(f"transformer feature size does not match the head (expected dim={dim}, got {transformer.dim})")
    for name, val in given.items():
        have = getattr(transformer, name)
        if have != val:
            raise ValueError(
                f"{name} disagrees with the injected transformer: pass either transformer= or its build "
                f"arguments (expected {name}={have!r} or no {name}, got {name}={val!r})"
            )
    return transformer


class _TransformerHead(nn.Module):
    """Shared wiring of the two paper heads: one (injectable) :class:`TemporalTransformer`."""

    temporal: TemporalTransformer

    @property
    def dim(self) -> int:
        return self.temporal.dim

    @property
    def max_frames(self) -> int:
        return self.temporal.max_frames


class ClipTemporalHead(_TransformerHead):
    """Clip-level representation ``Z_exp = Phi_exp(f_1..f_T)`` (paper eq. 3): ``[B, T, D] -> [B, D]``.

    Args:
        dim: feature size ``D``.
        depth, heads, mlp_dim, max_frames, dropout, qkv_bias: build arguments of the
            :class:`TemporalTransformer` (``None`` = its default: 1, 8, ``4 * dim``, 16, 0.0, True).
        pool: ``"cls"`` -- a learned CLS token is prepended to the frames and its output is the clip
            feature (the design of the released code's ``Temporal_Transformer_Cls``; its exact
            computation is :class:`GatedClsTemporalHead`); ``"mean"`` -- the mean of the frame
            outputs over valid (unpadded) frames.
        transformer: a built :class:`TemporalTransformer` to use instead of building one (it may be
            shared with another head). Build arguments passed beside it must agree with it.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shapes:
        ``forward(x [B, T, D], key_padding_mask [B, T] | None) -> [B, D]``.

    Examples::

        >>> head = ClipTemporalHead(64, heads=4, pool="cls")
        >>> head(torch.randn(2, 16, 64)).shape
        torch.Size([2, 64])
        >>> body = TemporalTransformer(64, heads=4)
        >>> ClipTemporalHead(64, transformer=body, pool="mean").temporal is body
        True
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int | None = None,
        heads: int | None = None,
        mlp_dim: int | None = None,
        max_frames: int | None = None,
        pool: str = "cls",
        dropout: float | None = None,
        qkv_bias: bool | None = None,
        transformer: TemporalTransformer | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool is unknown (expected 'cls' or 'mean', got {pool!r})")
        self.pool = pool
        build = dict(depth=depth, heads=heads, mlp_dim=mlp_dim, max_frames=max_frames, dropout=dropout, qkv_bias=qkv_bias)
        self.temporal = _temporal_body(dim, transformer, build, device, dtype)
        if pool == "cls":
            pdev = device if transformer is None else transformer.pos_embed.device
            pdt = dtype if transformer is None else transformer.pos_embed.dtype
            self.cls_token = nn.Parameter(torch.empty(1, dim, device=pdev, dtype=pdt))
        else:
            self.register_parameter("cls_token", None)
        self._reset_own()

    def _reset_own(self) -> None:
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def reset_parameters(self) -> None:
        self.temporal.reset_parameters()
        self._reset_own()

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Args:
            x: ``[B, T, D]`` frame features, ``1 <= T <= max_frames``.
            key_padding_mask: optional bool ``[B, T]``, ``True`` = padded frame (ignored by pooling).

        Returns:
            ``[B, D]`` clip features.
        """
        if self.pool == "cls":
            return self.temporal.encode(x, key_padding_mask, prefix=self.cls_token)[:, 0]
        h = self.temporal(x, key_padding_mask)  # padded positions are zero
        if key_padding_mask is None:
            return h.mean(dim=1)
        n_valid = (~key_padding_mask).sum(dim=1, keepdim=True).to(h.dtype)
        return h.sum(dim=1) / n_valid

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}"


class FrameTemporalHead(_TransformerHead):
    """Frame-level AU representation (paper eqs. 4-5): ``[B, T, D] -> [B, D]`` or ``[B, T, D]``.

    All frames attend to each other; ``select="center"`` returns the enhanced feature of the centre
    frame ``t = floor(T / 2)`` (0-based, eq. 5: for ``T = 16`` frame 8, for ``T = 5`` frame 2);
    ``select="all"`` returns every frame (the released code supervises all frames).

    With a ``key_padding_mask`` the centre is the centre **of the valid frames**: with ``L`` valid
    frames it is the ``floor(L / 2)``-th valid frame in temporal order (see :meth:`center_index`);
    without padding this is ``floor(T / 2)``.

    Args:
        dim: feature size ``D``.
        depth, heads, mlp_dim, max_frames, dropout, qkv_bias: build arguments of the
            :class:`TemporalTransformer` (``None`` = its default).
        select: ``"center"`` or ``"all"``.
        transformer: a built :class:`TemporalTransformer` to use instead of building one.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shapes:
        ``forward(x [B, T, D], key_padding_mask [B, T] | None) -> [B, D]`` (``"center"``) or
        ``[B, T, D]`` (``"all"``).

    Examples::

        >>> head = FrameTemporalHead(64, heads=4, select="center")
        >>> head(torch.randn(2, 16, 64)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int | None = None,
        heads: int | None = None,
        mlp_dim: int | None = None,
        max_frames: int | None = None,
        select: str = "center",
        dropout: float | None = None,
        qkv_bias: bool | None = None,
        transformer: TemporalTransformer | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if select not in ("center", "all"):
            raise ValueError(f"select is unknown (expected 'center' or 'all', got {select!r})")
        self.select = select
        build = dict(depth=depth, heads=heads, mlp_dim=mlp_dim, max_frames=max_frames, dropout=dropout, qkv_bias=qkv_bias)
        self.temporal = _temporal_body(dim, transformer, build, device, dtype)

    def reset_parameters(self) -> None:
        self.temporal.reset_parameters()

    @staticmethod
    def center_index(num_frames: int, key_padding_mask: Tensor | None = None) -> Tensor:
        """Index of the supervised centre frame of each clip.

        Args:
            num_frames: ``T``.
            key_padding_mask: optional bool ``[B, T]``, ``True`` = padded frame.

        Returns:
            ``floor(T / 2)`` as a 0-d long tensor without a mask; with a mask a long tensor ``[B]``
            holding, for each clip with ``L`` valid frames, the position of its ``floor(L / 2)``-th
            valid frame (0-based, in temporal order).
        """
        return _center_index(num_frames, key_padding_mask)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Args:
            x: ``[B, T, D]`` frame features, ``1 <= T <= max_frames``.
            key_padding_mask: optional bool ``[B, T]``, ``True`` = padded frame.

        Returns:
            ``[B, D]`` centre-frame features (``select="center"``) or ``[B, T, D]`` (``"all"``,
            zeros at padded frames).
        """
        return _select_frames(self.temporal(x, key_padding_mask), self.select, key_padding_mask)

    def extra_repr(self) -> str:
        return f"select={self.select!r}"


def _center_index(num_frames: int, key_padding_mask: Tensor | None) -> Tensor:
    if key_padding_mask is None:
        return torch.tensor(num_frames // 2)
    valid = ~key_padding_mask
    rank = valid.sum(dim=1) // 2  # 0-based rank among valid frames
    hit = valid & (valid.cumsum(dim=1) == (rank + 1).unsqueeze(1))
    return hit.to(torch.uint8).argmax(dim=1)


def _select_frames(h: Tensor, select: str, key_padding_mask: Tensor | None) -> Tensor:
    if select == "all":
        return h
    t = h.shape[1]
    if key_padding_mask is None:
        return h[:, t // 2]
    idx = _center_index(t, key_padding_mask)
    return h[torch.arange(h.shape[0], device=h.device), idx.to(h.device)]


# --------------------------------------------------------------------------------------------------
# The released code's two temporal modules (ssm/models/temporal.py), each a class of its own
# --------------------------------------------------------------------------------------------------


class LocalFrameAttention(nn.Module):
    """Gated local attention over the +-``radius`` neighbouring frames (the released AU module's layer).

    What the released SSM code runs as its AU temporal module (``Temporal_Transformer_All``, one
    ``_LocalFrameAttention`` per layer, ``ssm/models/temporal.py``); not part of the paper, whose
    eqs. 4-5 describe a transformer (:class:`FrameTemporalHead`). For frames ``x [B, T, D]``::

        h = LN(x);  q = h W_q^T,  k = h W_k^T            (bias-free D x D, split into heads)
        s[i, j] = q_i . k_j / sqrt(D / heads) + bias[head, j - i + radius]   for |j - i| <= radius
        a = softmax_j(s)                                  (frames farther than radius: weight 0)
        context_i = sum_j a[i, j] * x_j                   (the RAW frames, split into heads)
        out = x + max_update * tanh(channel_gate) * (context - x)

    ``W_k`` starts as a copy of ``W_q`` (Xavier-uniform, gain 0.5), the relative bias starts at 1 for
    the current frame and 0 elsewhere, and ``channel_gate`` starts at zero, so the layer is **exactly
    the identity at initialisation**; each output channel can move at most ``max_update`` of the way
    towards its attended neighbourhood average.

    Unlike the release, any number of frames ``T >= 1`` is accepted (the release requires exactly
    its ``num_patches``; the relative offsets do not depend on ``T``), and an optional
    ``key_padding_mask`` removes padded frames from the neighbourhoods (outputs at padded frames are
    zero).

    Args:
        dim: feature size ``D``; ``dim % heads == 0``.
        heads: attention heads (release: 8).
        radius: neighbourhood half-width ``r >= 1`` (release: 1).
        max_update: largest per-channel mixing weight, in ``(0, 1]`` (release: 0.25).
        qk_init_gain: Xavier-uniform gain of ``W_q`` (copied into ``W_k``) at initialisation
            (release: 0.5).
        eps: LayerNorm epsilon.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shapes:
        ``forward(x [B, T, D], key_padding_mask [B, T] | None) -> [B, T, D]``.

    Attributes:
        norm: the LayerNorm ``[D]``.
        q_proj, k_proj: bias-free ``nn.Linear(D, D)``.
        rel_pos_bias: ``[heads, 2 * radius + 1]``, index ``radius + (j - i)``.
        channel_gate: ``[D]``.

    Examples::

        >>> layer = LocalFrameAttention(64, heads=4)
        >>> x = torch.randn(2, 16, 64)
        >>> torch.equal(layer(x), x)  # identity at initialisation
        True
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        radius: int = 1,
        max_update: float = 0.25,
        qk_init_gain: float = 0.5,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _positive_int("dim", dim)
        _positive_int("heads", heads)
        _positive_int("radius", radius)
        if dim % heads != 0:
            raise ValueError(
                f"dim must be divisible by heads (expected dim % heads == 0, got dim={dim}, heads={heads})"
            )
        if not 0.0 < max_update <= 1.0:
            raise ValueError(f"max_update is out of range (expected a value in (0, 1], got {max_update})")
        fk = {"device": device, "dtype": dtype}
        self.dim, self.heads, self.radius = dim, heads, radius
        self.head_dim = dim // heads
        self.max_update = float(max_update)
        self.qk_init_gain = float(qk_init_gain)
        self.norm = nn.LayerNorm(dim, eps=eps, **fk)
        self.q_proj = nn.Linear(dim, dim, bias=False, **fk)
        self.k_proj = nn.Linear(dim, dim, bias=False, **fk)
        self.rel_pos_bias = nn.Parameter(torch.empty(heads, 2 * radius + 1, **fk))
        self.channel_gate = nn.Parameter(torch.empty(dim, **fk))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Release initialisation: ``W_k = W_q`` (Xavier, gain ``qk_init_gain``), bias 1 at offset 0,
        ``channel_gate = 0`` (identity)."""
        self.norm.reset_parameters()
        nn.init.xavier_uniform_(self.q_proj.weight, gain=self.qk_init_gain)
        self.k_proj.weight.copy_(self.q_proj.weight)
        self.rel_pos_bias.zero_()
        self.rel_pos_bias[:, self.radius] = 1.0
        self.channel_gate.zero_()

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Args:
            x: ``[B, T, D]`` frame features, any ``T >= 1``.
            key_padding_mask: optional bool ``[B, T]``, ``True`` = padded frame (never attended to;
                its output is zero).

        Returns:
            ``[B, T, D]``.
        """
        b, t = _check_frames(x, self.dim, None, param=self.norm.weight)
        mask = _check_padding_mask(key_padding_mask, b, t)
        h = self.norm(x)
        q = self.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5  # [B, H, T, T]
        pos = torch.arange(t, device=x.device)
        offset = pos[None, :] - pos[:, None]  # j - i
        local = offset.abs() <= self.radius
        bias = self.rel_pos_bias[:, offset.clamp(-self.radius, self.radius) + self.radius]  # [H, T, T]
        scores = scores + bias.unsqueeze(0).to(scores.dtype)
        allowed = local.view(1, 1, t, t)
        if mask is not None:
            allowed = allowed & ~mask.view(b, 1, 1, t)
        # the release fills with the dtype's lowest value, not -inf: a row with nothing allowed (a
        # padded frame whose neighbours are padded) then stays finite; its output is zeroed below
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)
        values = x.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # raw frames, split into heads
        context = (weights @ values).transpose(1, 2).reshape(b, t, self.dim)
        mixing = (self.max_update * torch.tanh(self.channel_gate)).to(x.dtype)
        out = x + mixing * (context - x)
        if mask is not None:
            out = out.masked_fill(mask.unsqueeze(-1), 0.0)
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, radius={self.radius}, max_update={self.max_update}"


class LocalFrameTemporalHead(nn.Module):
    """The released code's AU temporal module (``Temporal_Transformer_All``): ``depth`` stacked
    :class:`LocalFrameAttention` layers, ``[B, T, D] -> [B, T, D]`` (or the centre frame).

    The release supervises every frame (``select="all"``, its behaviour); ``select="center"``
    returns the centre of the valid frames as :class:`FrameTemporalHead` does. The release's
    constructor also takes ``mlp_dim`` and ``dim_head``; it uses neither (there is no MLP, and the
    head size must be ``D / heads``), so they have no counterpart here.

    Args:
        dim: feature size ``D``.
        depth: number of layers (release: 1).
        heads, radius, max_update, qk_init_gain: see :class:`LocalFrameAttention`.
        select: ``"all"`` (release) or ``"center"``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shapes:
        ``forward(x [B, T, D], key_padding_mask [B, T] | None) -> [B, T, D]`` (``"all"``) or
        ``[B, D]`` (``"center"``).

    Examples::

        >>> head = LocalFrameTemporalHead(64, heads=4)
        >>> head(torch.randn(2, 16, 64)).shape
        torch.Size([2, 16, 64])
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int = 1,
        heads: int = 8,
        radius: int = 1,
        max_update: float = 0.25,
        qk_init_gain: float = 0.5,
        select: str = "all",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _positive_int("depth", depth)
        if select not in ("center", "all"):
            raise ValueError(f"select is unknown (expected 'center' or 'all', got {select!r})")
        self.dim, self.depth, self.select = dim, depth, select
        self.layers = nn.ModuleList(
            LocalFrameAttention(
                dim, heads=heads, radius=radius, max_update=max_update, qk_init_gain=qk_init_gain,
                device=device, dtype=dtype,
            )
            for _ in range(depth)
        )

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Args:
            x: ``[B, T, D]`` frame features.
            key_padding_mask: optional bool ``[B, T]``, ``True`` = padded frame.

        Returns:
            ``[B, T, D]`` (``"all"``, zeros at padded frames) or ``[B, D]`` (``"center"``).
        """
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        return _select_frames(x, self.select, key_padding_mask)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, depth={self.depth}, select={self.select!r}"


class GatedClsTemporalHead(nn.Module):
    """The released code's expression temporal module (``Temporal_Transformer_Cls``): ``[B, T, D] -> [B, D]``.

    The released SSM code (``ssm/models/temporal.py``) computes::

        h = [cls; x_1..x_T] + pos[:T + 1]                 (the CLS token gets position 0)
        for each block:  h = h + Attn(LN(h));  h = h + MLP(LN(h))     (no final LayerNorm)
        out = LN(h[:, 0] + gate * (cls + pos[0]))          (gate: a learned scalar, 1 at init)

    with bias-free fused QKV, ``heads`` heads of size ``head_dim`` (release: 8 x 64 on 512-d
    features), an output projection (dropped by the release only when ``heads == 1`` and
    ``head_dim == D``), a tanh-approximate GELU in the MLP, and no dropout. This class computes the
    same; the blocks are :class:`TemporalBlock` s (SDPA attention). It is what released checkpoints
    need; :class:`ClipTemporalHead` is the paper's eq. 3 (differs: final LayerNorm inside, no gated
    skip, exact GELU, QKV bias, std-0.02 init).

    Args:
        dim: feature size ``D``.
        depth: number of blocks (release: 1).
        heads: attention heads (release: 8).
        head_dim: size of one head; ``None`` = ``dim // heads`` (release: 64).
        mlp_dim: MLP hidden size; ``None`` = ``4 * dim`` (release: 1024).
        max_frames: largest ``T`` (the positional table has ``max_frames + 1`` rows; release: 16).
        gate_init: initial value of the scalar ``gate`` (release: 1.0).
        init_std: std of the normal initialisation of the CLS token and the positional table
            (release: 1.0, ``torch.randn``).
        dropout: dropout inside the blocks, training only (release: 0).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shapes:
        ``forward(x [B, T, D], key_padding_mask [B, T] | None) -> [B, D]``.

    Attributes:
        cls_token: ``[1, 1, D]``.  pos_embed: ``[1, max_frames + 1, D]``.  blocks: the
        :class:`TemporalBlock` s.  norm: the output LayerNorm.  gate: ``[1]``.

    Examples::

        >>> head = GatedClsTemporalHead(64, heads=4, head_dim=16, mlp_dim=128)
        >>> head(torch.randn(2, 16, 64)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int = 1,
        heads: int = 8,
        head_dim: int | None = None,
        mlp_dim: int | None = None,
        max_frames: int = 16,
        gate_init: float = 1.0,
        init_std: float = 1.0,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("dim", dim), ("depth", depth), ("heads", heads), ("max_frames", max_frames)):
            _positive_int(name, val)
        if head_dim is not None:
            _positive_int("head_dim", head_dim)
        mlp_dim = 4 * dim if mlp_dim is None else _positive_int("mlp_dim", mlp_dim)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout is out of range (expected a value in [0, 1), got {dropout})")
        if not init_std > 0:
            raise ValueError(f"init_std must be positive (expected > 0, got {init_std})")
        fk = {"device": device, "dtype": dtype}
        hd = dim // heads if head_dim is None else head_dim
        if head_dim is None and dim % heads != 0:
            raise ValueError(
                f"dim must be divisible by heads when head_dim is None (expected dim % heads == 0, got dim={dim}, heads={heads})"
            )
        self.dim, self.depth, self.heads, self.head_dim = dim, depth, heads, hd
        self.mlp_dim, self.max_frames = mlp_dim, max_frames
        self.gate_init, self.init_std = float(gate_init), float(init_std)
        out_proj = not (heads == 1 and hd == dim)  # the release's rule
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim, **fk))
        self.pos_embed = nn.Parameter(torch.empty(1, max_frames + 1, dim, **fk))
        self.blocks = nn.ModuleList(
            TemporalBlock(
                dim, heads, mlp_dim, dropout=dropout, qkv_bias=False, head_dim=hd,
                act_layer=_TanhGELU, out_proj=out_proj, **fk,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, **fk)
        self.gate = nn.Parameter(torch.empty(1, **fk))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.cls_token, std=self.init_std)
        nn.init.normal_(self.pos_embed, std=self.init_std)
        for blk in self.blocks:
            blk.reset_parameters()
        self.norm.reset_parameters()
        self.gate.fill_(self.gate_init)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Args:
            x: ``[B, T, D]`` frame features, ``1 <= T <= max_frames``.
            key_padding_mask: optional bool ``[B, T]``, ``True`` = padded frame (never attended to;
                the release has no padding).

        Returns:
            ``[B, D]`` clip features.
        """
        b, t = _check_frames(x, self.dim, self.max_frames, param=self.pos_embed)
        mask = _check_padding_mask(key_padding_mask, b, t)
        pos = self.pos_embed[:, : t + 1].to(x.dtype)
        h = torch.cat([self.cls_token.to(x.dtype).expand(b, -1, -1), x], dim=1) + pos
        cls_in = h[:, 0]
        attn_mask = None
        if mask is not None:
            attn_mask = torch.cat([mask.new_ones(b, 1), ~mask], dim=1)[:, None, None, :]
        for blk in self.blocks:
            h = blk(h, attn_mask)
        return self.norm(h[:, 0] + self.gate.to(x.dtype) * cls_in)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, depth={self.depth}, heads={self.heads}, head_dim={self.head_dim}, "
            f"mlp_dim={self.mlp_dim}, max_frames={self.max_frames}"
        )


def _TanhGELU() -> nn.Module:  # noqa: N802 - used as an act_layer class
    return nn.GELU(approximate="tanh")
