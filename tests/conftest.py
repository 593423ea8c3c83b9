"""Test configuration: float64 is on for the whole session.

Exactness tests compare against dense references in float64; behaviour tests
create float32 inputs explicitly.
"""

import jax

jax.config.update("jax_enable_x64", True)
