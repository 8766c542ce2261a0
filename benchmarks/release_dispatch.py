"""The released SSM code's private-expert dispatch, kept as the benchmark baseline (one definition).

A Python loop over (slot, present expert) with ``unique()`` (a host sync per step) and boolean-mask
gathers/scatters, as in MSA-LMC/SSM ``ssm/models/moe.py`` -- but with correct routing (each token
goes to the experts it picked). Same signature and semantics as
``facelayers.ops.grouped_experts.grouped_expert_mlp`` with ``activation="gelu"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_loop(x, expert_idx, weights, w1, b1, w2, b2):
    """Release-style dispatch (loop over slots and present experts, boolean masks), correct routing."""
    n, k = expert_idx.shape
    outs = x.new_zeros(n, k, x.shape[1])
    for j in range(k):
        idx_j = expert_idx[:, j]
        chunk = x.new_zeros(n, x.shape[1])
        for e in idx_j.unique().tolist():  # host sync, as in the release
            mask = idx_j == e
            h = F.gelu(torch.addmm(b1[e], x[mask], w1[e]))
            chunk[mask] = torch.addmm(b2[e], h, w2[e])
        outs[:, j, :] = chunk
    return (outs * weights.unsqueeze(-1)).sum(dim=1)
