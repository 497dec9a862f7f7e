"""Pure-torch references: the spec of each op, its CPU fallback and the tests' oracle (float64-capable)."""
