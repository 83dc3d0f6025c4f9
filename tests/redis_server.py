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

:class:`RedisClusterServers` is a real Redis Cluster of three such servers (``--cluster-enabled
yes``, created with ``redis-cli --cluster create``); its ``url`` is
``redis-cluster://127.0.0.1:<port>``, the scheme :func:`dispatch.log.open_log` reads as a cluster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

__all__ = ["RedisClusterServers", "RedisServer", "free_port"]


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


class RedisClusterServers:
    """A real Redis Cluster for tests: ``nodes`` primaries (no replicas) on loopback, AOF on.

        cluster = RedisClusterServers(tmp_path)    # 3 nodes, appendfsync always
        cluster.start()      # start the processes, ``redis-cli --cluster create``, wait for "ok"
        ... RedisLog.from_url(cluster.url) ...     # redis-cluster://127.0.0.1:<port of node 0>
        cluster.servers[1].kill(); cluster.servers[1].start(); cluster.wait_ok()
        cluster.stop()

    Each node is a :class:`RedisServer` in ``directory/node-<port>`` (its AOF and its
    ``nodes-<port>.conf``) started with ``--cluster-enabled yes``, on a free client port and a free
    cluster-bus port (``--cluster-port``, Redis 7+: the default bus port, client port + 10000, may
    not exist for a high ephemeral port). The cluster is created once, by the first
    :meth:`start`; later starts reuse the nodes' config files, so a restarted node rejoins with
    its slots and its data. The executables are ``$REDIS_SERVER``/``$REDIS_CLI`` or the ones on
    ``PATH``; a missing one is an error, never a skip. Also a context manager.
    """

    def __init__(
        self,
        directory: Path,
        *,
        nodes: int = 3,
        appendfsync: str = "always",
        node_timeout_ms: int = 5000,
        executable: str | None = None,
        cli: str | None = None,
    ) -> None:
        if nodes < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        self.directory = Path(directory)
        found = cli or os.environ.get("REDIS_CLI") or shutil.which("redis-cli")
        if not found:
            raise RuntimeError("redis-cli not found: install it or set $REDIS_CLI")
        self.cli = found
        self.servers: list[RedisServer] = []
        ports = _free_ports(2 * nodes)
        for port, bus in zip(ports[::2], ports[1::2], strict=True):
            extra_args = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-port", str(bus),
                "--cluster-node-timeout", str(node_timeout_ms),
            )  # fmt: skip
            node_dir = self.directory / f"node-{port}"
            self.servers.append(
                RedisServer(
                    node_dir,
                    port=port,
                    appendfsync=appendfsync,
                    executable=executable,
                    extra_args=extra_args,
                )
            )
        self._created = False

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    @property
    def url(self) -> str:
        """``redis-cluster://127.0.0.1:<port>``: one seed node, the client discovers the rest."""
        return f"redis-cluster://127.0.0.1:{self.ports[0]}"

    @property
    def urls(self) -> list[str]:
        """Plain ``redis://`` URLs of the single nodes (for talking to one node directly)."""
        return [server.url for server in self.servers]

    def start(self, timeout: float = 30.0) -> None:
        """Start every node that is not running; create the cluster once; wait until it is ok."""
        deadline = time.monotonic() + timeout
        for server in self.servers:
            if not server.running:
                server.start()
        if not self._created:
            nodes = [f"127.0.0.1:{port}" for port in self.ports]
            done = subprocess.run(
                [self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "0",
                 "--cluster-yes"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )  # fmt: skip
            if done.returncode != 0:
                self.kill()
                raise RuntimeError(
                    "redis-cli --cluster create failed:\n"
                    + done.stdout.decode(errors="replace")
                    + done.stderr.decode(errors="replace")
                )
            self._created = True
        self.wait_ok(max(1.0, deadline - time.monotonic()))

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every running node says ``cluster_state:ok`` and knows every node."""
        deadline = time.monotonic() + timeout
        while True:
            infos = [_cluster_info(server.port) for server in self.servers if server.running]
            if all(
                info.get("cluster_state") == "ok"
                and info.get("cluster_slots_ok") == "16384"
                and info.get("cluster_known_nodes") == str(len(self.servers))
                for info in infos
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis cluster is not ok after {timeout}s: {infos}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        for server in self.servers:
            server.stop(timeout)

    def kill(self) -> None:
        for server in self.servers:
            server.kill()

    def __enter__(self) -> RedisClusterServers:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _cluster_info(port: int) -> dict[str, str]:
    """``CLUSTER INFO`` of one node as a dict (empty when the node does not answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"CLUSTER INFO\r\n")
            reply = b""
            while b"\r\n" not in reply:
                chunk = sock.recv(65536)
                if not chunk:
                    return {}
                reply += chunk
            header, _, body = reply.partition(b"\r\n")
            if not header.startswith(b"$"):  # an error, e.g. -LOADING
                return {}
            size = int(header[1:])
            while len(body) < size:
                chunk = sock.recv(65536)
                if not chunk:
                    return {}
                body += chunk
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in body[:size].decode(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key] = value.strip()
    return info
