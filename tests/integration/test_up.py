"""`runledger up`, the README's one command: embedded NATS and Postgres on free ports (this
machine's 4222 and 5432 are taken), the service, an endpoint file that lets the CLI in another
terminal find it with no flags or environment, a clean stop on SIGTERM and on Ctrl-C that leaves
no server running, and data that survives a restart."""

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

CLI = [sys.executable, "-m", "runledger.cli"]


def _env(config_dir: Path) -> dict[str, str]:
    # Nothing from the test run's own settings: `up` and the CLI must find everything themselves.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNLEDGER_")}
    env["RUNLEDGER_CONFIG_DIR"] = str(config_dir)
    return env


def _processes_using(path: Path) -> list[str]:
    """Command lines of running processes that mention `path` (the servers `up` started)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline and "pytest" not in cmdline:
            found.append(cmdline.strip())
    return found


class Up:
    def __init__(self, data_dir: Path, config_dir: Path):
        self.data_dir, self.config_dir = data_dir, config_dir
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []

    def start(self, timeout: float = 60) -> None:
        self.proc = subprocess.Popen([*CLI, "up", "--data-dir", str(self.data_dir)], env=_env(self.config_dir),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if "Press Ctrl-C to stop" in line:
                return
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"runledger up did not become ready:\n{''.join(self.output)}")

    def stop(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rest, _ = self.proc.communicate(timeout=30)
        self.output.append(rest)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def cli(config_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=_env(config_dir), capture_output=True, text=True, timeout=60)


@pytest.fixture
def up_dirs():
    # Short paths: Postgres puts its socket in the data directory (limit ~107 characters).
    # Not under pytest's tmp_path (0700 parents): as root, Postgres runs as a system user that
    # must get through, and `up` changes no directory outside its data dir.
    base = Path(tempfile.mkdtemp(prefix="rlup-"))
    base.chmod(0o711)
    yield base / "data", base / "cfg"
    shutil.rmtree(base, ignore_errors=True)


def test_up_serves_the_cli_stops_cleanly_and_keeps_its_data(up_dirs):
    data_dir, config_dir = up_dirs
    first = Up(data_dir, config_dir)
    try:
        first.start()
        endpoint = json.loads((config_dir / "endpoint.json").read_text())
        # Free ports of its own, on 127.0.0.1 only, whatever already holds 4222 and 5432.
        assert endpoint["nats_url"].startswith("nats://127.0.0.1:") and not endpoint["nats_url"].endswith(":4222")
        assert oct((config_dir / "endpoint.json").stat().st_mode & 0o777) == "0o600"

        made = cli(config_dir, "work-pool", "create", "kept", "--type", "process", "--json")
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout)["name"] == "kept"
        queue = cli(config_dir, "work-queue", "create", "q1", "--pool", "kept", "--priority", "1", "--json")
        assert queue.returncode == 0, queue.stderr

        assert first.stop(signal.SIGTERM) == 0, "".join(first.output)
    finally:
        first.kill()
    assert "runledger stopped" in "".join(first.output)
    assert not (config_dir / "endpoint.json").exists()
    assert _processes_using(data_dir) == []
    # Nothing answers now: a clear "unavailable", not a hang.
    gone = cli(config_dir, "work-pool", "ls")
    assert gone.returncode == 6, gone.stdout + gone.stderr

    # As an older runledger left the data dir: no admin role, the service's users alone.
    made_before = json.loads((data_dir / "credentials.json").read_text())
    del made_before["admin"]
    (data_dir / "credentials.json").write_text(json.dumps(made_before))
    second = Up(data_dir, config_dir)
    try:
        second.start()
        # The same address as last time: the task workers and clients of the first run reconnect to it.
        assert json.loads((config_dir / "endpoint.json").read_text())["nats_url"] == endpoint["nats_url"]
        credentials = json.loads((data_dir / "credentials.json").read_text())
        assert credentials["admin"]["password"] and {r: credentials[r] for r in made_before} == made_before
        assert 'user: "admin"' in (data_dir / "nats.conf").read_text()
        listed = cli(config_dir, "work-queue", "ls", "--pool", "kept", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [(q["name"], q["priority"]) for q in json.loads(listed.stdout)] == [("q1", 1), ("default", 2)]
        assert second.stop(signal.SIGINT) == 0, "".join(second.output)  # Ctrl-C
    finally:
        second.kill()
    assert _processes_using(data_dir) == []
