"""Training: the attnres-train CLI and Trainer, the one ordered build of a run, the step,
checkpoint save/load, metrics, diagnostics, NaN policy, faults, plots.
"""
