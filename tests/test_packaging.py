"""citer installs as users install it: `pip install citer` brings what the engine imports,
each command's extra brings what that command imports, and a command whose extra is
missing names it instead of a traceback. Checked from the built wheel's metadata and the
source's imports, so adding an import without its dependency fails here."""
import ast
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

from citer.cli import EXTRAS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def requires(tmp_path_factory):
    """The wheel's Requires-Dist: extra ("" for the base install) -> distribution names."""
    out = tmp_path_factory.mktemp("meta")
    code = ("import sys; from setuptools.build_meta import prepare_metadata_for_build_wheel as p; "
            "print(p(sys.argv[1]))")
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    dist_info = res.stdout.strip().splitlines()[-1]
    with open(os.path.join(out, dist_info, "METADATA")) as f:
        meta = f.read()
    deps = {}
    for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        name = re.split(r"[ ;<>=!\[~]", line, 1)[0].lower().replace("_", "-")
        extra = re.search(r'extra == "([^"]+)"', line)
        deps.setdefault(extra.group(1) if extra else "", set()).add(name)
    return deps


def _dist_of(module: str):
    dists = importlib.metadata.packages_distributions().get(module)
    return {d.lower().replace("_", "-") for d in dists} if dists else None


def _third_party_imports(paths, module_level_only: bool):
    """Top-level names of the non-stdlib, non-citer modules these files import."""
    names = set()
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top != "citer":
                    names.add(top)
    return names


def _files(*folders):
    for folder in folders:
        base = os.path.join(ROOT, folder)
        if os.path.isfile(base):
            yield base
            continue
        for dirpath, _, files in os.walk(base):
            yield from (os.path.join(dirpath, f) for f in files if f.endswith(".py"))


def _uncovered(modules, allowed):
    bad = []
    for m in sorted(modules):
        dists = _dist_of(m)
        if dists is None or not dists & allowed:
            bad.append(f"{m} (from {sorted(dists) if dists else 'no installed distribution'})")
    return bad


def test_the_engine_imports_only_base_dependencies(requires):
    """What `import citer` and an Engine load at module level: the base install's."""
    api = [p for p in _files("python/citer") if "/research/" not in p and "/serve/" not in p]
    mods = _third_party_imports(list(_files("engine", "kernels")) + api, module_level_only=True)
    mods -= {"triton"}  # a base dependency whose module name is its distribution's
    assert not _uncovered(mods, requires[""] | {"triton"}), _uncovered(mods, requires[""])


@pytest.mark.parametrize("extra,folders", [("serve", ("python/citer/serve", "python/citer/async_engine.py")),
                                           ("eval", ("python/citer/research",))])
def test_each_commands_imports_are_in_its_extra(requires, extra, folders):
    mods = _third_party_imports(list(_files(*folders)), module_level_only=False)
    allowed = requires[""] | requires.get(extra, set())
    assert not _uncovered(mods, allowed), f"citer[{extra}] misses: {_uncovered(mods, allowed)}"
    for m in EXTRAS[extra]:
        assert _dist_of(m) & requires[extra], f"{m} is not in the [{extra}] extra"
    assert requires.get(extra, set()) <= requires["all"]


@pytest.mark.parametrize("command,extra,module", [("serve", "serve", "uvicorn"), ("eval", "eval", "matplotlib")])
def test_a_command_without_its_extra_names_it(command, extra, module):
    code = (f"import sys; sys.modules[{module!r}] = None; from citer.cli import main; "
            f"sys.exit(main([{command!r}]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"pip install 'citer[{extra}]'" in res.stderr and "Traceback" not in res.stderr
