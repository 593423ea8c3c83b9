"""kronjax: Kronecker factorization in JAX (filled in as modules land)."""
