"""Developer tools shipped with kv3d (e.g. the synthetic GGUF writer)."""
