"""What ``scripts/benchmark.py`` measures, one job per module; the script only parses its command line
and dispatches sections.

* ``timing``: repeated and paired (ours/theirs, alternating order) rounds, and their statistics.
* ``load``: how busy the rest of the machine was while a section ran.
* ``ours``: our train step and eval-mode forward, built as training builds them
  (``recipes.build_model_and_loss`` + ``steps.build_steps``).
* ``pytorch``: the PyTorch reference (``interop.torch_reference``) trained and run the same way.
* ``fill``: the accelerator's ``--batch=fill``, device memory and the chip's published peak.
* ``profiling``: per-part milliseconds of a step, ours and PyTorch's, attributed to the named scopes
  of ``tpu/accounting.py``.
* ``model``, ``kernels``, ``input_pipeline``: the sections themselves.

torch is imported only where the PyTorch reference runs, so everything else works without it.
"""
