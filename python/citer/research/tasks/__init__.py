"""Tasks with checkable answers: what the demo pair is trained on and routers are trained for.

A task gives prompts, gold solutions and an answer checker; the router-training pipeline
and the evaluation are generic over it. `jsonl` reads the user's own data (jsonl.py), with
code checked in a sandboxed child process (citer.research.sandbox).
"""
from .base import Problem, Task
from .arith import ArithTask, Difficulty, extract_answer, is_correct, verify_solution
from .arith_free import ArithFreeTask
from .jsonl import JsonlError, JsonlTask

TASKS = {"arith": ArithTask, "arith-free": ArithFreeTask, "jsonl": JsonlTask}


def get_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = ["Problem", "Task", "ArithTask", "ArithFreeTask", "JsonlTask", "JsonlError", "Difficulty", "get_task", "TASKS", "extract_answer", "is_correct",
           "verify_solution"]
