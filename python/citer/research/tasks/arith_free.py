"""`arith-free`: the arithmetic task with interchangeable choices in its solutions.

The problems (stories, numbers, answers) are drawn exactly like `arith`'s, but each gold
solution is one of many equally right texts, drawn at random:

  - operand order of every sum and product ("3*11=33." or "11*3=33.");
  - a free connective before each equation after the first ("", "Then ", "So ", "Now ");
  - a free closing phrase before the answer line ("", " The answer is 49.").

So a model trained on it is unsure at tokens where any choice is right (the confidence
rule and a token-match oracle spend LLM calls there for nothing), and an SLM token that
differs from the gold text is often harmless: positions where both models differ from
gold are common, and only a rollout (CITER's long-term label) tells harmless from fatal.
Answers are checked as in `arith` (the integer after "####"); every variant checks.
"""
from typing import Iterator, Tuple

import numpy as np

from .arith import ArithTask

CONNECTIVES = ("", "Then ", "So ", "Now ")
CLOSINGS = ("", " The answer is {answer}.")
TEST_SEED = 20261202


class ArithFreeTask(ArithTask):
    name = "arith-free"
    test_seed = TEST_SEED

    def render(self, eqs, answer: int, rng: np.random.Generator) -> str:
        parts = []
        for i, (a, op, b, c) in enumerate(eqs):
            if op in "+*" and rng.random() < 0.5:
                a, b = b, a
            lead = CONNECTIVES[rng.integers(len(CONNECTIVES))] if i else ""
            parts.append(f"{lead}{a}{op}{b}={c}.")
        closing = CLOSINGS[rng.integers(len(CLOSINGS))].format(answer=answer)
        return " " + " ".join(parts) + closing + f" #### {answer}"

    @staticmethod
    def variants(eqs, answer: int) -> Iterator[str]:
        """Every solution text the renderer can produce for these equations (for tests)."""
        import itertools

        def forms(i, a, op, b, c):
            orders = [(a, b), (b, a)] if op in "+*" else [(a, b)]
            leads = CONNECTIVES if i else ("",)
            return [f"{lead}{x}{op}{y}={c}." for lead in leads for x, y in orders]

        per_eq = [forms(i, *eq) for i, eq in enumerate(eqs)]
        for parts in itertools.product(*per_eq):
            for closing in CLOSINGS:
                yield " " + " ".join(parts) + closing.format(answer=answer) + f" #### {answer}"


def equations(solution: str) -> Tuple[Tuple[int, str, int, int], ...]:
    """The (a, op, b, c) equations of a solution text, in order."""
    import re

    return tuple((int(a), op, int(b), int(c)) for a, op, b, c in re.findall(r"(\d+)([-+*])(\d+)=(\d+)", solution))
