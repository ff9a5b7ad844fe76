"""`citer serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over AsyncEngine.

args.py holds its settings (ServerArgs: limits, API key, Host / Origin rules, timeouts);
guard.py checks who may call (Host, Origin, API key, JSON content type); http.py reads
bodies under a size cap and a deadline and runs uvicorn with head / body timeouts;
requests.py turns OpenAI request bodies into prompts and SamplingParams (strict JSON,
each error naming its field); protocol.py builds OpenAI responses, stream chunks and
errors, with citer's per-token provenance in an extension field; metrics.py holds the
Prometheus metrics; app.py wires the routes. `create_app(async_engine, model_name)`
mounts into any FastAPI app (see examples/fastapi_mount.py).

Only args.py is imported eagerly: the CLI builds its flags without FastAPI installed.
"""
from .args import ServerArgs

__all__ = ["ServerArgs", "create_app", "run_server"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app
        return create_app
    if name == "run_server":
        from .http import run_server
        return run_server
    raise AttributeError(f"module 'citer.serve' has no attribute {name!r}")
