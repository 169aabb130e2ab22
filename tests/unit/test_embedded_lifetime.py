"""The pieces behind `runledger up`'s data-dir ownership and Postgres choice, without servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runledger.infra import embedded_postgres
from runledger.infra.embedded_postgres import PostgresUnavailable, find_binaries
from runledger.infra.lifetime import DataDirInUse, DataDirLock, runs

HOLD = """
import sys, time
from pathlib import Path
from runledger.infra.lifetime import DataDirLock
DataDirLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_lock_names_the_holder_and_leaves_its_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataDirInUse) as refused:
            DataDirLock(tmp_path).acquire()
        assert refused.value.pid == holder.pid
        assert f"in use by process {holder.pid} (" in str(refused.value)
        assert (tmp_path / "runledger.lock").read_text().strip() == str(holder.pid)  # not erased
    finally:
        holder.kill()
        holder.wait()
    lock = DataDirLock(tmp_path).acquire()  # the kernel dropped the dead holder's lock
    lock.release()


def test_runs_matches_whole_arguments_of_that_program():
    argv = ["/x/bin/postgres", "-D", "/d/pg", "-k", "/d/pg"]
    assert runs(argv, "postgres", "/d/pg")
    assert not runs(argv, "postgres", "/d/p")  # a prefix is another directory
    assert not runs(["/bin/sleep", "/d/pg"], "postgres", "/d/pg")
    assert not runs(None, "postgres", "/d/pg")


def test_without_pgserver_the_local_postgresql_is_chosen(monkeypatch, tmp_path):
    monkeypatch.delenv(embedded_postgres.BACKEND_ENV, raising=False)
    monkeypatch.setattr(embedded_postgres, "pgserver_binaries", lambda: None)
    local = embedded_postgres.local_binaries()
    assert local is not None, "this test needs a local PostgreSQL installation (e.g. apt-get install postgresql)"
    assert find_binaries(tmp_path) == local


def test_without_any_postgresql_one_line_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv(embedded_postgres.BACKEND_ENV, raising=False)
    monkeypatch.setattr(embedded_postgres, "pgserver_binaries", lambda: None)
    monkeypatch.setattr(embedded_postgres, "local_binaries", lambda want=None: None)
    with pytest.raises(PostgresUnavailable) as e:
        find_binaries(tmp_path)
    assert "\n" not in str(e.value) and "apt-get install postgresql" in str(e.value)


def test_an_unknown_backend_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(embedded_postgres.BACKEND_ENV, "docker")
    with pytest.raises(PostgresUnavailable, match="use 'pgserver' or 'local'"):
        find_binaries(tmp_path)


def test_an_existing_cluster_wants_its_own_major_version(tmp_path):
    (tmp_path / "PG_VERSION").write_text("9\n")
    with pytest.raises(PostgresUnavailable, match="holds a PostgreSQL 9 cluster, but"):
        embedded_postgres.EmbeddedPostgres(Path(tmp_path)).prepare()


OLD_UP = """
import subprocess, sys, time
from runledger.infra.embedded import nats_server_binary
p = subprocess.Popen([str(nats_server_binary()), "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", sys.argv[1]],
                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(p.pid, flush=True)
time.sleep(60)
"""


def test_the_nats_server_of_a_live_older_up_is_not_taken_for_an_orphan(tmp_path):
    """An `up` from before the lock runs on the store: the new one refuses, it stops nothing."""
    from runledger.infra.embedded import EmbeddedNats
    from runledger.infra.lifetime import alive

    store = tmp_path / "nats"
    old = subprocess.Popen([sys.executable, "-c", OLD_UP, str(store), "runledger", "up"],
                           stdout=subprocess.PIPE, text=True)
    server = int(old.stdout.readline())
    # Right after exec, /proc/<pid>/cmdline is briefly empty: wait until the server names its
    # store, as any server an `up` could meet has long done (without this, 1 run in 4 raced).
    deadline = time.monotonic() + 5
    while str(store) not in Path(f"/proc/{server}/cmdline").read_bytes().decode(errors="replace"):
        assert time.monotonic() < deadline, "the old up's nats-server never named its store"
        time.sleep(0.01)
    try:
        with pytest.raises(DataDirInUse) as refused:
            EmbeddedNats(store).start()
        assert refused.value.pid == old.pid
        assert alive(server)
    finally:
        old.kill()
        old.wait()
        os.kill(server, signal.SIGTERM)


def test_roots_default_data_dir_is_one_postgres_user_can_reach(monkeypatch):
    from runledger.cli import service

    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setattr(service.os, "geteuid", lambda: 0)
    assert service.default_data_dir() == Path("/var/lib/runledger")
    monkeypatch.setenv("XDG_DATA_HOME", "/srv/data")
    assert service.default_data_dir() == Path("/srv/data/runledger")
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setattr(service.os, "geteuid", lambda: 1000)
    assert service.default_data_dir() == Path.home() / ".local" / "share" / "runledger"


def test_the_postgres_of_a_live_older_up_is_not_taken_for_an_orphan(tmp_path):
    """pgserver lists the processes using its server in .handle_pids.json: a live `up` there
    owns the running Postgres; nothing is signalled."""
    from runledger.infra.embedded_postgres import stop_orphan_postmaster

    old = subprocess.Popen([sys.executable, "-c", "print(1, flush=True); import time; time.sleep(60)",
                            "runledger", "up"], stdout=subprocess.PIPE, text=True)
    try:
        old.stdout.readline()  # running: its command line is there (not in the instant of exec)
        (tmp_path / "postmaster.pid").write_text(f"{old.pid}\n{tmp_path}\n")
        (tmp_path / ".handle_pids.json").write_text(f"[{old.pid}]")
        with pytest.raises(DataDirInUse) as refused:
            stop_orphan_postmaster(tmp_path)
        assert refused.value.pid == old.pid and old.poll() is None
    finally:
        old.kill()
        old.wait()


def test_pgserver_binaries_in_a_private_directory(monkeypatch):
    """A virtualenv inside a private directory (/root). As root, Postgres runs as a system user
    they are out of reach of: no chmod of it, a local PostgreSQL instead (or, when pgserver is
    asked for, a refusal). As anyone else, Postgres runs as that user: pgserver's binaries."""
    import shutil
    import tempfile

    local = embedded_postgres.local_binaries()
    assert local is not None, "this test needs a local PostgreSQL installation (e.g. apt-get install postgresql)"
    base = Path(tempfile.mkdtemp(prefix="rlbin-"))
    try:
        private = base / "private"
        (private / "bin").mkdir(parents=True, mode=0o700)
        private.chmod(0o700)
        (private / "bin" / "postgres").write_text("#!/bin/sh\n")
        (private / "bin" / "postgres").chmod(0o755)
        monkeypatch.delenv(embedded_postgres.BACKEND_ENV, raising=False)
        monkeypatch.setattr(embedded_postgres, "pgserver_binaries",
                            lambda: embedded_postgres.Binaries(private / "bin", local.version, "pgserver"))
        base.chmod(0o711)
        pg = embedded_postgres.EmbeddedPostgres(base / "data" / "pg").prepare()
        if os.geteuid() != 0:
            assert pg.binaries is not None and pg.binaries.bin_dir == private / "bin" and pg.run_as is None
            assert not pg.notice
            assert oct(private.stat().st_mode & 0o777) == "0o700"
            return
        assert pg.binaries == local
        assert "out of its reach, so the local PostgreSQL" in pg.notice and "\n" not in pg.notice
        assert oct(private.stat().st_mode & 0o777) == "0o700"

        monkeypatch.setenv(embedded_postgres.BACKEND_ENV, "pgserver")  # asked for: refused instead
        with pytest.raises(embedded_postgres.BinariesOutOfReach, match="does not let it through"):
            embedded_postgres.EmbeddedPostgres(base / "data" / "pg").prepare()
    finally:
        shutil.rmtree(base, ignore_errors=True)
