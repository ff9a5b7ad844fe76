"""Run model-generated Python outside the engine's process: one sandboxed child per program.

    r = run_python(code, Limits(timeout=10))        # -> SandboxResult: status, passed, stdout, ...
    rs = run_many([code, ...], Limits(), workers=4)  # a pool of sandboxes, results in order

Nothing the program does runs in the calling process. Per program:

- A fresh temporary folder (mode 0711) with a private working folder inside it; the whole
  folder is removed afterwards, whatever happened. The child is `python -I` (no
  PYTHON* variables, no user site, no script folder on sys.path) with a minimal
  environment (PATH, HOME and TMPDIR = the working folder, a marker variable), stdin
  /dev/null, in a new session (its own process group).
- Limits, set with resource.setrlimit in the child before the program runs (soft = hard,
  so the program cannot raise them): RLIMIT_AS and RLIMIT_DATA (memory_mb), RLIMIT_CPU
  (cpu_seconds), RLIMIT_FSIZE (max_file_mb: every file it writes, its stdout and stderr
  included), RLIMIT_NPROC (max_processes), RLIMIT_NOFILE 256, RLIMIT_CORE 0. A wall-clock
  limit (timeout) is enforced from outside.
- stdout and stderr go to files in the temporary folder (never into this process's
  memory); a stream over max_output_bytes makes the verdict "output-limit"; the result
  carries only keep_output_bytes of each.
- Verdict: "passed" only if the program ran to its end without an exception; SystemExit
  (also exit code 0), os._exit, signals, MemoryError, timeouts and huge outputs all fail.
  A program that leaves processes running when it ends fails too ("stray-processes").
  Statuses: passed, failed (an exception), exit, timeout, memory, output-limit, crashed
  (killed by a signal), stray-processes, sandbox-error.
- An audit hook (sys.addaudithook, which the program cannot remove) refuses sockets other
  than AF_UNIX ones, their connect / bind / sendto, and DNS look-ups; unless
  allow_subprocess, also os.fork / os.system / os.exec* / os.posix_spawn / subprocess;
  and os.kill / os.killpg of process groups (pid <= 0).
- Nothing is left running: the child forks a supervisor (which waits) and a worker (which
  runs the program). The supervisor is a child subreaper (prctl), so processes the
  program spawns that outlive their parents are re-parented to it; when the worker ends
  it SIGKILLs the worker's process group and every process below it until none is left.
  At the wall-clock limit the caller asks the supervisor to do the same (SIGTERM; without
  a PID namespace), then SIGKILLs the whole session's process group, and finally every
  process still carrying this run's marker variable in its initial environment
  (/proc/<pid>/environ).

Which protections hold where (detected once per process, `isolation()` says which):

- Linux with `unshare` that can make namespaces (checked by running a probe that must
  find the network unreachable): the child runs under `unshare --net --pid --fork
  --kill-child --mount-proc` (as root) or the same with `--user --map-root-user` (not
  root): no network interface but a down loopback (no network at all, also through
  ctypes or a spawned `curl`), and the supervisor is PID 1 of a new PID namespace (with
  its own /proc), so when it exits or is killed the kernel kills every process in it,
  including ones that called setsid() and cleared their environment. If only `unshare
  -rn` works, network isolation without the PID namespace.
- Root (when the namespace needs no user namespace, or without unshare): the worker drops
  to a uid and gid of its own (UID_BASE + its slot among the sandboxes running at once; no
  supplementary groups) before running the program, so it can write only where anyone
  can (its working folder, world-writable folders), cannot signal the supervisor, the
  engine or another sandbox, and RLIMIT_NPROC (counted per uid) is enforced per sandbox
  (for root it is not). If this Python's files are not world-readable (e.g. under a 0700
  /root), the worker keeps CAP_DAC_READ_SEARCH alone (it may read any file, write none it
  could not) so that imports work; a program it executes loses it. Inside a user
  namespace made by --map-root-user only root is mapped, so no drop there (the caller is
  not root then).
- Elsewhere (no usable unshare; CITER_SANDBOX_ISOLATION=none forces this): network is
  blocked only by the audit hook (a program can still reach it through ctypes or by
  executing another program when allow_subprocess is on); process clean-up relies on the
  subreaper, the process-group kill and the marker-variable sweep, which a process that
  setsid()s, clears its environment and whose supervisor was already killed would escape.
- Never: a file-system sandbox (the program can read what its user can read) or a cap on
  total disk use (each file is capped, not their number). Not a defence against code
  written to attack this sandbox; it is made for model mistakes: loops, crashes, memory
  hogs, fork loops, stray children, huge outputs, accidental network use.
- Non-Linux: no rlimits beyond what `resource` offers, no namespaces, no /proc sweeps.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
MARKER = "CITER_SANDBOX"
UID_BASE = 1_990_000_000  # as root, sandbox k (of those running at once) runs as uid = gid = UID_BASE + k
_slots_lock = threading.Lock()
_slots_used: set = set()
STATUSES = ("passed", "failed", "exit", "timeout", "memory", "output-limit", "crashed", "stray-processes",
            "sandbox-error")


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds, from start to end of the child
    cpu_seconds: Optional[int] = None  # RLIMIT_CPU; None: ceil(timeout) + 1
    memory_mb: int = 1024  # RLIMIT_AS and RLIMIT_DATA
    max_processes: int = 32  # RLIMIT_NPROC (counted per uid: per sandbox when run as root)
    max_file_mb: float = 16.0  # RLIMIT_FSIZE
    max_output_bytes: int = 1 << 20  # stdout or stderr beyond this: "output-limit"
    keep_output_bytes: int = 4096  # of stdout (its start) and stderr (its end) in the result
    allow_subprocess: bool = False
    drop_privileges: bool = True  # as root, run the program as an unused uid of its own


@dataclass
class SandboxResult:
    status: str  # one of STATUSES
    passed: bool
    seconds: float
    stdout: str = ""
    stderr: str = ""
    detail: str = ""  # the exception's type, the signal, the exit code, ...

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Isolation:
    name: str  # "netns+pidns", "userns+netns+pidns", "userns+netns" or "none"
    prefix: tuple  # argv before the python command
    network_isolated: bool
    pid_namespace: bool
    user_namespace: bool


NO_ISOLATION = Isolation("none", (), False, False, False)
_PROBE = ("import errno, os, socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('127.0.0.1', 9))\n"
          "except OSError as e:\n    print('isolated' if e.errno in (errno.ENETUNREACH, errno.EADDRNOTAVAIL) else "
          "'open')\nelse:\n    print('open')\n"
          "print('pid1' if os.getpid() == 1 and os.readlink('/proc/self') == '1' else 'pid?')\n")
_isolation: Optional[Isolation] = None
_isolation_lock = threading.Lock()


def isolation() -> Isolation:
    """The namespace isolation this machine allows, detected once (CITER_SANDBOX_ISOLATION=none
    turns it off)."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = _detect()
        return _isolation


def _detect() -> Isolation:
    if os.environ.get("CITER_SANDBOX_ISOLATION", "").lower() in ("none", "off", "0") or not sys.platform.startswith(
            "linux"):
        return NO_ISOLATION
    unshare = shutil.which("unshare")
    if not unshare:
        return NO_ISOLATION
    pid = ("--pid", "--fork", "--kill-child", "--mount-proc")  # /proc of the new namespace (a mount namespace too)
    cands = []
    if os.geteuid() == 0:
        cands.append(Isolation("netns+pidns", (unshare, "--net") + pid, True, True, False))
    userns = (unshare, "--user", "--map-root-user", "--net")
    cands.append(Isolation("userns+netns+pidns", userns + pid, True, True, True))
    cands.append(Isolation("userns+netns", userns, True, False, True))
    for c in cands:
        try:
            r = subprocess.run(list(c.prefix) + [sys.executable, "-I", "-c", _PROBE], capture_output=True,
                               timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            continue
        out = r.stdout.split()
        if r.returncode == 0 and out[:1] == [b"isolated"] and (not c.pid_namespace or out[1:] == [b"pid1"]):
            return c
    return NO_ISOLATION


def _world_readable(path: str) -> bool:
    """Can a user with no special rights read `path` (every folder above it searchable)?"""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & 0o004:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & 0o001:
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


_readable: Optional[bool] = None


def _python_readable() -> bool:
    global _readable
    if _readable is None:
        _readable = _python_world_readable()
    return _readable


def _python_world_readable() -> bool:
    import sysconfig

    paths = [sys.executable, CHILD] + [sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib")]
    return all(_world_readable(p) for p in paths)


def describe() -> dict:
    """Which protections are in force for the next run on this machine."""
    iso = isolation()
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    drop = root and not iso.user_namespace
    runs_as = "caller"
    if drop:
        runs_as = "a uid of its own" + ("" if _python_readable() else
                                        " + CAP_DAC_READ_SEARCH (this Python is not world-readable)")
    return {"isolation": iso.name, "network": "namespace + audit hook" if iso.network_isolated else "audit hook only",
            "pid_namespace": iso.pid_namespace, "runs_as": runs_as,
            "rlimits": ["AS", "DATA", "CPU", "FSIZE", "NPROC", "NOFILE", "CORE"]}


def run_python(code: str, limits: Limits = Limits(), isolation_mode: Optional[Isolation] = None) -> SandboxResult:
    """Run `code` (a whole Python program) in a fresh sandbox; see the module doc."""
    iso = isolation() if isolation_mode is None else isolation_mode
    drop = limits.drop_privileges and hasattr(os, "geteuid") and os.geteuid() == 0 and not iso.user_namespace
    slot = _take_slot() if drop else None
    try:
        return _run(code, limits, iso, slot)
    finally:
        if slot is not None:
            with _slots_lock:
                _slots_used.discard(slot)


def _take_slot() -> int:
    with _slots_lock:
        k = next(i for i in range(len(_slots_used) + 1) if i not in _slots_used)
        _slots_used.add(k)
        return k


def _run(code: str, limits: Limits, iso: Isolation, slot: Optional[int]) -> SandboxResult:
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="citer-sandbox-")
    proc, timed_out, token = None, False, uuid.uuid4().hex
    uid = None if slot is None else UID_BASE + slot
    try:
        os.chmod(tmp, 0o711)
        work = os.path.join(tmp, "work")
        os.mkdir(work, 0o700)
        program, result, out_path, err_path = (os.path.join(tmp, n) for n in
                                               ("program.py", "result.json", "stdout", "stderr"))
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        cfg = {"program": program, "result": result, "workdir": work,
               "memory_bytes": int(limits.memory_mb) << 20,
               "cpu_seconds": limits.cpu_seconds or math.ceil(limits.timeout) + 1,
               "file_bytes": int(limits.max_file_mb * (1 << 20)), "max_processes": limits.max_processes,
               "allow_subprocess": limits.allow_subprocess, "uid": uid, "gid": uid,
               "keep_read": uid is not None and not _python_readable()}
        cfg_path = os.path.join(tmp, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", MARKER: token}
        argv = list(iso.prefix) + [sys.executable, "-I", CHILD, cfg_path]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True, close_fds=True)
            except OSError as e:
                return SandboxResult("sandbox-error", False, time.monotonic() - t0, detail=f"cannot start: {e}")
            try:
                proc.wait(timeout=max(limits.timeout - (time.monotonic() - t0), 0.01))
            except subprocess.TimeoutExpired:
                timed_out = True
                if not iso.pid_namespace:  # let the supervisor sweep its subtree first
                    _signal(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=2.0)
                    except subprocess.TimeoutExpired:
                        pass
            finally:
                group = _procs(lambda stat: stat[2] == str(proc.pid))  # unshare, supervisor (PID 1 of its namespace)
                _killpg(proc.pid)
                proc.wait()
                sweep(token)
                _wait_gone(group)  # a killed namespace's PID 1 is gone only after everything in it
        seconds = time.monotonic() - t0
        return _verdict(result, out_path, err_path, limits, timed_out, proc.returncode, seconds)
    finally:
        if proc is None:
            sweep(token)
        _rmtree(tmp)


def _verdict(result, out_path, err_path, limits, timed_out, returncode, seconds) -> SandboxResult:
    sizes = [os.path.getsize(p) if os.path.exists(p) else 0 for p in (out_path, err_path)]
    stdout, stderr = _read(out_path, limits.keep_output_bytes, head=True), _read(err_path, limits.keep_output_bytes)
    mk = lambda status, detail="": SandboxResult(status, status == "passed", seconds, stdout, stderr, detail)  # noqa
    if max(sizes) > limits.max_output_bytes:
        return mk("output-limit", f"{max(sizes)} bytes written (limit {limits.max_output_bytes})")
    if timed_out:
        return mk("timeout", f"wall clock over {limits.timeout:g} s")
    try:
        with open(result) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return mk("sandbox-error", f"no result from the sandbox (exit status {returncode})")
    msg, sig = res.get("message", ""), res.get("signal")
    if msg == "ok" and res.get("strays"):
        return mk("stray-processes", f"{res['strays']} process(es) still running after the program ended (killed)")
    if msg == "ok":
        return mk("passed")
    if msg.startswith("exception MemoryError"):
        return mk("memory", "MemoryError")
    if msg.startswith("exception"):
        return mk("failed", msg.split(" ", 1)[1])
    if msg.startswith("exit"):
        return mk("exit", "SystemExit " + msg.split(" ", 1)[1])
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == getattr(signal, "SIGXCPU", -1):
            return mk("timeout", f"CPU time over the limit ({name})")
        return mk("crashed", f"killed by {name}")
    return mk("exit", f"exited with code {res.get('exit_code')} before the end of the program")


def _read(path: str, n: int, head: bool = False) -> str:
    """The first (head) or last n bytes of a file, as text."""
    try:
        with open(path, "rb") as f:
            if not head:
                f.seek(max(os.fstat(f.fileno()).st_size - n, 0))
            return f.read(n).decode("utf-8", errors="replace")
    except OSError:
        return ""


def run_many(codes: Sequence[str], limits: Limits = Limits(), workers: Optional[int] = None,
             isolation_mode: Optional[Isolation] = None) -> List[SandboxResult]:
    """run_python over many programs with `workers` sandboxes at a time (default: 2 per CPU,
    at most 8); results in the order of `codes`. The threads only wait on the children."""
    if not codes:
        return []
    iso = isolation() if isolation_mode is None else isolation_mode
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    if workers == 1 or len(codes) == 1:
        return [run_python(c, limits, iso) for c in codes]
    with ThreadPoolExecutor(max_workers=min(workers, len(codes)), thread_name_prefix="citer-sandbox") as pool:
        return list(pool.map(lambda c: run_python(c, limits, iso), codes))


# ---- process clean-up ----------------------------------------------------------------------
def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _stat_fields(pid) -> Optional[List[str]]:
    """/proc/<pid>/stat after the command name: [state, ppid, pgrp, session, ...]."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:].decode().split()
    except (OSError, ValueError):
        return None


def _procs(pred) -> List[int]:
    if not os.path.isdir("/proc"):
        return []
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat_fields(name)
            if st is not None and pred(st):
                out.append(int(name))
    return out


def _wait_gone(pids, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            st = _stat_fields(pid)
            if st is None or st[0] in ("Z", "X"):
                break
            time.sleep(0.005)


def marked_processes(token: Optional[str] = None) -> List[int]:
    """Pids of live processes whose initial environment carries the sandbox marker (this
    run's `token`, or any run's when None). Zombies are not counted: they run nothing."""
    if not os.path.isdir("/proc"):
        return []
    key = b"\0" + (f"{MARKER}={token}\0" if token else f"{MARKER}=").encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = b"\0" + f.read()
        except OSError:
            continue
        st = _stat_fields(name) if key in environ else None
        if st is not None and st[0] not in ("Z", "X"):
            out.append(int(name))
    return out


def sweep(token: str, rounds: int = 20) -> int:
    """SIGKILL every process carrying this run's marker; -> how many were found."""
    found = 0
    for _ in range(rounds):
        pids = [p for p in marked_processes(token) if p != os.getpid()]
        if not pids:
            break
        found += len(pids)
        for p in pids:
            _signal(p, signal.SIGKILL)
        time.sleep(0.01)
    return found


def _rmtree(path: str) -> None:
    def fix(func, p, exc):
        try:  # a folder the program made unreadable: open it up, then retry
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    for _ in range(3):
        shutil.rmtree(path, onerror=fix)
        if not os.path.exists(path):
            return
