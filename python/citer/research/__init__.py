"""citer.research: everything that makes and measures routers, on top of the API.

tasks/ (problems with checkable answers), training/ (the demo pair's language models,
CITER's shortcut-reward labels, router fitting, shipping), router_nets.py (the router's
training networks and saved format), evaluate.py / eval_stats.py (accuracy against LLM
share with bootstrap CIs), baselines.py (query-level and Co-LLM-style routers),
oracle.py (the token-match oracle), token_metrics.py (AUROC, recall at budgets).
Nothing in citer.engine or citer.kernels imports from here.
"""
