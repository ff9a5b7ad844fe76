"""The embedded default: a demo SLM/LLM pair and router trained by citer itself.

The folders live beside this file (demo/slm, demo/llm, demo/router) once trained and
shipped; `default_paths()` is what Engine() with no model arguments loads.

Routers trained by citer for public pretrained pairs live in routers/<name> (folded,
float16): `Engine(slm, llm, router="<name>")` loads one by name (`router_path`).
"""
import os

DEMO_DIR = os.path.join(os.path.dirname(__file__), "demo")
ROUTERS_DIR = os.path.join(os.path.dirname(__file__), "routers")
PAIRS = {"arith": DEMO_DIR, "arith-free": os.path.join(os.path.dirname(__file__), "demo_free")}  # task -> pair


def shipped(task: str = "arith") -> dict:
    """The embedded pair trained on `task` -> {"slm", "llm", "router", "router_s",
    "router_hidden", "baselines"}: folders, None where that part is not shipped."""
    if task not in PAIRS:
        raise ValueError(f"no embedded pair for task {task!r}; embedded: {sorted(PAIRS)}")
    root = PAIRS[task]
    out = {}
    for name, marker in (("slm", "config.json"), ("llm", "config.json"), ("router", "router_config.json"),
                         ("router_s", "router_config.json"), ("router_hidden", "router_config.json"),
                         ("baselines", "query/config.json")):
        path = os.path.join(root, name)
        out[name] = path if os.path.isfile(os.path.join(path, marker)) else None
    if out["slm"] is None or out["llm"] is None:
        raise FileNotFoundError(f"the embedded pair for task {task!r} is not in this build ({root})")
    return out


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


def shipped_routers() -> dict:
    """name -> folder of each router shipped for a public pretrained pair."""
    if not os.path.isdir(ROUTERS_DIR):
        return {}
    return {n: os.path.join(ROUTERS_DIR, n) for n in sorted(os.listdir(ROUTERS_DIR))
            if os.path.isfile(os.path.join(ROUTERS_DIR, n, "router_config.json"))}


def router_path(router: str) -> str:
    """A router argument -> its folder: a shipped router's name (see shipped_routers) or a path,
    returned as given."""
    if os.path.exists(router):
        return router
    routers = shipped_routers()
    if router not in routers:
        raise FileNotFoundError(f"router {router!r} is neither a folder nor a shipped router's name; "
                                f"shipped: {sorted(routers) or 'none'}")
    return routers[router]
