"""Studies that do not run inside a training job: ablations, reports, model size, the reference
trainer. Nothing in the package imports this.
"""
