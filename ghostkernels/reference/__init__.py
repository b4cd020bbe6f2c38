"""Pure-PyTorch definitions of every ghostkernels op (readable, float64-capable)."""
