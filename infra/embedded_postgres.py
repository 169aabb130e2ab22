"""Postgres for `runledger up` and for tests: `postgres` runs as a direct child of this process
(never daemonized), on a Unix socket inside its data directory, no TCP.

Two sources of binaries (`RUNLEDGER_EMBEDDED_POSTGRES`):
- `pgserver`: the binaries of the `pgserver` wheel (PostgreSQL 16), the default where it is
  installed. Only its binaries are used: pgserver's own start-up daemonizes Postgres through
  `pg_ctl` (it then outlives a killed parent) and, as root, chmods every parent directory.
- `local`: a PostgreSQL installation on this machine (`postgres` and `initdb` on the PATH,
  or in /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin, /usr/local/pgsql/bin), chosen by itself
  where pgserver cannot be imported (no wheel for Linux on arm64).

Postgres refuses to run as root; as root it runs as a system user (`postgres` for a local
installation where that user exists, else `pgserver`, created if missing), which must be able
to reach the data directory and the binaries. Nothing here changes the mode of a directory
outside the data directory: if a parent does not let that user through, `start` says so."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from runledger.infra.lifetime import (
    DataDirInUse,
    die_with_parent,
    program_cmdline,
    program_cmdline_text,
    runs,
    stop_orphan,
)

BACKEND_ENV = "RUNLEDGER_EMBEDDED_POSTGRES"
LOCAL_DIRS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin")


class PostgresUnavailable(RuntimeError):
    """Postgres cannot be started here; the message is one line that says why and what to do."""


class BinariesOutOfReach(PostgresUnavailable):
    """As root: the system user cannot reach the Postgres binaries (a virtualenv in /root)."""


@dataclass(frozen=True)
class Binaries:
    bin_dir: Path
    version: int  # major
    source: str  # "pgserver" or "local"

    def __getitem__(self, name: str) -> str:
        return str(self.bin_dir / name)


def _major_version(postgres: Path) -> int | None:
    m = re.search(r"/postgresql/(\d+)/bin/", str(postgres))  # Debian's layout: no process needed
    if m:
        return int(m.group(1))
    try:
        out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"(\d+)(?:\.\d+)?", out.stdout)
    return int(m.group(1)) if m and out.returncode == 0 else None


def pgserver_binaries() -> Binaries | None:
    spec = importlib.util.find_spec("pgserver")  # not imported: slow, and we need only its files
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        return None
    return Binaries(bin_dir, _major_version(bin_dir / "postgres") or 16, "pgserver")


def local_binaries(want_version: int | None = None) -> Binaries | None:
    """A local installation with both `postgres` and `initdb`; `want_version` first if given
    (an existing data directory needs its own major version), else the newest."""
    import glob

    dirs: list[Path] = []
    for name in ("postgres", "initdb", "pg_ctl"):
        found = shutil.which(name)
        if found:
            dirs.append(Path(found).resolve().parent)
    for pattern in LOCAL_DIRS:
        dirs.extend(Path(d) for d in sorted(glob.glob(pattern), reverse=True))
    found_bins: list[Binaries] = []
    for d in dict.fromkeys(dirs):
        if os.access(d / "postgres", os.X_OK) and os.access(d / "initdb", os.X_OK):
            version = _major_version(d / "postgres")
            if version:
                found_bins.append(Binaries(d, version, "local"))
    if not found_bins:
        return None
    if want_version is not None:
        for b in found_bins:
            if b.version == want_version:
                return b
    return max(found_bins, key=lambda b: b.version)


def find_binaries(data_dir: Path) -> Binaries:
    wanted = os.environ.get(BACKEND_ENV, "").strip().lower() or None
    if wanted not in (None, "pgserver", "local"):
        raise PostgresUnavailable(f"{BACKEND_ENV}={wanted!r}: use 'pgserver' or 'local'")
    existing = _data_version(data_dir)
    if wanted in (None, "pgserver"):
        bins = pgserver_binaries()
        if bins is not None and wanted is None and existing is not None and bins.version != existing:
            # A cluster made by a local PostgreSQL (e.g. when pgserver's files were out of a
            # root `up`'s reach) runs again on the binaries of its own major version.
            local = local_binaries(existing)
            return local if local is not None and local.version == existing else bins
        if bins is not None:
            return bins
        if wanted == "pgserver":
            raise PostgresUnavailable(f"{BACKEND_ENV}=pgserver but the pgserver package is not "
                                      f"installed (pip install pgserver; no wheel exists for Linux on arm64)")
    bins = local_binaries(existing)
    if bins is None:
        raise PostgresUnavailable(
            "no PostgreSQL to run: the pgserver package is not installed here and no local "
            "PostgreSQL (initdb and postgres) is on the PATH or in /usr/lib/postgresql/*/bin; "
            "install one (Debian/Ubuntu: apt-get install postgresql; Fedora: dnf install "
            "postgresql-server; macOS: brew install postgresql@16), or set RUNLEDGER_DATABASE_URL "
            "and use `runledger serve`")
    return bins


def _data_version(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "PG_VERSION").read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class RunAs:
    """The system user Postgres runs as when we are root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    def popen_kwargs(self) -> dict:
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}


def _run_as(data_dir: Path, bins: Binaries) -> RunAs | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    name = None
    with contextlib.suppress(OSError):
        owner = data_dir.stat().st_uid  # an existing cluster keeps its owner
        if owner != 0 and (data_dir / "PG_VERSION").exists():
            with contextlib.suppress(KeyError):
                name = pwd.getpwuid(owner).pw_name
    if name is None:
        name = "pgserver"
        if bins.source == "local":
            with contextlib.suppress(KeyError):
                name = pwd.getpwnam("postgres").pw_name
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        try:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                           check=True, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            raise PostgresUnavailable(f"running as root: Postgres refuses to run as root and the "
                                      f"system user {name!r} to run it as could not be created ({e}); "
                                      f"create it (useradd --system {name}) or run `runledger up` "
                                      f"as an ordinary user") from None
        entry = pwd.getpwnam(name)
    return RunAs(name, entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(name, entry.pw_gid)))


def _blocked(user: RunAs, paths: list[Path]) -> Path | None:
    """The first of `paths` (each directory or file, in order) `user` cannot search or read,
    as the kernel decides it (ACLs included): checked by a shell running as that user."""
    script = 'for p do if [ -d "$p" ]; then [ -x "$p" ]; else [ -r "$p" ]; fi || { printf %s "$p"; exit 1; }; done'
    out = subprocess.run(["/bin/sh", "-c", script, "sh", *map(str, paths)], capture_output=True,
                         text=True, timeout=30, cwd="/", **user.popen_kwargs())
    return Path(out.stdout) if out.returncode != 0 and out.stdout else None


def _ancestors(path: Path) -> list[Path]:
    return [*reversed(path.parents), path]


def root_check(user: RunAs, data_dir: Path, bins: Binaries) -> str:
    """One line saying what running as root needs; raises PostgresUnavailable if the data
    directory's parents or the binaries are out of the user's reach."""
    why = (f"running as root: Postgres refuses to run as root, so it runs as the system user "
           f"{user.name!r}, which must be able to reach {data_dir}")
    parent = data_dir.parent
    blocked = _blocked(user, [p for p in _ancestors(parent) if p.exists()])  # start makes the rest
    if blocked is not None:
        mode = oct(blocked.stat().st_mode & 0o777)[2:]
        raise PostgresUnavailable(
            f"{why}, but {blocked} (mode {mode}) does not let it through; runledger changes no "
            f"directory outside its data directory: use --data-dir under a directory others can "
            f"traverse (e.g. /var/lib/runledger), or allow it yourself (chmod o+x {blocked})")
    postgres = bins.bin_dir / "postgres"
    extra = [d for d in (bins.bin_dir.parent / "lib", bins.bin_dir.parent / "share") if d.is_dir()]
    blocked = _blocked(user, [*_ancestors(bins.bin_dir), postgres, *extra])
    if blocked is not None:
        raise BinariesOutOfReach(
            f"{why} and run {postgres}, but {blocked} does not let it through: install runledger "
            f"outside a private directory (such as /root), or use a local PostgreSQL "
            f"({BACKEND_ENV}=local)")
    return why + "."


def _socket_dir(data_dir: Path) -> Path:
    """The data directory, unless the socket path would pass the ~107-character limit of Unix
    sockets: then a directory of its own under the temporary directory."""
    if len(str(data_dir / ".s.PGSQL.5432.lock")) < 100:
        return data_dir
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"runledger-pg-{digest}"


def stop_orphan_postmaster(data_dir: Path) -> bool:
    """A Postgres left running on `data_dir` (by a killed process or by pgserver) is stopped:
    a fast shutdown (SIGINT), checked to be a `postgres` whose `-D` is this directory."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return False
    # pgserver (an `up` from before the data-dir lock) lists the processes using its server:
    # a live `runledger up` among them owns it; it is no orphan.
    with contextlib.suppress(OSError, ValueError, TypeError):
        for holder in json.loads((data_dir / ".handle_pids.json").read_text()):
            argv = program_cmdline(int(holder)) or []
            if int(holder) != os.getpid() and "up" in argv and any("runledger" in a for a in argv):
                raise DataDirInUse(data_dir.parent, int(holder), program_cmdline_text(int(holder)))
    return stop_orphan(pid, lambda argv: runs(argv, "postgres", str(data_dir)) or runs(argv, "postmaster", str(data_dir)),
                       signal.SIGINT, timeout=30)


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    process: subprocess.Popen | None = None
    binaries: Binaries | None = None
    run_as: RunAs | None = None
    notice: str | None = None  # the one line about running as root, for `up` to print
    socket_dir: Path | None = None
    _reaper: threading.Thread | None = field(default=None, repr=False)

    def prepare(self) -> EmbeddedPostgres:
        """Before anything starts: a Postgres an earlier crash left on the directory is stopped,
        and everything that can refuse is checked (binaries, the user, its reach)."""
        self.data_dir = self.data_dir.expanduser().resolve()
        stop_orphan_postmaster(self.data_dir)
        self.binaries = find_binaries(self.data_dir)
        existing = _data_version(self.data_dir)
        self._check_version(existing)
        self.run_as = _run_as(self.data_dir, self.binaries)
        if self.run_as is None:
            return self
        try:
            self.notice = root_check(self.run_as, self.data_dir, self.binaries)
        except BinariesOutOfReach as out_of_reach:
            # pgserver's files in a private directory (a virtualenv inside /root): a local
            # PostgreSQL, if there is one, rather than opening that directory to others.
            local = local_binaries(existing)
            if self.binaries.source != "pgserver" or os.environ.get(BACKEND_ENV) or local is None:
                raise
            if existing is not None and local.version != existing:
                raise out_of_reach from None
            unreachable = self.binaries.bin_dir
            self.binaries = local
            self.run_as = _run_as(self.data_dir, local)
            assert self.run_as is not None  # still root, as when the first user was found
            self.notice = (root_check(self.run_as, self.data_dir, local)[:-1]
                           + f"; pgserver's binaries ({unreachable}) are out of its reach, so the local "
                           f"PostgreSQL {local.version} ({local.bin_dir}) runs instead.")
        return self

    def _check_version(self, existing: int | None) -> None:
        assert self.binaries is not None
        if existing is not None and existing != self.binaries.version:
            raise PostgresUnavailable(
                f"{self.data_dir} holds a PostgreSQL {existing} cluster, but the PostgreSQL found "
                f"({self.binaries.source}, {self.binaries.bin_dir}) is version {self.binaries.version}; "
                f"install PostgreSQL {existing}, or use another --data-dir")

    def start(self, timeout: float = 60.0) -> EmbeddedPostgres:
        if self.binaries is None:
            self.prepare()
        assert self.binaries is not None
        stop_orphan_postmaster(self.data_dir)
        self._prepare_dirs()
        if self.run_as is not None:  # directories made just now (a umask of 077 shuts it out)
            root_check(self.run_as, self.data_dir, self.binaries)
        if _data_version(self.data_dir) is None:
            self._initdb()
        log = open(self.data_dir.parent / "postgres.log", "ab")
        try:
            self.process = subprocess.Popen(
                [self.binaries["postgres"], "-D", str(self.data_dir), "-k", str(self.socket_dir),
                 "-h", ""],  # no TCP: the socket only
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(self.data_dir),
                start_new_session=True,  # Ctrl-C in a terminal goes to `up`, which stops us in order
                preexec_fn=die_with_parent(signal.SIGINT),  # fast shutdown when the parent dies
                **(self.run_as.popen_kwargs() if self.run_as else {}),
            )
        finally:
            log.close()
        # Reap it as soon as it exits, so that a killed postmaster is gone, not a zombie.
        self._reaper = threading.Thread(target=self.process.wait, name="postgres-reaper", daemon=True)
        self._reaper.start()
        self._wait_ready(timeout)
        return self

    def _prepare_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir = _socket_dir(self.data_dir)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        for d in {self.data_dir, self.socket_dir}:
            if self.run_as is not None:
                st = d.stat()
                if (st.st_uid, st.st_gid) != (self.run_as.uid, self.run_as.gid):
                    os.chown(d, self.run_as.uid, self.run_as.gid)
            if d.stat().st_mode & 0o077:
                d.chmod(0o700)  # inside the data directory; Postgres wants its own dir private

    def _initdb(self) -> None:
        assert self.binaries is not None
        out = subprocess.run(
            [self.binaries["initdb"], "-D", str(self.data_dir), "--auth=trust", "--auth-local=trust",
             "--encoding=utf8", "-U", "postgres"],
            capture_output=True, text=True, cwd=str(self.data_dir), stdin=subprocess.DEVNULL, timeout=300,
            **(self.run_as.popen_kwargs() if self.run_as else {}),
        )
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise PostgresUnavailable(f"initdb {self.data_dir} failed: {last}")

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        pid_file = self.data_dir / "postmaster.pid"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PostgresUnavailable(f"postgres exited with code {self.process.returncode} at start: "
                                          f"{self._log_tail()}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                lines = pid_file.read_text().splitlines()
                if int(lines[0]) == self.process.pid and len(lines) >= 8 and lines[7].strip() == "ready":
                    return
            time.sleep(0.01)
        self.stop()
        raise PostgresUnavailable(f"postgres not ready after {timeout} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = (self.data_dir.parent / "postgres.log").read_text(errors="replace").strip().splitlines()
            if lines:
                return lines[-1]
        return "(no log)"

    @property
    def url(self) -> str:
        assert self.socket_dir is not None
        return f"postgresql+asyncpg://postgres:@/postgres?host={self.socket_dir}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self, timeout: float = 30.0) -> None:
        """A fast shutdown (SIGINT: clients disconnected, a checkpoint, exit), then immediate
        (SIGQUIT), then SIGKILL."""
        proc = self.process
        if proc is None:
            return
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
        self.process = None


if __name__ == "__main__" and len(sys.argv) == 2:  # manual check: python -m ... DIR
    pg = EmbeddedPostgres(Path(sys.argv[1])).start()
    print(pg.notice or "", pg.url, flush=True)
    pg.stop()
