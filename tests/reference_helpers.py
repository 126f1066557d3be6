"""Shared by the tests that compare against the eager reference model."""

import torch

from megatron_attnres.attnres.reference import MoE, ReferenceModel


def randomise_depth_and_norm_params(module: torch.nn.Module) -> None:
    """Random non-zero pseudo-queries and non-trivial norm gains (in place), for any model."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "pseudo_query" in name:
                param.normal_(0.0, 0.5)
            elif name.endswith("norm_weight") or name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)


def randomise(model: ReferenceModel, expert_bias_std: float = 0.1) -> ReferenceModel:
    """`randomise_depth_and_norm_params` plus random expert biases (in place)."""
    randomise_depth_and_norm_params(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoE):
                module.expert_bias.normal_(0.0, expert_bias_std)
    return model
