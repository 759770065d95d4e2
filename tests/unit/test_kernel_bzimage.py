"""The x86 boot protocol check, on the header of a real bzImage and on files that are not.

The fixture is the first 1 KiB of a bzImage apflab built (fixtures/kernel/README.md).
"""

import struct
from pathlib import Path

import pytest

from apflab import kernel
from apflab.errors import UsageError
from apflab.kernel import bzimage

HEAD = Path(__file__).parent / "fixtures" / "kernel" / "bzImage-6.1.192-apflab.head"
VERSION = b"6.1.192-apflab (apflab@apflab) #1 SMP apflab a0f497736b5204a1\0"


def _complete(tmp_path: Path, head: bytes, with_version: bool = False) -> Path:
    """The real header, padded with zeros to the size it declares (optionally with its
    version string where the header points)."""
    header = bzimage.parse_header(head)
    data = bytearray(head.ljust(header.min_file_size, b"\0"))
    if with_version:
        (pointer,) = struct.unpack_from("<H", head, 0x20E)
        data[pointer + 0x200 : pointer + 0x200 + len(VERSION)] = VERSION
    path = tmp_path / "bzImage"
    path.write_bytes(bytes(data))
    return path


def test_real_header_parses() -> None:
    header = bzimage.parse_header(HEAD.read_bytes())
    assert header.protocol == (2, 15)
    assert header.setup_sects == 31
    assert header.syssize == 220480
    assert header.x86_64
    assert header.version is None  # the string lies past the 1 KiB excerpt
    assert header.min_file_size == 32 * 512 + 220480 * 16


def test_complete_file_is_accepted_and_names_its_release(tmp_path: Path) -> None:
    path = _complete(tmp_path, HEAD.read_bytes(), with_version=True)
    header = kernel.check_bzimage(path)
    assert header.release == "6.1.192-apflab"
    assert header.version == VERSION[:-1].decode()
    assert kernel.is_bzimage(path)


def test_truncated_copy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(HEAD.read_bytes())  # only the header: the kernel itself is missing
    with pytest.raises(UsageError, match=r"is truncated: 1024 bytes, its header declares"):
        kernel.check_bzimage(path)
    assert not kernel.is_bzimage(path)


def test_passwd_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    lines = [f"user{i}:x:{1000 + i}:{1000 + i}::/home/user{i}:/bin/sh\n" for i in range(40)]
    path.write_text("root:x:0:0:root:/root:/bin/bash\n" + "".join(lines))
    with pytest.raises(UsageError, match=r"is not an x86 bzImage \(no 0x55AA boot signature"):
        kernel.check_bzimage(path)


@pytest.mark.parametrize("content", [b"", b"\0" * 100, b"\x55\xaa" * 600])
def test_empty_short_or_random_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    assert not kernel.is_bzimage(path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read it"):
        kernel.check_bzimage(tmp_path / "nope")


def _patched(offset: int, value: bytes) -> bytes:
    data = bytearray(HEAD.read_bytes())
    data[offset : offset + len(value)] = value
    return bytes(data)


def test_wrong_magic_old_protocol_zimage_and_32_bit_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HdrS"):
        bzimage.parse_header(_patched(0x202, b"HdrX"))
    with pytest.raises(ValueError, match=r"older than 2\.06"):
        bzimage.parse_header(_patched(0x206, struct.pack("<H", 0x0204)))
    with pytest.raises(ValueError, match="zImage"):
        bzimage.parse_header(_patched(0x211, b"\x00"))
    path = _complete(tmp_path, _patched(0x236, struct.pack("<H", 0)))
    with pytest.raises(UsageError, match="32-bit kernel"):
        kernel.check_bzimage(path)
