"""The task interface."""
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np

Seed = Union[int, np.random.Generator]


def as_rng(seed: Seed) -> np.random.Generator:
    """An int seed or a numpy Generator (used as is, so successive calls continue it)."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


@dataclass(frozen=True)
class Problem:
    prompt: str  # what the model is given
    solution: str  # the gold continuation (chain of thought + final answer line)
    answer: int


class Task:
    name = "task"

    def train_problems(self, n: int, seed: Seed) -> List[Problem]:
        """n fresh training problems, never from the held-out split. seed: an int, or a
        numpy Generator that successive calls keep drawing from."""
        raise NotImplementedError

    def test_problems(self, n: Optional[int] = None) -> List[Problem]:
        """The fixed held-out split (first n)."""
        raise NotImplementedError

    def extract_answer(self, text: str) -> Optional[int]:
        raise NotImplementedError

    def check(self, text: str, problem: Problem) -> bool:
        """Is the generated continuation's final answer right?"""
        return self.extract_answer(text) == problem.answer
