"""The task interface."""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

Seed = Union[int, np.random.Generator]
Answer = Union[int, str, None]


def as_rng(seed: Seed) -> np.random.Generator:
    """An int seed or a numpy Generator (used as is, so successive calls continue it)."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


@dataclass(frozen=True)
class Problem:
    prompt: str  # what the model is given
    solution: str = ""  # the gold continuation (chain of thought + final answer line); "" when the data has none
    answer: Answer = None  # int for the built-in tasks, a string from JSONL data, None when there is none
    tests: Optional[str] = None  # Python test code (the python-tests checker)
    stop: Tuple[str, ...] = ()  # the completion ends before the first of these
    id: Optional[str] = None


class Task:
    name = "task"
    has_checker = True  # check() says whether a completion is right (False: no tests, answers or checker)

    def train_problems(self, n: int, seed: Seed) -> List[Problem]:
        """n fresh training problems, never from the held-out split. seed: an int, or a
        numpy Generator that successive calls keep drawing from."""
        raise NotImplementedError

    def validation_problems(self, n: int, seed: Seed) -> List[Problem]:
        """n problems to select routers and thresholds on, never from the held-out split.
        Generated tasks draw them from the training stream (continuing `seed`); tasks read
        from data have a split of their own, disjoint from training."""
        return self.train_problems(n, seed)

    def test_problems(self, n: Optional[int] = None) -> List[Problem]:
        """The fixed held-out split (first n)."""
        raise NotImplementedError

    def extract_answer(self, text: str) -> Answer:
        raise NotImplementedError

    def check(self, text: str, problem: Problem) -> bool:
        """Is the generated continuation's final answer right?"""
        return self.extract_answer(text) == problem.answer

    def check_many(self, texts: Sequence[str], problems: Sequence[Problem]) -> List[bool]:
        """check() over many completions (tasks that run code check them in parallel)."""
        return [bool(self.check(t, p)) for t, p in zip(texts, problems)]

    def sampling_params(self, problems: Sequence[Problem], params):
        """One SamplingParams per problem (tasks with per-problem stop strings add them)."""
        return [params] * len(problems)
