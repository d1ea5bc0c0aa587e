"""TLS and secrets of a TCP connection, both ends: ``TlsConfig``, token files, and the rule
that a worker reachable from the network encrypts its traffic.

Imports grpc, never torch or JAX: the client, the worker and the CLI (which checks the
listen addresses before it starts the worker) all use it.

Note [Who may reach a TCP worker]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A unix socket is guarded by its file mode (the worker's user only). A TCP port is guarded by
the bearer token, which a relay on the path could read in cleartext together with every
tensor byte. So a TCP listener on anything but a loopback address needs TLS (``--tls-cert``
and ``--tls-key``; with ``--tls-client-ca`` also a client certificate, checked during the
handshake, before any request), or ``--insecure`` to say the network is trusted. The token
is required over TLS too: TLS proves who the worker is, the token (or a client certificate
plus the token) who the client is.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

log = logging.getLogger("torch_jax_interop")


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise ValueError(f"cannot read the {what} `{path}`: {error.strerror}; check the path "
                         "and that this user may read it") from None


@dataclass(frozen=True)
class TlsConfig:
    """Certificate files of one end of a TLS connection (PEM files; paths, not contents).

    On the client, ``connect(address, tls=TlsConfig(ca_file=...))``:

    * ``ca_file``: the CA bundle that signed the worker's certificate (``None``: the
      system's trusted roots);
    * ``cert_file`` and ``key_file``: this client's certificate and key, for a worker that
      requires client certificates (mTLS);
    * ``server_name``: the name to check the worker's certificate against, when it differs
      from the host in ``address`` (e.g. connecting by IP to a certificate for a DNS name).

    On the worker (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``):

    * ``cert_file`` and ``key_file``: the worker's certificate chain and key (required);
    * ``ca_file``: when given, every TCP client must present a certificate signed by it
      (mTLS); a client without one is refused during the handshake.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TlsConfig needs cert_file and key_file together (a certificate "
                             "and its private key), or neither")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for the client's channel: verify the worker, show the client cert."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "TLS CA file") if self.ca_file else None,
            private_key=_read(self.key_file, "TLS key file") if self.key_file else None,
            certificate_chain=(_read(self.cert_file, "TLS certificate file")
                               if self.cert_file else None),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        """Channel options that go with ``channel_credentials`` (the name override)."""
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for the worker's TCP ports: its certificate, and the client CA (mTLS)."""
        if self.cert_file is None or self.key_file is None:
            raise ValueError("a TLS worker needs its certificate and key: give --tls-cert "
                             "and --tls-key (PEM files)")
        client_ca = _read(self.ca_file, "TLS client CA file") if self.ca_file else None
        return grpc.ssl_server_credentials(
            [(_read(self.key_file, "TLS key file"),
              _read(self.cert_file, "TLS certificate file"))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


def read_token_file(path: str) -> str:
    """The token stored in ``path`` (e.g. a ``/run/secrets/...`` file), surrounding
    whitespace removed; a ``ValueError`` when the file cannot be read or is empty."""
    try:
        if os.stat(path).st_mode & 0o077:
            log.warning("the token file `%s` can be read by other users: chmod 600 it", path)
    except OSError:
        pass  # _read names the problem
    token = _read(path, "token file").decode("utf-8", errors="strict").strip()
    if not token:
        raise ValueError(f"the token file `{path}` is empty; write the token into it")
    return token


def is_tcp(address: str) -> bool:
    """Whether a listen/connect address is TCP (anything but ``unix:`` and
    ``unix-abstract:``)."""
    return not address.startswith(("unix:", "unix-abstract:"))


def is_loopback(address: str) -> bool:
    """Whether a TCP ``host:port`` address is reachable only from this host
    (``127.0.0.0/8``, ``[::1]``, ``localhost``). ``0.0.0.0`` and every other name count
    as the network."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    for prefix in ("ipv4:", "ipv6:", "dns:///", "dns:"):
        if host.startswith(prefix):
            host = host[len(prefix):]
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen_security(addresses: Iterable[str], *, tls: bool, insecure: bool) -> None:
    """Refuse (``ValueError``) a TCP listener on a non-loopback address without TLS unless
    ``insecure`` (Note [Who may reach a TCP worker])."""
    exposed = [a for a in addresses if is_tcp(a) and not is_loopback(a)]
    if exposed and not tls and not insecure:
        raise ValueError(
            f"`{exposed[0]}` is reachable from the network, and without TLS the token and "
            "every tensor travel in cleartext: give --tls-cert and --tls-key (and "
            "--tls-client-ca to require client certificates), listen on 127.0.0.1 or a "
            "unix:// socket, or pass --insecure if the network is trusted"
        )
