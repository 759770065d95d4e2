"""SSH to a guest with paramiko: run commands, move files, pinned host key.

Remote commands are given as argv lists and quoted with :func:`shlex.join`
before they reach the remote shell (SSH carries one command string).
"""

from __future__ import annotations

import logging
import shlex
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType

import paramiko

from apflab.errors import CommandError, SSHError
from apflab.process import CmdResult

#: how long starting a command may take: a guest whose sshd cannot fork (a stalled
#: kernel: its page-readies never come) would otherwise hold the caller for good
#: (paramiko waits for the exec reply with no timeout)
START_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)


def banner_ready(host: str, port: int, timeout: float = 2.0) -> bool:
    """Cheap readiness probe: does something send an ``SSH-`` banner?

    Costs the guest one accept() and nothing else, unlike a full SSH login;
    use it before :meth:`SSH.connect` so polling never starves a slow guest.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


class SSH:
    """One authenticated SSH connection to a guest.

    :param host_key: the guest's pinned host key; any other key is refused
    """

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        key: paramiko.PKey,
        host_key: paramiko.PKey,
        name: str = "guest",
    ) -> None:
        self.host, self.port, self.user, self.name = host, port, user, name
        self._key = key
        self._host_key = host_key
        self._client: paramiko.SSHClient | None = None

    def connect(self, timeout: float = 60.0) -> None:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        known = f"[{self.host}]:{self.port}" if self.port != 22 else self.host
        client.get_host_keys().add(known, self._host_key.get_name(), self._host_key)
        try:
            client.connect(
                self.host,
                self.port,
                self.user,
                pkey=self._key,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException as err:
            client.close()
            raise SSHError(
                f"{self.name}: host key mismatch at {known}: the guest is not the image we built "
                f"(got {err.key.get_name()} {err.key.get_base64()[:16]}...)"
            ) from err
        except (paramiko.SSHException, OSError, EOFError) as err:
            client.close()
            raise SSHError(f"{self.name}: SSH to {self.user}@{known} failed: {err}") from err
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(15)
        self._client = client

    @property
    def client(self) -> paramiko.SSHClient:
        if self._client is None:
            raise SSHError(f"{self.name}: SSH is not connected")
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> SSH:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- commands ----------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 300.0,
        input_text: str | None = None,
        on_output: Callable[[str, str], None] | None = None,
        watch: Callable[[], None] | None = None,
    ) -> CmdResult:
        """Run ``argv`` in the guest and wait for it.

        :param timeout: seconds for the whole command; on expiry the channel is
            closed and :class:`CommandError` raised
        :param on_output: called as ``(stream_name, text_chunk)`` as output arrives
        :param watch: called about once a second while waiting; it raises to
            abort (e.g. the VM behind this connection panicked or died: an SSH
            channel to a dead kernel would otherwise wait forever)
        """
        command = shlex.join(argv)
        log.debug("%s$ %s", self.name, command)
        start = time.monotonic()
        chan = self._start(command, min(timeout or START_TIMEOUT_S, START_TIMEOUT_S), input_text)
        out = _Output(tuple(argv), start, on_output)
        deadline = None if timeout is None else start + timeout
        chan.settimeout(0.2)
        next_watch = time.monotonic() + 1.0
        try:
            while True:
                if watch is not None and time.monotonic() >= next_watch:
                    next_watch = time.monotonic() + 1.0
                    watch()
                got = out.drain(chan)
                if not got and chan.exit_status_ready() and not out.drain(chan):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    chan.close()
                    timed_out = out.result(-1)
                    raise CommandError(
                        f"{self.name}: timed out after {timeout}s: {timed_out.describe()}",
                        timed_out,
                    )
                if not got:
                    time.sleep(0.02)
            status = chan.recv_exit_status()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SSHError(f"{self.name}: connection lost during `{command}`: {exc}") from exc
        finally:
            chan.close()
        result = out.result(status)
        return result.check() if check else result

    def _start(self, command: str, within: float, input_text: str | None) -> paramiko.Channel:
        """Open a channel and start ``command`` on it within ``within`` seconds (a
        timer closes the channel otherwise, which ends paramiko's wait)."""
        chan: paramiko.Channel | None = None
        timer: threading.Timer | None = None
        try:
            transport = self.client.get_transport()
            if transport is None:
                raise SSHError(f"{self.name}: not connected")
            chan = transport.open_session(timeout=within)
            timer = threading.Timer(within, chan.close)
            timer.daemon = True
            timer.start()
            chan.exec_command(command)
            if input_text is not None:
                chan.sendall(input_text.encode())
            chan.shutdown_write()
        except (paramiko.SSHException, OSError, EOFError) as err:
            if chan is not None:
                chan.close()
            late = timer is not None and not timer.is_alive()
            why = f"no answer within {within:.0f}s" if late else str(err)
            raise SSHError(f"{self.name}: cannot start `{command}`: {why}") from err
        finally:
            if timer is not None:
                timer.cancel()
        return chan

    # -- files -------------------------------------------------------------
    def put(self, local: Path, remote: str, mode: int | None = None) -> None:
        try:
            with self.client.open_sftp() as sftp:
                sftp.put(str(local), remote)
                if mode is not None:
                    sftp.chmod(remote, mode)
        except (paramiko.SSHException, OSError) as err:
            raise SSHError(f"{self.name}: cannot copy {local} to {remote}: {err}") from err

    def put_files(self, pairs: Sequence[tuple[Path, str]]) -> None:
        """Copy local files to remote paths, making the remote directories first."""
        dirs = sorted({str(PurePosixPath(remote).parent) for _, remote in pairs})
        if dirs:
            self.run(["mkdir", "-p", *dirs])
        try:
            with self.client.open_sftp() as sftp:
                for local, remote in pairs:
                    sftp.put(str(local), remote)
        except (paramiko.SSHException, OSError) as err:
            raise SSHError(f"{self.name}: cannot copy files to {dirs}: {err}") from err

    def get(self, remote: str, local: Path) -> None:
        try:
            with self.client.open_sftp() as sftp:
                sftp.get(remote, str(local))
        except (paramiko.SSHException, OSError) as err:
            raise SSHError(f"{self.name}: cannot copy {remote} to {local}: {err}") from err

    def get_tree(self, remote: str, local: Path) -> int:
        """Copy a remote directory tree to ``local``; return the number of files."""
        count = 0
        try:
            with self.client.open_sftp() as sftp:
                stack = [(PurePosixPath(remote), local)]
                while stack:
                    rdir, ldir = stack.pop()
                    ldir.mkdir(parents=True, exist_ok=True)
                    for entry in sftp.listdir_attr(str(rdir)):
                        rpath = rdir / entry.filename
                        lpath = ldir / entry.filename
                        mode = entry.st_mode or 0
                        if stat.S_ISDIR(mode):
                            stack.append((rpath, lpath))
                        elif stat.S_ISLNK(mode):
                            target = sftp.readlink(str(rpath))
                            if target and not lpath.exists():
                                lpath.symlink_to(target)
                        elif stat.S_ISREG(mode):
                            sftp.get(str(rpath), str(lpath))
                            count += 1
        except (paramiko.SSHException, OSError) as err:
            raise SSHError(f"{self.name}: cannot copy tree {remote} to {local}: {err}") from err
        return count


class _Output:
    """What a remote command printed so far, streamed to ``on_output`` as it comes."""

    def __init__(
        self,
        argv: tuple[str, ...],
        start: float,
        on_output: Callable[[str, str], None] | None,
    ) -> None:
        self.argv, self.start, self.on_output = argv, start, on_output
        self.streams: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def drain(self, chan: paramiko.Channel) -> bool:
        """Read what is ready on both streams; True if anything was."""
        got = False
        for name, ready, recv in (
            ("stdout", chan.recv_ready, chan.recv),
            ("stderr", chan.recv_stderr_ready, chan.recv_stderr),
        ):
            if ready():
                data = recv(65536)
                self.streams[name].append(data)
                got = True
                if self.on_output:
                    self.on_output(name, data.decode(errors="replace"))
        return got

    def result(self, status: int) -> CmdResult:
        return CmdResult(
            self.argv,
            status,
            b"".join(self.streams["stdout"]).decode(errors="replace"),
            b"".join(self.streams["stderr"]).decode(errors="replace"),
            time.monotonic() - self.start,
        )
