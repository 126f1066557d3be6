"""The run configuration: its fields (run.py), loading (load.py), every validation rule (rules.py),
its translation to Megatron-Core (megatron.py) and FLOP counts (flops.py).
"""
