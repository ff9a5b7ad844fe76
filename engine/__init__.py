"""citer.engine: the runtime (requests, sequences, scheduler, model runners, routing,
CUDA graphs, the step loop) and the types it owns: SamplingParams, RequestOutput,
TokenEvent. It imports its models (citer.engine.models) and citer.kernels, never the API
or research modules above it."""
