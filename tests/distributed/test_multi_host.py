"""The multi-host recipe on loopback (docs/scaling.md, "Ranks on one host, workers on
another"): the workers listen on TCP with TLS and a token, as on a host of their own; two
``torchrun`` ranks reach them through a TCP address template, over TLS, with the token,
tensors as inline bytes in the gRPC messages (what a rank on another host gets, since it
cannot map the worker's shared memory).
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from support.certs import make_certificates

from torch_jax_interop._launch import WorkerGroup

pytestmark = pytest.mark.slow  # two workers and a two-rank torchrun job: ~30 s here


def torchrun(nproc: int) -> list[str]:
    """``torchrun`` on one host, its rendezvous on a port of 127.0.0.1 it picks itself."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
            f"--rdzv-id={uuid.uuid4().hex}", "--max-restarts=0"]


def _free_port_pair() -> str:
    """A prefix P such that ports P0 and P1 are free on 127.0.0.1 (for the template
    ``127.0.0.1:P{local_rank}``)."""
    for _ in range(100):
        prefix = str(random.randint(2000, 6000))
        sockets = []
        try:
            for rank in range(2):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", int(f"{prefix}{rank}")))
            return prefix
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no pair of free ports found")


def test_ranks_reach_their_workers_over_tcp_with_tls_and_the_token() -> None:
    directory = Path(tempfile.mkdtemp(prefix="tji", dir="/tmp"))
    try:
        try:
            certs = make_certificates(str(directory))
        except FileNotFoundError as error:
            pytest.skip(str(error))
        token = secrets.token_hex(16)
        template = f"127.0.0.1:{_free_port_pair()}{{local_rank}}"
        env = {**os.environ, "TORCH_JAX_INTEROP_TOKEN": token, "OMP_NUM_THREADS": "1"}
        log = (directory / "workers.log").open("wb")
        # the host of the workers: what `torch-jax-interop worker --ranks 2 --listen
        # TEMPLATE --tls-cert ... --tls-key ...` runs there
        group = WorkerGroup(template, 2, ["--function",
                                          "mlp=torch_jax_interop.examples.mlp:apply",
                                          "--tls-cert", certs.server_cert,
                                          "--tls-key", certs.server_key, "--grace", "5"],
                            env=env, stdout=log, stop_timeout=20)
        try:
            group.start()
            # the host of the trainers
            process = subprocess.Popen(
                [*torchrun(2), "-m", "torch_jax_interop.demo.ddp", "--address", template,
                 "--steps", "3", "--transport", "inline", "--tls-ca", certs.ca],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env)
            try:
                output, _ = process.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                output, _ = process.communicate()
            text = output.decode(errors="replace")
            assert process.returncode == 0, text[-6000:]
            for rank in range(2):
                address = template.format(local_rank=rank)
                assert f"rank {rank}/2 (pid " in text and f"worker {address}; transport: " \
                    "inline" in text, text[-3000:]
            assert "data-parallel training: loss " in text, text[-3000:]
        finally:
            codes = group.stop()
            log.close()
        assert codes == [0, 0], (directory / "workers.log").read_text()
        assert "over TLS" in (directory / "workers.log").read_text()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_rank_without_the_token_is_refused(tmp_path: Path) -> None:
    """The same workers refuse a trainer that lacks the token, saying so."""
    certs = make_certificates(str(tmp_path)) if shutil.which("openssl") else None
    if certs is None:
        pytest.skip("the openssl command is needed to make test certificates")
    env = {**os.environ, "TORCH_JAX_INTEROP_TOKEN": secrets.token_hex(16)}
    group = WorkerGroup("127.0.0.1:0", 1, ["--function",
                                           "mlp=torch_jax_interop.examples.mlp:apply",
                                           "--tls-cert", certs.server_cert,
                                           "--tls-key", certs.server_key, "--grace", "5"],
                        env=env, stdout=subprocess.DEVNULL, stop_timeout=20)
    try:
        group.start()
        (address,) = group.bound[0]
        code = ("from torch_jax_interop.client import TlsConfig, connect\n"
                f"connect({address!r}, tls=TlsConfig(ca_file={certs.ca!r}), timeout=30)\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=120,
                                env={k: v for k, v in os.environ.items()
                                     if k != "TORCH_JAX_INTEROP_TOKEN"})
        assert result.returncode != 0
        assert "token" in result.stderr, result.stderr[-2000:]
    finally:
        assert group.stop() == [0]
