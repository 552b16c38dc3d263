"""The mathematics of attention maps, once: NumPy conversion, selections, reductions, rollout, grids.

Every other module that needs one of these calls it here; none keeps a copy.
"""
