"""`runledger up` takes the NATS ports of its last run in a data directory again, so that the
task workers and clients of that run, which reconnect to the address they were given, keep
working across its restart; a port another process took meanwhile is left for a free one, and
said."""

from __future__ import annotations

import json
import socket

from runledger.cli.service import PORTS_FILE, _keep_ports, _ports_of_last_run
from runledger.infra.embedded import free_port


def test_the_ports_of_the_last_run_are_taken_again_when_free(tmp_path):
    assert _ports_of_last_run(tmp_path) == (0, 0, None)  # no last run: free ones
    nats_port, monitor_port = free_port(), free_port()
    _keep_ports(tmp_path, nats_port, monitor_port)
    assert _ports_of_last_run(tmp_path) == (nats_port, monitor_port, None)


def test_a_port_taken_meanwhile_is_left_and_named(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        monitor_port = free_port()
        _keep_ports(tmp_path, taken, monitor_port)
        assert _ports_of_last_run(tmp_path) == (0, monitor_port, taken)


def test_a_damaged_record_means_free_ports(tmp_path):
    for text in ("", "{", json.dumps({"nats": "x"}), json.dumps({"nats": 70000, "monitor": 70001}), "[]"):
        (tmp_path / PORTS_FILE).write_text(text)
        nats_port, monitor_port, _ = _ports_of_last_run(tmp_path)
        assert (nats_port, monitor_port) == (0, 0), text
