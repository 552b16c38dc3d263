"""Coverage sweeps: ``python -m benchmarks.coverage`` writes COVERAGE.md.

Every transformers model type and every timm model with attention is built
tiny, run once under ``get_local.watch_attention()`` + ``capture()`` on its
default attention implementation, and compared with an independent
reference (``output_attentions=True`` under eager for transformers, forward
hooks with the fused path off for timm).  Each architecture runs in its own
forked process with a memory cap and a time limit (``_sandbox``), and is
classified:

* ``covered``: every reference map equals a captured map (absolute 1e-5) and
  the outputs under capture are bit-identical to the outputs without;
* ``missed``: some reference map was not captured, or the output changed
  (the reason says which);
* ``no attention``: builds and runs, but returns no attention maps under the
  reference (not applicable);
* ``not built``: cannot be built or run from a tiny configuration (the
  exception, one line; not applicable).
"""
