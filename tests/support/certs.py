"""Test certificates made at test time with the ``openssl`` command (no key is checked in):
a CA, a worker certificate for 127.0.0.1 / localhost signed by it, a client certificate
signed by it, and a second, unrelated CA."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Certificates:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(directory: str, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


def _signed(directory: str, name: str, ca: str, extensions: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=directory)
    with open(os.path.join(directory, f"{name}.ext"), "w") as f:
        f.write(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
             f"{name}.ext", cwd=directory)


def make_certificates(directory: str) -> Certificates:
    """Write the certificates into ``directory``; skip-worthy ``FileNotFoundError`` when
    there is no ``openssl`` command."""
    if shutil.which("openssl") is None:
        raise FileNotFoundError("the openssl command is needed to make test certificates")
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    _signed(directory, "worker", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "extendedKeyUsage=serverAuth\n")
    _signed(directory, "client", "ca", "extendedKeyUsage=clientAuth\n")

    def path(name: str) -> str:
        return os.path.join(directory, name)

    return Certificates(ca=path("ca.pem"), server_cert=path("worker.pem"),
                        server_key=path("worker.key"), client_cert=path("client.pem"),
                        client_key=path("client.key"), other_ca=path("other-ca.pem"))
