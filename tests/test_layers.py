"""The layers the folders show, checked from the source: every import points down.

    citer.research  ->  citer (API)  ->  citer.engine  ->  citer.engine.models  ->  citer.kernels

and no file of the runtime (engine/, engine/models/, kernels/) over 350 lines; no
benchmark script named like a package users have installed (a script's folder comes
first on sys.path, so benchmarks/kernels.py once shadowed the `kernels` package that
transformers imports)."""
import ast
import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 350

# folder -> (its import path, the citer modules it may import; None: any)
LAYERS = {
    "kernels": ("citer.kernels", ("citer.kernels", "citer._cpu_kernels")),
    "engine/models": ("citer.engine.models", ("citer.kernels", "citer.engine.models")),
    "engine": ("citer.engine", ("citer.kernels", "citer.engine", "citer._C")),
}
API_FORBIDDEN = ("citer.research",)  # the API modules (but the CLI and the demo, entry points) never import research


def _py_files(folder: str, recursive: bool = True):
    base = os.path.join(ROOT, folder)
    for dirpath, dirs, files in os.walk(base):
        if not recursive and dirpath != base:
            continue
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def _module_of(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, "/")
    for folder, (pkg, _) in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if rel.startswith(folder + "/"):
            return pkg + "." + rel[len(folder) + 1:].replace("/", ".")
    assert rel.startswith("python/citer/")
    return "citer." + rel[len("python/citer/"):].replace("/", ".")


def _imports(path: str):
    """Every citer module a file imports (relative imports resolved), at any depth."""
    mod = _module_of(path)
    pkg = mod.rsplit(".", 1)[0] if not mod.endswith("__init__") else mod[: -len(".__init__")]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            yield name, node.lineno


def _allowed(name: str, allowed) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_imports_point_down(folder):
    pkg, allowed = LAYERS[folder]
    bad = []
    for path in _py_files(folder):
        if folder == "engine" and os.path.relpath(path, ROOT).startswith("engine/models/"):
            continue  # checked as its own layer
        for name, line in _imports(path):
            if name.startswith("citer") and not _allowed(name, allowed):
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {name}")
    assert not bad, f"{pkg} may import only {allowed}:\n" + "\n".join(bad)


def test_api_does_not_import_research():
    bad = []
    for path in _py_files("python/citer"):
        rel = os.path.relpath(path, ROOT)
        if rel.startswith("python/citer/research/") or rel in ("python/citer/cli.py", "python/citer/demo.py"):
            continue
        for name, line in _imports(path):
            if _allowed(name, API_FORBIDDEN):
                bad.append(f"{rel}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_runtime_files_are_small():
    big = []
    for folder in ("kernels", "engine"):
        for path in _py_files(folder):
            with open(path) as f:
                n = sum(1 for _ in f)
            if n > MAX_LINES:
                big.append(f"{os.path.relpath(path, ROOT)}: {n} lines")
    assert not big, f"over {MAX_LINES} lines:\n" + "\n".join(big)


def test_importing_the_kernels_loads_nothing_above_them():
    code = ("import sys, citer.kernels.ops; print(sorted(m for m in sys.modules if m.startswith('citer') and not "
            "m.startswith('citer.kernels') and m not in ('citer._C', 'citer._cpu_kernels')))")  # compiled kernels
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "['citer']", out.stdout


def test_public_imports():
    code = "from citer import Engine, SamplingParams, AsyncEngine, EngineArgs, RequestOutput, TokenEvent; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


# packages that torch / transformers import when present (so a script named like one breaks
# them only on the machines that have it installed): checked whether installed here or not
OPTIONAL_IMPORTS = {"kernels", "accelerate", "datasets", "evaluate", "peft", "bitsandbytes", "optimum", "deepspeed",
                    "flash_attn", "torchao", "gguf", "sentencepiece", "tiktoken", "llama_cpp", "timm", "torchvision"}


def test_no_script_shadows_an_installed_package():
    installed = set(importlib.metadata.packages_distributions()) | set(sys.builtin_module_names) \
        | set(sys.stdlib_module_names) | OPTIONAL_IMPORTS
    for folder in ("benchmarks", "examples"):
        names = {f[:-3] for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".py")}
        clash = sorted(names & installed)
        assert not clash, f"{folder}/ scripts named like installed modules (they would shadow them): {clash}"
