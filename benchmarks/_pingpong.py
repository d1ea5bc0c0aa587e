"""The other end of the ping-pong floors (``python -m benchmarks._pingpong KIND FD FD``):
answers every ping at once, until its parent closes the descriptors or kills it.

``eventfd PING PONG``: waits on eventfd PING, then signals eventfd PONG.
``socketpair SOCK NBYTES``: reads NBYTES from the socket, writes them back.
Imports nothing but the standard library, so that the floor is Python's own.
"""

from __future__ import annotations

import os
import socket
import sys


def main(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "eventfd":
        ping, pong = int(argv[1]), int(argv[2])
        while True:
            os.eventfd_read(ping)
            os.eventfd_write(pong, 1)
    elif kind == "socketpair":
        sock = socket.socket(fileno=int(argv[1]))
        nbytes = int(argv[2])
        buffer = bytearray(nbytes)
        while True:
            got = sock.recv_into(buffer, nbytes, socket.MSG_WAITALL)
            if got == 0:
                return
            sock.sendall(buffer)
    else:
        raise SystemExit(f"unknown ping-pong kind {kind!r}: eventfd or socketpair")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (OSError, KeyboardInterrupt):
        pass
