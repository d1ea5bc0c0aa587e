"""The worker on the network (issue 13, findings 6 and 7), with real worker processes:

* TLS on TCP: a TLS call works; a plaintext client, a client trusting another CA, and (with
  ``--tls-client-ca``) a client without a certificate are refused at the handshake; the
  token is still required over TLS; tokens come from files; a non-loopback TCP listener
  without TLS refuses to start (exit status 2) unless ``--insecure``.
* Unauthenticated peers cost little: large requests without the token are refused before
  their bodies are buffered (the worker's RSS stays bounded), and a flood of idle TCP
  connections neither takes the process's descriptors (the unix socket keeps serving) nor
  stays: connections that do not finish their handshake are closed.

Certificates are made at test time (``support/certs.py``). Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
import torch
from support.certs import Certificates, make_certificates
from support.workers import (
    FUNCTIONS,
    RSS_STEADY_ENV,
    TESTS,
    WorkerProcess,
    rss_mib,
    start_worker,
    stop_worker,
)

from torch_jax_interop._wire import SERVICE_NAME
from torch_jax_interop.client import (
    AuthenticationError,
    TlsConfig,
    WorkerUnavailableError,
    connect,
)
from torch_jax_interop.proto.v1 import interop_pb2 as pb

TOKEN = "network-test-token"


@pytest.fixture(scope="module")
def certs() -> Iterator[Certificates]:
    with tempfile.TemporaryDirectory(prefix="tjicerts") as directory:
        try:
            yield make_certificates(directory)
        except FileNotFoundError as error:
            pytest.skip(str(error))


@pytest.fixture(scope="module")
def token_file() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="tjitok") as directory:
        path = os.path.join(directory, "token")
        with open(path, "w") as f:
            f.write(TOKEN + "\n")  # as `echo TOKEN > /run/secrets/...` writes it
        os.chmod(path, 0o600)
        yield path


def _tls_worker(certs: Certificates, token_file: str, *extra: str) -> Iterator[WorkerProcess]:
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        worker = start_worker(tmp, tcp=True, extra=[
            "--token-file", token_file, "--tls-cert", certs.server_cert,
            "--tls-key", certs.server_key, *extra])
        try:
            yield worker
        finally:
            assert stop_worker(worker) == 0, worker.log()


@pytest.fixture(scope="module")
def tls_worker(certs: Certificates, token_file: str) -> Iterator[WorkerProcess]:
    yield from _tls_worker(certs, token_file)


@pytest.fixture(scope="module")
def mtls_worker(certs: Certificates, token_file: str) -> Iterator[WorkerProcess]:
    yield from _tls_worker(certs, token_file, "--tls-client-ca", certs.ca)


def test_tls_call_works(tls_worker: WorkerProcess, certs: Certificates,
                        token_file: str) -> None:
    assert tls_worker.tcp_address is not None
    with connect(tls_worker.tcp_address, tls=TlsConfig(ca_file=certs.ca),
                 token_file=token_file, transport="inline", timeout=30) as worker:
        assert torch.equal(worker.function("add_one")(torch.zeros(3)), torch.ones(3))
    port = tls_worker.tcp_address.rsplit(":", 1)[1]
    # The certificate names localhost too: the override checks the worker against it.
    with connect(f"127.0.0.1:{port}", tls=TlsConfig(ca_file=certs.ca, server_name="localhost"),
                 token=TOKEN, transport="inline", timeout=30) as worker:
        assert "add_one" in {f.name for f in worker.functions()}


def test_plaintext_client_is_refused(tls_worker: WorkerProcess) -> None:
    assert tls_worker.tcp_address is not None
    with pytest.raises(WorkerUnavailableError, match="no worker answered"):
        connect(tls_worker.tcp_address, token=TOKEN, transport="inline", timeout=3)
    assert tls_worker.process.poll() is None


def test_client_trusting_another_ca_is_refused(tls_worker: WorkerProcess,
                                                certs: Certificates) -> None:
    assert tls_worker.tcp_address is not None
    with pytest.raises(WorkerUnavailableError, match="over TLS: check .* the CA"):
        connect(tls_worker.tcp_address, tls=TlsConfig(ca_file=certs.other_ca), token=TOKEN,
                transport="inline", timeout=3)


def test_token_is_still_required_over_tls(tls_worker: WorkerProcess,
                                          certs: Certificates) -> None:
    assert tls_worker.tcp_address is not None
    for token in (None, "wrong-token"):
        with pytest.raises(AuthenticationError, match="missing or wrong token"):
            connect(tls_worker.tcp_address, tls=TlsConfig(ca_file=certs.ca), token=token,
                    transport="inline", timeout=10)


def test_mtls_refuses_a_client_without_a_certificate(mtls_worker: WorkerProcess,
                                                     certs: Certificates) -> None:
    assert mtls_worker.tcp_address is not None
    with pytest.raises(WorkerUnavailableError, match="client certificate"):
        connect(mtls_worker.tcp_address, tls=TlsConfig(ca_file=certs.ca), token=TOKEN,
                transport="inline", timeout=3)
    with connect(mtls_worker.tcp_address, token=TOKEN, transport="inline", timeout=30,
                 tls=TlsConfig(ca_file=certs.ca, cert_file=certs.client_cert,
                               key_file=certs.client_key)) as worker:
        assert torch.equal(worker.function("add_one")(torch.zeros(2)), torch.ones(2))


def _worker_command(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TORCH_JAX_INTEROP_TOKEN": TOKEN,
           "PYTHONPATH": os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run(
        [sys.executable, "-m", "torch_jax_interop.server", "--function",
         f"add_one={FUNCTIONS['add_one']}", *args],
        env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0"])
def test_non_loopback_tcp_without_tls_refuses_to_start(address: str) -> None:
    # Only the refusal is checked: nothing listens, no traffic leaves the host.
    result = _worker_command("--listen", address)
    assert result.returncode == 2, result.stderr
    assert "--insecure" in result.stderr and "--tls-cert" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_tls_and_token_file_options_exit_with_2(certs: Certificates) -> None:
    for args, message in (
            (["--tls-cert", certs.server_cert], "--tls-cert and --tls-key together"),
            (["--tls-client-ca", certs.ca], "--tls-client-ca needs --tls-cert"),
            (["--tls-cert", "/nonexistent.pem", "--tls-key", certs.server_key],
             "cannot read the TLS certificate file `/nonexistent.pem`"),
            (["--token-file", "/nonexistent-token"], "cannot read the token file")):
        result = _worker_command("--listen", "127.0.0.1:0", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)


def test_connect_token_file_errors(token_file: str) -> None:
    with pytest.raises(ValueError, match="token= or token_file="):
        connect("127.0.0.1:1", token="x", token_file=token_file)
    with pytest.raises(ValueError, match="cannot read the token file `/nonexistent-token`"):
        connect("127.0.0.1:1", token_file="/nonexistent-token")
    with pytest.raises(ValueError, match="tls= is for TCP addresses"):
        connect("unix:///tmp/none.sock", tls=TlsConfig())


# -- unauthenticated peers cost little ----------------------------------------------------


def test_large_unauthenticated_requests_are_refused_before_they_are_buffered(
        short_tmp: str) -> None:
    worker = start_worker(short_tmp, tcp=True, token=TOKEN, env=RSS_STEADY_ENV)
    try:
        assert worker.tcp_address is not None
        request = pb.CallRequest(session_id="x", function="identity")
        leaf = request.args.leaves.add()
        leaf.dtype, leaf.inline_data = pb.DTYPE_UINT8, b"\x01" * (75 << 20)
        leaf.shape.append(75 << 20)
        payload = request.SerializeToString()
        del request, leaf
        before = rss_mib(worker.process.pid)
        with grpc.insecure_channel(worker.tcp_address, options=[
                ("grpc.max_send_message_length", 100 << 20)]) as channel:
            call = channel.unary_unary(f"/{SERVICE_NAME}/Call")
            with futures.ThreadPoolExecutor(8) as pool:
                attempts = [pool.submit(call, payload, timeout=60) for _ in range(8)]
                for attempt in attempts:
                    with pytest.raises(grpc.RpcError) as caught:
                        attempt.result()
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        time.sleep(0.5)
        grown = rss_mib(worker.process.pid) - before
        # Before the fix: ~100 MiB per refused request (8 x 75 MiB requests: +790 MiB).
        assert grown < 64, f"worker RSS grew {grown:.0f} MiB for 8 refused requests"
        with connect(worker.address, transport="inline", timeout=30) as client:
            assert torch.equal(client.function("add_one")(torch.zeros(2)), torch.ones(2))
    finally:
        assert stop_worker(worker) == 0, worker.log()


def _open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _closed_by_peer(sock: socket.socket) -> bool:
    """Reads what the worker sent (its HTTP/2 settings); True once it closed the socket."""
    sock.settimeout(0.0)
    try:
        while sock.recv(65536):
            pass
        return True  # end of stream
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset


def test_idle_tcp_flood_leaves_the_unix_socket_serving(short_tmp: str) -> None:
    cap, flood = 32, 300
    worker = start_worker(short_tmp, tcp=True, token=TOKEN, extra=[
        "--max-connections", str(cap), "--handshake-timeout", "2"])
    sockets: list[socket.socket] = []
    try:
        assert worker.tcp_address is not None
        pid = worker.process.pid
        # A small descriptor limit, as on hosts with `ulimit -n 1024`, but the flood is
        # bigger than what is left of it.
        spare = 150
        limit = _open_descriptors(pid) + spare
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
        host, port = worker.tcp_address.rsplit(":", 1)
        for _ in range(flood):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sockets.append(sock)
        time.sleep(0.5)
        held = _open_descriptors(pid)
        assert held < limit - 50, f"the worker holds {held} descriptors of {limit}"
        with connect(worker.address, transport="inline", timeout=10) as client:
            assert torch.equal(client.function("add_one")(torch.zeros(2)), torch.ones(2))
        # Connections that never finish their handshake are closed (2 s here).
        deadline = time.monotonic() + 15
        open_ones = list(sockets)
        while open_ones and time.monotonic() < deadline:
            open_ones = [sock for sock in open_ones if not _closed_by_peer(sock)]
            time.sleep(0.2)
        assert not open_ones, f"{len(open_ones)} idle connections are still open"
    finally:
        for sock in sockets:
            sock.close()
        assert stop_worker(worker) == 0, worker.log()


def test_health_command_over_tls(mtls_worker: WorkerProcess, certs: Certificates) -> None:
    assert mtls_worker.tcp_address is not None
    base = [sys.executable, "-m", "torch_jax_interop.cli", "health", mtls_worker.tcp_address,
            "--timeout", "5", "--tls-ca", certs.ca]
    ok = subprocess.run([*base, "--tls-cert", certs.client_cert, "--tls-key",
                         certs.client_key], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
    refused = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "unreachable" in refused.stderr


@pytest.mark.parametrize("address,loopback", [
    ("127.0.0.1:0", True), ("127.1.2.3:5005", True), ("localhost:5005", True),
    ("[::1]:5005", True), ("0.0.0.0:5005", False), ("[::]:0", False),
    ("10.0.0.7:5005", False), ("jax-worker:5005", False)])
def test_which_addresses_count_as_the_network(address: str, loopback: bool) -> None:
    from torch_jax_interop._tls import check_listen_security, is_loopback

    assert is_loopback(address) is loopback
    if loopback:
        check_listen_security([address], tls=False, insecure=False)
    else:
        with pytest.raises(ValueError, match="--insecure"):
            check_listen_security([address], tls=False, insecure=False)
        check_listen_security([address], tls=True, insecure=False)
        check_listen_security([address], tls=False, insecure=True)


def test_unix_peers_without_a_token_still_get_full_answers(short_tmp: str) -> None:
    # Tokenless calls go through the check-before-reading handler; on the unix socket they
    # are read and answered as before: decoded leniently, errors mapped to status codes.
    worker = start_worker(short_tmp, tcp=True, token=TOKEN)
    try:
        with grpc.insecure_channel(worker.address) as channel:
            listed = channel.unary_unary(
                f"/{SERVICE_NAME}/ListFunctions",
                response_deserializer=pb.ListFunctionsResponse.FromString)(
                    pb.ListFunctionsRequest().SerializeToString(), timeout=30)
            assert "add_one" in {f.name for f in listed.functions}
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(f"/{SERVICE_NAME}/Call")(b"\xff\xfe garbage", timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid protobuf message" in (caught.value.details() or "")
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(f"/{SERVICE_NAME}/Call")(
                    pb.CallRequest(session_id="nope", function="add_one").SerializeToString(),
                    timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert stop_worker(worker) == 0, worker.log()


def _soft_open_file_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no open-file limit")


def test_worker_raises_its_open_file_limit_to_the_hard_limit(short_tmp: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 512:
        pytest.skip(f"the hard open-file limit ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))  # the worker inherits it
    try:
        worker = start_worker(short_tmp, tcp=True, token=TOKEN)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert _soft_open_file_limit(worker.process.pid) == hard
    finally:
        assert stop_worker(worker) == 0, worker.log()
