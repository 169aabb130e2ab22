"""Who owns a data directory, and servers that never outlive the process that started them.

- `DataDirLock`: an exclusive `flock` on `<data_dir>/runledger.lock`, held for the life of the
  process (the kernel drops it when the process dies, however it dies), with the holder's pid
  written in it so that a second `runledger up` can say who has the directory.
- `die_with_parent(sig)`: a `preexec_fn` that asks Linux to send `sig` to the child when the
  thread that started it dies (`prctl(PR_SET_PDEATHSIG)`); `None` on other systems.
- `stop_orphan(pid, is_ours)`: stop a server left behind by an earlier crash, after checking
  from its command line that the pid really is that program on that directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

LOCK_NAME = "runledger.lock"
_PR_SET_PDEATHSIG = 1


class DataDirInUse(RuntimeError):
    def __init__(self, data_dir: Path, pid: int | None, cmdline: str | None):
        self.data_dir, self.pid, self.cmdline = data_dir, pid, cmdline
        who = f"process {pid}" if pid else "another process"
        if pid and cmdline:
            who += f" ({cmdline})"
        super().__init__(f"the data directory {data_dir} is in use by {who}; stop it first, "
                         f"or give this one another --data-dir")


class DataDirLock:
    """Open without truncating, lock, and only then write our pid: a second process that fails
    to lock must not erase the holder's pid on the way."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise DataDirInUse(self.data_dir, pid, program_cmdline_text(pid) if pid else None) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the lock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 64, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen` (Linux only): the child gets `sig` when the thread
    that forks it dies, even by SIGKILL. Start servers from a thread that lives as long as
    they should (the main thread). It runs after Popen's user switch, which would clear it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody will tell us
            os.kill(os.getpid(), sig)

    return preexec


def program_cmdline(pid: int) -> list[str] | None:
    """The argv of a live (not zombie) process, or None."""
    if sys.platform.startswith("linux"):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a] or None  # zombie: empty
    try:
        out = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.split() or None


def program_cmdline_text(pid: int) -> str | None:
    argv = program_cmdline(pid)
    return " ".join(argv)[:200] if argv else None


def alive(pid: int) -> bool:
    if sys.platform.startswith("linux"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def runs(argv: list[str] | None, program: str, *marks: str) -> bool:
    """Whether `argv` is `program` (by the base name of argv[0]) with one of `marks` as a whole
    argument (so `/d` does not match `/d2`)."""
    if not argv or Path(argv[0]).name != program:
        return False
    return any(m in argv[1:] for m in marks)


def stop_orphan(pid: int, is_ours: Callable[[list[str] | None], bool], sig: int = signal.SIGTERM,
                timeout: float = 15.0) -> bool:
    """Signal `pid` if its command line passes `is_ours`, wait until it is gone (escalating to
    SIGKILL after `timeout`). Returns whether there was such a process."""
    if pid <= 1 or pid == os.getpid() or not is_ours(program_cmdline(pid)):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.02)
    return True


def parent_pid(pid: int) -> int | None:
    if sys.platform.startswith("linux"):
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
    try:
        out = subprocess.run(["ps", "-p", str(pid), "-o", "ppid="], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def live_up_owning(pid: int) -> int | None:
    """The pid of a live `runledger up` that is the parent of `pid` (a server of a running `up`
    from before the data-dir lock, not an orphan), or None."""
    ppid = parent_pid(pid)
    if not ppid or ppid <= 1 or ppid == os.getpid():
        return None
    argv = program_cmdline(ppid) or []
    if "up" in argv and any("runledger" in a for a in argv):
        return ppid
    return None


def processes_running(program: str, *marks: str) -> list[int]:
    """Pids of live `program` processes whose command line names one of `marks` (Linux only:
    elsewhere an empty list)."""
    if not sys.platform.startswith("linux"):
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            if runs(program_cmdline(int(entry.name)), program, *marks):
                found.append(int(entry.name))
    return found
