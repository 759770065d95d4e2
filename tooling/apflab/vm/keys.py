"""Per-run SSH client keys and pinned host keys.

Client keys are generated for every run (ed25519, never written outside the
run's 0700 directory, never committed).  Host keys are generated when an image
is built and pinned by the client: an unknown host key is refused.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from apflab.errors import UsageError


@dataclass(frozen=True)
class ClientKey:
    """A private key on disk and its public ``authorized_keys`` line."""

    path: Path
    public_line: str

    def load(self) -> paramiko.PKey:
        return paramiko.Ed25519Key.from_private_key_file(str(self.path))


def generate_client_key(directory: Path, comment: str = "apflab") -> ClientKey:
    """Write a fresh ed25519 key pair into ``directory`` (which must be private)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path = directory / "id_ed25519"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    line = f"{public.decode()} {comment}"
    (directory / "id_ed25519.pub").write_text(line + "\n")
    return ClientKey(path, line)


def parse_public_key(line: str) -> paramiko.PKey:
    """Turn an OpenSSH public key line (``type base64 [comment]``) into a PKey."""
    parts = line.split()
    if len(parts) < 2:
        raise UsageError(f"not an OpenSSH public key line: {line[:60]!r}")
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except (ValueError, paramiko.SSHException) as err:
        raise UsageError(f"cannot parse public key {parts[0]}: {err}") from err
