"""Sort-once PyTorch backend of the grouped expert MLP.

Algorithm: the ``N * k`` (token, slot) pairs are sorted once by expert (stable sort, so equal experts
keep token order), ``bincount`` gives the tokens per expert, the gathered input rows are split into
contiguous per-expert slices and each non-empty expert runs two ``addmm`` calls on its slice. The
results are scattered back to (token, slot) order with ``index_copy`` (a permutation: every row is
written exactly once), scaled by their gate weights and summed over the ``k`` slots in a fixed order
(in fp32 for bf16/fp16 inputs). No dense all-expert compute, no atomics, deterministic.

Host synchronisation: splitting by counts needs the counts on the host (``counts.tolist()``), one
device->host copy of ``E`` integers per call. On CPU tensors this is free; on CUDA it is a sync, which
is why the ``triton`` backend is preferred there. This is also the only graph break under
``torch.compile``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .activations import resolve_activation

__all__ = ["grouped_expert_mlp_torch"]


def grouped_expert_mlp_torch(
    x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    activation: str | Callable[[Tensor], Tensor] = "gelu",
) -> Tensor:
    """Sort-once grouped expert MLP (shapes and semantics: see ``grouped_expert_mlp``).

    Args:
        x: ``[N, D]``; expert_idx: ``[N, k]``; weights: ``[N, k]``;
        w1: ``[E, D, H]``; b1: ``[E, H]``; w2: ``[E, H, D]``; b2: ``[E, D]``.

    Returns:
        ``[N, D]``.
    """
    act = resolve_activation(activation)
    n_tokens, k = expert_idx.shape
    num_experts = w1.shape[0]
    dim = x.shape[1]
    if n_tokens == 0 or k == 0:
        return x.new_zeros((n_tokens, dim))
    flat_idx = expert_idx.reshape(-1).long()
    order = torch.argsort(flat_idx, stable=True)  # [N*k] positions in (token, slot) order
    counts = torch.bincount(flat_idx, minlength=num_experts)
    sizes = counts.tolist()  # the one host sync (see module docstring)
    if len(sizes) != num_experts:
        raise ValueError(
            f"expert_idx values must lie in [0, {num_experts}) (expected indices < {num_experts}, "
            f"got an index >= {num_experts})"
        )
    token_of = torch.div(order, k, rounding_mode="floor")
    x_sorted = x.index_select(0, token_of)  # [N*k, D], grouped by expert
    # unbind (not w1[e]): its backward stacks the per-expert grads into ONE [E, ...] tensor (zeros for
    # empty experts) instead of one zero-filled full-size tensor per expert and parameter.
    w1s, b1s, w2s, b2s = w1.unbind(0), b1.unbind(0), w2.unbind(0), b2.unbind(0)
    outs = []
    for e, x_e in enumerate(x_sorted.split(sizes)):
        if sizes[e] == 0:
            continue
        h = act(torch.addmm(b1s[e], x_e, w1s[e]))
        outs.append(torch.addmm(b2s[e], h, w2s[e]))
    y_sorted = torch.cat(outs) if len(outs) > 1 else outs[0]
    y_slots = y_sorted.new_empty((n_tokens * k, dim)).index_copy(0, order, y_sorted)
    # Gate-weighted k-sum, accumulated in at least fp32 (one rounding for bf16/fp16, like a kernel's
    # fp32 accumulator; also keeps d(weights) = <dy, y> accurate).
    acc = torch.promote_types(x.dtype, torch.float32)
    out = (y_slots.view(n_tokens, k, dim).to(acc) * weights.to(acc).unsqueeze(-1)).sum(dim=1)
    return out.to(x.dtype)
