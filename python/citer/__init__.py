"""citer: token-level collaborative decoding between a small and a large language model."""
