"""Fused kernels for the AttnRes depth read: Triton on GPU (`depth_read_triton`), C on CPU
(`depth_read_cpu`); the PyTorch op stays the fallback and the oracle.

Imports torch and (guarded) triton, plus megatron_attnres.attnres; nothing else of ours
(docs/architecture.md section 9). See `depth_read_triton.depth_read_auto` for the dispatch switch
ATTNRES_DEPTH_READ.
"""

from megatron_attnres.kernels.depth_read_triton import (
    FusedDepthRead,
    depth_read_auto,
    depth_read_backend,
    fused_depth_read,
    fused_depth_read_available,
)

__all__ = [
    "FusedDepthRead",
    "depth_read_auto",
    "depth_read_backend",
    "fused_depth_read",
    "fused_depth_read_available",
]
