"""Temporal transformers over per-frame features (SSM paper eqs. 3-5).

The SSM model encodes every frame of a clip with a shared image encoder and then lets the frames of
one clip attend to each other:

* :class:`TemporalTransformer` -- a small pre-norm transformer over ``[B, T, D]`` frame features with
  a learned positional embedding, built on :func:`torch.nn.functional.scaled_dot_product_attention`.
* :class:`ClipTemporalHead` -- ``[B, T, D] -> [B, D]``: one representation per clip (paper eq. 3,
  the expression branch ``Phi_exp``), pooled with a learned CLS token or a (masked) mean.
* :class:`FrameTemporalHead` -- ``[B, T, D] -> [B, D]``: the temporally enhanced feature of the
  centre frame ``floor(T / 2)`` (paper eqs. 4-5, the AU branch ``Phi_au``), or ``[B, T, D]`` for every
  frame (``select="all"``, what the released SSM code supervises).

Padding convention: ``key_padding_mask`` is a bool tensor ``[B, T]`` where ``True`` marks a *padded*
frame (the convention of :class:`torch.nn.MultiheadAttention`). Padded frames are never attended to,
so they cannot change any other output; the outputs *at* padded positions are set to zero. Every clip
needs at least one valid frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TemporalBlock", "TemporalTransformer", "ClipTemporalHead", "FrameTemporalHead"]


def _check_frames(x: Tensor, dim: int, max_frames: int, name: str = "x") -> tuple[int, int]:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor of shape [B, T, {dim}], received {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape [B, T, D={dim}], received shape {tuple(x.shape)}")
    b, t, d = x.shape
    if d != dim:
        raise ValueError(
            f"{name} must have feature size D={dim} (shape [B, T, {dim}]), received shape {tuple(x.shape)}"
        )
    if t < 1:
        raise ValueError(f"{name} must have at least one frame (T >= 1), received shape {tuple(x.shape)}")
    if t > max_frames:
        raise ValueError(
            f"{name} has T={t} frames but this module was built with max_frames={max_frames}; "
            f"build it with max_frames >= {t} or feed at most {max_frames} frames"
        )
    return b, t


def _check_padding_mask(mask: Tensor | None, b: int, t: int) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a bool Tensor [B, T]=[{b}, {t}], received {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must have dtype torch.bool (True = padded frame), received {mask.dtype}"
        )
    if tuple(mask.shape) != (b, t):
        raise ValueError(f"key_padding_mask must have shape [B, T]=[{b}, {t}], received {tuple(mask.shape)}")
    if bool(mask.all(dim=1).any()):
        bad = torch.nonzero(mask.all(dim=1)).flatten().tolist()
        raise ValueError(f"every clip needs at least one valid (unpadded) frame; clips {bad} are fully padded")
    return mask


class TemporalBlock(nn.Module):
    """One pre-norm transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.

    Args:
        dim: feature size ``D``.
        heads: attention heads; ``dim`` must be divisible by ``heads``.
        mlp_dim: hidden size of the MLP.
        dropout: dropout on attention weights and on both residual branches (training only).
        qkv_bias: bias in the fused query/key/value projection.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim must be divisible by heads, received dim={dim}, heads={heads}")
        fk = {"device": device, "dtype": dtype}
        self.dim = dim
        self.heads = heads
        self.dropout = float(dropout)
        self.norm1 = nn.LayerNorm(dim, **fk)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **fk)
        self.proj = nn.Linear(dim, dim, **fk)
        self.norm2 = nn.LayerNorm(dim, **fk)
        self.fc1 = nn.Linear(dim, mlp_dim, **fk)
        self.fc2 = nn.Linear(mlp_dim, dim, **fk)

    def reset_parameters(self) -> None:
        for m in (self.norm1, self.qkv, self.proj, self.norm2, self.fc1, self.fc2):
            m.reset_parameters()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Args:
            x: ``[B, L, D]`` tokens.
            attn_mask: optional bool ``[B, 1, 1, L]``, ``True`` = this key may be attended to.

        Returns:
            ``[B, L, D]``.
        """
        b, n, d = x.shape
        p = self.dropout if self.training else 0.0
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        x = x + F.dropout(self.proj(a.transpose(1, 2).reshape(b, n, d)), p, self.training)
        h = F.dropout(F.gelu(self.fc1(self.norm2(x))), p, self.training)
        return x + F.dropout(self.fc2(h), p, self.training)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, dropout={self.dropout}"


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
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, received {val!r}")
        if dim % heads != 0:
            raise ValueError(f"dim must be divisible by heads, received dim={dim}, heads={heads}")
        mlp_dim = 4 * dim if mlp_dim is None else mlp_dim
        if not isinstance(mlp_dim, int) or mlp_dim < 1:
            raise ValueError(f"mlp_dim must be a positive int or None, received {mlp_dim!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), received {dropout}")
        fk = {"device": device, "dtype": dtype}
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.mlp_dim = mlp_dim
        self.max_frames = max_frames
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
        b, t = _check_frames(x, self.dim, self.max_frames)
        mask = _check_padding_mask(key_padding_mask, b, t)
        h = x + self.pos_embed[:t].to(x.dtype)
        n_prefix = 0
        if prefix is not None:
            if prefix.ndim != 2 or prefix.shape[1] != self.dim:
                raise ValueError(f"prefix must have shape [P, {self.dim}], received {tuple(prefix.shape)}")
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


class ClipTemporalHead(nn.Module):
    """Clip-level representation ``Z_exp = Phi_exp(f_1..f_T)`` (paper eq. 3): ``[B, T, D] -> [B, D]``.

    Args:
        dim: feature size ``D``.
        depth, heads, mlp_dim, max_frames, dropout, qkv_bias: see :class:`TemporalTransformer`.
        pool: ``"cls"`` -- a learned CLS token is prepended to the frames and its output is the clip
            feature (as the released code's ``Temporal_Transformer_Cls``); ``"mean"`` -- the mean of
            the frame outputs over valid (unpadded) frames.

    Examples::

        >>> head = ClipTemporalHead(64, heads=4, pool="cls")
        >>> head(torch.randn(2, 16, 64)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int = 1,
        heads: int = 8,
        mlp_dim: int | None = None,
        max_frames: int = 16,
        pool: str = "cls",
        dropout: float = 0.0,
        qkv_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', received {pool!r}")
        self.pool = pool
        self.temporal = TemporalTransformer(
            dim, depth, heads, mlp_dim, max_frames, dropout, qkv_bias=qkv_bias, device=device, dtype=dtype
        )
        if pool == "cls":
            self.cls_token = nn.Parameter(torch.empty(1, dim, device=device, dtype=dtype))
        else:
            self.register_parameter("cls_token", None)
        self._reset_own()

    def _reset_own(self) -> None:
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def reset_parameters(self) -> None:
        self.temporal.reset_parameters()
        self._reset_own()

    @property
    def dim(self) -> int:
        return self.temporal.dim

    @property
    def max_frames(self) -> int:
        return self.temporal.max_frames

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


class FrameTemporalHead(nn.Module):
    """Frame-level AU representation (paper eqs. 4-5): ``[B, T, D] -> [B, D]`` or ``[B, T, D]``.

    All frames attend to each other; ``select="center"`` returns the enhanced feature of the centre
    frame ``t = floor(T / 2)`` (0-based, eq. 5: for ``T = 16`` frame 8, for ``T = 5`` frame 2);
    ``select="all"`` returns every frame (the released code supervises all frames).

    With a ``key_padding_mask`` the centre is the centre **of the valid frames**: with ``L`` valid
    frames it is the ``floor(L / 2)``-th valid frame in temporal order (see :meth:`center_index`);
    without padding this is ``floor(T / 2)``.

    Args:
        dim: feature size ``D``.
        depth, heads, mlp_dim, max_frames, dropout, qkv_bias: see :class:`TemporalTransformer`.
        select: ``"center"`` or ``"all"``.

    Examples::

        >>> head = FrameTemporalHead(64, heads=4, select="center")
        >>> head(torch.randn(2, 16, 64)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int = 1,
        heads: int = 8,
        mlp_dim: int | None = None,
        max_frames: int = 16,
        select: str = "center",
        dropout: float = 0.0,
        qkv_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if select not in ("center", "all"):
            raise ValueError(f"select must be 'center' or 'all', received {select!r}")
        self.select = select
        self.temporal = TemporalTransformer(
            dim, depth, heads, mlp_dim, max_frames, dropout, qkv_bias=qkv_bias, device=device, dtype=dtype
        )

    def reset_parameters(self) -> None:
        self.temporal.reset_parameters()

    @property
    def dim(self) -> int:
        return self.temporal.dim

    @property
    def max_frames(self) -> int:
        return self.temporal.max_frames

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
        if key_padding_mask is None:
            return torch.tensor(num_frames // 2)
        valid = ~key_padding_mask
        rank = valid.sum(dim=1) // 2  # 0-based rank among valid frames
        hit = valid & (valid.cumsum(dim=1) == (rank + 1).unsqueeze(1))
        return hit.to(torch.uint8).argmax(dim=1)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Args:
            x: ``[B, T, D]`` frame features, ``1 <= T <= max_frames``.
            key_padding_mask: optional bool ``[B, T]``, ``True`` = padded frame.

        Returns:
            ``[B, D]`` centre-frame features (``select="center"``) or ``[B, T, D]`` (``"all"``,
            zeros at padded frames).
        """
        h = self.temporal(x, key_padding_mask)
        if self.select == "all":
            return h
        t = h.shape[1]
        if key_padding_mask is None:
            return h[:, t // 2]
        idx = self.center_index(t, key_padding_mask)
        return h[torch.arange(h.shape[0], device=h.device), idx.to(h.device)]

    def extra_repr(self) -> str:
        return f"select={self.select!r}"
