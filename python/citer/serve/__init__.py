"""`citer serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over AsyncEngine.

protocol.py turns OpenAI request bodies into prompts and SamplingParams (and names any
field citer does not support) and builds OpenAI responses and stream chunks, with
citer's per-token provenance in an extension field; metrics.py holds the Prometheus
metrics; app.py wires the routes. `create_app(async_engine)` mounts into any FastAPI
app (see examples/fastapi_mount.py).
"""
from .app import create_app

__all__ = ["create_app"]
