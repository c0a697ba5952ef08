"""Servers and workers started in the background for a shell session (`imgclf ui --wait`, `imgclf prefect-server
--wait`, `imgclf worker`): each runs in a process group of its own, its output in `.services/<name>.log`, and
is recorded in `.services/<name>.json` so that `imgclf stop` (and `imgclf stack down`) can stop what was
started, workers before servers, and only those processes: a reused pid is recognised by its start time and
command line, and a record is checked before anything is signalled (a pid of 0 or 1, the caller's own group,
a FIFO are refused)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

STATE_DIR = ".services"
# Stopped in this order: a worker still polling a stopped server only fills its log with errors.
STOP_ORDER = ("worker", "serve", "prefect", "mlflow")


@dataclass
class Service:
    name: str
    kind: str  # one of STOP_ORDER
    pid: int
    started: int  # the process's start time in clock ticks since boot (/proc/<pid>/stat field 22)
    cmd: list[str]
    log: str
    url: Optional[str] = None


def _start_ticks(pid: int) -> Optional[int]:
    """The process's start time, None when it is gone or a zombie (exited, not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _cmdline(pid: int) -> Optional[list[str]]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return None


def alive(svc: Service) -> bool:
    """The recorded process itself is running: same pid, same start time and the command it was started with
    (a record is a file anyone can edit: a pid alone may name the caller, or any process of this user)."""
    return (svc.pid > 1 and svc.pid != os.getpid() and _start_ticks(svc.pid) == svc.started
            and _cmdline(svc.pid) == svc.cmd)


def _read_record(path: Path) -> Service:
    """One `.services/*.json` record, checked: a regular file (a FIFO must not hang `stop`), small, and fields of
    the right types (pid > 1: a pid of 0 or 1 would signal the caller's group or init)."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ValueError("not a regular file")
        raw = json.loads(fh.read(1 << 20))
    svc = Service(**raw)
    if svc.name != path.stem:  # stop_all deletes <name>.json: a forged name must not point elsewhere
        raise ValueError(f"its name {str(svc.name)[:80]!r} is not the file's")
    if not (isinstance(svc.pid, int) and svc.pid > 1 and isinstance(svc.started, int) and svc.started > 0
            and isinstance(svc.cmd, list) and svc.cmd and all(isinstance(c, str) for c in svc.cmd)
            and svc.kind in STOP_ORDER):
        raise ValueError("pid, start time, command or kind out of range")
    return svc


def recorded(state_dir: str | Path = STATE_DIR, say: Callable[[str], None] = print) -> list[Service]:
    """The valid records; each one that is not (damaged, forged, a FIFO) is named and left alone."""
    out = []
    for path in sorted(Path(state_dir).glob("*.json")):
        try:
            out.append(_read_record(path))
        except (OSError, ValueError, TypeError) as exc:
            say(f"{path}: not a service record ({str(exc)[:200]}); nothing signalled for it, delete it if nothing "
                "runs from it")
    return out


def start(name: str, kind: str, cmd: list[str], env: dict[str, str], *, url: Optional[str] = None,
          state_dir: str | Path = STATE_DIR) -> tuple[Service, bool]:
    """Start `cmd` detached unless a live one of that name is recorded; returns it and whether it is new."""
    state = Path(state_dir)
    state.mkdir(mode=0o700, exist_ok=True)
    record = state / f"{name}.json"
    if record.exists():
        try:
            old = _read_record(record)
        except (OSError, ValueError, TypeError):
            old = None  # damaged or forged: not ours to keep, nothing of it is signalled
        if old is not None and alive(old):
            return old, False
        record.unlink()
    log = state / f"{name}.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    svc = Service(name, kind, proc.pid, _start_ticks(proc.pid) or 0, cmd, str(log), url)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(svc)))
    tmp.replace(record)
    return svc, True


def answers(url: str) -> bool:
    """The URL gives any HTTP answer below 500 (an auth-protected server answers 401: it is up)."""
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


def log_tail(svc: Service, lines: int = 15) -> str:
    try:
        return "\n".join(Path(svc.log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until(ready: Callable[[], bool], what: str, timeout: float, say: Callable[[str], None],
               svc: Optional[Service] = None, every: float = 10.0) -> None:
    """Poll `ready` until it holds; a line every `every` seconds; fail naming the log if the process dies."""
    t0 = last = time.monotonic()
    while not ready():
        now = time.monotonic()
        if svc is not None and not alive(svc):
            raise RuntimeError(f"{what} exited before it was ready (log {svc.log}):\n{log_tail(svc)}")
        if now - t0 > timeout:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s" + (f" (log {svc.log})" if svc else ""))
        if now - last >= every:
            say(f"waiting for {what} ({now - t0:.0f} s)")
            last = now
        time.sleep(0.5)


def stop(svc: Service, grace: float = 20.0) -> bool:
    """SIGTERM the service's process group, SIGKILL it after `grace` seconds; False if it was not running."""
    if not alive(svc):
        return False
    try:
        if os.getpgid(svc.pid) in (os.getpgrp(), 0):  # never the caller's own group (a script, a CI job)
            return False
    except ProcessLookupError:
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(svc.pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive(svc):
                return True
            try:  # reap it when it is our child (started in this process)
                os.waitpid(svc.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
    return not alive(svc)


def stop_all(state_dir: str | Path = STATE_DIR, say: Callable[[str], None] = print) -> int:
    """Stop every recorded service, workers first, then Prefect, then MLflow; returns how many were running."""
    services = sorted(recorded(state_dir, say), key=lambda s: STOP_ORDER.index(s.kind) if s.kind in STOP_ORDER else 0)
    n = 0
    for svc in services:
        if stop(svc):
            n += 1
            say(f"stopped {svc.name} (pid {svc.pid})")
        (Path(state_dir) / f"{svc.name}.json").unlink(missing_ok=True)
    return n
