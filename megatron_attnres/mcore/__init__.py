"""Megatron-Core side: config, specs, AttnRes stack, model builder, CPU compat."""
