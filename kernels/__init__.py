"""ELAS-JAX Pallas kernels for the 2:4-sparse squared-ReLU FFN.

Each module holds its forward and backward kernels, the ``jax.custom_vjp``
wrapper, an ``interpret`` switch for CPU and a plain-jnp reference (no
``custom_vjp``: ``jax.grad`` of it is the gradient the kernels are tested
against). ``common`` holds the pieces they share.

This package is imported from the repository root (pytest puts the root first
on ``sys.path``); PyPI has an unrelated package also named ``kernels``.
"""

IS_ELAS_JAX_KERNELS = True
