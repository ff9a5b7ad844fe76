"""GSM8K-like multi-step arithmetic word problems with a chain-of-thought solution.

  Q: Max has 15 shells. He buys 9 packs of 54. He gives away 47. How many shells does he
  have now? A:
  solution: " 9*54=486. 15+486=501. 501-47=454. #### 454"

Seeded, with a difficulty knob (number of steps, operand sizes). The held-out split is
a fixed set of problems drawn from its own seed; training problems equal to any of them
are skipped, so the split is disjoint from training.
"""
import re
from dataclasses import dataclass
from functools import cached_property
from typing import List, Optional, Tuple

import numpy as np

from .base import Problem, Seed, Task, as_rng

NAMES = [("Max", "He", "he"), ("Tom", "He", "he"), ("Sam", "He", "he"), ("Leo", "He", "he"),
         ("Ann", "She", "she"), ("Mia", "She", "she"), ("Zoe", "She", "she"), ("Eva", "She", "she")]
ITEMS = ["shells", "apples", "coins", "stamps", "cards", "books", "pens", "eggs", "rocks", "beads"]
ANSWER = re.compile(r"####\s*(-?\d+)")
TEST_SEED = 20251124


@dataclass(frozen=True)
class Difficulty:
    min_steps: int = 2
    max_steps: int = 3
    max_start: int = 99  # starting amount
    max_operand: int = 99  # added / removed amounts, pack sizes
    max_packs: int = 9  # the one-digit factor of "buys a packs of b"


class ArithTask(Task):
    name = "arith"
    test_seed = TEST_SEED

    def __init__(self, difficulty: Difficulty = Difficulty(), num_test: int = 1000):
        self.difficulty = difficulty
        self.num_test = num_test

    # ---- generation -----------------------------------------------------------------
    def sample(self, rng: np.random.Generator) -> Problem:
        d = self.difficulty
        name, He, he = NAMES[rng.integers(len(NAMES))]
        item = ITEMS[rng.integers(len(ITEMS))]
        x = int(rng.integers(1, d.max_start + 1))
        story = [f"{name} has {x} {item}."]
        eqs = []  # the solution's equations (a, op, b, a op b), in order
        for _ in range(int(rng.integers(d.min_steps, d.max_steps + 1))):
            kind = rng.integers(4)
            if kind == 0:  # buy packs: a product, then a sum
                a, b = int(rng.integers(2, d.max_packs + 1)), int(rng.integers(2, d.max_operand + 1))
                story.append(f"{He} buys {a} packs of {b}.")
                eqs += [(a, "*", b, a * b), (x, "+", a * b, x + a * b)]
                x += a * b
            elif kind == 1:
                n = int(rng.integers(1, d.max_operand + 1))
                story.append(f"{He} finds {n} more.")
                eqs.append((x, "+", n, x + n))
                x += n
            elif kind == 2 and x > 1:
                n = int(rng.integers(1, min(x - 1, d.max_operand) + 1))
                story.append(f"{He} gives away {n}.")
                eqs.append((x, "-", n, x - n))
                x -= n
            else:
                story.append(f"{He} doubles them.")
                eqs.append((x, "*", 2, 2 * x))
                x *= 2
        story.append(f"How many {item} does {he} have now?")
        prompt = "Q: " + " ".join(story) + " A:"
        return Problem(prompt, self.render(eqs, x, rng), x)

    def render(self, eqs, answer: int, rng: np.random.Generator) -> str:
        """The gold solution text of a problem's equations (draws nothing from rng here)."""
        return " " + " ".join(f"{a}{op}{b}={c}." for a, op, b, c in eqs) + f" #### {answer}"

    @cached_property
    def _test(self) -> Tuple[Problem, ...]:
        rng = np.random.default_rng(self.test_seed)
        seen, out = set(), []
        while len(out) < self.num_test:
            p = self.sample(rng)
            if p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
        return tuple(out)

    @cached_property
    def _test_prompts(self) -> frozenset:
        return frozenset(p.prompt for p in self._test)

    def test_problems(self, n: Optional[int] = None) -> List[Problem]:
        return list(self._test[: n if n is not None else self.num_test])

    def train_problems(self, n: int, seed: Seed) -> List[Problem]:
        rng, out = as_rng(seed), []
        while len(out) < n:
            p = self.sample(rng)
            if p.prompt not in self._test_prompts:
                out.append(p)
        return out

    # ---- checking -------------------------------------------------------------------
    def extract_answer(self, text: str) -> Optional[int]:
        return extract_answer(text)


def extract_answer(text: str) -> Optional[int]:
    """The integer after the first "####" in a generated solution, or None."""
    m = ANSWER.search(text)
    return int(m.group(1)) if m else None


def is_correct(text: str, gold: int) -> bool:
    """Does a generated solution's final answer equal gold?"""
    return extract_answer(text) == gold


def verify_solution(solution: str) -> bool:
    """Every equation "a op b = c" in a solution is arithmetically right."""
    for a, op, b, c in re.findall(r"(\d+)([-+*])(\d+)=(\d+)", solution):
        a, b, c = int(a), int(b), int(c)
        if {"+": a + b, "-": a - b, "*": a * b}[op] != c:
            return False
    return True
