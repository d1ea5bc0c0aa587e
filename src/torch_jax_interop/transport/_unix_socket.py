"""Checks that a unix socket reaches the worker's user and nobody else. No framework.

Note [Whom a unix socket reaches]
=================================

On a unix socket the trusted peers are the processes of one uid (the token is for TCP):
the worker's socket file is 0600, so only its user can connect. That holds only if no other
user can *replace* the socket: whoever can write its directory can unlink the worker's
socket and bind their own under the same name, then receive the client's tensors and
return forged outputs. ``mkdir -p -m 0700 /tmp/tji`` does nothing to a directory another
user made first. So:

* the worker refuses to listen in a directory that another user owns or that group or
  others can write (:func:`check_socket_directory`);
* the client, before it sends anything, checks the same of the directory and that the
  socket file is a socket owned by its own uid or root (:func:`check_socket_path`);
* abstract sockets (``unix-abstract:NAME``) have no file, no owner and no permissions: any
  local user can connect to one, or bind the name first and pose as the worker, and gRPC
  Python does not expose the peer's credentials (``SO_PEERCRED``). Neither side can check
  the other, so both refuse the scheme (:func:`refuse_abstract`); use ``unix:///path`` in
  a private directory, or TCP with the token.

Root is trusted (it can read any process's memory anyway); the checks use the directory
as it resolves now (``realpath``), so a symbolic link in the path is followed to the
directory that would really hold the socket.
"""

from __future__ import annotations

import os
import stat

from .._errors import UntrustedSocketError

ABSTRACT_SCHEME = "unix-abstract:"
"""gRPC's scheme for Linux abstract-namespace unix sockets (refused, see the note)."""


def refuse_abstract(address: str) -> None:
    """Raise :class:`UntrustedSocketError` for a ``unix-abstract:`` address."""
    if address.startswith(ABSTRACT_SCHEME):
        raise UntrustedSocketError(
            f"refusing `{address}`: an abstract unix socket has no owner and no permissions, "
            "so any local user could connect to it or pose as the worker (see Note [Whom a "
            "unix socket reaches] in transport/_unix_socket.py). Use a socket file in a "
            "private directory (`unix:///run/user/$UID/tji/worker.sock`, or a directory "
            "made with `mkdir -m 0700`), or TCP with a token"
        )


def unix_socket_path(address: str) -> str | None:
    """The file path of a ``unix:`` address (``unix:///abs``, ``unix:/abs``, ``unix:rel``),
    or None for any other address."""
    if address.startswith("unix://"):
        return address[len("unix://"):]
    if address.startswith("unix:"):
        return address[len("unix:"):]
    return None


def _trusted_uid(uid: int) -> bool:
    return uid in (os.getuid(), 0)


def check_socket_directory(socket_path: str) -> None:
    """Raise :class:`UntrustedSocketError` unless the directory that holds ``socket_path``
    belongs to this uid (or root) and neither group nor others can write it."""
    directory = os.path.realpath(os.path.dirname(os.path.abspath(socket_path)))
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise UntrustedSocketError(
            f"no unix socket at `{socket_path}`: its directory `{directory}` does not exist. "
            f"Start the worker there, or create the directory with `mkdir -m 0700 {directory}`"
        ) from None
    problem = None
    if not _trusted_uid(st.st_uid):
        problem = (f"it belongs to uid {st.st_uid}, not to this process's uid {os.getuid()} "
                   "(or root)")
    elif st.st_mode & 0o022:
        problem = (f"its mode is {stat.S_IMODE(st.st_mode):04o}: group or others can write it, "
                   "so they could replace the socket")
    if problem is not None:
        raise UntrustedSocketError(
            f"refusing the unix socket `{socket_path}`: its directory `{directory}` is not "
            f"private ({problem}). Another user could swap the socket, receive the tensors and "
            f"return forged outputs. Fix: use a directory you own that only you can write "
            f"(`mkdir -m 0700 DIR`, or `chmod go-w {directory}` if it is yours), e.g. "
            "`$XDG_RUNTIME_DIR/tji`"
        )


def check_socket_path(socket_path: str) -> None:
    """The client's check before it sends anything: the directory passes
    :func:`check_socket_directory`, and the socket file is a socket owned by this uid or
    root. A missing socket passes (connecting will then fail with its own error)."""
    check_socket_directory(socket_path)
    try:
        st = os.lstat(socket_path)
    except FileNotFoundError:
        return
    problem = None
    if not stat.S_ISSOCK(st.st_mode):
        problem = "it is not a socket"
    elif not _trusted_uid(st.st_uid):
        problem = (f"it belongs to uid {st.st_uid}, not to this process's uid {os.getuid()} "
                   "(or root)")
    if problem is not None:
        raise UntrustedSocketError(
            f"refusing the unix socket `{socket_path}`: {problem}, so it is not the worker of "
            "this user. Run the worker as your user, in a directory only you can write"
        )
