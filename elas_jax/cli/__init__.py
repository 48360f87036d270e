"""The command-line programs, one module each (flags and ``main`` only; the work is in
the library). Each has a console script and a ``python -m`` name:

  ``train``     elas-train      python train.py
  ``evaluate``  elas-eval       python -m elas_jax.evaluate
  ``generate``  elas-generate   python -m elas_jax.generate
  ``export``    elas-export     python -m elas_jax.export
  ``summary``   elas-summary    python -m elas_jax.summary
  ``prepare``   elas-prepare    python -m elas_jax.data.prepare
  ``lm_eval``   elas-lm-eval    python -m elas_jax.lm_eval
  ``aot``       elas-aot        python -m elas_jax.aot

``common`` is the shared plumbing (``--config`` with one-line errors),
``distributed`` the multi-process start-up flags. The ``python -m elas_jax.<name>``
modules (and ``elas_jax.data.prepare``) are aliases of these.
"""
