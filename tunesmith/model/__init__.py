"""Models: resolving names to local directories, loading, quantization, adapters, speed kernels."""
