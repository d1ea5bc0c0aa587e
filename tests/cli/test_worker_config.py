"""``WorkerConfig`` and ``create_server`` as a library uses them: limits below 1 refused,
the metrics address checked, and two workers in one process keeping separate metrics."""

from __future__ import annotations

import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from torch_jax_interop.server import WorkerConfig, create_server, shutdown

LIMITS = ["max_sessions", "max_residuals", "max_residual_bytes", "max_regions",
          "max_tensor_bytes", "max_inline_bytes", "max_leaves", "max_compiled_signatures"]


@pytest.mark.parametrize("name", LIMITS)
@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_limits_below_one_are_refused(name: str, value: object) -> None:
    option = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=rf"WorkerConfig\({name}={value!r}\): must be a whole "
                                         rf"number of at least 1 \(the CLI's {option}\)"):
        WorkerConfig(**{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-1, 100_001, 2.5, True, None])
def test_spin_outside_its_range_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"spin_us=.*: must be a whole number of microseconds "
                                         r"from 0 \(sleep at once\) to 100000"):
        WorkerConfig(spin_us=value)  # type: ignore[arg-type]
    assert WorkerConfig(spin_us=0).spin_us == 0  # 0 is allowed: sleep at once


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        return response.read().decode()


def test_two_workers_in_one_process_keep_their_own_metrics() -> None:
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        servers = []
        try:
            for name in ("first", "second"):
                config = WorkerConfig(metrics_listen="127.0.0.1:0")
                servers.append(create_server({name: "support.served:add_one"},
                                             f"unix://{tmp}/{name}.sock", config=config))
            texts = [_scrape(servicer.metrics_server.address) for _, _, servicer in servers]
            assert 'torch_jax_interop_compile_cache_entries{function="first"}' in texts[0]
            assert 'function="second"' not in texts[0]
            assert 'torch_jax_interop_compile_cache_entries{function="second"}' in texts[1]
            assert 'function="first"' not in texts[1]
        finally:
            addresses = [servicer.metrics_server.address for _, _, servicer in servers]
            for server, _, servicer in servers:
                shutdown(server, servicer, grace=1)
        for address in addresses:  # closed with the worker
            with pytest.raises(urllib.error.URLError):
                _scrape(address)


def test_a_bad_metrics_address_is_refused_before_listening() -> None:
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        with pytest.raises(ValueError, match=r"`9100` is not HOST:PORT; write e\.g\."):
            create_server({"f": "support.served:add_one"}, f"unix://{tmp}/w.sock",
                          config=WorkerConfig(metrics_listen="9100"))
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        try:
            port = taken.getsockname()[1]
            with pytest.raises(OSError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port} "
                                              r"\(--metrics-listen\): Address already in use"):
                create_server({"f": "support.served:add_one"}, f"unix://{tmp}/w.sock",
                              config=WorkerConfig(metrics_listen=f"127.0.0.1:{port}"))
        finally:
            taken.close()
        assert not (Path(tmp) / "w.sock").exists()  # nothing left listening
