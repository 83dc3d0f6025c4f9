"""Every benchmark of issue 5 in one go, and ``docs/performance.md`` rewritten from the results.

    python -m tests.bench.run_all            # what ``make bench`` runs (a few minutes)
    python -m tests.bench.run_all --quick    # one run of each, shorter windows
    python -m tests.bench.run_all --only issue2,fanout --no-doc

The server is pinned to CPU 0 (``taskset -c 0``) and everything that makes load to CPU 1
(``taskset -c 1``), as ``shared/PERFORMANCE-FLOORS.md`` prescribes. Each scenario gets a fresh
server on a free loopback port, with a fresh SQLite log in a temporary folder on the real disk,
and is driven by ``dispatch bench`` (``dispatch/sim/bench.py``):

* ``floor-*`` vs ``dispatch-*`` — the same load against ``tests/bench/floor_server.py`` (a bare
  aiohttp websocket server that only decodes) and against the real server: position ingest
  (flood), paced positions (CPU per message at equal load), report round trips (closed loop).
  These run ``--repeat`` times, interleaved, and the ratios use the medians.
* ``issue2`` — 1,000 devices, a position every 5 s, 200 reports/s steady, one screen.
* ``issue5-latency`` — 10,000 devices, a position every 5 s, 1,000 reports/s steady.
* ``issue5-memory`` — 10,000 devices + 50 screens (town and villages), peak RSS.
* ``issue5-burst`` — 10,000 devices, 2,000 reports at once every 5 s, one town screen.
* ``fanout`` — 1,000 screens on the town, deliveries per second.
* ``profile-*`` — the saturated report loop and the 10k-device steady load again, with py-spy
  sampling the server (not used for any headline figure).
* the responder index vs numpy vs Redis GEOSEARCH (``bench_geosearch.py``, which uses
  ``bench_index.py``'s town and checks), and the event-log backends (``bench_log.py``).

The server runs under ``tests/bench/serve_instrumented.py`` (``dispatch serve`` plus a record
of GC pauses and event-loop lag; ``--plain`` uses ``dispatch serve`` itself). Results go to
``bench-results/*.json``; ``docs/performance.md`` is regenerated from them (``--no-doc`` keeps
it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PY = sys.executable
RESULTS = ROOT / "bench-results"
DOC = ROOT / "docs" / "performance.md"
SERVER_CPU = "0"
LOAD_CPU = "1"

Json = dict[str, Any]

LIFTED = {"rate": 1_000_000.0, "burst": 1_000_000}  # per-connection limits out of the way


@dataclass
class Scenario:
    name: str
    title: str
    server: str  # "dispatch" | "floor"
    town: str  # "1k" | "10k"
    bench: list[str]
    server_conf: Json = field(default_factory=dict)
    profile: bool = False
    repeatable: bool = False
    what: str = ""
    server_args: list[str] = field(default_factory=list)  # for serve_instrumented (experiments)


def scenarios(quick: bool) -> list[Scenario]:
    d = (lambda full, short: short if quick else full)  # noqa: E731
    ingest = ["--mode", "ingest", "--devices", "200", "--screens", "0", "--warmup", "1",
              "--duration", d("5", "4"), "--processes", "1", "--connect-rate", "2000",
              "--drain", "1"]
    paced = ["--devices", "500", "--position-every", "0.025", "--rate", "0", "--inflight", "0",
             "--screens", "0", "--warmup", "1.5", "--duration", d("8", "4"), "--processes", "1",
             "--no-probe", "--connect-rate", "2000", "--drain", "0.5"]
    loop = ["--devices", "1000", "--rate", "0", "--inflight", "256", "--position-every", "5",
            "--screens", "0", "--warmup", "1.5", "--duration", d("5", "4"), "--processes", "2",
            "--connect-rate", "2000", "--drain", "1"]
    latency = ["--devices", "10000", "--position-every", "5", "--rate", "1000",
               "--screens", "0", "--warmup", "5", "--duration", d("20", "10"),
               "--processes", "4", "--connect-rate", "1000"]
    gc_tuned = ["--gc-freeze-every", "1", "--gc-threshold", "20000,20,100"]
    return [
        Scenario("floor-ingest", "transport floor: position flood", "floor", "1k", ingest,
                 repeatable=True,
                 what="200 connections send positions as fast as the server takes them"),
        Scenario("dispatch-ingest", "dispatch: position flood", "dispatch", "1k", ingest,
                 LIFTED, repeatable=True,
                 what="the same flood into the real server (rate limit lifted)"),
        Scenario("floor-paced", "transport floor: 20,000 positions/s paced", "floor", "1k",
                 paced, repeatable=True,
                 what="500 connections, a position every 25 ms each: CPU per message at equal "
                      "load"),
        Scenario("dispatch-paced", "dispatch: 20,000 positions/s paced", "dispatch", "1k",
                 paced, LIFTED, repeatable=True,
                 what="the same paced load into the real server (rate limit lifted)"),
        Scenario("floor-reports", "transport floor: report round trips", "floor", "1k",
                 [*loop, "--handled-share", "1"], repeatable=True,
                 what="256 reports outstanding at once; the floor acks at once, durably nothing"),
        Scenario("dispatch-reports-handled", "dispatch: durable reports, handled on the spot",
                 "dispatch", "1k", [*loop, "--handled-share", "1"], LIFTED, repeatable=True,
                 what="256 outstanding; every report recorded and closed on the spot "
                      "(3 events), acked after the SQLite commit"),
        Scenario("experiment-gc-reports",
                 "experiment: durable reports (handled) with the collector tamed", "dispatch",
                 "1k", [*loop, "--handled-share", "1"], LIFTED, server_args=gc_tuned,
                 repeatable=True,
                 what="dispatch-reports-handled against the same server started with "
                      "`gc.freeze()` every second and `gc.set_threshold(20000, 20, 100)` "
                      "(tests/bench/serve_instrumented.py switches; server code unchanged)"),
        Scenario("dispatch-reports-dispatched", "dispatch: durable reports, each dispatched",
                 "dispatch", "1k", [*loop, "--handled-share", "0"], LIFTED, repeatable=True,
                 what="256 outstanding; every report offered to the nearest device, which "
                      "accepts and resolves it (3 commands, ~8 events a report)"),
        Scenario("issue2", "issue 2: 200 reports/s, 1,000 devices", "dispatch", "1k",
                 ["--devices", "1000", "--position-every", "5", "--rate", "200", "--screens", "1",
                  "--warmup", "3", "--duration", d("20", "10"), "--processes", "2"],
                 repeatable=True,
                 what="1,000 devices, a position every 5 s each, 200 reports/s steady, all "
                      "dispatched, accepted and resolved; one town screen; default limits"),
        Scenario("issue5-latency", "issue 5: 1,000 reports/s, 10,000 devices", "dispatch",
                 "10k", latency, repeatable=True,
                 what="10,000 devices, a position every 5 s each (2,000/s), 1,000 reports/s "
                      "steady, all dispatched, accepted and resolved; default limits"),
        Scenario("issue5-memory", "issue 5: 10,000 devices + 50 screens", "dispatch", "10k",
                 ["--devices", "10000", "--position-every", "5", "--rate", "50",
                  "--screens", "50", "--screen-scope", "villages", "--warmup", "3",
                  "--duration", d("10", "6"), "--processes", "4", "--connect-rate", "1000"],
                 what="10,000 devices (positions every 5 s) and 50 screens spread over the town "
                      "and its 13 villages, 50 reports/s; peak RSS"),
        Scenario("fanout", "issue 5: fan-out to 1,000 screens", "dispatch", "1k",
                 ["--devices", "200", "--position-every", "5", "--rate", "15",
                  "--screens", "1000", "--warmup", "3", "--duration", d("8", "5"),
                  "--processes", "4", "--connect-rate", "500"],
                 what="1,000 screens on the town, 200 devices, 15 reports/s (~8 events each: "
                      "~120 events/s, ~120,000 deliveries/s offered)"),
        Scenario("issue5-latency-screen", "issue 5's load with the town's wall screen open",
                 "dispatch", "10k", [*latency[:latency.index("--screens") + 1], "1",
                                     *latency[latency.index("--screens") + 2:]],
                 what="the issue5-latency load with one screen watching the town, as a "
                      "command centre's wall always is: every event, the positions every "
                      "250 ms and the statistics every 5 s go to it"),
        Scenario("issue5-burst", "a typhoon's burst: 2,000 reports at once", "dispatch", "10k",
                 ["--devices", "10000", "--position-every", "5", "--rate", "0", "--burst",
                  "2000", "--burst-every", "5", "--screens", "1", "--warmup", "5",
                  "--duration", d("20", "10"), "--processes", "4", "--connect-rate", "1000"],
                 what="10,000 devices (positions every 5 s), one town screen, and every 5 s "
                      "2,000 reports sent at once (400/s on average), all dispatched, "
                      "accepted and resolved: how long the last of a burst waits"),
        Scenario("issue5-latency-200", "10,000 devices at 200 reports/s", "dispatch", "10k",
                 [*latency[:5], "200", *latency[6:]],
                 what="the issue5-latency fleet (10,000 devices, positions every 5 s) at the "
                      "issue-2 rate of 200 reports/s: what 10× the connections cost"),
        Scenario("experiment-gc-latency",
                 "experiment: issue5-latency with the collector tamed", "dispatch", "10k",
                 latency, server_args=gc_tuned,
                 what="the issue5-latency load against the same server started with "
                      "`gc.freeze()` every second and `gc.set_threshold(20000, 20, 100)` "
                      "(tests/bench/serve_instrumented.py switches; server code unchanged)"),
        Scenario("profile-reports", "profile: saturated report loop", "dispatch", "1k",
                 [*loop, "--handled-share", "0"], LIFTED, profile=True, server_args=gc_tuned,
                 what="dispatch-reports-dispatched again, with py-spy sampling the server "
                      "(collector tamed, so that its time is not smeared over allocation "
                      "sites)"),
        Scenario("profile-handled", "profile: saturated report loop, handled on the spot",
                 "dispatch", "1k", [*loop, "--handled-share", "1"], LIFTED, profile=True,
                 server_args=gc_tuned,
                 what="dispatch-reports-handled again, with py-spy sampling the server "
                      "(collector tamed)"),
        Scenario("profile-ingest", "profile: position flood", "dispatch", "1k",
                 [*ingest[:ingest.index("--duration") + 1], "8",
                  *ingest[ingest.index("--duration") + 2:]], LIFTED, profile=True,
                 server_args=gc_tuned,
                 what="dispatch-ingest again (8 s), with py-spy sampling the server (collector "
                      "tamed)"),
        Scenario("profile-steady", "profile: 10,000 devices, 1,000 reports/s", "dispatch",
                 "10k",
                 ["--devices", "10000", "--position-every", "5", "--rate", "1000",
                  "--screens", "0", "--warmup", "5", "--duration", d("10", "6"),
                  "--processes", "4", "--connect-rate", "1000"], profile=True,
                 what="issue5-latency again, with py-spy sampling the server (default "
                      "collector: GC time shows up at allocation sites)"),
    ]


# --------------------------------------------------------------------------------------------
# processes


def loadavg() -> list[str]:
    from dispatch.sim.bench import loadavg as la

    return la()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: str, nice: int, cmd: list[str]) -> list[str]:
    pre = ["taskset", "-c", cpu] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
    if nice:
        pre = ["nice", "-n", str(nice), *pre]
    return [*pre, *cmd]


def wait_http(url: str, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except Exception:
            pass
        time.sleep(0.1)
    return False


def stop(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def shown(cmd: list[str]) -> str:
    """A command as a person would type it."""
    out = []
    for c in cmd:
        if c == PY:
            c = "python"
        out.append(c if c and all(ch.isalnum() or ch in "-_./,:=" for ch in c) else repr(c))
    return " ".join(out)


# --------------------------------------------------------------------------------------------
# analysis helpers


def pctl(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stethoscope(path: Path, window: list[float]) -> Json:
    """GC pauses and loop lag of the server inside the window."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    w0, w1 = window
    lag = [ms for t, ms in doc.get("lag", []) if w0 <= t < w1]
    gcs = [g for g in doc.get("gc", []) if w0 <= g[0] < w1]
    by_gen: dict[int, list[float]] = defaultdict(list)
    for _t, gen, ms, _n in gcs:
        by_gen[int(gen)].append(ms)
    secs = max(w1 - w0, 1e-9)
    return {
        "loop_lag_ms": {"n": len(lag), "p50": pctl(lag, 0.5), "p99": pctl(lag, 0.99),
                        "max": max(lag) if lag else None,
                        "over_10ms": sum(1 for x in lag if x > 10)},
        "gc": {str(g): {"count": len(v), "per_s": round(len(v) / secs, 2),
                        "total_ms": round(sum(v), 1), "max_ms": round(max(v), 2)}
               for g, v in sorted(by_gen.items())},
        "gc_share_of_window": round(sum(ms for *_x, ms, _n in gcs) / 1000 / secs, 4),
        "lag_spikes": [(t, ms) for t, ms in doc.get("lag", []) if w0 <= t < w1 + 5 and ms >= 5],
        "gc_pauses": [(t, gen, ms) for t, gen, ms, _n in doc.get("gc", [])
                      if w0 <= t < w1 + 5 and ms >= 2],
    }


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _covered(spans: list[tuple[float, float]], a: float, b: float) -> float:
    """Seconds of [a, b] covered by the (merged) spans."""
    return sum(max(0.0, min(e, b) - max(s, a)) for s, e in spans if s < b and e > a)


def attribute_tail(bench: Json, steth: Json, threshold_ms: float | None = None) -> Json:
    """For the slowest report→offer samples (≥ p99, or ≥ ``threshold_ms``): which stall covers
    most of each sample's time in flight? A stall is the interval [t - ms, t] before a late
    wake-up: a server GC pause (``gc.callbacks``), another server event-loop stall (its 10 ms
    timer), a load-generator stall (its 5 ms timer). A sample is *explained* by a kind when
    that kind covers at least half of its latency; shares are of the tail samples."""
    series = bench.get("offer_series") or []
    if not series:
        return {}
    lat = [s[1] for s in series]
    p99 = pctl(lat, 0.99) or 0.0
    thr = threshold_ms if threshold_ms is not None else max(p99, 5.0)
    tail = [s for s in series if s[1] >= thr]
    gcs = _merge([(t - ms / 1000, t) for t, _g, ms in steth.get("gc_pauses", [])])
    srv = _merge([(t - ms / 1000, t) for t, ms in steth.get("lag_spikes", [])])
    cli = _merge([(t - ms / 1000, t) for t, ms in bench.get("client_lag_spikes", []) if ms >= 5])
    counts: Counter[str] = Counter()
    for t, ms, inbound, _outbound in tail:
        a, b = t, t + ms / 1000
        half = (b - a) / 2
        g = _covered(gcs, a, b)
        s_ = _covered(srv, a, b)
        c = _covered(cli, a, b)
        counts["server_gc"] += g >= half
        counts["server_stall"] += s_ >= half
        counts["client_stall"] += c >= half
        counts["none_seen"] += not (g >= half or s_ >= half or c >= half)
        if inbound is not None and ms > 0:
            counts["inbound_dominant"] += inbound > ms / 2
    n = len(tail)
    return {"threshold_ms": round(thr, 2), "samples": n,
            **{k: round(100 * counts[k] / n, 1) if n else None
               for k in ("server_gc", "server_stall", "client_stall", "none_seen",
                         "inbound_dominant")}}


CATEGORIES = [
    # (name, substrings of a frame; first match walking from the leaf up)
    ("event-log writer thread (SQLite)", ("dispatch/log/sqlite.py",)),
    ("time formatting (wire.codec.iso)", ("iso (dispatch/wire/codec.py",)),
    ("ISO time parsing (parse_time)", ("parse_time (dispatch/wire/codec.py",)),
    ("websocket send (aiohttp writer)", ("aiohttp/_websocket/writer.py",
                                          "send_frame (aiohttp/web_ws.py")),
    ("websocket receive (aiohttp reader/protocol)", ("aiohttp/_websocket/reader",
                                                     "aiohttp/web_protocol.py",
                                                     "aiohttp/web_ws.py",
                                                     "aiohttp/streams.py")),
    ("decode + validate (msgspec)", ("decode_field", "decode_screen", "_decode (dispatch/wire")),
    ("JSON encode (msgspec dumps)", ("dumps (dispatch/wire/codec.py",)),
    ("wire objects (incident_obj, event_wire)", ("dispatch/wire/objects.py",
                                                  "event_wire (dispatch/wire/codec.py")),
    ("prometheus metrics", ("prometheus_client", "dispatch/server/metrics.py")),
    ("point in polygon (shapely STRtree)", ("dispatch/geo/grids.py", "shapely/")),
    ("responder index", ("dispatch/geo/index.py",)),
    ("engine rules + state", ("dispatch/engine/",)),
    ("fan-out hub + outboxes", ("dispatch/server/hub.py", "dispatch/server/outbox.py")),
    ("town writer (batching, commit)", ("dispatch/server/town.py",)),
    ("field/screen handlers", ("dispatch/server/field.py", "dispatch/server/screen.py",
                               "dispatch/server/limits.py")),
    ("logging (structlog)", ("structlog",)),
    ("REST / HTTP", ("dispatch/server/rest.py", "aiohttp/web_app.py")),
    ("native code under the event loop (uvloop; aiohttp's compiled websocket reader)",
     ("asyncio/", "uvloop", "run_app (aiohttp/web.py")),
]


def profile_summary(raw: Path) -> Json:
    """py-spy ``--format raw`` (collapsed stacks) → where the time goes."""
    try:
        lines = raw.read_text().splitlines()
    except OSError:
        return {}
    total = 0
    leaf: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for line in lines:
        stack, _, n_ = line.rpartition(" ")
        try:
            n = int(n_)
        except ValueError:
            continue
        frames = stack.split(";")
        total += n
        threads["writer thread" if frames[0].startswith("Thread._bootstrap") else
                "event loop"] += n
        leaf[frames[-1]] += n
        for f in reversed(frames):
            name = next((c for c, keys in CATEGORIES if any(k in f for k in keys)), None)
            if name:
                cats[name] += n
                break
        else:
            cats["other"] += n
    if not total:
        return {}
    return {
        "samples": total,
        "threads": {k: round(100 * v / total, 1) for k, v in threads.most_common()},
        "categories": [(k, round(100 * v / total, 1)) for k, v in cats.most_common()],
        "top_self": [(k, round(100 * v / total, 1)) for k, v in leaf.most_common(15)],
    }


# --------------------------------------------------------------------------------------------
# the runner


def snapshot(dst: Path) -> tuple[Path, str]:
    """Copy the code (dispatch/, tests/, config/, static/) so that every scenario runs the same
    code even if the working tree changes meanwhile; returns the copy and a digest of dispatch/."""
    import hashlib

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".mypy_cache")
    for name in ("dispatch", "tests", "config", "static"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    h = hashlib.sha256()
    for path in sorted((dst / "dispatch").rglob("*.py")):
        h.update(str(path.relative_to(dst)).encode())
        h.update(path.read_bytes())
    return dst, h.hexdigest()[:12]


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="dispatch-bench-", dir=args.tmp))
        self.towns: dict[str, int] = {"1k": 1_001, "10k": 10_001}
        self.commands: list[tuple[str, str]] = []
        self.towns_shown: set[str] = set()
        self.root = ROOT
        self.digest = ""
        if not getattr(args, "no_snapshot", True):
            self.root, self.digest = snapshot(self.tmp / "code")
        self.env = {**os.environ, "PYTHONPATH": str(self.root)}
        self.py_spy = shutil.which("py-spy") or str(Path(PY).with_name("py-spy"))

    def config(self, scn: Scenario, port: int, run_dir: Path) -> Path:
        from dispatch.sim.bench import write_bench_town

        return write_bench_town(run_dir, self.towns[scn.town],
                                server={"port": port, **scn.server_conf},
                                store="sqlite:///dispatch.db")

    def run(self, scn: Scenario, k: int) -> Json:
        args = self.args
        run_dir = self.tmp / f"{scn.name}-{k}"
        port = free_port()
        cfg = self.config(scn, port, run_dir)
        steth = run_dir / "server-stats.json"
        if scn.server == "floor":
            cmd = [PY, "-m", "tests.bench.floor_server", "--port", str(port)]
            ready = f"http://127.0.0.1:{port}/healthz"
        elif args.plain:
            cmd = [PY, "-m", "dispatch.cli", "serve", "--config", str(cfg)]
            ready = f"http://127.0.0.1:{port}/readyz"
        else:
            cmd = [PY, "-m", "tests.bench.serve_instrumented", "--config", str(cfg),
                   "--stats", str(steth), *scn.server_args]
            ready = f"http://127.0.0.1:{port}/readyz"
        server_cmd = pinned(SERVER_CPU, args.nice, cmd)
        log = (run_dir / "server.log").open("wb")
        server = subprocess.Popen(server_cmd, cwd=self.root, env=self.env, stdout=log,
                                  stderr=subprocess.STDOUT)
        result: Json = {"scenario": scn.name, "title": scn.title, "what": scn.what,
                        "server_kind": scn.server, "run": k, "server_conf": scn.server_conf,
                        "server_args": scn.server_args}
        try:
            if not wait_http(ready, 60):
                raise RuntimeError(f"{scn.name}: the server did not come up; see "
                                   f"{run_dir / 'server.log'}")
            out = run_dir / "bench.json"
            bench_cmd = pinned(LOAD_CPU, args.nice, [
                PY, "-m", "dispatch.cli", "bench", "--config", str(cfg),
                "--url", f"ws://127.0.0.1:{port}", "--server-pid", str(server.pid),
                "--label", scn.name, "--out", str(out), *scn.bench])
            if k == 0:
                def generic(cmd: list[str]) -> str:
                    return (shown(cmd).replace(str(run_dir), "$RUN").replace(str(port), "$PORT")
                            .replace(f"--server-pid {server.pid} ", ""))
                if scn.town not in self.towns_shown:
                    self.towns_shown.add(scn.town)
                    self.commands.append((
                        f"town of {self.towns[scn.town]:,} grid workers (edit [server] in "
                        "$RUN/dispatch.toml as each scenario's *_server_conf* says)",
                        f"python -c \"from dispatch.sim.bench import write_bench_town; "
                        f"write_bench_town('$RUN', {self.towns[scn.town]}, "
                        f"server={{'port': $PORT}})\""))
                self.commands.append((scn.name + " (server)", generic(server_cmd)))
                self.commands.append((scn.name, generic(bench_cmd)))
            print(f"== {scn.name} (run {k + 1}): {scn.what}", file=sys.stderr, flush=True)
            prof = run_dir / "py-spy.txt"
            spy: subprocess.Popen[Any] | None = None
            duration = float(scn.bench[scn.bench.index("--duration") + 1])
            bench = subprocess.Popen(bench_cmd, cwd=self.root, env=self.env,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
            assert bench.stderr is not None and bench.stdout is not None
            err_lines = []
            for line in bench.stderr:
                err_lines.append(line)
                if "measuring" in line and scn.profile and spy is None:
                    spy = subprocess.Popen(pinned(LOAD_CPU, 0, [
                        self.py_spy, "record", "--pid", str(server.pid), "--duration",
                        str(max(1, int(duration) - 1)), "--rate", "200", "--format", "raw",
                        "--nonblocking", "-o", str(prof)]), stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
                if not args.verbose and line.startswith("[bench"):
                    if int(time.time()) % 5 == 0:
                        print("   " + line.rstrip()[:160], file=sys.stderr, flush=True)
                elif args.verbose or not line.startswith("#"):
                    print("   " + line.rstrip(), file=sys.stderr, flush=True)
            table = bench.stdout.read()
            bench.wait()
            if spy is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(30)
                result["profile"] = profile_summary(prof)
            print(table, file=sys.stderr, flush=True)
            data = json.loads(out.read_text()) if out.exists() else {}
            result["bench"] = data
            result["table"] = table
            result["bench_exit"] = bench.returncode
        finally:
            stop(server)
            log.close()
        if scn.server == "dispatch" and not args.plain and result.get("bench"):
            st = stethoscope(steth, result["bench"].get("window", [0, 0]))
            result["server_pauses"] = {k_: v for k_, v in st.items()
                                       if k_ not in ("lag_spikes", "gc_pauses")}
            result["tail"] = attribute_tail(result["bench"], st)
            result["tail_10ms"] = attribute_tail(result["bench"], st, 10.0)
        tail = (run_dir / "server.log").read_text(errors="replace").splitlines()[-200:]
        result["server_log_errors"] = [ln[:300] for ln in tail
                                       if '"level": "error"' in ln or "Traceback" in ln][:10]
        # keep the big series out of the summary, in the run's own file
        return result

    def index_bench(self) -> Json:
        out = self.tmp / "geo.json"
        cmd = pinned(LOAD_CPU, self.args.nice, [
            PY, "-m", "tests.bench.bench_geosearch", "--sizes", "1000,10000,100000",
            "--rounds", "2" if self.args.quick else "3", "--redis-cpu", SERVER_CPU,
            "--out", str(out)])
        self.commands.append(("index", shown(cmd)))
        print("== responder index vs numpy vs Redis GEOSEARCH", file=sys.stderr, flush=True)
        p = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        print(p.stdout, p.stderr[-2000:], file=sys.stderr, flush=True)
        doc = json.loads(out.read_text()) if out.exists() else {}
        doc["table"] = p.stdout
        doc["exit"] = p.returncode
        return doc

    def log_bench(self) -> Json:
        out = self.tmp / "log.json"
        script = self.root / "tests" / "bench" / "bench_log.py"
        if not script.exists():
            return {"missing": str(script)}
        cmd = pinned(SERVER_CPU, self.args.nice, [
            PY, str(script), "--seconds", "1.5" if self.args.quick else "2", "--uvloop",
            "--dir", str(self.tmp), "--out", str(out)])
        self.commands.append(("log", shown(cmd)))
        print("== event log backends", file=sys.stderr, flush=True)
        p = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        print(p.stdout, p.stderr[-2000:], file=sys.stderr, flush=True)
        doc = json.loads(out.read_text()) if out.exists() else {}
        doc["table"] = p.stdout
        doc["exit"] = p.returncode
        return doc


# --------------------------------------------------------------------------------------------
# the machine


def _cmd_out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> Json:
    lscpu = _cmd_out(["lscpu"])
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                  if ln.startswith("Model name")), platform.processor())
    hyper = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                  if ln.startswith("Hypervisor vendor")), "")
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for ln in f:
            if ln.startswith("MemTotal"):
                mem = int(ln.split()[1]) // 1024
    versions: Json = {}
    for mod in ("aiohttp", "websockets", "msgspec", "uvloop", "numpy", "redis", "shapely",
                "prometheus_client", "jwt"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[mod] = version({"jwt": "PyJWT", "redis": "redis",
                                     "prometheus_client": "prometheus-client"}.get(mod, mod))
    redis_v = _cmd_out(["redis-server", "--version"]).split()
    fs = "?"
    with contextlib.suppress(Exception):
        from tests.bench.bench_log import fs_type

        fs = fs_type(Path(tempfile.gettempdir()).resolve())
    head = _cmd_out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).strip()
    dirty = [ln[3:] for ln in _cmd_out(["git", "-C", str(ROOT), "status", "--porcelain",
                                         "dispatch"]).splitlines() if ln.strip()]
    return {
        "git_head": head or "?", "server_code_uncommitted": dirty,
        "cpu_model": model, "hypervisor": hyper, "cpus": os.cpu_count(), "ram_mib": mem,
        "kernel": platform.release(), "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "redis_server": next((w.split("=")[1] for w in redis_v if w.startswith("v=")), "?"),
        "libraries": versions, "tmp_filesystem": fs,
        "loadavg_at_start": loadavg(),
    }


# --------------------------------------------------------------------------------------------
# the report


def med(runs: list[Json], *path: str) -> float | None:
    vals = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if isinstance(v, int | float):
            vals.append(float(v))
    return statistics.median(vals) if vals else None


def fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def trim(run: Json, keep: int = 4000) -> Json:
    """Keep the result files small: the slowest 1 % of the report→offer series in full and an
    even sample of the rest (the tail attribution has already been computed from all of it)."""
    b = run.get("bench") or {}
    series = b.get("offer_series") or []
    if len(series) > keep:
        by_lat = sorted(series, key=lambda x: x[1])
        n_tail = max(1, len(series) // 100)
        head, tail = by_lat[:-n_tail], by_lat[-n_tail:]
        step = max(1, len(head) // max(1, keep - n_tail))
        b["offer_series"] = sorted(head[::step] + tail)
        b["offer_series_note"] = (f"{len(b['offer_series'])} of {len(series)} samples: the "
                                  f"slowest {n_tail} and every {step}th of the others")
    return run


def write_results(runs: dict[str, list[Json]], extra: Json) -> None:
    RESULTS.mkdir(exist_ok=True)
    for rs in runs.values():
        for r in rs:
            trim(r)
    for name, rs in runs.items():
        (RESULTS / f"{name}.json").write_text(json.dumps(rs, separators=(",", ":")) + "\n")
    for name, doc in extra.items():
        (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")


def summary(runs: dict[str, list[Json]], extra: Json) -> Json:
    """The headline figures and the targets, from the results."""
    def b(name: str, *path: str) -> float | None:
        return med(runs.get(name, []), "bench", *path)

    def runs_of(name: str) -> list[float]:
        return [v for r in runs.get(name, [])
                if isinstance(v := (r.get("bench") or {}).get("throughput", {}).get(
                    "reports_acked"), int | float)]

    def p99_runs(name: str) -> list[float]:
        return [v for r in runs.get(name, [])
                if isinstance(v := (r.get("bench") or {}).get("latency_ms", {}).get(
                    "report_offer", {}).get("p99"), int | float)]

    s: Json = {}
    fi, di = b("floor-ingest", "throughput", "ingest"), b("dispatch-ingest", "throughput", "ingest")
    fcpu = b("floor-ingest", "server", "cpu_us_per_message")
    dcpu = b("dispatch-ingest", "server", "cpu_us_per_message")
    fp = b("floor-paced", "server", "cpu_us_per_message")
    dp = b("dispatch-paced", "server", "cpu_us_per_message")
    s["ingest"] = {"floor_msgs_per_s": fi, "dispatch_msgs_per_s": di,
                   "ratio_rate": di / fi if di and fi else None,
                   "floor_cpu_us": fcpu, "dispatch_cpu_us": dcpu,
                   "floor_cpu_pct": b("floor-ingest", "server", "cpu_percent"),
                   "dispatch_cpu_pct": b("dispatch-ingest", "server", "cpu_percent"),
                   "ratio_capacity_flood": fcpu / dcpu if fcpu and dcpu else None,
                   "floor_paced_cpu_us": fp, "dispatch_paced_cpu_us": dp,
                   "ratio_capacity_paced": fp / dp if fp and dp else None}
    fr = b("floor-reports", "throughput", "reports_acked")
    rh = b("dispatch-reports-handled", "throughput", "reports_acked")
    rd = b("dispatch-reports-dispatched", "throughput", "reports_acked")
    s["reports"] = {"floor_per_s": fr, "handled_per_s": rh, "dispatched_per_s": rd,
                    "handled_ratio": rh / fr if rh and fr else None,
                    "dispatched_ratio": rd / fr if rd and fr else None,
                    "handled_cpu_pct": b("dispatch-reports-handled", "server", "cpu_percent"),
                    "dispatched_cpu_pct": b("dispatch-reports-dispatched", "server",
                                            "cpu_percent")}
    s["issue2"] = {
        "reports_per_s": b("issue2", "throughput", "reports_acked"),
        "offer_p50": b("issue2", "latency_ms", "report_offer", "p50"),
        "offer_p99": b("issue2", "latency_ms", "report_offer", "p99"),
    }
    s["latency"] = {
        "reports_per_s": b("issue5-latency", "throughput", "reports_acked"),
        "offer_p50": b("issue5-latency", "latency_ms", "report_offer", "p50"),
        "offer_p99": b("issue5-latency", "latency_ms", "report_offer", "p99"),
        "connected": b("issue5-latency", "counters", "connected"),
        "cpu_pct": b("issue5-latency", "server", "cpu_percent"),
    }
    s["memory"] = {"peak_rss_mib": b("issue5-memory", "server", "peak_rss_mib"),
                   "connected": b("issue5-memory", "counters", "connected"),
                   "screens": b("issue5-memory", "counters", "screens_up")}
    s["fanout"] = {"deliveries_per_s": b("fanout", "throughput", "screen_events"),
                   "screens": b("fanout", "counters", "screens_up"),
                   "event_p50": b("fanout", "latency_ms", "report_screen", "p50"),
                   "event_p99": b("fanout", "latency_ms", "report_screen", "p99"),
                   "cpu_pct": b("fanout", "server", "cpu_percent"),
                   "generator_cpu_s": b("fanout", "generator_cpu_seconds")}
    geo = extra.get("index", {}).get("results") or []
    g100 = next((r for r in geo if r.get("n") == 100_000), None)
    s["index"] = g100 or {}
    per_run = []
    for a, b_ in zip(runs.get("floor-paced", []), runs.get("dispatch-paced", []), strict=False):
        x = (a.get("bench") or {}).get("server", {}).get("cpu_us_per_message")
        y = (b_.get("bench") or {}).get("server", {}).get("cpu_us_per_message")
        if x and y:
            per_run.append(round(100 * x / y))
    s["ingest"]["paced_ratio_runs"] = per_run
    cap = s["ingest"]["ratio_capacity_paced"]
    targets = [
        ("position ingest ≥ 60 % of the bare aiohttp floor",
         "≥ 60 %",
         f"{fmt(100 * cap, 0) if cap else '–'} % (CPU a message at equal paced load, medians; "
         f"run by run {', '.join(f'{x} %' for x in per_run) or '–'}); flood: "
         f"{fmt(100 * s['ingest']['ratio_rate'], 0) if s['ingest']['ratio_rate'] else '–'} % of "
         "the floor's rate",
         cap is not None and cap >= 0.6),
        ("≥ 5,000 durable reports/s sustained", "≥ 5,000/s",
         f"{fmt(rh, 0)}/s handled on the spot (median; runs "
         f"{', '.join(fmt(x, 0) for x in runs_of('dispatch-reports-handled'))}); "
         f"{fmt(rd, 0)}/s dispatched+accepted+resolved",
         rh is not None and rh >= 5000),
        ("p99 report→offer ≤ 10 ms at 1,000 reports/s, 10,000 devices", "≤ 10 ms",
         f"p99 {fmt(s['latency']['offer_p99'])} ms (p50 {fmt(s['latency']['offer_p50'])} ms) at "
         f"{fmt(s['latency']['reports_per_s'], 0)} reports/s acked (median of runs; p99 run by "
         f"run {', '.join(fmt(x) for x in p99_runs('issue5-latency'))} ms)",
         s["latency"]["offer_p99"] is not None and s["latency"]["offer_p99"] <= 10
         and (s["latency"]["reports_per_s"] or 0) >= 990),
        ("nearest among 100,000: median ≤ 20 µs", "≤ 20 µs",
         f"{fmt(g100.get('index_p50_us')) if g100 else '–'} µs",
         bool(g100) and g100["index_p50_us"] <= 20),
        ("… equal results to the brute-force scan", "0 mismatches",
         f"{g100.get('mismatches_vs_numpy')} of {g100.get('checked_vs_numpy')} differ; the "
         f"compiled and the pure-Python search differ on "
         f"{g100.get('answers_differing_from_python', '–')}" if g100 else "–",
         bool(g100) and g100["mismatches_vs_numpy"] == 0
         and not g100.get("answers_differing_from_python")),
        ("… ≥ 4× faster than Redis GEOSEARCH pipelined", "≥ 4×",
         f"{fmt(g100.get('index_vs_redis_pipelined_x'))}× (Redis's own time alone: "
         f"{fmt(g100.get('redis_server_us_per_geosearch'))} µs a GEOSEARCH, "
         f"{fmt((g100.get('redis_server_us_per_geosearch') or 0) / g100['index_p50_us'])}× the "
         "index's)" if g100 else "–",
         bool(g100) and g100["index_vs_redis_pipelined_x"] >= 4),
        ("fan-out ≥ 100,000 deliveries/s to 1,000 screens", "≥ 100,000/s",
         f"{fmt(s['fanout']['deliveries_per_s'], 0)}/s to {fmt(s['fanout']['screens'], 0)} screens",
         (s["fanout"]["deliveries_per_s"] or 0) >= 100_000
         and (s["fanout"]["screens"] or 0) >= 1000),
        ("10,000 devices + 50 screens within 1 GiB RSS", "≤ 1,024 MiB",
         f"peak {fmt(s['memory']['peak_rss_mib'], 0)} MiB with {fmt(s['memory']['connected'], 0)} "
         f"devices and {fmt(s['memory']['screens'], 0)} screens",
         s["memory"]["peak_rss_mib"] is not None and s["memory"]["peak_rss_mib"] <= 1024
         and (s["memory"]["connected"] or 0) >= 10_000),
    ]
    s["targets"] = [{"target": t, "goal": g, "measured": m, "met": ok} for t, g, m, ok in targets]
    return s


def render_only() -> int:
    from tests.bench.perfdoc import render

    runs: dict[str, list[Json]] = {}
    extra: Json = {}
    for path in sorted(RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc, list):
            runs[path.stem] = doc
        else:
            extra[path.stem] = doc
    summ = extra.get("summary") or {}
    info = summ.get("machine") or machine()
    commands = [tuple(c) for c in summ.get("commands", [])]
    extra["summary"] = {**summ, **summary(runs, extra)}
    DOC.write_text(render(runs, extra, info, commands), encoding="utf-8")  # type: ignore[arg-type]
    print(f"# wrote {DOC}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="one run each, shorter windows")
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs of each floor/dispatch pair (default 3, --quick 1)")
    ap.add_argument("--only", default="", help="comma-separated scenario names (or index, log)")
    ap.add_argument("--skip", default="", help="comma-separated scenario names to leave out")
    ap.add_argument("--nice", type=int, default=0,
                    help="run server and load at this niceness (e.g. -10 on a shared machine)")
    ap.add_argument("--plain", action="store_true", help="plain `dispatch serve`, no stethoscope")
    ap.add_argument("--no-doc", action="store_true", help="leave docs/performance.md alone")
    ap.add_argument("--tmp", default=None, help="folder for the runs (a real disk)")
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="run the working tree as it is (default: a copy taken at the start, so "
                         "edits made meanwhile do not leak into later scenarios)")
    ap.add_argument("--verbose", "-v", action="store_true")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite docs/performance.md from bench-results/*.json, run nothing")
    args = ap.parse_args(argv)
    if args.render_only:
        return render_only()
    repeat = args.repeat or (1 if args.quick else 3)
    only = {x for x in args.only.split(",") if x}
    skip = {x for x in args.skip.split(",") if x}
    want = lambda name: (not only or name in only) and name not in skip  # noqa: E731

    started = time.time()
    info = machine()
    runner = Runner(args)
    runs: dict[str, list[Json]] = defaultdict(list)
    extra: Json = {}
    todo = [s for s in scenarios(args.quick) if want(s.name)]
    try:
        pairs = [s for s in todo if s.repeatable]
        for k in range(repeat):
            for scn in pairs:  # interleaved: floor, dispatch, floor, dispatch, …
                runs[scn.name].append(runner.run(scn, k))
        for scn in todo:
            if not scn.repeatable:
                runs[scn.name].append(runner.run(scn, 0))
        if want("index"):
            extra["index"] = runner.index_bench()
        if want("log"):
            extra["log"] = runner.log_bench()
    finally:
        if not args.keep:
            shutil.rmtree(runner.tmp, ignore_errors=True)
        else:
            print(f"# runs kept in {runner.tmp}", file=sys.stderr)
    info["loadavg_at_end"] = loadavg()
    info["code_digest"] = runner.digest or "working tree (no snapshot)"
    info["seconds"] = round(time.time() - started)
    info["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    info["nice"] = args.nice
    info["repeat"] = repeat
    summ = summary(runs, extra)
    extra["summary"] = {"machine": info, "commands": runner.commands, **summ}
    write_results(runs, extra)
    if not args.no_doc:
        from tests.bench.perfdoc import render

        DOC.write_text(render(runs, extra, info, runner.commands), encoding="utf-8")
        print(f"# wrote {DOC}", file=sys.stderr)
    print(f"# results in {RESULTS}; {info['seconds']} s", file=sys.stderr)
    for t in summ["targets"]:
        print(f"{'MET ' if t['met'] else 'NOT '} {t['target']}: {t['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
