"""Shared by the tests that compare against the eager reference model."""

import torch

from megatron_attnres.attnres.reference import MoE, ReferenceModel


def randomise(model: ReferenceModel, expert_bias_std: float = 0.1) -> ReferenceModel:
    """Random non-zero pseudo-queries, non-trivial norm gains and expert biases (in place)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "pseudo_query" in name:
                param.normal_(0.0, 0.5)
            elif name.endswith("norm_weight") or name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
        for module in model.modules():
            if isinstance(module, MoE):
                module.expert_bias.normal_(0.0, expert_bias_std)
    return model
