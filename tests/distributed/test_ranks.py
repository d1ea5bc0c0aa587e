"""Address templates per rank: what ``connect()``, the launcher and the health check fill."""

from __future__ import annotations

import pytest

from torch_jax_interop._ranks import (
    RANK_FIELDS,
    is_rank_template,
    local_rank_addresses,
    rank_address,
    template_fields,
)

TEMPLATE = "unix:///run/tji/worker-{local_rank}.sock"


def test_rank_address_reads_the_variables_torchrun_sets() -> None:
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert rank_address(TEMPLATE, environ=env) == "unix:///run/tji/worker-1.sock"
    assert rank_address("h:{rank}/{world_size}/{local_world_size}", environ=env) == "h:5/8/4"
    assert rank_address("127.0.0.1:5005{local_rank}", environ=env) == "127.0.0.1:50051"
    assert rank_address("w-{local_rank:02d}", environ=env) == "w-01"


def test_explicit_values_win_and_plain_addresses_pass_through() -> None:
    assert rank_address(TEMPLATE, local_rank=3, environ={}) == "unix:///run/tji/worker-3.sock"
    assert rank_address(TEMPLATE, local_rank=0, environ={"LOCAL_RANK": "7"}).endswith("-0.sock")
    for plain in ("unix:///tmp/w.sock", "localhost:50051", "[::1]:50051", "inproc"):
        assert rank_address(plain, environ={}) == plain
        assert not is_rank_template(plain)
    assert rank_address("unix:///tmp/{{odd}}.sock", environ={}) == "unix:///tmp/{odd}.sock"


def test_a_missing_variable_says_how_to_set_it() -> None:
    with pytest.raises(ValueError, match=r"\$LOCAL_RANK is not set: launch with torchrun"):
        rank_address(TEMPLATE, environ={})
    with pytest.raises(ValueError, match=r"\$LOCAL_RANK is `x`, not an integer"):
        rank_address(TEMPLATE, environ={"LOCAL_RANK": "x"})


@pytest.mark.parametrize("bad", ["w-{node}.sock", "w-{0}.sock", "w-{}.sock", "w-{rank.x}"])
def test_unknown_fields_are_refused_with_the_valid_ones(bad: str) -> None:
    with pytest.raises(ValueError, match=r"the fields are \{rank\}, \{local_rank\}"):
        template_fields(bad)


def test_unbalanced_braces_are_refused() -> None:
    with pytest.raises(ValueError, match="bad address template `w-{local_rank.sock`"):
        template_fields("w-{local_rank.sock")


def test_every_field_has_its_torchrun_variable() -> None:
    assert RANK_FIELDS == {"rank": "RANK", "local_rank": "LOCAL_RANK",
                           "world_size": "WORLD_SIZE", "local_world_size": "LOCAL_WORLD_SIZE"}


def test_local_rank_addresses_for_the_launcher() -> None:
    assert local_rank_addresses(TEMPLATE, 3) == [
        "unix:///run/tji/worker-0.sock", "unix:///run/tji/worker-1.sock",
        "unix:///run/tji/worker-2.sock"]
    assert local_rank_addresses("w{local_rank}of{local_world_size}", 2) == ["w0of2", "w1of2"]
    assert local_rank_addresses("unix:///tmp/one.sock", 1) == ["unix:///tmp/one.sock"]


def test_local_rank_addresses_refuses_what_cannot_work() -> None:
    with pytest.raises(ValueError, match=r"names `\{rank\}`, which a launcher on one host"):
        local_rank_addresses("unix:///tmp/w-{rank}.sock", 2)
    with pytest.raises(ValueError, match=r"2 workers need 2 addresses, but .* no `\{local_rank\}`"):
        local_rank_addresses("unix:///tmp/w.sock", 2)
    with pytest.raises(ValueError, match="at least 1, got 0"):
        local_rank_addresses(TEMPLATE, 0)


def test_connect_fills_the_template_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from torch_jax_interop.client import connect

    # No worker listens there: the error names the filled-in address, so it was filled.
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(Exception, match=r"/nonexistent-tji/worker-1\.sock"):
        connect("unix:///nonexistent-tji/worker-{local_rank}.sock", timeout=1)
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(ValueError, match=r"\$LOCAL_RANK is not set"):
        connect("unix:///nonexistent-tji/worker-{local_rank}.sock", timeout=1)
