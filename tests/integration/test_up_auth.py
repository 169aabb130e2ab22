"""`runledger up` with the broker roles: its NATS refuses an unauthenticated connection and
syncs every write before acknowledging it; the credentials are made once per data directory
and kept private; the CLI in another terminal finds the client credentials (and, for `events`, `verify` and
`replay`, the analyst's) in the endpoint file with no flags."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nats
import nats.errors
import pytest

CLI = [sys.executable, "-m", "runledger.cli"]


def _env(config_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNLEDGER_")}
    env["RUNLEDGER_CONFIG_DIR"] = str(config_dir)
    return env


def _cli(config_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=_env(config_dir), capture_output=True, text=True, timeout=60)


@pytest.fixture
def up():
    # Short, and not under pytest's 0700 tmp_path: as root, Postgres runs as a system user that
    # must get through the parents (its socket lives in the data dir).
    base = Path(tempfile.mkdtemp(prefix="rlua-"))
    base.chmod(0o711)
    data_dir, config_dir = base / "data", base / "cfg"
    proc = subprocess.Popen([*CLI, "up", "--data-dir", str(data_dir)], env=_env(config_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    for line in proc.stdout:
        output.append(line)
        if "Press Ctrl-C to stop" in line:
            break
        if time.monotonic() > deadline:
            break
    try:
        if not output or "Press Ctrl-C to stop" not in output[-1]:
            raise AssertionError("runledger up did not become ready:\n" + "".join(output))
        monitor = re.search(r"monitoring (http://127\.0\.0\.1:\d+)", "".join(output))
        yield data_dir, config_dir, monitor.group(1) if monitor else None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


async def test_up_needs_credentials_and_the_cli_finds_them(up):
    data_dir, config_dir, monitor = up
    endpoint = json.loads((config_dir / "endpoint.json").read_text())
    assert oct((config_dir / "endpoint.json").stat().st_mode & 0o777) == "0o600"
    assert set(endpoint["nats_users"]) == {"service", "client", "analyst", "task_worker", "admin"}
    assert all(u["password"] for u in endpoint["nats_users"].values())
    for name in ("credentials.json", "nats.conf"):
        assert oct((data_dir / name).stat().st_mode & 0o777) == "0o600", name
    config = (data_dir / "nats.conf").read_text()
    assert "sync_interval: always" in config
    assert json.loads((data_dir / "credentials.json").read_text()) == endpoint["nats_users"]
    # ... and the running server took it: JetStream syncs every write (its /varz says so).
    assert monitor, "up printed no monitoring URL"
    with urllib.request.urlopen(f"{monitor}/varz", timeout=5) as r:
        assert json.load(r)["jetstream"]["config"]["sync_always"] is True

    # No flags, no environment: the client credentials from the endpoint file.
    made = _cli(config_dir, "work-pool", "create", "authed", "--type", "process", "--json")
    assert made.returncode == 0, made.stderr
    listed = _cli(config_dir, "work-pool", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "authed" in [p["name"] for p in json.loads(listed.stdout)]
    # `events` reads the log with the analyst's.
    events = _cli(config_dir, "events", "--aggregate", "work_pool")
    assert events.returncode == 0, events.stderr
    assert any(json.loads(line)["type"] == "WorkPoolCreated" for line in events.stdout.splitlines())
    follower = subprocess.Popen([*CLI, "events", "--follow"], env=_env(config_dir), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)  # its start-up, then a poll or more
    finally:
        follower.send_signal(signal.SIGINT)
        followed, followed_err = follower.communicate(timeout=30)
    assert any(json.loads(line)["type"] == "WorkPoolCreated" for line in followed.splitlines()), followed_err
    verified = _cli(config_dir, "verify")  # a rebuild from the log, compared with the live read models
    assert verified.returncode == 0, verified.stdout + verified.stderr
    replayed = _cli(config_dir, "replay", "--quiet")
    assert replayed.returncode == 0, replayed.stderr

    # None of it needed anything its role lacks.
    log = (data_dir / "nats" / "nats-server.log").read_text(errors="replace")
    assert not [line for line in log.splitlines() if "Publish Violation" in line or "Subscription Violation" in line]

    # Anyone else is refused.
    with pytest.raises(nats.errors.Error):
        await nats.connect(endpoint["nats_url"], allow_reconnect=False, connect_timeout=3)
    client = endpoint["nats_users"]["client"]
    with pytest.raises(nats.errors.Error):
        await nats.connect(endpoint["nats_url"], user=client["user"], password="not-" + client["password"],
                           allow_reconnect=False, connect_timeout=3)
