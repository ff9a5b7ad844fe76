"""The token-match oracle's curve: route exactly where the SLM's greedy token differs from
the LLM's, spending at most k LLM tokens per answer (on its first k mismatches), for
k = 1, 2, ...; at k = infinity it is the LLM's greedy answer.

Computed by replacement, batched: generate with the SLM; teacher-force the LLM over the
answer; at the first position past the last replacement where the LLM's greedy token
differs, put the LLM's token and let the SLM continue from there; repeat. Positions where
the two agree count as the SLM's (it made them); each replacement is one LLM token.
"""
from typing import Dict, List, Sequence

import numpy as np
from tqdm import tqdm

from citer import Engine, SamplingParams
from citer.research.tasks import Problem, Task
from citer.research.training.forcing import Forcer


def oracle_points(engine: Engine, forcer: Forcer, task: Task, problems: List[Problem],
                  ks: Sequence[int] = (1, 2, 3, 4, 6, 8, 12), max_tokens: int = 128) -> List[Dict]:
    """-> per k: {"k", "correct" [N] bool, "tokens" [N], "llm_tokens" [N]} (per-problem arrays)."""
    tok = engine.tokenizer
    prompts = [tok(p.prompt).input_ids for p in problems]
    n = len(problems)
    forced: List[List[int]] = [[] for _ in range(n)]  # the answer's decided tokens (replacements included)
    answers = _continue(engine, task, problems, prompts, forced, range(n), max_tokens)
    llm_tokens = np.zeros(n, dtype=np.int64)
    open_ = set(range(n))  # answers that may still differ from the LLM's path
    out, done_k = [], 0
    for k in tqdm(range(1, max(ks) + 1), desc="oracle (first k mismatches)", leave=False):
        todo = sorted(open_)
        if todo:
            forced_runs = forcer.run([prompts[i] + answers[i] for i in todo], slm=False)
            changed = []
            for i, f in zip(todo, forced_runs):
                start, ans = len(prompts[i]), answers[i]
                llm_next = f.llm_pred[start - 1:start - 1 + len(ans)].tolist()  # the LLM's choice for each answer slot
                j = next((t for t in range(len(forced[i]), len(ans)) if llm_next[t] != ans[t]), None)
                if j is None:
                    open_.discard(i)
                    continue
                forced[i] = ans[:j] + [llm_next[j]]
                llm_tokens[i] += 1
                changed.append(i)
            for i, a in zip(changed, _continue(engine, task, problems, prompts, forced, changed, max_tokens)):
                answers[i] = a
        done_k = k
        if k in ks:
            out.append({"k": k, "correct": np.array([task.check(_text(tok, a), p) for a, p in zip(answers, problems)]),
                        "tokens": np.array([len(a) for a in answers]), "llm_tokens": llm_tokens.copy()})
    assert done_k == max(ks)
    return out


def _continue(engine: Engine, task: Task, problems, prompts, forced, idx, max_tokens) -> List[List[int]]:
    """The SLM's greedy continuation of prompt + forced tokens, for the answers in idx (with
    the task's stop strings)."""
    idx = list(idx)
    if not idx:
        return []
    stopped = [i for i in idx if forced[i] and forced[i][-1] in engine.core.eos_token_ids]
    run = [i for i in idx if i not in set(stopped)]
    got = {i: list(forced[i]) for i in stopped}  # an LLM eos ends the answer
    if run:
        params = [task.sampling_params([problems[i]], SamplingParams(max_tokens=max(1, max_tokens - len(forced[i])),
                                                                     policy="slm"))[0] for i in run]
        outs = engine.generate([prompts[i] + forced[i] for i in run], params)
        for i, o in zip(run, outs):
            got[i] = forced[i] + list(o.token_ids) if len(forced[i]) < max_tokens else forced[i]
    return [got[i] for i in idx]


def _text(tok, answer: List[int]) -> str:
    return tok.decode(answer, skip_special_tokens=True)
