"""Tasks from the user's own data: a JSONL file, one problem per line.

    {"prompt": "def add(a, b):\\n    \\"\\"\\"Add.\\"\\"\\"\\n", "reference": "    return a + b\\n",
     "tests": "assert add(2, 3) == 5", "stop": ["\\ndef "], "id": "add"}
    {"prompt": "Q: 2+3? A:", "reference": " 2+3=5. #### 5", "answer": 5}

Fields of a line (other fields are ignored; blank lines are skipped; `.jsonl.gz` is read
through gzip):
  prompt     str, required: what the model is given.
  reference  str: the gold completion. Router training teacher-forces it, so the lines of
             the training and validation splits need one (require_reference=True).
  answer     str | int | float: the gold final answer, for the `exact` checker.
  extract    str: this line's extraction rule (else the task's `extract`).
  tests      str: Python test code, for the `python-tests` checker.
  stop       list of str: the completion ends before the first of these (the checkers cut
             it there; sampling_params() passes them to the engine too).
  id         str | int: the line's name (default "<file name>:<line number>").
Any error names the file, the line number and the field: bad JSON, a missing prompt,
a wrong type, an unknown extraction rule, a line without what its checker needs.

Checkers (task option `checker`):
  exact         the answer extracted from the completion equals `answer`: equal after
                stripping, or both numbers of equal value ("1,000" = "1000.0"; "$" and a
                final "." are ignored). Extraction rules: `last-number` (the last number in
                the text), `after:<marker>` (the rest of the line after the first marker,
                e.g. `after:####`), `regex:<pattern>` (group 1 of the first match; the
                pattern needs exactly one group), `whole` (the stripped text).
  python-tests  the program prompt + completion + "\\n" + tests runs to its end without an
                exception, in a sandboxed child process (citer.research.sandbox: time,
                memory, process and output limits, no network; never inside this process).
                With chat=True (or code="completion") the program is the completion's
                first fenced code block (or the whole completion) + "\\n" + tests.
                check_many() runs a pool of sandboxes; verdicts are cached by program text.
  none          no checker: check() is always False (train with labels="llm-agreement" or
                short_term=True; evaluation reports share and speed only).
  auto          (default) python-tests if every line has tests, else exact if every line
                has an answer, else none.
check() takes the completion alone, or the decoded prompt followed by it (what the label
rollouts of citer.research.training.labels pass); the prompt is cut off either way.

Splits: training / validation / test, never overlapping.
  - separate files: data (training), val_data (validation), eval_data (test);
  - a seeded split of one file: a split not given as a file is carved out of `data`:
    test_fraction (0.2) of its distinct prompts for test, val_fraction (0.1) for
    validation, the rest training, by a permutation from split_seed (0). Lines with the
    same prompt (whitespace-normalised) always land in the same split;
  - across files, a prompt found in the test split is dropped from validation and
    training, and one in validation from training (counted in `overlap_removed`, warned);
  - eval_data alone: a test-only task (evaluation of a router trained elsewhere).
train_problems(n, seed) draws min(n, size) training problems without replacement;
validation_problems(n) and test_problems(n) are the first n of their split, in file order.
The same options always give the same splits, so `citer eval` with the training options
evaluates on exactly the held-out part.

chat=True applies the tokenizer's chat template to each prompt (apply_chat_template with
add_generation_prompt=True, an optional system message); the tokenizer is an object or a
checkpoint folder. The CLI wiring: add_arguments(parser) and task_from_args(args, tokenizer).
"""
import gzip
import hashlib
import json
import os
import re
import threading
import warnings
from dataclasses import replace
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .base import Problem, Seed, Task, as_rng

CHECKERS = ("auto", "exact", "python-tests", "none")
RULES_HELP = "last-number, after:<marker>, regex:<pattern> (one group) or whole"
FIELDS = {"prompt": (str,), "reference": (str,), "answer": (str, int, float), "extract": (str,), "tests": (str,),
          "stop": (list,), "id": (str, int)}
TYPE_NAMES = {str: "string", int: "integer", float: "number", list: "list"}
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


class JsonlError(ValueError):
    """A problem with a JSONL file: names the file, the line and the field."""

    def __init__(self, path: str, line: int, field: Optional[str], problem: str):
        where = f"{path}:{line}" + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.field = path, line, field


# ---- extraction rules --------------------------------------------------------------------
def parse_rule(rule: str) -> Callable[[str], Optional[str]]:
    """An extraction rule -> a function text -> the extracted answer (None: no answer)."""
    if not isinstance(rule, str):
        raise ValueError(f"unknown extraction rule {rule!r}; use {RULES_HELP}")
    if rule == "last-number":
        def last_number(text):
            found = _NUMBER.findall(text)
            return found[-1].rstrip(",") if found else None
        return last_number
    if rule == "whole":
        return lambda text: text.strip()
    if rule.startswith("after:") and len(rule) > len("after:"):
        marker = rule[len("after:"):]

        def after(text):
            i = text.find(marker)
            if i < 0:
                return None
            rest = text[i + len(marker):].split("\n", 1)[0].strip()
            return rest or None
        return after
    if rule.startswith("regex:"):
        try:
            pat = re.compile(rule[len("regex:"):])
        except re.error as e:
            raise ValueError(f"bad regex in extraction rule {rule!r}: {e}") from None
        if pat.groups != 1:
            raise ValueError(f"the pattern of extraction rule {rule!r} must have exactly one group "
                             f"(it has {pat.groups})")

        def regex(text):
            m = pat.search(text)
            return m.group(1).strip() if m and m.group(1) is not None else None
        return regex
    raise ValueError(f"unknown extraction rule {rule!r}; use {RULES_HELP}")


def as_number(s: str) -> Optional[Fraction]:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    if not s or not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(got: Optional[str], gold: str) -> bool:
    if got is None:
        return False
    if got.strip() == gold.strip():
        return True
    a, b = as_number(got), as_number(gold)
    return a is not None and a == b


def first_code_block(text: str) -> str:
    """The first fenced code block of a chat answer (an unclosed one runs to the end), else the text."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def normalize_prompt(prompt: str) -> str:
    return " ".join(prompt.split())


# ---- reading -----------------------------------------------------------------------------
def _lines(f, path: str):
    """The file's lines (bytes); a file that is not what its name says (a .gz that is not
    gzip) is named."""
    try:
        yield from f
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read it as {'gzip' if path.endswith('.gz') else 'a text file'}: "
                         f"{type(e).__name__}: {e}") from None


def read_jsonl(path: str) -> List[Tuple[int, dict]]:
    """-> [(line number, the checked record)] of a JSONL (or .jsonl.gz) file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such JSONL file: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    out = []
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(_lines(f, path), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JsonlError(path, lineno, None, f"not UTF-8 (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsonlError(path, lineno, None, f"bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise JsonlError(path, lineno, None, f"a line must be a JSON object, not {type(rec).__name__}")
            if "prompt" not in rec:
                raise JsonlError(path, lineno, "prompt", "missing (every line needs a prompt)")
            for key, types in FIELDS.items():
                v = rec.get(key)
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, types):
                    names = " or ".join(TYPE_NAMES[t] for t in types)
                    raise JsonlError(path, lineno, key, f"must be a {names}, not {type(v).__name__}")
            if not rec["prompt"]:
                raise JsonlError(path, lineno, "prompt", "empty")
            stop = rec.get("stop")
            if stop is not None and not all(isinstance(s, str) and s for s in stop):
                raise JsonlError(path, lineno, "stop", "must be a list of non-empty strings")
            if rec.get("extract") is not None:
                try:
                    parse_rule(rec["extract"])
                except ValueError as e:
                    raise JsonlError(path, lineno, "extract", str(e)) from None
            out.append((lineno, rec))
    return out


class JsonlTask(Task):
    """A task read from JSONL files (see the module doc)."""

    name = "jsonl"

    def __init__(self, data: Optional[str] = None, val_data: Optional[str] = None, eval_data: Optional[str] = None,
                 checker: str = "auto", extract: str = "last-number", chat: bool = False, tokenizer=None,
                 system: Optional[str] = None, split_seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, require_reference: bool = False, code: str = "auto",
                 limits=None, workers: Optional[int] = None):
        from citer.research.sandbox import Limits

        if data is None and eval_data is None:
            raise ValueError("a JSONL task needs data (training, and validation / test unless given) or eval_data")
        if checker not in CHECKERS:
            raise ValueError(f"unknown checker {checker!r}; choose one of {CHECKERS}")
        if code not in ("auto", "prompt+completion", "completion"):
            raise ValueError(f"unknown code {code!r}; choose auto, prompt+completion or completion")
        for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= f < 1:
                raise ValueError(f"{name} must be in [0, 1), not {f}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be under 1 (training needs the rest), "
                             f"not {val_fraction + test_fraction}")
        parse_rule(extract)
        self.extract = extract
        self.chat, self.system = chat, system
        self.tokenizer = _load_tokenizer(tokenizer) if tokenizer is not None else None
        if chat and (self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None)):
            raise ValueError("chat=True needs a tokenizer with a chat template "
                             "(give tokenizer=, e.g. the SLM's folder)")
        self.code = ("completion" if chat else "prompt+completion") if code == "auto" else code
        self.limits = limits or Limits()
        self.workers = workers
        self._cache: Dict[str, bool] = {}
        self._cache_lock = threading.Lock()
        self._prompt_forms: Dict[str, Tuple[str, ...]] = {}
        self._rules: Dict[Problem, str] = {}  # lines with an extraction rule of their own

        files = {"data": data, "val_data": val_data, "eval_data": eval_data}
        raw = {k: read_jsonl(p) for k, p in files.items() if p is not None}
        all_lines = [(files[k], n, r) for k, lines in raw.items() for n, r in lines]
        if not all_lines:
            raise ValueError("the JSONL files hold no problems: " + ", ".join(p for p in files.values() if p))
        self.checker = _resolve_checker(checker, all_lines)
        self.files = {k: v for k, v in files.items() if v is not None}
        self.split_seed, self.val_fraction, self.test_fraction = split_seed, val_fraction, test_fraction

        carved = {"train": [], "val": [], "test": []}
        if data is not None:
            groups = _groups([(data, n, r) for n, r in raw["data"]])
            perm = np.random.default_rng(split_seed).permutation(len(groups))
            n_test = 0 if eval_data is not None else _share(test_fraction, len(groups))
            n_val = 0 if val_data is not None else _share(val_fraction, len(groups))
            n_val = min(n_val, max(0, len(groups) - n_test - 1))  # training keeps at least one
            for rank, gi in enumerate(perm):
                split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
                carved[split].extend(groups[gi])
        if val_data is not None:
            carved["val"] = [(val_data, n, r) for n, r in raw["val_data"]]
        if eval_data is not None:
            carved["test"] = [(eval_data, n, r) for n, r in raw["eval_data"]]
        for split in carved:
            carved[split].sort(key=lambda x: (list(files.values()).index(x[0]), x[1]))  # file order
        self.overlap_removed = {"train": 0, "val": 0}
        held = {normalize_prompt(r["prompt"]) for _, _, r in carved["test"]}
        for split in ("val", "train"):
            keep = [x for x in carved[split] if normalize_prompt(x[2]["prompt"]) not in held]
            self.overlap_removed[split] = len(carved[split]) - len(keep)
            carved[split] = keep
            held |= {normalize_prompt(r["prompt"]) for _, _, r in keep}
        if any(self.overlap_removed.values()):
            warnings.warn(f"JSONL task: dropped prompts also found in a later split: {self.overlap_removed} "
                          "(test wins over validation, validation over training)")
        self._splits = {s: tuple(self._problem(p, n, r, need_reference=require_reference and s != "test")
                                 for p, n, r in lines) for s, lines in carved.items()}

    # ---- problems ----------------------------------------------------------------------
    def _problem(self, path: str, lineno: int, rec: dict, need_reference: bool) -> Problem:
        if need_reference and not rec.get("reference"):
            raise JsonlError(path, lineno, "reference", "missing (router training teacher-forces the reference "
                                                        "completion of every training and validation line)")
        if self.checker == "exact" and rec.get("answer") is None:
            raise JsonlError(path, lineno, "answer", "missing (the exact checker compares it)")
        if self.checker == "python-tests" and not rec.get("tests"):
            raise JsonlError(path, lineno, "tests", "missing (the python-tests checker runs them)")
        answer = rec.get("answer")
        if answer is not None:
            answer = str(answer)
        prompt = rec["prompt"]
        if self.chat:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + \
                   [{"role": "user", "content": prompt}]
            prompt = _without_template_bos(self.tokenizer, self.tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=True))
        rid = rec.get("id")
        p = Problem(prompt=prompt, solution=rec.get("reference") or "", answer=answer, tests=rec.get("tests"),
                    stop=tuple(rec.get("stop") or ()),
                    id=str(rid) if rid is not None else f"{os.path.basename(path)}:{lineno}")
        if rec.get("extract"):
            self._rules[p] = rec["extract"]
        return p

    def split_sizes(self) -> Dict[str, int]:
        return {s: len(v) for s, v in self._splits.items()}

    def train_problems(self, n: int, seed: Seed) -> List[Problem]:
        pool = self._splits["train"]
        if not pool:
            raise ValueError("this JSONL task has no training split (give data=, with a fraction left for training)")
        idx = as_rng(seed).permutation(len(pool))[: max(0, min(n, len(pool)))]
        return [pool[i] for i in idx]

    def validation_problems(self, n: int, seed: Seed = 0) -> List[Problem]:
        pool = self._splits["val"]
        if not pool:
            raise ValueError("this JSONL task has no validation split (give val_data= or a val_fraction > 0)")
        return list(pool[:n])

    def test_problems(self, n: Optional[int] = None) -> List[Problem]:
        return list(self._splits["test"][:n])

    # ---- checking ----------------------------------------------------------------------
    def completion(self, text: str, problem: Problem) -> str:
        """The completion in `text` (the decoded prompt cut off if it leads), cut at the stop strings."""
        for form in self._forms(problem.prompt):
            if text.startswith(form):
                text = text[len(form):]
                break
        return cut_at_stop(text, problem.stop)

    def _forms(self, prompt: str) -> Tuple[str, ...]:
        forms = self._prompt_forms.get(prompt)
        if forms is None:
            cands = [prompt]
            if self.tokenizer is not None:
                try:
                    cands.append(self.tokenizer.decode(self.tokenizer(prompt).input_ids, skip_special_tokens=True))
                except Exception:  # noqa: BLE001 - a tokenizer that cannot: the raw prompt only
                    pass
            cands += [c.split(" A:", 1)[1] for c in list(cands) if " A:" in c]  # labels.py's rollout text
            forms = tuple(sorted({c for c in cands if len(c.strip()) >= 8}, key=len, reverse=True))
            self._prompt_forms[prompt] = forms
        return forms

    def extract_answer(self, text: str, rule: Optional[str] = None) -> Optional[str]:
        return parse_rule(rule or self.extract)(text)

    def program(self, text: str, problem: Problem) -> str:
        """The Python program the python-tests checker runs for this completion."""
        body = self.completion(text, problem)
        if self.code == "completion":
            return first_code_block(body) + "\n" + (problem.tests or "") + "\n"
        return problem.prompt + body + "\n" + (problem.tests or "") + "\n"

    def check(self, text: str, problem: Problem) -> bool:
        return self.check_many([text], [problem])[0]

    def check_many(self, texts: Sequence[str], problems: Sequence[Problem]) -> List[bool]:
        if len(texts) != len(problems):
            raise ValueError(f"{len(texts)} texts for {len(problems)} problems")
        if self.checker == "none":
            return [False] * len(texts)
        if self.checker == "exact":
            return [answers_equal(self.extract_answer(self.completion(t, p), self._rules.get(p)), p.answer)
                    for t, p in zip(texts, problems)]
        return self._run_tests([self.program(t, p) for t, p in zip(texts, problems)])

    def _run_tests(self, programs: List[str]) -> List[bool]:
        from citer.research.sandbox import run_many

        keys = [hashlib.sha256(p.encode("utf-8", "surrogatepass")).hexdigest() for p in programs]
        with self._cache_lock:
            todo = {k: p for k, p in zip(keys, programs) if k not in self._cache}
        if todo:
            results = run_many(list(todo.values()), self.limits, self.workers)
            with self._cache_lock:
                for k, r in zip(todo, results):
                    self._cache[k] = r.passed
        with self._cache_lock:
            return [self._cache[k] for k in keys]

    def run_tests_detailed(self, texts: Sequence[str], problems: Sequence[Problem]):
        """python-tests: the sandbox's full results (status, stderr, ...), not cached."""
        from citer.research.sandbox import run_many

        return run_many([self.program(t, p) for t, p in zip(texts, problems)], self.limits, self.workers)

    @property
    def has_checker(self) -> bool:
        return self.checker != "none"

    def sampling_params(self, problems: Sequence[Problem], params):
        """One SamplingParams per problem: `params` with the problem's stop strings added."""
        out = []
        for p in problems:
            if not p.stop:
                out.append(params)
                continue
            base = params.stop if params.stop is not None else []
            base = [base] if isinstance(base, str) else list(base)
            out.append(replace(params, stop=base + [s for s in p.stop if s not in base]))
        return out


def _load_tokenizer(tok):
    if isinstance(tok, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tok))
    return tok


def _resolve_checker(checker: str, lines) -> str:
    if checker != "auto":
        return checker
    if all(r.get("tests") for _, _, r in lines):
        return "python-tests"
    if all(r.get("answer") is not None for _, _, r in lines):
        return "exact"
    return "none"


def _groups(lines):
    """Lines grouped by normalised prompt, groups in order of first appearance."""
    by: Dict[str, list] = {}
    for x in lines:
        by.setdefault(normalize_prompt(x[2]["prompt"]), []).append(x)
    return list(by.values())


def _share(fraction: float, n: int) -> int:
    if fraction <= 0 or n < 2:
        return 0
    return min(max(1, int(round(fraction * n))), n - 1)


# ---- CLI wiring --------------------------------------------------------------------------
def add_arguments(parser, train: bool = True) -> None:
    """The data options of `citer train-router` (train=True) and `citer eval` (train=False)."""
    g = parser.add_argument_group("your own data (JSONL; see citer.research.tasks.jsonl)")
    g.add_argument("--data", help="JSONL file: training lines (and validation / test, carved out when their own "
                                  "files are not given)")
    g.add_argument("--val-data", help="JSONL file: validation lines (else val-fraction of --data)")
    g.add_argument("--eval-data", help="JSONL file: test lines (else test-fraction of --data)")
    g.add_argument("--checker", default="auto", choices=CHECKERS)
    g.add_argument("--extract", default="last-number", help=f"extraction rule of the exact checker: {RULES_HELP}")
    g.add_argument("--chat", action="store_true", help="apply the SLM tokenizer's chat template to the prompts")
    g.add_argument("--system", help="system message with --chat")
    g.add_argument("--split-seed", type=int, default=0)
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument("--test-fraction", type=float, default=0.2)
    g.add_argument("--check-timeout", type=float, default=10.0, help="python-tests: seconds per program")
    g.add_argument("--check-workers", type=int, default=None, help="python-tests: sandboxes at a time")


def task_from_args(args, tokenizer=None, train: bool = True) -> JsonlTask:
    """The JsonlTask of parsed add_arguments() options. tokenizer: an object or a folder (the
    SLM's), needed with --chat and used to recognise decoded prompts."""
    from citer.research.sandbox import Limits

    return JsonlTask(data=args.data, val_data=args.val_data, eval_data=args.eval_data, checker=args.checker,
                     extract=args.extract, chat=args.chat, tokenizer=tokenizer, system=args.system,
                     split_seed=args.split_seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                     require_reference=train, limits=Limits(timeout=args.check_timeout), workers=args.check_workers)


def _without_template_bos(tokenizer, text: str) -> str:
    """A rendered chat prompt without the BOS its template printed (Llama 3's prints
    bos_token) when the tokenizer adds one itself: the prompt is tokenized with the
    tokenizer's special tokens everywhere (generation, training, baselines), and would
    otherwise start with two."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
        return text[len(bos):]
    return text
