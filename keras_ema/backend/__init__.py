"""What only one backend has: one module per backend."""
