"""Is this file an x86 bzImage?  The Linux/x86 boot protocol header, read without booting.

Layout (Documentation/x86/boot.rst): the real-mode setup header starts at 0x1F1 of the
file.  A bzImage has the legacy boot sector signature 0xAA55 at 0x1FE, the magic ``HdrS``
at 0x202, a boot protocol version at 0x206, the LOADED_HIGH bit in ``loadflags`` (0x211),
and (protocol 2.12+) XLF_KERNEL_64 in ``xloadflags`` (0x236) when it is a 64-bit kernel.
``setup_sects`` (0x1F1) and ``syssize`` (0x1F4, 16-byte units) give the size the file must
at least have, so a truncated copy is refused too.  The kernel version string (pointed to by
0x20E) gives the release before anything boots.

:func:`parse_header` is pure (bytes in); :func:`check_bzimage` reads the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from apflab.errors import UsageError

BOOT_FLAG_OFFSET = 0x1FE
BOOT_FLAG = b"\x55\xaa"
HEADER_MAGIC_OFFSET = 0x202
HEADER_MAGIC = b"HdrS"
#: bytes of the file :func:`parse_header` needs (through ``xloadflags`` at 0x236)
HEADER_BYTES = 0x238
#: the version string lives in the setup code; this much of the file is read for it
READ_BYTES = 64 * 1024
#: boot protocol 2.06: the oldest that QEMU's -kernel path and every kernel since 2.6.22 use
MIN_PROTOCOL = (2, 6)
LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01


@dataclass(frozen=True)
class BzImageHeader:
    """What the setup header says.

    :ivar protocol: boot protocol version (major, minor)
    :ivar setup_sects: 512-byte sectors of real-mode setup code after the boot sector
    :ivar syssize: size of the protected-mode code in 16-byte paragraphs
    :ivar x86_64: the kernel has a 64-bit entry point (XLF_KERNEL_64)
    :ivar version: the kernel version string (``6.1.192-apflab (user@host) #1 SMP ...``)
        when it lies within the bytes given, else None
    """

    protocol: tuple[int, int]
    setup_sects: int
    syssize: int
    x86_64: bool
    version: str | None

    @property
    def min_file_size(self) -> int:
        """Bytes a complete file has at least: boot sector + setup + protected-mode code."""
        return (self.setup_sects + 1) * 512 + self.syssize * 16

    @property
    def release(self) -> str | None:
        """The release (``uname -r``): the first word of the version string."""
        return self.version.split()[0] if self.version else None


def parse_header(data: bytes) -> BzImageHeader:
    """Parse the setup header from the first bytes of a file.

    :raises ValueError: with the reason, when ``data`` is not a bzImage's start
    """
    if len(data) < HEADER_BYTES:
        raise ValueError(f"only {len(data)} bytes; a bzImage header needs {HEADER_BYTES}")
    if data[BOOT_FLAG_OFFSET : BOOT_FLAG_OFFSET + 2] != BOOT_FLAG:
        raise ValueError("no 0x55AA boot signature at offset 0x1FE")
    if data[HEADER_MAGIC_OFFSET : HEADER_MAGIC_OFFSET + 4] != HEADER_MAGIC:
        raise ValueError("no 'HdrS' boot protocol magic at offset 0x202")
    (version,) = struct.unpack_from("<H", data, 0x206)
    protocol = (version >> 8, version & 0xFF)
    if protocol < MIN_PROTOCOL:
        raise ValueError(f"boot protocol {protocol[0]}.{protocol[1]:02d} is older than 2.06")
    setup_sects = data[0x1F1] or 4  # 0 means 4 (boot.rst)
    (syssize,) = struct.unpack_from("<I", data, 0x1F4)
    loadflags = data[0x211]
    if not loadflags & LOADED_HIGH:
        raise ValueError("a zImage (loaded low), not a bzImage")
    xloadflags = struct.unpack_from("<H", data, 0x236)[0] if protocol >= (2, 12) else 0
    (version_ptr,) = struct.unpack_from("<H", data, 0x20E)
    return BzImageHeader(
        protocol=protocol,
        setup_sects=setup_sects,
        syssize=syssize,
        x86_64=bool(xloadflags & XLF_KERNEL_64),
        version=_version_string(data, version_ptr),
    )


def _version_string(data: bytes, pointer: int) -> str | None:
    if pointer == 0:
        return None
    start = pointer + 0x200
    end = data.find(b"\0", start, start + 512)
    if start >= len(data) or end < 0:
        return None
    text = data[start:end].decode("ascii", errors="replace").strip()
    return text or None


def check_bzimage(path: Path) -> BzImageHeader:
    """Return the header of a complete 64-bit x86 bzImage at ``path``.

    :raises UsageError: one line naming the file and what is wrong with it
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            data = f.read(READ_BYTES)
    except OSError as err:
        raise UsageError(f"kernel {path}: cannot read it ({err.strerror})") from err
    try:
        header = parse_header(data)
    except ValueError as err:
        raise UsageError(
            f"kernel {path} is not an x86 bzImage ({err}); give arch/x86/boot/bzImage "
            "of a built kernel"
        ) from err
    if size < header.min_file_size:
        raise UsageError(
            f"kernel {path} is truncated: {size} bytes, its header declares "
            f"{header.min_file_size}; copy the bzImage again"
        )
    if not header.x86_64:
        raise UsageError(
            f"kernel {path} is a 32-bit kernel (no XLF_KERNEL_64); the guest image is x86_64: "
            "build it with CONFIG_64BIT=y"
        )
    return header


def is_bzimage(path: Path) -> bool:
    """True when :func:`check_bzimage` accepts ``path``."""
    try:
        check_bzimage(path)
    except UsageError:
        return False
    return True
