"""What every layer may use: the device mesh, XLA flags, device memory queries, the compilation cache."""
