"""Modeling code shipped inside exported Hugging Face checkpoints (loaded with trust_remote_code).

`configuration_attnres.py` and `modeling_attnres.py` import only torch, transformers and each
other, so an export copies them next to the weights and sets config.auto_map to
`AUTO_MAP`. Nothing here imports the rest of megatron_attnres.
"""

from pathlib import Path

from .configuration_attnres import AttnResConfig
from .modeling_attnres import AttnResForCausalLM, AttnResModel

MODELING_FILES = tuple(
    Path(__file__).with_name(name) for name in ("configuration_attnres.py", "modeling_attnres.py")
)
AUTO_MAP = {
    "AutoConfig": "configuration_attnres.AttnResConfig",
    "AutoModel": "modeling_attnres.AttnResModel",
    "AutoModelForCausalLM": "modeling_attnres.AttnResForCausalLM",
}

__all__ = ["AUTO_MAP", "MODELING_FILES", "AttnResConfig", "AttnResForCausalLM", "AttnResModel"]
