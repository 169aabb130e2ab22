"""One `runledger up` per data directory, and its servers never outlive it.

- A second `up` on the same data dir exits at once, naming the first; the first goes on serving
  and its endpoint file is untouched. So does a second `up` of another data dir with the same
  config dir (one endpoint file), saying to give it a RUNLEDGER_CONFIG_DIR of its own.
- SIGKILL or SIGHUP of `up` ends its nats-server and its Postgres within seconds (they are
  tied to it), and what was acknowledged before a kill -9 is there after the next `up`.
- Servers an earlier crash left behind on the data dir (from before they were tied to `up`)
  are stopped by the next `up` before it starts its own: never two nats-servers on one store.
- As root, `up` changes the mode of no directory outside its data dir: under a 0700 parent
  it refuses in one line that says why and what to do; under a traversable one it works.
- The local-PostgreSQL backend (what Linux on arm64 uses, having no pgserver wheel) serves
  too, and its Postgres dies with `up` as well."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from runledger.infra.embedded_postgres import local_binaries
from runledger.infra.lifetime import alive

from .test_up import CLI, _env, cli

pytestmark = [pytest.mark.timeout(240)]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(autouse=True)
def _linux():
    """Never skipped: `up` ties its servers' lives to its own with Linux's parent-death
    signal, and these tests read /proc. Elsewhere they fail, saying so."""
    if not sys.platform.startswith("linux"):
        pytest.fail(f"runledger up's lifetime guarantees are Linux's (prctl, /proc); this is {sys.platform}")


class Up:
    def __init__(self, data_dir: Path, config_dir: Path, **env: str):
        self.data_dir, self.config_dir, self.extra_env = data_dir, config_dir, env
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []

    def env(self) -> dict[str, str]:
        return {**_env(self.config_dir), **self.extra_env}

    def start(self, timeout: float = 60) -> Up:
        self.proc = subprocess.Popen([*CLI, "up", "--data-dir", str(self.data_dir)], env=self.env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if "Press Ctrl-C to stop" in line:
                return self
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"runledger up did not become ready:\n{''.join(self.output)}")

    def signal(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rest, _ = self.proc.communicate(timeout=60)
        self.output.append(rest or "")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def nats_pid(self) -> int:
        (pid,) = _servers_on(self.data_dir)["nats-server"]
        return pid

    def postgres_pid(self) -> int:
        return int((self.data_dir / "pg" / "postmaster.pid").read_text().splitlines()[0])


def _servers_on(data_dir: Path) -> dict[str, list[int]]:
    """Live nats-server and postgres (postmaster or backend) processes that name `data_dir`."""
    found: dict[str, list[int]] = {"nats-server": [], "postgres": []}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not alive(int(proc.name)):
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = Path(argv[0].decode(errors="replace")).name
        if name in found and any(str(data_dir).encode() in a for a in argv):
            found[name].append(int(proc.name))
    return found


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def _modes(paths: list[Path]) -> dict[str, str]:
    return {str(p): oct(p.stat().st_mode & 0o7777) for p in paths}


@pytest.fixture
def dirs():
    base = Path(tempfile.mkdtemp(prefix="rll-"))
    base.chmod(0o711)  # as root, Postgres's system user must get through
    yield base / "data", base / "cfg"
    shutil.rmtree(base, ignore_errors=True)


def test_a_second_up_on_the_same_data_dir_exits_at_once_naming_the_first(dirs):
    data_dir, config_dir = dirs
    first = Up(data_dir, config_dir).start()
    try:
        endpoint = config_dir / "endpoint.json"
        before = (endpoint.read_bytes(), endpoint.stat().st_mtime_ns)
        servers = _servers_on(data_dir)
        assert len(servers["nats-server"]) == 1 and servers["postgres"], servers

        started = time.monotonic()
        second = subprocess.run([*CLI, "up", "--data-dir", str(data_dir)], env=_env(config_dir),
                                capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
        out = (second.stdout + second.stderr).strip()
        assert second.returncode != 0, out
        assert len(out.splitlines()) == 1, out
        assert f"in use by process {first.proc.pid}" in out and "runledger.cli up" in out, out
        assert took < 10, took  # at once: nothing was started (the CLI's own start-up is ~1-2 s)

        assert (endpoint.read_bytes(), endpoint.stat().st_mtime_ns) == before
        assert _servers_on(data_dir) == servers  # no second nats-server on the store
        made = cli(config_dir, "work-pool", "create", "after-second", "--type", "process", "--json")
        assert made.returncode == 0, made.stdout + made.stderr
        listed = cli(config_dir, "work-pool", "ls", "--json")
        assert "after-second" in {p["name"] for p in json.loads(listed.stdout)}, listed.stdout
        assert first.signal(signal.SIGTERM) == 0, "".join(first.output)
    finally:
        first.kill()
    assert not (config_dir / "endpoint.json").exists()


def test_a_second_up_with_another_data_dir_but_the_same_config_dir_refuses_naming_the_way_out(dirs):
    """The endpoint file is one per config dir: a second `up` writing it would leave the first
    unreachable by the CLI (and remove it when it stops)."""
    data_dir, config_dir = dirs
    first = Up(data_dir, config_dir).start()
    try:
        endpoint = config_dir / "endpoint.json"
        before = (endpoint.read_bytes(), endpoint.stat().st_mtime_ns)
        other = data_dir.parent / "other-data"
        second = subprocess.run([*CLI, "up", "--data-dir", str(other)], env=_env(config_dir),
                                capture_output=True, text=True, timeout=60)
        out = (second.stdout + second.stderr).strip()
        assert second.returncode == 6, out
        assert len(out.splitlines()) == 1, out
        assert f"process {first.proc.pid}" in out and str(data_dir) in out and "RUNLEDGER_CONFIG_DIR" in out, out
        assert (endpoint.read_bytes(), endpoint.stat().st_mtime_ns) == before
        assert _servers_on(other) == {"nats-server": [], "postgres": []}
        listed = cli(config_dir, "work-pool", "ls", "--json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert first.signal(signal.SIGTERM) == 0, "".join(first.output)
    finally:
        first.kill()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP], ids=["SIGKILL", "SIGHUP"])
def test_the_servers_die_with_up_and_the_data_survives_a_kill(dirs, sig):
    data_dir, config_dir = dirs
    first = Up(data_dir, config_dir).start()
    try:
        made = cli(config_dir, "work-pool", "create", "kept", "--type", "process", "--json")
        assert made.returncode == 0, made.stdout + made.stderr
        servers = [first.nats_pid(), first.postgres_pid()]
        assert all(alive(p) for p in servers)
        code = first.signal(sig)
    finally:
        first.kill()
    if sig == signal.SIGHUP:
        assert code == 0, "".join(first.output)  # a clean stop, as on SIGTERM
        assert "runledger stopped" in "".join(first.output)
        assert not (config_dir / "endpoint.json").exists()
    assert _gone_within(servers, 10) == [], f"still running after {sig.name} of up: {_servers_on(data_dir)}"
    assert _servers_on(data_dir) == {"nats-server": [], "postgres": []}

    second = Up(data_dir, config_dir).start()
    try:
        listed = cli(config_dir, "work-pool", "ls", "--json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert "kept" in {p["name"] for p in json.loads(listed.stdout)}, listed.stdout
        assert second.signal(signal.SIGTERM) == 0, "".join(second.output)
    finally:
        second.kill()
    assert _servers_on(data_dir) == {"nats-server": [], "postgres": []}


def test_up_stops_servers_an_earlier_crash_left_on_its_data_dir(dirs):
    """Orphans as an `up` from before this fix left them: a nats-server in a session of its
    own on the store, and a Postgres daemonized by pg_ctl (pgserver's way)."""
    data_dir, config_dir = dirs
    first = Up(data_dir, config_dir).start()
    try:
        assert cli(config_dir, "work-pool", "create", "kept", "--type", "process").returncode == 0
        nats_argv = Path(f"/proc/{first.nats_pid()}/cmdline").read_bytes().split(b"\0")[:-1]
        pg_argv = Path(f"/proc/{first.postgres_pid()}/cmdline").read_bytes().split(b"\0")[:-1]
        pg_owner, pg_owner_gid = (data_dir / "pg").stat().st_uid, (data_dir / "pg").stat().st_gid
        assert first.signal(signal.SIGTERM) == 0
    finally:
        first.kill()

    # Start them again, untied to any `up`, on the same directories and files.
    nats_orphan = subprocess.Popen(nats_argv, start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    pg_ctl = [str(Path(pg_argv[0].decode()).parent / "pg_ctl"), "-D", str(data_dir / "pg")]
    as_owner = {"user": pg_owner, "group": pg_owner_gid} if IS_ROOT else {}
    try:
        opts = " ".join(a.decode() if a else '""' for a in pg_argv[3:])  # after postgres -D DIR
        subprocess.run([*pg_ctl, "-o", opts, "-l", str(data_dir / "pg" / "orphan.log"), "-w", "start"],
                       check=True, capture_output=True, cwd="/", **as_owner)
        orphans = [nats_orphan.pid, int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])]
        deadline = time.monotonic() + 10
        while not (data_dir / "nats" / "nats-server.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(alive(p) for p in orphans)

        second = Up(data_dir, config_dir).start()
        try:
            # (our child: poll() reaps it, so that it is not left a zombie)
            assert nats_orphan.poll() is not None, "the orphan nats-server still runs beside the new one"
            assert not alive(orphans[1]), "the orphan Postgres still runs"
            servers = _servers_on(data_dir)
            assert len(servers["nats-server"]) == 1 and servers["nats-server"][0] not in orphans, servers
            listed = cli(config_dir, "work-pool", "ls", "--json")
            assert "kept" in {p["name"] for p in json.loads(listed.stdout)}, listed.stdout + listed.stderr
            assert second.signal(signal.SIGTERM) == 0, "".join(second.output)
        finally:
            second.kill()
    finally:
        if nats_orphan.poll() is None:
            nats_orphan.kill()
            nats_orphan.wait()
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, cwd="/", **as_owner)
    assert _servers_on(data_dir) == {"nats-server": [], "postgres": []}


def test_up_under_private_parents_changes_no_parent_mode_and_as_root_says_what_it_needs(dirs):
    """As root, Postgres runs as a system user that private parents shut out: `up` refuses in
    one line saying what to do, and works once they can be traversed. As anyone else, it
    works under private parents of the user's own. Either way no parent's mode changes."""
    if not IS_ROOT:
        _up_as_a_user_under_private_parents(dirs)
        return
    base = dirs[0].parent / "rlr"
    base.mkdir()
    base.chmod(0o700)
    private = base / "private"
    private.mkdir(mode=0o700)
    data_dir, config_dir = private / "data", base / "cfg"
    parents = [*reversed(data_dir.parents)]
    before = _modes(parents)

    refused = subprocess.run([*CLI, "up", "--data-dir", str(data_dir)], env=_env(config_dir),
                             capture_output=True, text=True, timeout=60)
    out = (refused.stdout + refused.stderr).strip()
    assert refused.returncode == 6, out
    assert len(out.splitlines()) == 1, out
    assert "Postgres refuses to run as root" in out and f"{base} (mode 700)" in out, out
    assert "--data-dir" in out and "chmod o+x" in out, out
    assert _modes(parents) == before
    assert _servers_on(data_dir) == {"nats-server": [], "postgres": []}
    assert not (config_dir / "endpoint.json").exists()

    # Under a parent others can traverse: it works, and still changes no parent's mode.
    base.chmod(0o711)
    private.chmod(0o711)
    before = _modes(parents)
    up = Up(data_dir, config_dir).start()
    try:
        assert "runs as the system user" in "".join(up.output)
        assert cli(config_dir, "work-pool", "ls").returncode == 0
        assert up.signal(signal.SIGTERM) == 0, "".join(up.output)
    finally:
        up.kill()
    assert _modes(parents) == before


def _up_as_a_user_under_private_parents(dirs) -> None:
    base = dirs[0].parent / "rlr"
    base.mkdir()
    base.chmod(0o700)
    private = base / "private"
    private.mkdir(mode=0o700)
    data_dir, config_dir = private / "data", base / "cfg"
    parents = [*reversed(data_dir.parents)]
    before = _modes(parents)
    up = Up(data_dir, config_dir).start()
    try:
        assert "runs as the system user" not in "".join(up.output)
        assert cli(config_dir, "work-pool", "ls").returncode == 0
        assert up.signal(signal.SIGTERM) == 0, "".join(up.output)
    finally:
        up.kill()
    assert _modes(parents) == before


def test_up_with_a_local_postgresql_serves_and_its_postgres_dies_with_it(dirs):
    data_dir, config_dir = dirs
    local = local_binaries()
    # Never skipped: the machines this runs on (CI's among them) have PostgreSQL installed.
    assert local is not None, "this test needs a local PostgreSQL installation (e.g. apt-get install postgresql)"
    up = Up(data_dir, config_dir, RUNLEDGER_EMBEDDED_POSTGRES="local").start()
    try:
        made = cli(config_dir, "work-pool", "create", "on-local", "--type", "process", "--json")
        assert made.returncode == 0, made.stdout + made.stderr
        listed = cli(config_dir, "work-pool", "ls", "--json")
        assert "on-local" in {p["name"] for p in json.loads(listed.stdout)}, listed.stdout + listed.stderr
        pid = up.postgres_pid()
        exe = os.readlink(f"/proc/{pid}/exe")
        assert Path(exe).parent == local.bin_dir, exe
        assert (data_dir / "pg" / "PG_VERSION").read_text().strip() == str(local.version)
        servers = [up.nats_pid(), pid]
        up.signal(signal.SIGKILL)
    finally:
        up.kill()
    assert _gone_within(servers, 10) == [], _servers_on(data_dir)
