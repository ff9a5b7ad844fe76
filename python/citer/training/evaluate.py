"""Greedy accuracy of a model folder (or a routed pair) on a task's held-out problems."""
from typing import List, Optional

from citer import Engine, SamplingParams
from citer.tasks import Problem, Task


def accuracy(engine: Engine, task: Task, problems: List[Problem], max_tokens: int = 96,
             params: Optional[SamplingParams] = None) -> dict:
    params = params or SamplingParams(max_tokens=max_tokens)
    outs = engine.generate([p.prompt for p in problems], params)
    correct = [task.check(o.text, p) for o, p in zip(outs, problems)]
    tokens = sum(len(o.token_ids) for o in outs)
    return {
        "accuracy": sum(correct) / len(problems),
        "llm_share": sum(sum(o.from_llm) for o in outs) / max(tokens, 1),
        "tokens": tokens,
        "outputs": outs,
        "correct": correct,
    }
