"""A real ``redis-server`` for tests and benchmarks: free port, own folder, AOF on.

    server = RedisServer(tmp_path)          # appendfsync always unless told otherwise
    server.start()
    ... RedisLog.from_url(server.url) ...
    server.stop()      # SIGTERM: Redis flushes and exits
    server.kill()      # SIGKILL: a crash
    server.start()     # same port, same folder: the AOF is replayed
    server.restart()   # stop() + start()

It is also a context manager (``with RedisServer(path) as server:``). The executable is
``$REDIS_SERVER`` or ``redis-server`` on ``PATH``; a missing one is an error, never a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

__all__ = ["RedisServer", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process in ``directory`` (created if missing) on a fixed free port."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        appendfsync: str = "always",
        extra_args: tuple[str, ...] = (),
        executable: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.port = port if port is not None else free_port()
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        found = executable or os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
        if not found:
            raise RuntimeError("redis-server not found: install it or set $REDIS_SERVER")
        self.executable = found
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def logfile(self) -> Path:
        return self.directory / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING (after replaying its AOF)."""
        if self.running:
            raise RuntimeError("redis-server is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", str(self.logfile),
            *self.extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start:\n{self._log_tail()}")
            if self._answers_ping():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start in {timeout}s:\n{self._log_tail()}")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: Redis fsyncs its AOF and exits cleanly."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL and wait: a crash, as far as Redis can tell."""
        self._end(signal.SIGKILL, 10.0)

    def restart(self, timeout: float = 10.0) -> None:
        self.stop(timeout)
        self.start(timeout)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")  # "-LOADING" while replaying
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
