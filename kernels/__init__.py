"""ELAS-JAX Pallas kernels for the 2:4-sparse squared-ReLU FFN.

Each module holds its forward and backward kernels, the ``jax.custom_vjp``
wrapper, an ``interpret`` switch for CPU and a pure-jnp reference. The pure-JAX
op in ``elas_jax.sparsity`` is the ground truth they are tested against.

This package is imported from the repository root (pytest puts the root first
on ``sys.path``); PyPI has an unrelated package also named ``kernels``.
"""

IS_ELAS_JAX_KERNELS = True
