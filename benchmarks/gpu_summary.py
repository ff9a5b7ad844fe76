"""The summary table of `gpu_check.sh quick`: each part's status and time, then the headline
numbers from decode_gpu.py's JSON. Usage: python benchmarks/gpu_summary.py LOG_DIR"""
import json
import os
import re
import sys


def part_rows(log_dir: str):
    """-> [(part, status, seconds, limit, what its log ends with)] from LOG_DIR/parts and the logs."""
    rows = []
    with open(os.path.join(log_dir, "parts")) as f:
        for line in f:
            name, rc, secs, limit = line.split()
            status = "ok" if rc == "0" else "TIMEOUT" if rc in ("124", "137") else f"FAIL (rc {rc})"
            rows.append((name, status, int(secs), int(limit), _result_line(os.path.join(log_dir, f"{name}.log"))))
    return rows


def _result_line(path: str) -> str:
    if not os.path.isfile(path):
        return ""
    with open(path, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    for ln in reversed(lines):  # pytest's last line: "3 passed, 1 skipped in 12.3s"
        if re.search(r"\b(passed|failed|error|no tests ran)\b", ln):
            return ln.strip("= ")
    return lines[-1][:90] if lines else ""


def headline_lines(path: str):
    if not os.path.isfile(path):
        return ["headline: no numbers (the part failed or ran out of time)"]
    with open(path) as f:
        h = json.load(f)
    out = [f"headline: {h['shapes'][0]} SLM / {h['shapes'][1]} LLM, {h['dtype']}, {h['device']}, copy "
           f"{h['copy_GBps']:.0f} GB/s, graphs captured in {h['capture_s'] or 0:.1f} s"]
    for r in h["rows"]:
        if r["policy"] in ("slm", "llm") and r["mode"] != "transformers":
            out.append(f"  batch {r['batch']} {r['mode']} {r['policy']}: {r['ms_per_step']:.3f} ms/step, bound "
                       f"{r['bound_ms']:.3f} ms = {r['pct_of_bound']:.0f}% of the weight-bandwidth bound")
    for d in h["derived"]:
        out.append(f"  batch {d['batch']} {d['mode']}: router {d['router_overhead_pct']:+.2f}% of the SLM step; "
                   f"routed@{h['fraction']:g} {d['routed_vs_llm']:.2f}x faster than LLM-only "
                   f"(efficiency {d['routed_efficiency']:.2f}); LLM-only {d['llm_vs_transformers']:.2f}x transformers")
    return out


def main(log_dir: str) -> int:
    rows = part_rows(log_dir)
    print("\n=== summary")
    print(f"{'part':<9} {'status':<12} {'s':>4} {'limit':>5}  result")
    for name, status, secs, limit, result in rows:
        print(f"{name:<9} {status:<12} {secs:>4} {limit:>5}  {result}")
    for line in headline_lines(os.path.join(log_dir, "headline.json")):
        print(line)
    print(f"total {sum(r[2] for r in rows)} s; logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
