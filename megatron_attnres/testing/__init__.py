"""Test support: the gloo launcher, the pipeline traffic counter, the reference mapping and
sharding helpers. No production module imports this.
"""
