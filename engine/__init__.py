"""citer.engine: the runtime (sequences, KV pools, model runner, routed decode loop)."""
