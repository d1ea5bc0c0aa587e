"""The client checks whom a unix socket reaches before it sends anything (Note [Whom a unix
socket reaches] in ``transport/_unix_socket.py``), against a real worker."""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator

import pytest
import torch
from support.workers import WorkerProcess, start_worker, stop_worker

from torch_jax_interop.client import connect
from torch_jax_interop.errors import UntrustedSocketError


@pytest.fixture
def private_worker(short_tmp: str) -> Iterator[WorkerProcess]:
    directory = os.path.join(short_tmp, "d")
    os.mkdir(directory, 0o700)
    process = start_worker(directory)
    try:
        yield process
    finally:
        os.chmod(directory, 0o700)
        os.chown(directory, os.getuid(), -1)
        assert stop_worker(process) == 0, process.log()


def test_a_private_socket_is_accepted(private_worker: WorkerProcess) -> None:
    with connect(private_worker.address, timeout=30) as worker:
        assert torch.equal(worker.function("add_one")(torch.zeros(2)), torch.ones(2))


def _needs_root() -> None:
    if os.getuid() != 0:
        pytest.skip("chown to another uid needs root")


@pytest.mark.parametrize("how", ["directory mode 0777", "directory owned by nobody",
                                 "socket owned by nobody"])
def test_a_socket_another_user_could_have_swapped_is_refused(
        private_worker: WorkerProcess, how: str) -> None:
    """Finding 5: the socket's directory was made (or is writable) by another user, or the
    socket itself is another user's: the client refuses before sending a byte."""
    socket_path = private_worker.socket_path
    directory = os.path.dirname(socket_path)
    nobody = pwd.getpwnam("nobody").pw_uid
    if how == "directory mode 0777":
        os.chmod(directory, 0o777)
        message = "is not private \\(its mode is 0777"
    elif how == "directory owned by nobody":
        _needs_root()
        os.chown(directory, nobody, -1)
        message = f"is not private \\(it belongs to uid {nobody}"
    else:
        _needs_root()
        os.chown(socket_path, nobody, -1)
        message = f"belongs to uid {nobody}, not to this process's uid"
    with pytest.raises(UntrustedSocketError, match=message):
        connect(private_worker.address, timeout=30)
    if how == "socket owned by nobody":
        os.chown(socket_path, os.getuid(), -1)


def test_an_abstract_socket_is_refused() -> None:
    """Finding 4, client side: nothing to check on an abstract socket, so nothing is sent."""
    with pytest.raises(UntrustedSocketError, match="abstract unix socket has no owner"):
        connect(f"unix-abstract:tji-test-{os.getpid()}", timeout=5)
