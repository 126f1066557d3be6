"""Megatron <-> Hugging Face conversion and the exported HF modeling code."""
