"""How Megatron-Core lays out fused weights, for code that maps other layouts onto it (the
reference mapping in tests, the Hugging Face conversion).

Attention: Megatron fuses q/k/v in `linear_qkv`, grouped per query group g:
[q heads of g (heads/groups * d rows), k_g (d rows), v_g (d rows)] for g = 0..groups-1.
"""

import torch


def fuse_qkv(wq, wk, wv, heads: int, groups: int) -> torch.Tensor:
    """Separate q [heads * d, h], k and v [groups * d, h] as Megatron's fused `linear_qkv`."""
    d = wk.shape[0] // groups
    per_group = heads // groups
    blocks = []
    for g in range(groups):
        q_rows = wq[g * per_group * d : (g + 1) * per_group * d]
        blocks += [q_rows, wk[g * d : (g + 1) * d], wv[g * d : (g + 1) * d]]
    return torch.cat(blocks, dim=0)
