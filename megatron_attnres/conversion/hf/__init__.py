"""Modeling code shipped inside exported Hugging Face checkpoints (loaded with trust_remote_code).

`configuration_attnres.py`, `modeling_attnres.py`, `modeling_kda.py` and `depth_read_triton.py`
import only torch, transformers, each other (relative imports, which trust_remote_code resolves
inside the folder), for KDA layers fla-core, and (guarded) triton for the fused two-phase read; an
export copies them next to the weights and sets config.auto_map to `AUTO_MAP`. Nothing here imports
the rest of megatron_attnres.
"""

from pathlib import Path

from .configuration_attnres import AttnResConfig
from .modeling_attnres import AttnResForCausalLM, AttnResModel

SHIPPED = (
    "configuration_attnres.py",
    "modeling_attnres.py",
    "modeling_kda.py",
    "depth_read_triton.py",
)
MODELING_FILES = tuple(Path(__file__).with_name(name) for name in SHIPPED)
AUTO_MAP = {
    "AutoConfig": "configuration_attnres.AttnResConfig",
    "AutoModel": "modeling_attnres.AttnResModel",
    "AutoModelForCausalLM": "modeling_attnres.AttnResForCausalLM",
}

__all__ = ["AUTO_MAP", "MODELING_FILES", "AttnResConfig", "AttnResForCausalLM", "AttnResModel"]
