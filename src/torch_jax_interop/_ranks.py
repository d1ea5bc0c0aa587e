"""Worker addresses per rank: one address template serves every rank of a ``torchrun`` job.

``unix:///run/tji/worker-{local_rank}.sock`` names one worker per local rank. The trainer's
ranks fill it from the variables ``torchrun`` sets (``connect()`` does this for any address
with a ``{field}``), and the launcher (``torch-jax-interop workers --ranks N``) and the
health check fill it for ranks ``0 .. N-1``. Imports no framework.
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping

RANK_FIELDS: dict[str, str] = {
    "rank": "RANK",
    "local_rank": "LOCAL_RANK",
    "world_size": "WORLD_SIZE",
    "local_world_size": "LOCAL_WORLD_SIZE",
}
"""Template fields and the environment variables ``torchrun`` sets for them in each rank."""

LAUNCHER_FIELDS: tuple[str, ...] = ("local_rank", "local_world_size")
"""The fields a launcher on one host can fill: it starts the workers of this host's ranks,
and knows nothing of other hosts (``{rank}`` would be wrong on every host but the first)."""


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names in ``template``, in order; ``[]`` for a plain address.

    Raises ``ValueError`` for a field other than those of ``RANK_FIELDS``, or for braces
    that do not form a field (``{{`` and ``}}`` stand for literal braces, as in
    ``str.format``).
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"bad address template `{template}`: {error}") from None
    fields = [name for _, name, _, _ in parsed if name is not None]
    unknown = [name for name in fields if name not in RANK_FIELDS]
    if unknown:
        raise ValueError(
            f"address template `{template}` names `{{{unknown[0]}}}`; the fields are "
            + ", ".join(f"{{{f}}}" for f in RANK_FIELDS)
            + " (e.g. unix:///run/tji/worker-{local_rank}.sock)"
        )
    return fields


def is_rank_template(address: str) -> bool:
    """Whether ``address`` has ``{field}`` s to fill (``template_fields`` raises for bad ones)."""
    return bool(template_fields(address))


def rank_address(
    template: str,
    *,
    rank: int | None = None,
    local_rank: int | None = None,
    world_size: int | None = None,
    local_world_size: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The address of this rank's worker: ``template`` with its ``{field}`` s filled in.

    Each field comes from the keyword argument of the same name or else from the variable
    ``torchrun`` sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``; read
    from ``environ``, by default ``os.environ``). A plain address comes back unchanged; ``{{`` and
    ``}}`` stand for literal braces, as in ``str.format``.

    Example: under ``torchrun --nproc_per_node=2``, rank 1 gets
    ``rank_address("unix:///run/tji/worker-{local_rank}.sock")`` ==
    ``"unix:///run/tji/worker-1.sock"``.

    Raises:
        ValueError: an unknown field, or a field whose variable is unset or not an integer
            (the message names the variable and how to set it).
    """
    fields = template_fields(template)
    if "{" not in template and "}" not in template:
        return template
    given = {"rank": rank, "local_rank": local_rank, "world_size": world_size,
             "local_world_size": local_world_size}
    env = os.environ if environ is None else environ
    values: dict[str, int] = {}
    for field in fields:
        value = given[field]
        if value is None:
            variable = RANK_FIELDS[field]
            text = env.get(variable)
            if text is None:
                raise ValueError(
                    f"address template `{template}` names `{{{field}}}`, but ${variable} is "
                    f"not set: launch with torchrun (it sets {variable} in each rank) or pass "
                    f"{field}= explicitly"
                )
            try:
                value = int(text)
            except ValueError:
                raise ValueError(
                    f"${variable} is `{text}`, not an integer, so `{{{field}}}` in `{template}` "
                    "cannot be filled"
                ) from None
        values[field] = value
    return template.format(**values)


def local_rank_addresses(template: str, count: int) -> list[str]:
    """The addresses of ``count`` local ranks' workers (``{local_rank}`` = 0 .. count-1).

    What the launcher binds and what the health check probes: the same template the
    trainer's ranks fill with ``rank_address``. Raises ``ValueError`` when ``count`` is
    below 1, when ``template`` names a field a launcher cannot know (``{rank}``,
    ``{world_size}``: see ``LAUNCHER_FIELDS``), or when it lacks ``{local_rank}`` although
    ``count`` > 1 (every worker would get the same address).
    """
    if count < 1:
        raise ValueError(f"the number of ranks must be at least 1, got {count}")
    fields = template_fields(template)
    foreign = [f for f in fields if f not in LAUNCHER_FIELDS]
    if foreign:
        raise ValueError(
            f"address template `{template}` names `{{{foreign[0]}}}`, which a launcher on one "
            "host cannot fill; workers are per host, so use {local_rank} (e.g. "
            "unix:///run/tji/worker-{local_rank}.sock) in the workers' and the trainer's "
            "template"
        )
    if count > 1 and "local_rank" not in fields:
        raise ValueError(
            f"{count} workers need {count} addresses, but `{template}` has no `{{local_rank}}` "
            "to tell them apart (e.g. unix:///run/tji/worker-{local_rank}.sock)"
        )
    return [template.format(local_rank=i, local_world_size=count) for i in range(count)]


__all__ = [
    "LAUNCHER_FIELDS",
    "RANK_FIELDS",
    "is_rank_template",
    "local_rank_addresses",
    "rank_address",
    "template_fields",
]
