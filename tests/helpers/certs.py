"""A small test PKI made with the openssl command: a CA, server and client certificates it signed (for
127.0.0.1), and a second CA with its own client certificate that the first CA's holders must not trust."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LEAF_EXTENSIONS = ("subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n")
LOCAL_NAMES = "IP:127.0.0.1,DNS:localhost"


@dataclass(frozen=True)
class Pki:
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_ca_key: Path
    other_client_cert: Path
    other_client_key: Path
    elsewhere_cert: Path  # signed by the hospital CA for another host name (pacs.invalid), not 127.0.0.1
    elsewhere_key: Path


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, crt = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt, "-days", "90",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return crt, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], names: str = LOCAL_NAMES) -> tuple[Path, Path]:
    key, csr, crt, ext = (folder / f"{name}{s}" for s in (".key", ".csr", ".crt", ".ext"))
    ext.write_text(LEAF_EXTENSIONS.format(names=names), encoding="ascii")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-out", crt,
             "-days", "90", "-extfile", ext)
    return crt, key


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca, other = _ca(folder, "hospital-ca"), _ca(folder, "other-ca")
    server, client, stranger = _leaf(folder, "node", ca), _leaf(folder, "pacs", ca), _leaf(folder, "stranger", other)
    elsewhere = _leaf(folder, "elsewhere", ca, "DNS:pacs.invalid")
    return Pki(ca=ca[0], ca_key=ca[1], server_cert=server[0], server_key=server[1], client_cert=client[0], client_key=client[1],
               other_ca=other[0], other_ca_key=other[1], other_client_cert=stranger[0], other_client_key=stranger[1],
               elsewhere_cert=elsewhere[0], elsewhere_key=elsewhere[1])


def make_crl(pki: Pki, folder: Path, revoked: tuple[Path, ...] = (), *, other_ca: bool = False) -> Path:
    """A revocation list of the hospital CA (or of the other CA) naming the certificates ``revoked``."""
    ca, ca_key = (pki.other_ca, pki.other_ca_key) if other_ca else (pki.ca, pki.ca_key)
    db = folder / "ca-db"
    db.mkdir(parents=True)
    (db / "index.txt").write_text("", encoding="ascii")
    (db / "crlnumber").write_text("1000\n", encoding="ascii")
    cnf = folder / "ca.cnf"
    cnf.write_text(f"[ca]\ndefault_ca = c\n[c]\ndatabase = {db / 'index.txt'}\ncrlnumber = {db / 'crlnumber'}\n"
                   f"default_md = sha256\ndefault_crl_days = 30\ncertificate = {ca}\nprivate_key = {ca_key}\n",
                   encoding="ascii")
    for cert in revoked:
        _openssl("ca", "-config", cnf, "-revoke", cert)
    crl = folder / "hospital-ca.crl"
    _openssl("ca", "-config", cnf, "-gencrl", "-out", crl)
    return crl
