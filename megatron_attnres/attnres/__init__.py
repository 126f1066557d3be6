"""Pure-torch Attention Residuals: depth read, schedule, reference model. Imports torch only."""

from megatron_attnres.attnres.depth_read import LeanDepthRead, depth_read, depth_read_reference
from megatron_attnres.attnres.module import DepthAttention
from megatron_attnres.attnres.schedule import DepthBlockSchedule, ResidualMode, SourceSpec
from megatron_attnres.attnres.tolerances import Tolerance, tolerance

__all__ = [
    "DepthAttention",
    "DepthBlockSchedule",
    "LeanDepthRead",
    "ResidualMode",
    "SourceSpec",
    "Tolerance",
    "depth_read",
    "depth_read_reference",
    "tolerance",
]
