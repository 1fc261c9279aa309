"""Mutual TLS for migration channels.

Both daemons hold a certificate signed by a CA they both trust; the server
side *requires* a client certificate (``CERT_REQUIRED``), so an unauthenticated
peer cannot push a VM into a destination or pull one out of a source. TLS 1.2
is the floor. Each context made here also records the files it was loaded
from (:func:`material_of`): the native bulk streams load the same
certificate, key and CA into OpenSSL inside their threads (native/tls.py),
TLS 1.3 only there. ``make_test_pki(dir)`` builds a throwaway CA plus server and
client certificates with the ``openssl`` command-line tool, for tests and the
demo; production keys come from the operator.
"""
from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

_MATERIAL_ATTR = "livemig_material"


@dataclass(frozen=True)
class TlsMaterial:
    """The files a context was loaded from."""

    cert: str
    key: str
    ca: str


def material_of(ctx: ssl.SSLContext | None) -> TlsMaterial | None:
    """The files ``ctx`` was made from by this module (None for a context
    made elsewhere: its streams then cannot speak TLS natively)."""
    return getattr(ctx, _MATERIAL_ATTR, None)


def peer_cert_of(transport_info) -> bytes | None:
    """The DER certificate the peer presented on a TLS connection
    (``get_extra_info`` of its channel), or None on plain TCP."""
    obj = transport_info("ssl_object")
    return obj.getpeercert(binary_form=True) if obj is not None else None


def _load(ctx: ssl.SSLContext, cert: str | os.PathLike, key: str | os.PathLike,
          ca: str | os.PathLike) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
        ctx.load_verify_locations(cafile=os.fspath(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS material (cert {cert}, key {key}, CA {ca}): "
                          f"{exc}") from exc
    setattr(ctx, _MATERIAL_ATTR, TlsMaterial(os.fspath(cert), os.fspath(key), os.fspath(ca)))
    return ctx


def server_context(cert, key, ca) -> ssl.SSLContext:
    """Server side: presents ``cert``, requires a client cert signed by ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return _load(ctx, cert, key, ca)


def client_context(cert, key, ca, *, check_hostname: bool = True) -> ssl.SSLContext:
    """Client side: presents ``cert``, verifies the server against ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    return _load(ctx, cert, key, ca)


@dataclass(frozen=True)
class TestPKI:
    """Paths of a throwaway CA and the certificates it signed."""

    __test__ = False  # not a pytest test class
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path    # a client cert from another CA: must be refused
    rogue_key: Path

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.server_cert, self.server_key, self.ca_cert)

    def client_context(self) -> ssl.SSLContext:
        return client_context(self.client_cert, self.client_key, self.ca_cert)


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise ConfigError("the openssl command is needed to create test certificates")
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def _issue(directory: Path, name: str, ca: str, *, server: bool, days: int) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN=livemig-{name}", cwd=directory)
    # A daemon presents one certificate as server and as client (it both
    # receives and sends VMs), so the node certificate carries both usages.
    usage = "serverAuth,clientAuth" if server else "clientAuth"
    ext = (f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n"
           "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n")
    (directory / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", str(days), "-out", f"{name}.crt",
             "-extfile", f"{name}.ext", cwd=directory)


def _make_ca(directory: Path, name: str, days: int) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", str(days),
             "-subj", f"/CN=livemig test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


def make_test_pki(directory: str | os.PathLike, *, days: int = 2) -> TestPKI:
    """A CA, a server cert (localhost/127.0.0.1/::1), a client cert, and a
    client cert from an unrelated CA, written into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _make_ca(d, "ca", days)
    _make_ca(d, "rogue-ca", days)
    _issue(d, "server", "ca", server=True, days=days)
    _issue(d, "client", "ca", server=False, days=days)
    _issue(d, "rogue", "rogue-ca", server=False, days=days)
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return TestPKI(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
                   d / "client.key", d / "rogue.crt", d / "rogue.key")
