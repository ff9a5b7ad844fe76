"""The `citer` command: train-router, eval, serve, demo."""
import argparse
import json
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(prog="citer", description="token-level routed decoding (CITER)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    tr = sub.add_parser("train-router", help="train a CITER router with shortcut-reward labels")
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
    tr.add_argument("--labels", default="gold", choices=["gold", "llm-agreement"],
                    help="gold: CITER's shortcut labels; llm-agreement: 1 where the SLM's greedy token is the LLM's")
    tr.add_argument("--easy-keep", type=float, default=1.0,
                    help="hard-case mining: keep positions with top probability >= 0.99 at this rate (reweighted)")
    tr.add_argument("--slack", type=float, default=0.01,
                    help="default τ: the cheapest within this much of the LLM's validation accuracy")

    ev = sub.add_parser("eval", help="accuracy vs LLM share for router / CITER-S / random / confidence")
    ev.add_argument("--slm")
    ev.add_argument("--llm")
    ev.add_argument("--router")
    ev.add_argument("--router-s", help="a CITER-S router folder to compare")
    ev.add_argument("--task", default="arith")
    ev.add_argument("-n", type=int, default=500)
    ev.add_argument("--out", default="eval")

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (default: the embedded demo pair)")
    sv.add_argument("--slm")
    sv.add_argument("--llm")
    sv.add_argument("--router")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--model-name", help="the model id clients ask for (default: citer-demo, or the LLM's folder)")
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--dtype", default="float32")
    sv.add_argument("--max-model-len", type=int)
    sv.add_argument("--max-num-seqs", type=int, default=64)
    sv.add_argument("--num-blocks", type=int)
    sv.add_argument("--profile", action="store_true", help="time the router (reported in /metrics)")

    sub.add_parser("demo", help="what `make demo` runs")
    args = ap.parse_args(argv)

    from citer.tasks import get_task

    if args.cmd == "train-router":
        from citer.training.router_train import train_router

        metrics = train_router(args.slm, args.llm, get_task(args.task), args.out, rounds=args.rounds,
                               n_train=args.n_train, n_val=args.n_val, short_term=args.short_term, seed=args.seed,
                               features=args.features, labels=args.labels, easy_keep=args.easy_keep, slack=args.slack)
        print(json.dumps(metrics["default_threshold"], indent=1))
    elif args.cmd == "eval":
        from citer import Engine
        from citer.evaluate import sweep, table, write

        sizes = dict(max_model_len=256, max_num_seqs=512, num_blocks=512 * 16)
        router_s = args.router_s
        if args.slm:
            engine = Engine(args.slm, args.llm, args.router, **sizes)
        else:  # the embedded default, with its CITER-S router when shipped
            import os

            from citer.assets import DEMO_DIR

            engine = Engine(**sizes)
            default_s = os.path.join(DEMO_DIR, "router_s")
            if router_s is None and os.path.isfile(os.path.join(default_s, "router_config.json")):
                router_s = default_s
        rows = sweep(engine, get_task(args.task), args.n, router_s=router_s)
        write(rows, args.out, f"{args.task}: {args.n} held-out problems")
        print(table(rows))
        print(f"\nwrote {args.out}/eval.json and {args.out}/accuracy_vs_llm_share.png")
    elif args.cmd == "serve":
        import os

        import uvicorn

        from citer.async_engine import AsyncEngine
        from citer.serve import create_app

        engine = AsyncEngine(args.slm, args.llm, args.router, device=args.device, dtype=args.dtype,
                             max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                             num_blocks=args.num_blocks, profile=args.profile)
        name = args.model_name or (os.path.basename(os.path.normpath(args.llm or args.slm)) if (args.llm or args.slm)
                                   else "citer-demo")
        print(f"citer serve: model {name!r} on http://{args.host}:{args.port}/v1", flush=True)
        try:
            uvicorn.run(create_app(engine, name), host=args.host, port=args.port, log_level="warning")
        finally:
            engine.shutdown()
    elif args.cmd == "demo":
        from citer.demo import main as demo

        demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
