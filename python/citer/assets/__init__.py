"""The embedded default: a demo SLM/LLM pair and router trained by citer itself.

The folders live beside this file (demo/slm, demo/llm, demo/router) once trained and
shipped; `default_paths()` is what Engine() with no model arguments loads.
"""
import os

DEMO_DIR = os.path.join(os.path.dirname(__file__), "demo")


def default_paths():
    """-> (slm, llm, router) folders of the embedded default; router may be None."""
    slm, llm, router = (os.path.join(DEMO_DIR, n) for n in ("slm", "llm", "router"))
    missing = [p for p in (slm, llm) if not os.path.isfile(os.path.join(p, "config.json"))]
    if missing:
        raise FileNotFoundError(
            f"the embedded default models are not in this build ({', '.join(missing)} missing); "
            "pass slm=/llm= folders to Engine"
        )
    return slm, llm, (router if os.path.isfile(os.path.join(router, "router_config.json")) else None)
