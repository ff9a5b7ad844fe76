"""The sandbox's child side (run as `python -I _sandbox_child.py CONFIG`; imports nothing of citer).

It forks once. The parent half is the supervisor: a child subreaper (orphans of the program
are re-parented to it), PID 1 of a fresh PID namespace where `unshare` made one. The child
half is the worker: it sets the resource limits, drops root to the uid it is given, installs
an audit hook (no sockets but AF_UNIX ones, no DNS, optionally no new processes), reads and
runs the program, and tells the supervisor through a pipe how it ended ("ok" only if the
program ran to its end). The supervisor waits for the worker, kills every process left
below it, and writes result.json (the worker's wait status and message) where the
unprivileged worker cannot write. See citer.research.sandbox for the whole picture.
"""
import json
import os
import resource
import signal
import sys
import traceback

PROCESS_EVENTS = ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
                  "pty.spawn", "os.startfile")


def _audit_hook(allow_subprocess: bool):
    import socket

    unix = socket.AF_UNIX

    def hook(event, args):
        if event.startswith("socket.") and event not in ("socket.gethostname",):
            if event == "socket.__new__" and len(args) > 1 and args[1] == unix:
                return
            raise PermissionError(f"network access is disabled in the citer sandbox ({event})")
        if not allow_subprocess and event in PROCESS_EVENTS:
            raise PermissionError(f"starting processes is disabled in the citer sandbox ({event})")
        if event in ("os.kill", "os.killpg") and len(args) > 0 and isinstance(args[0], int) and args[0] <= 0:
            raise PermissionError(f"signalling process groups is disabled in the citer sandbox ({event})")

    return hook


def _drop_privileges(uid: int, gid: int, keep_read: bool) -> None:
    """Become uid/gid with no supplementary groups. keep_read: keep CAP_DAC_READ_SEARCH only
    (read any file, write none of root's), for a Python installed where others cannot read."""
    libc = None
    if keep_read:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(8, 1, 0, 0, 0) != 0:  # PR_SET_KEEPCAPS: keep the permitted set across setuid
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if keep_read:
        import ctypes

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        read_search = 1 << 2  # CAP_DAC_READ_SEARCH
        data = (Data * 2)(Data(read_search, read_search, 0), Data(0, 0, 0))
        if libc.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:  # _LINUX_CAPABILITY_VERSION_3
            raise OSError(ctypes.get_errno(), "capset")
        libc.prctl(8, 0, 0, 0, 0)


def _limit(name: str, value) -> None:
    if value is not None and hasattr(resource, name):
        try:
            resource.setrlimit(getattr(resource, name), (int(value), int(value)))
        except (ValueError, OSError):  # above the current hard limit: keep that one
            pass


def worker(cfg: dict, w: int) -> None:
    msg = "ok"
    try:
        os.setpgid(0, 0)  # a process group of its own: one killpg ends the program and its forks at once
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with open(cfg["program"], "rb") as f:
            src = f.read()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        _limit("RLIMIT_CORE", 0)
        _limit("RLIMIT_AS", cfg["memory_bytes"])
        _limit("RLIMIT_DATA", cfg["memory_bytes"])
        _limit("RLIMIT_CPU", cfg["cpu_seconds"])
        _limit("RLIMIT_FSIZE", cfg["file_bytes"])
        _limit("RLIMIT_NOFILE", 256)
        if cfg.get("uid") is not None:
            os.chown(cfg["workdir"], cfg["uid"], cfg["gid"])
            _drop_privileges(cfg["uid"], cfg["gid"], cfg.get("keep_read", False))
        _limit("RLIMIT_NPROC", cfg["max_processes"])
        os.chdir(cfg["workdir"])
        sys.addaudithook(_audit_hook(cfg["allow_subprocess"]))
        code = compile(src, "<program>", "exec")
        del src
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:
        msg = f"exit {e.code!r}"[:200]
    except BaseException as e:  # noqa: BLE001 - every way the program can fail is a verdict
        msg = "exception " + type(e).__name__
        try:  # the program's frames only (not this file's)
            tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
            traceback.print_exception(type(e), e, tb)
        except BaseException:  # noqa: BLE001
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - e.g. the file-size limit
            pass
    try:
        os.write(w, msg.encode()[:512])
    finally:
        os._exit(0)


def _children(me: int, live_only: bool = False):
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
                fields = stat[stat.rindex(b")") + 2:].split()
                if int(fields[1]) == me and not (live_only and fields[0] in (b"Z", b"X")):
                    out.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def proc_is_ours() -> bool:
    """Does /proc show our PID namespace (so its pids are ours to signal)?"""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def kill_descendants(rounds: int = 50) -> None:
    """SIGKILL every child (orphans of the program come to us, the subreaper) until none is left."""
    me = os.getpid()
    scan = proc_is_ours()
    for _ in range(rounds):
        kids = _children(me) if scan else []
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        reaped = False
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
            reaped = True
        if not kids and not reaped:
            import time

            time.sleep(0.01)


class _Stop(Exception):
    pass


def _stop(signum, frame):
    raise _Stop()


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    try:  # orphans below us are re-parented to us, not to init (Linux >= 3.4)
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:  # noqa: BLE001 - no ctypes / not Linux: the parent's sweeps remain
        pass
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        worker(cfg, w)
    os.close(w)
    signal.signal(signal.SIGTERM, _stop)  # the parent's "time is up": clean up, then exit
    status, stopped = None, False
    try:
        _, status = os.waitpid(pid, 0)
    except _Stop:
        stopped = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # processes the program left running (orphans come to us: PID 1 of the namespace or subreaper)
    strays = len(_children(os.getpid(), live_only=True)) if proc_is_ours() else 0
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except OSError:
            pass
    kill_descendants()
    os.set_blocking(r, False)
    try:
        msg = os.read(r, 4096).decode(errors="replace")
    except (BlockingIOError, OSError):
        msg = ""
    result = {"stopped": stopped, "message": msg, "strays": strays}
    if status is not None:
        result["exit_code"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        result["signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    tmp = cfg["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, cfg["result"])
    os._exit(0)


if __name__ == "__main__":
    main()
