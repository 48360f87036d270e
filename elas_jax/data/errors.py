"""Re-export of the data error type (kept next to the data modules for imports)."""

from elas_jax.errors import DataError

__all__ = ["DataError"]
