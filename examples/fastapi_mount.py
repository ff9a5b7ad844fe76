"""An existing FastAPI app that serves citer's OpenAI-compatible API under /llm, beside
its own routes. Run: uvicorn examples.fastapi_mount:app --port 8000
then:   curl localhost:8000/llm/v1/completions -H 'content-type: application/json' \\
             -d '{"model": "citer-demo", "prompt": "Q: Tom has 4 beads. He finds 5 more. How many beads does he have now? A:", "max_tokens": 32, "temperature": 0}'
"""
from fastapi import FastAPI

from citer.async_engine import AsyncEngine
from citer.serve import create_app

app = FastAPI(title="my service")
engine = AsyncEngine()  # the embedded demo pair; AsyncEngine(slm, llm, router, device="cuda") for yours
app.mount("/llm", create_app(engine, model_name="citer-demo"))


@app.get("/hello")
async def hello():
    return {"hello": "world"}


@app.on_event("shutdown")
def stop_engine():
    engine.shutdown()
