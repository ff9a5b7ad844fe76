"""The user's own data: JSONL tasks (parsing, extraction, splits, chat template) and the
python-tests checker's sandbox (verdicts, limits, nothing left running, no network)."""
import json
import os
import shutil
import socket
import sys
import time
import uuid

import numpy as np
import pytest

from citer.research.sandbox import NO_ISOLATION, Limits, isolation, marked_processes, run_many, run_python
from citer.research.tasks import JsonlError, JsonlTask, Problem, get_task
from citer.research.tasks.jsonl import answers_equal, cut_at_stop, first_code_block, parse_rule

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox tests need Linux /proc")


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(p)


# ---- parsing --------------------------------------------------------------------------------
@pytest.mark.parametrize("line,field,words", [
    ('{"prompt": "a", ', None, "bad JSON"),
    ('["prompt"]', None, "JSON object"),
    ({"reference": "x"}, "prompt", "missing"),
    ({"prompt": 3}, "prompt", "string"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": "p", "reference": 5}, "reference", "string"),
    ({"prompt": "p", "answer": True}, "answer", "string or integer or number"),
    ({"prompt": "p", "answer": [1]}, "answer", "list"),
    ({"prompt": "p", "tests": 1}, "tests", "string"),
    ({"prompt": "p", "stop": "\n"}, "stop", "list"),
    ({"prompt": "p", "stop": ["\n", 3]}, "stop", "non-empty strings"),
    ({"prompt": "p", "id": [1]}, "id", "string or integer"),
    ({"prompt": "p", "extract": "first-word"}, "extract", "unknown extraction rule"),
    ({"prompt": "p", "extract": "regex:(a)(b)"}, "extract", "exactly one group"),
])
def test_each_error_names_file_line_and_field(tmp_path, line, field, words):
    path = write(tmp_path, "d.jsonl", [{"prompt": "fine", "answer": 1}, "", line])
    with pytest.raises(JsonlError) as e:
        JsonlTask(eval_data=path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3") and words in msg, msg
    assert e.value.line == 3 and e.value.field == field
    if field:
        assert f"field {field!r}" in msg


def test_bytes_that_are_not_utf8_or_not_gzip_are_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(JsonlError, match=r"latin1.jsonl:2: not UTF-8"):
        JsonlTask(eval_data=str(path))
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b'{"prompt": "not gzip"}\n')
    with pytest.raises(ValueError, match=r"fake.jsonl.gz: cannot read it as gzip"):
        JsonlTask(eval_data=str(fake))


def test_missing_what_the_checker_or_training_needs(tmp_path):
    path = write(tmp_path, "d.jsonl", [{"prompt": "a", "answer": 1, "tests": "pass"}, {"prompt": "b", "tests": "pass"}])
    with pytest.raises(JsonlError, match=r"d.jsonl:2: field 'answer': missing"):
        JsonlTask(eval_data=path, checker="exact")
    path = write(tmp_path, "e.jsonl", [{"prompt": "a", "tests": "pass"}, {"prompt": "b", "answer": 2}])
    with pytest.raises(JsonlError, match=r"e.jsonl:2: field 'tests': missing"):
        JsonlTask(eval_data=path, checker="python-tests")
    path = write(tmp_path, "f.jsonl", [{"prompt": f"q{i}", "answer": i, **({"reference": "r"} if i != 7 else {})}
                                       for i in range(20)])
    with pytest.raises(JsonlError, match=r"f.jsonl:8: field 'reference': missing"):
        JsonlTask(data=path, val_fraction=0.0, test_fraction=0.0, require_reference=True)
    for bad, match in (({"checker": "fuzzy"}, "unknown checker"), ({"extract": "first"}, "unknown extraction rule"),
                       ({"extract": "regex:x"}, "exactly one group"), ({"chat": True}, "chat template")):
        with pytest.raises(ValueError, match=match):
            JsonlTask(eval_data=path, **bad)
    with pytest.raises(FileNotFoundError, match="no such JSONL file"):
        JsonlTask(eval_data=str(tmp_path / "nope.jsonl"))


def test_fields_and_auto_checker(tmp_path):
    path = write(tmp_path, "d.jsonl", [{"prompt": "p1", "reference": "r", "answer": 42, "stop": ["\n\n"], "id": 7},
                                       {"prompt": "p2", "answer": "x"}])
    t = JsonlTask(eval_data=path)
    a, b = t.test_problems()
    assert t.checker == "exact" and get_task("jsonl", eval_data=path).checker == "exact"
    assert a == Problem("p1", "r", "42", None, ("\n\n",), "7") and b.id == "d.jsonl:2" and b.solution == ""
    assert JsonlTask(eval_data=write(tmp_path, "t.jsonl", [{"prompt": "p", "tests": "pass"}])).checker == "python-tests"
    assert JsonlTask(eval_data=write(tmp_path, "n.jsonl", [{"prompt": "p"}, {"prompt": "q", "answer": 1}])).checker \
        == "none"


# ---- extraction and the exact checker -----------------------------------------------------------
@pytest.mark.parametrize("rule,text,expected", [
    ("last-number", "3 apples and -4.5 pears", "-4.5"), ("last-number", "total: 1,000.", "1,000"),
    ("last-number", "no digits", None), ("after:####", " 2+3=5. #### 5\nmore", "5"), ("after:####", "5", None),
    ("after:The answer is", "So. The answer is 12.", "12."), ("regex:answer=(\\w+)", "x answer=B y", "B"),
    ("regex:answer=(\\w+)", "none", None), ("whole", "  yes \n", "yes"),
])
def test_extraction_rules(rule, text, expected):
    assert parse_rule(rule)(text) == expected


def test_answers_equal_and_helpers():
    assert answers_equal("1,000", "1000") and answers_equal("12.", "12") and answers_equal("$5", "5.0")
    assert answers_equal(" B ", "B") and not answers_equal("b", "B") and not answers_equal(None, "1")
    assert not answers_equal("1e", "1") and answers_equal("0.5", ".5")
    assert cut_at_stop("a\ndef b", ["\ndef ", "\nclass "]) == "a" and cut_at_stop("abc", []) == "abc"
    assert first_code_block("Sure:\n```python\nx = 1\n```\nbye") == "x = 1\n"
    assert first_code_block("```\ny = 2") == "y = 2" and first_code_block("z = 3") == "z = 3"


def test_exact_checker_per_line_rule_stop_and_prompt_prefix(tmp_path):
    path = write(tmp_path, "d.jsonl", [{"prompt": "Q: How many? A:", "answer": 49, "stop": ["\nQ:"]},
                                       {"prompt": "Pick a letter, please.", "answer": "B", "extract": "regex:<(\\w)>"}])
    t = JsonlTask(eval_data=path, extract="after:####")
    p, q = t.test_problems()
    assert t.check(" 7*7=49. #### 49", p) and not t.check(" #### 48", p)
    assert not t.check(" no answer\nQ: next #### 49", p)  # cut at the stop string first
    assert t.check("Q: How many? A: #### 49", p)  # the decoded prompt + completion (label rollouts)
    assert t.check(" How many? A: #### 49".split(" A:", 1)[1], p)
    assert t.check("I pick <B>.", q) and not t.check("#### B", q)
    assert t.check_many([" #### 49", "<C>"], [p, q]) == [True, False]
    none = JsonlTask(eval_data=path, checker="none")
    assert none.check(" #### 49", p) is False


def test_sampling_params_carry_the_stop_strings(tmp_path):
    from citer import SamplingParams

    path = write(tmp_path, "d.jsonl", [{"prompt": "a", "stop": ["\ndef "]}, {"prompt": "b"}])
    t = JsonlTask(eval_data=path)
    base = SamplingParams(max_tokens=9, stop=["END"])
    ps = t.sampling_params(t.test_problems(), base)
    assert ps[0].stop == ["END", "\ndef "] and ps[0].max_tokens == 9 and ps[1] is base


# ---- splits -----------------------------------------------------------------------------------
def test_seeded_split_of_one_file_is_disjoint_and_complete(tmp_path):
    lines = [{"prompt": f"question {i}", "reference": f" {i}", "answer": i} for i in range(100)]
    lines += [{"prompt": "question   7", "reference": " again", "answer": 7}]  # same prompt, whitespace aside
    path = write(tmp_path, "d.jsonl", lines)
    t = JsonlTask(data=path, split_seed=3, require_reference=True)
    sizes = t.split_sizes()
    assert sizes == {"train": 71, "val": 10, "test": 20}
    splits = {s: [p.id for p in t._splits[s]] for s in sizes}
    assert len(set(sum(splits.values(), []))) == 101
    prompts = {s: {" ".join(p.prompt.split()) for p in t._splits[s]} for s in sizes}
    assert not (prompts["train"] & prompts["val"] or prompts["train"] & prompts["test"]
                or prompts["val"] & prompts["test"])
    assert sum("question 7" in prompts[s] for s in sizes) == 1  # duplicates stay together
    again = JsonlTask(data=path, split_seed=3)
    assert [p.id for p in again.test_problems()] == splits["test"]
    assert [p.id for p in JsonlTask(data=path, split_seed=4).test_problems()] != splits["test"]
    assert t.test_problems(5) == t.test_problems()[:5] and t.validation_problems(3) == t.validation_problems(99)[:3]
    a, b = t.train_problems(30, 1), t.train_problems(30, np.random.default_rng(1))
    assert a == b and len(a) == 30 and {p.id for p in a} <= set(splits["train"])
    assert len(t.train_problems(10_000, 0)) == 71


def test_separate_files_never_overlap(tmp_path):
    train = write(tmp_path, "train.jsonl", [{"prompt": f"p{i}", "answer": i} for i in range(10)])
    val = write(tmp_path, "val.jsonl", [{"prompt": "p1", "answer": 1}, {"prompt": "v", "answer": 0}])
    test = write(tmp_path, "test.jsonl", [{"prompt": "p2 ", "answer": 2}, {"prompt": "v", "answer": 0},
                                          {"prompt": "t", "answer": 3}])
    with pytest.warns(UserWarning, match="dropped prompts"):
        t = JsonlTask(data=train, val_data=val, eval_data=test)
    assert t.split_sizes() == {"train": 8, "val": 1, "test": 3} and t.overlap_removed == {"train": 2, "val": 1}
    assert [p.prompt for p in t.validation_problems(5)] == ["p1"]
    only_test = JsonlTask(eval_data=test)
    assert len(only_test.test_problems()) == 3
    with pytest.raises(ValueError, match="no training split"):
        only_test.train_problems(1, 0)
    with pytest.raises(ValueError, match="val_fraction"):
        JsonlTask(data=train, val_fraction=0.5, test_fraction=0.5)


def test_validation_problems_default_continues_the_training_stream():
    t = get_task("arith")
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    t.train_problems(10, rng_a)
    t.train_problems(10, rng_b)
    assert t.validation_problems(5, rng_a) == t.train_problems(5, rng_b)


# ---- chat ---------------------------------------------------------------------------------------
def test_chat_template_is_applied(tmp_path):
    from conftest import make_tokenizer

    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    path = write(tmp_path, "d.jsonl", [{"prompt": "Write add(a, b).", "tests": "assert add(2, 3) == 5"}])
    t = JsonlTask(eval_data=path, chat=True, tokenizer=tok, system="Be brief.")
    p = t.test_problems()[0]
    assert p.prompt == "<system>Be brief.\n<user>Write add(a, b).\n<assistant>"
    assert t.code == "completion"
    answer = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert t.program(answer, p) == "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n"
    assert t.check(answer, p) and not t.check(answer.replace("a + b", "a - b"), p)
    tok.save_pretrained(tmp_path / "tok")
    assert JsonlTask(eval_data=path, chat=True, tokenizer=str(tmp_path / "tok")).test_problems()[0].prompt.startswith(
        "<user>Write")


def test_chat_prompts_get_one_bos(tmp_path):
    """A template that prints bos_token and a tokenizer that adds BOS: the prompt, tokenized
    as the engine and the training pipeline tokenize it, starts with one BOS, and its ids are
    apply_chat_template's."""
    from tokenizers import processors

    from conftest import make_tokenizer

    tok = make_tokenizer()
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    path = write(tmp_path, "d.jsonl", [{"prompt": "Write add(a, b).", "tests": "assert add(2, 3) == 5"}])
    p = JsonlTask(eval_data=path, chat=True, tokenizer=tok).test_problems()[0]
    msgs = [{"role": "user", "content": "Write add(a, b)."}]
    want = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    assert tok(p.prompt).input_ids == list(want["input_ids"] if hasattr(want, "keys") else want)
    assert tok(p.prompt).input_ids[:2] != [bos, bos]


# ---- the python-tests checker and its sandbox ------------------------------------------------------
FAST = Limits(timeout=3, memory_mb=512, max_file_mb=4, max_output_bytes=1 << 20)
MARK = f"{7000 + os.getpid() % 1000}.{uuid.uuid4().int % 1000}"  # a unique sleep length to find strays by


def leftovers():
    """Live processes of any sandbox (marker variable) or with this test's sleep length."""
    found = set(marked_processes())
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if MARK.encode() in f.read():
                        with open(f"/proc/{name}/stat") as g:
                            if g.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                                found.add(int(name))
            except OSError:
                pass
    return found


def assert_nothing_left():
    deadline = time.monotonic() + 3
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leftovers(), leftovers()


CASES = {  # name -> (program, expected status)
    "pass": ("import os\nprint(os.getcwd())\nassert sum(range(4)) == 6\n", "passed"),
    "fail": ("assert 1 + 1 == 3, 'wrong'\n", "failed"),
    "syntax": ("def f(:\n", "failed"),
    "sys.exit(0)": ("import sys\nsys.exit(0)\nassert False\n", "exit"),
    "os._exit(0)": ("import os\nos._exit(0)\n", "exit"),
    "segfault": ("import faulthandler\nfaulthandler._sigsegv()\n", "crashed"),
    "infinite loop": ("while True:\n    pass\n", "timeout"),
    "memory hog": ("blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n", "memory"),
    "huge output": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", "output-limit"),
    "fork (refused)": ("import os\nos.fork()\n", "failed"),
    "subprocess (refused)": (f"import subprocess\nsubprocess.Popen(['sleep', '{MARK}'])\n", "failed"),
}
SPAWN_CASES = {  # with allow_subprocess=True
    "fork loop": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                  "timeout"),
    "stray sleeper": (f"import subprocess\nsubprocess.Popen(['sleep', '{MARK}'])\n", "stray-processes"),
    "daemon, cleared env": (f"import os\nif os.fork() == 0:\n    os.setsid()\n    os.execve('/bin/sleep', "
                            f"['sleep', '{MARK}'], {{}})\n", "stray-processes"),
    "daemon, then hang": (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    os.execve('/bin/sleep', "
                          f"['sleep', '{MARK}'], {{}})\ntime.sleep(60)\n", "timeout"),
    "waited child": ("import subprocess\nr = subprocess.run(['sh', '-c', 'echo $((6 * 7))'], capture_output=True, "
                     "text=True)\nassert r.stdout.strip() == '42', r\n", "passed"),
}


@pytest.mark.parametrize("mode", ["detected", "no-namespaces"])
def test_sandbox_verdicts_and_nothing_left_running(mode):
    iso = isolation() if mode == "detected" else NO_ISOLATION
    t0 = time.monotonic()
    res = run_many([c for c, _ in CASES.values()], FAST, workers=4, isolation_mode=iso)
    res += run_many([c for c, _ in SPAWN_CASES.values()], Limits(**{**FAST.__dict__, "allow_subprocess": True}),
                    workers=4, isolation_mode=iso)
    elapsed = time.monotonic() - t0
    got = {name: r.status for name, r in zip(list(CASES) + list(SPAWN_CASES), res)}
    assert got == {k: v[1] for k, v in list(CASES.items()) + list(SPAWN_CASES.items())}, \
        {n: (r.status, r.detail, r.stderr[-300:]) for n, r in zip(got, res)}
    assert [r.passed for r in res] == [s == "passed" for s in got.values()]
    assert elapsed < 25, elapsed
    work = res[0].stdout.strip()
    assert work and not os.path.exists(os.path.dirname(work))  # the temporary folder is gone
    assert "AssertionError: wrong" in res[1].stderr and "_sandbox_child" not in res[1].stderr
    assert_nothing_left()


def test_sandbox_blocks_the_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        direct = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", FAST)
        assert direct.status == "failed" and "network access is disabled" in direct.stderr
        raw = run_python("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n", FAST)
        assert raw.status == "failed" and "PermissionError" in raw.stderr
        unix = run_python("import socket\na, b = socket.socketpair()\na.send(b'x')\nassert b.recv(1) == b'x'\n", FAST)
        assert unix.passed, unix.stderr
        if isolation().network_isolated and shutil.which("bash"):  # another program has no audit hook
            child = ("import subprocess\nr = subprocess.run(['bash', '-c', 'echo start; exec 3<>/dev/tcp/127.0.0.1/"
                     f"{port} && echo connected'], capture_output=True, text=True)\n"
                     "assert r.stdout == 'start\\n' and r.returncode != 0, r\n")
            r = run_python(child, Limits(**{**FAST.__dict__, "allow_subprocess": True}))
            assert r.passed, (r.status, r.stderr)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected
    finally:
        server.close()
    assert_nothing_left()


def test_python_tests_checker(tmp_path):
    prompt = 'def add(a, b):\n    """Add two numbers."""\n'
    lines = [{"prompt": prompt, "tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0", "stop": ["\ndef "], "id": i}
             for i in range(4)]
    path = write(tmp_path, "code.jsonl", lines)
    task = JsonlTask(eval_data=path, limits=FAST, workers=4)
    assert task.checker == "python-tests"
    probs = task.test_problems()
    texts = ["    return a + b\n", "    return a - b\n", "    while True:\n        pass\n",
             "    return a + b\ndef add(a, b):\n    return 0\n"]  # the stop string cuts the redefinition
    t0 = time.monotonic()
    assert task.check_many(texts, probs) == [True, False, False, True]
    assert time.monotonic() - t0 < 15
    assert task.check(prompt + "    return a + b\n", probs[0])  # decoded prompt + completion
    assert task.program(texts[0], probs[0]) == prompt + texts[0] + "\n" + lines[0]["tests"] + "\n"
    t0 = time.monotonic()
    assert task.check_many(texts, probs) == [True, False, False, True]  # cached: no second timeout
    assert time.monotonic() - t0 < 1
    detailed = task.run_tests_detailed(texts[:2], probs[:2])
    assert [r.status for r in detailed] == ["passed", "failed"]
    assert_nothing_left()
