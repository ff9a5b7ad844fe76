"""The `citer` command: one plain function per subcommand (train-router, train-baselines,
eval, serve, demo, convert), each importing what it needs when it runs. A subcommand whose
packages come with an extra (`pip install 'citer[serve]'`, `'citer[eval]'`) says which
extra to install when they are missing."""
import argparse
import importlib
import json
import os
import sys

from citer.engine.args import EngineArgs

EXTRAS = {  # extra -> the modules its commands import
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "eval": ("matplotlib",),
    "gguf": ("gguf",),
}


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require_extra(extra: str, command: str) -> None:
    """Exit with a message naming the extra to install when one of its modules is missing."""
    missing = [m for m in EXTRAS[extra] if not _importable(m)]
    if missing:
        print(f"citer {command} needs {', '.join(missing)}, which this install does not have; "
              f"install it with: pip install 'citer[{extra}]'", file=sys.stderr)
        raise SystemExit(2)


def train_router_cmd(args) -> None:
    from citer.research.tasks import get_task
    from citer.research.tasks.jsonl import task_from_args
    from citer.research.training.router_train import resolve_labels, train_router

    if args.data:  # references are required by the labels that use them ("auto": once it has chosen)
        task = task_from_args(args, tokenizer=args.slm, train=args.labels not in ("llm-agreement", "auto"))
    else:
        task = get_task(args.task)
    labels, short_term = resolve_labels(args.labels, args.short_term, task)
    if args.data and args.labels == "auto" and labels != "llm-agreement":
        task = task_from_args(args, tokenizer=args.slm, train=True)  # every line's reference checked
    metrics = train_router(args.slm, args.llm, task, args.out, rounds=args.rounds, n_train=args.n_train,
                           n_val=args.n_val, short_term=short_term, seed=args.seed, features=args.features,
                           labels=labels, easy_keep=args.easy_keep, slack=args.slack, dtype=args.dtype,
                           max_len=args.max_len, max_tokens=args.max_tokens, target_recall=args.target_recall,
                           n_onpolicy=args.n_onpolicy, round_share=args.round_share, cache=args.cache,
                           target_share=args.target_share)
    print(json.dumps(metrics["default_threshold"], indent=1))


def eval_data_cmd(args) -> None:
    """citer eval --data / --eval-data: the test split of the user's data (research.data_eval)."""
    from citer import Engine
    from citer.research.data_eval import data_table, evaluate_data, time_methods, write_data_eval
    from citer.research.tasks.jsonl import task_from_args

    task = task_from_args(args, tokenizer=args.slm, train=False)
    engine = Engine(args.slm, args.llm, args.router, dtype=args.dtype, max_model_len=args.max_model_len,
                    max_num_seqs=args.max_num_seqs, max_llm_wait=args.max_llm_wait, llm_batch_min=args.llm_batch_min)
    test = task.test_problems(args.n)
    problems = [p for p in test  # the prompts that fit with max_tokens new ones
                if len(engine.tokenizer(p.prompt).input_ids) + args.max_tokens <= args.max_model_len]
    if not problems:
        raise ValueError(f"no test problems to evaluate: the test split has {len(test)}, and none fits "
                         f"--max-model-len {args.max_model_len} with --max-tokens {args.max_tokens}" if test else
                         "no test problems to evaluate: the test split is empty (more lines, or --test-fraction)")
    from citer.assets import router_path

    routers = {"CITER": router_path(args.router)} if args.router else {}  # shipped names -> folders
    if args.router_s:
        routers["CITER-S"] = router_path(args.router_s)
    query = os.path.join(args.baselines, "query") if args.baselines else None
    if args.baselines and os.path.isdir(os.path.join(args.baselines, "colm")):
        routers["Co-LLM"] = os.path.join(args.baselines, "colm")
    extras = dict(verify_shares=tuple(args.verify_shares), random_shares=tuple(args.random_shares),
                  speculative=not args.no_speculative)
    if args.curves_only:
        extras = dict(verify_shares=(), speculative=False, random_shares=())
    result = evaluate_data(engine, task, problems, routers, args.out, max_tokens=args.max_tokens, query_router=query,
                           oracle_ks=() if args.no_oracle else (1, 2, 4, 8), shares=tuple(args.shares), **extras)
    timings = None
    if args.timing:
        pick, unmatched = {}, set(args.timing)
        for r in result["rows"]:
            name = r["method"] if r["knob"] is None else f"{r['method']} {r['knob']}"
            asked = {a for a in args.timing if _names_point(a, r)}
            unmatched -= asked
            if r["method"] in ("slm", "llm", "speculative") or asked:
                kw = {"slm": dict(policy="slm"), "llm": dict(policy="llm"),
                      "speculative": dict(policy="speculative", num_draft_tokens=4)}.get(r["method"])
                if kw is None:
                    kw = _point_params(r, routers)
                pick[name] = kw
        if unmatched:
            raise ValueError(f"--timing {sorted(unmatched)}: no such evaluated point; name one as the table does "
                             f"('method knob'), e.g. {sorted(_table_name(r) for r in result['rows'])[:6]}")
        pick.setdefault("speculative", dict(policy="speculative", num_draft_tokens=4))  # timed without its point too
        timings = time_methods(engine, task, problems, pick, max_tokens=args.max_tokens)
    write_data_eval(result, args.out, f"{os.path.basename(args.eval_data or args.data)}: {len(problems)} problems",
                    timings)
    print(data_table(result, timings))


def _table_name(row: dict) -> str:
    return row["method"] if row["knob"] is None else f"{row['method']} {row['knob']:.4g}"


def _names_point(asked: str, row: dict) -> bool:
    """Does a --timing name pick this point: its method, and its knob as the table prints it
    (4 significant digits) or in full?"""
    if row["knob"] is None:
        return asked == row["method"]
    method, _, knob = asked.rpartition(" ")
    if method != row["method"]:
        return False
    try:
        return float(knob) == row["knob"] or knob == f"{row['knob']:.4g}"
    except ValueError:
        return False


def _point_params(row: dict, routers: dict) -> dict:
    """The SamplingParams fields of an evaluated point (method + knob)."""
    method, knob = row["method"], row["knob"]
    if method == "confidence":
        return dict(policy="confidence", confidence_threshold=knob)
    if method == "random":
        return dict(policy="random", llm_fraction=knob)
    base = method.replace(" + verify", "")
    return dict(policy="router", threshold=knob, verify=method.endswith("+ verify"), router_path=routers[base])


def eval_cmd(args) -> None:
    require_extra("eval", "eval")
    if args.data or args.eval_data:
        return eval_data_cmd(args)
    from citer import Engine
    from citer.assets import shipped
    from citer.research.evaluate import EVAL_SEED, evaluate, summary_table, table, token_table, write_eval
    from citer.research.tasks import get_task

    sizes = dict(max_model_len=256, max_num_seqs=512, num_blocks=512 * 16)
    folders = {"router_s": args.router_s, "router_hidden": args.router_hidden, "baselines": args.baselines}
    if args.slm:
        engine = Engine(args.slm, args.llm, args.router, dtype=args.dtype, **sizes)
    else:  # an embedded pair (the one trained on this task), with whatever it ships beside its router
        pair = shipped(args.task)
        engine = Engine(pair["slm"], pair["llm"], args.router or pair["router"], dtype=args.dtype, **sizes)
        folders = {k: v if v is not None else pair.get(k) for k, v in folders.items()}
    routers = {name: folders[key] for name, key in (("CITER-S", "router_s"), ("CITER (hidden only)",
                                                                               "router_hidden")) if folders[key]}
    query = None
    if folders["baselines"]:
        routers["Co-LLM"] = os.path.join(folders["baselines"], "colm")
        query = os.path.join(folders["baselines"], "query")
    seed = EVAL_SEED if args.seed is None else args.seed
    result = evaluate(engine, get_task(args.task), args.n, seed=seed, routers=routers, query_router=query,
                      oracle=not args.no_oracle)
    write_eval(result, args.out, f"{args.task}: {result['n']} fresh problems (seed {seed})")
    print(table(result["rows"]))
    print()
    print(summary_table(result["summary"]))
    print()
    print(token_table(result["token_report"]))
    print(f"\nwrote {args.out}/eval.json and {args.out}/accuracy_vs_llm_share*.png")


def train_baselines_cmd(args) -> None:
    from citer.research.baselines import train_baselines, train_baselines_on_positions
    from citer.research.tasks import get_task
    from citer.research.tasks.jsonl import task_from_args

    if args.data:
        task = task_from_args(args, tokenizer=args.slm, train=True)
        train_baselines_on_positions(args.slm, args.llm, task, args.out, n_train=args.n_train, seed=args.seed,
                                     dtype=args.dtype, max_len=args.max_len, cache=args.cache, only=args.only)
    else:
        train_baselines(args.slm, args.llm, get_task(args.task), args.out, n_train=args.n_train, seed=args.seed,
                        only=args.only)


def serve_cmd(args) -> None:
    require_extra("serve", "serve")
    from citer.async_engine import AsyncEngine
    from citer.serve import ServerArgs, create_app, run_server

    server_args = ServerArgs.from_cli_args(args)  # checked before the models load
    engine = AsyncEngine(EngineArgs.from_cli_args(args))
    model = args.llm or args.slm
    name = server_args.model_name or (os.path.basename(os.path.normpath(model)) if model else "citer-demo")
    key = "API key required" if server_args.api_key else "no API key"
    print(f"citer serve: model {name!r} on http://{server_args.host}:{server_args.port}/v1 ({key})", flush=True)
    try:
        run_server(create_app(engine, name, server_args), server_args)
    finally:
        engine.shutdown()


def demo_cmd(args) -> None:
    from citer.demo import main as demo

    demo()


def convert_cmd(args) -> None:
    require_extra("gguf", "convert")
    from citer.convert import convert_gguf

    summary = convert_gguf(args.src, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {args.out}: {', '.join(summary['files'])} ({summary['weight_bytes'] / 1e9:.2f} GB of "
          f"{args.dtype} weights, {summary['seconds']:.1f} s)")


def build_parser() -> argparse.ArgumentParser:
    from citer.research.tasks.jsonl import add_arguments as data_arguments

    ap = argparse.ArgumentParser(prog="citer", description="token-level routed decoding (CITER)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    tr = sub.add_parser("train-router", help="train a CITER router with shortcut-reward labels")
    tr.set_defaults(run=train_router_cmd)
    tr.add_argument("--slm", required=True)
    tr.add_argument("--llm", required=True)
    tr.add_argument("--task", default="arith")
    tr.add_argument("--out", required=True)
    tr.add_argument("--rounds", type=int, default=2)
    tr.add_argument("--short-term", action="store_true", help="CITER-S: case 3 -> LLM, no rollouts")
    tr.add_argument("--n-train", type=int, default=3000)
    tr.add_argument("--n-val", type=int, default=500)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--features", default="hidden+head", choices=["hidden+head", "hidden"],
                    help="router input: the hidden state and the head's signals (default), or the paper's hidden only")
    tr.add_argument("--labels", default="auto", choices=["auto", "gold", "llm-agreement"],
                    help="gold: CITER's shortcut labels (long-term by rollouts with a checker; with references but "
                         "no checker, CITER-S's short-term ones); llm-agreement: 1 where the SLM's greedy token is "
                         "the LLM's (on references, or on the LLM's own trajectories when the data has only "
                         "prompts); auto: what the data allows, in that order")
    tr.add_argument("--easy-keep", type=float, default=1.0,
                    help="hard-case mining: keep positions with top probability >= 0.99 at this rate (reweighted)")
    tr.add_argument("--slack", type=float, default=0.01,
                    help="default τ: the cheapest within this much of the LLM's validation accuracy")
    tr.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the models' dtype for teacher forcing and rollouts (the dtype you will serve in)")
    tr.add_argument("--max-len", type=int, default=256, help="longest prompt + reference to teacher-force (tokens)")
    tr.add_argument("--max-tokens", type=int, default=128, help="new tokens per rollout / trajectory")
    tr.add_argument("--target-recall", type=float, default=0.9,
                    help="without a checker: default τ sends the LLM this share of validation disagreements")
    tr.add_argument("--target-share", type=float, help="without a checker: default τ sends the LLM this share of "
                                                        "validation positions (instead of --target-recall)")
    tr.add_argument("--n-onpolicy", type=int, help="training prompts whose routed trajectories round 2 adds "
                                                   "(default: all)")
    tr.add_argument("--round-share", type=float, default=0.15, help="round 2's router runs at about this LLM share")
    tr.add_argument("--cache", help="folder of the teacher-forced positions (default OUT/cache; runs on the same "
                                    "data may share one)")
    data_arguments(tr, train=True)

    ev = sub.add_parser("eval", help="accuracy vs LLM share of CITER and every baseline, with bootstrap CIs")
    ev.set_defaults(run=eval_cmd)
    ev.add_argument("--slm")
    ev.add_argument("--llm")
    ev.add_argument("--router", help="the CITER router (default: the embedded pair's)")
    ev.add_argument("--router-s", help="a CITER-S router folder to compare")
    ev.add_argument("--router-hidden", help="a hidden-only (the paper's input) router folder to compare")
    ev.add_argument("--baselines", help="a `citer train-baselines` folder (query/ and colm/)")
    ev.add_argument("--task", default="arith")
    ev.add_argument("-n", type=int, default=500)
    ev.add_argument("--seed", type=int, default=None, help="the problems' seed (default: 20261202)")
    ev.add_argument("--no-oracle", action="store_true")
    ev.add_argument("--out", default="eval")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ev.add_argument("--max-tokens", type=int, default=192, help="--data: new tokens per problem")
    ev.add_argument("--max-model-len", type=int, default=1024, help="--data: prompt + new tokens")
    ev.add_argument("--max-num-seqs", type=int, default=64)
    ev.add_argument("--max-llm-wait", type=int, default=0, help="--data: deferred LLM calls (outputs unchanged)")
    ev.add_argument("--llm-batch-min", type=int, default=1)
    ev.add_argument("--shares", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.15, 0.2, 0.3],
                    help="--data: the LLM shares each router's and the confidence rule's knobs aim at")
    ev.add_argument("--random-shares", type=float, nargs="*", default=[0.05, 0.15, 0.3],
                    help="--data: LLM fractions of the random baseline")
    ev.add_argument("--verify-shares", type=float, nargs="*", default=[0.1, 0.2],
                    help="--data: the CITER router's shares (of --shares) also run with verify=True")
    ev.add_argument("--no-speculative", action="store_true", help="--data: no speculative decoding point (its "
                                                                    "greedy outputs are the LLM's; --timing still "
                                                                    "times it)")
    ev.add_argument("--curves-only", action="store_true", help="--data: only the SLM, the LLM, the routers and "
                                                               "the confidence rule (no random, verify, speculative)")
    ev.add_argument("--timing", nargs="*", help="--data: also time these points ('CITER 0.93', ...) beside slm, llm "
                                                "and speculative, batch 1 and 16")
    data_arguments(ev, train=False)

    tb = sub.add_parser("train-baselines", help="the query-level router and Co-LLM's deferral head")
    tb.set_defaults(run=train_baselines_cmd)
    tb.add_argument("--slm", required=True)
    tb.add_argument("--llm", required=True)
    tb.add_argument("--task", default="arith")
    tb.add_argument("--out", required=True)
    tb.add_argument("--n-train", type=int, default=3000)
    tb.add_argument("--seed", type=int, default=0)
    tb.add_argument("--only", choices=["query", "colm"], help="train one of the two")
    tb.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    tb.add_argument("--max-len", type=int, default=256)
    tb.add_argument("--cache", help="--data: the teacher-forced positions train-router cached (same data, seed)")
    data_arguments(tb, train=True)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (default: the embedded demo pair)")
    sv.set_defaults(run=serve_cmd)
    from citer.serve.args import ServerArgs  # the server's flags (--host, --port, limits, key, origins, timeouts)

    ServerArgs.add_cli_args(sv)
    EngineArgs.add_cli_args(sv)

    sub.add_parser("demo", help="what `make demo` runs").set_defaults(run=demo_cmd)

    cv = sub.add_parser("convert", help="write a GGUF checkpoint once as a Hugging Face folder")
    cv.set_defaults(run=convert_cmd)
    cv.add_argument("src", help="a .gguf file (architecture qwen2, qwen3 or llama)")
    cv.add_argument("out", help="the folder to write (new or empty)")
    cv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the weights' dtype (default float32: dequantized values rarely fit 16 bits exactly)")
    cv.add_argument("--max-shard-gb", type=float, default=4.0, help="shard the weights above this size (GiB)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
