"""``dispatch bench`` against a real server: the load generator's own figures must be right,
or every benchmark built on it is wrong."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dispatch.sim.bench import write_bench_town
from tests.e2e.harness import free_port

pytestmark = pytest.mark.slow


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the server did not come up")


def _bench(tmp_path: Path, *args: str) -> dict:  # type: ignore[type-arg]
    """Serve a 60-worker bench town and run ``dispatch bench`` against it; its JSON."""
    port = free_port()
    config = write_bench_town(tmp_path, 60, server={"port": port})
    server = subprocess.Popen(
        [sys.executable, "-m", "dispatch.cli", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "server.log").open("wb"),
    )
    try:
        _wait_healthy(port, server)
        out = tmp_path / "run.json"
        run = subprocess.run(
            [sys.executable, "-m", "dispatch.cli", "bench", "--config", str(config),
             "--url", f"ws://127.0.0.1:{port}", *args, "--out", str(out)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
    finally:
        server.terminate()
        server.wait(timeout=15)
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_bench_drives_devices_and_screens_and_counts_every_delivery(tmp_path: Path) -> None:
    doc = _bench(tmp_path, "--devices", "40", "--position-every", "1", "--rate", "5",
                 "--screens", "3", "--warmup", "1", "--duration", "3", "--processes", "1")
    c = doc["counters"]
    assert doc["errors"] == {}
    assert c["connected"] == 40 and c["screens_up"] == 3
    assert c["reports_sent"] == c["reports_acked"] > 0 and c["reports_failed"] == 0
    assert c["offers"] > 0 and c["accepts"] == c["resolves"] == c["offers"]
    # three town screens: each sees every event, in order, with no gap
    assert c["screen_gaps"] == 0 and c["screen_disorder"] == 0
    assert c["screen_events"] >= 3 * c["reports_acked"]
    lat = doc["latency_ms"]
    assert lat["report_ack"]["n"] > 0 and lat["report_screen"]["n"] > 0
    assert 0 < lat["report_ack"]["p50"] < 1000


def test_bench_bursts_send_whole_bursts_and_every_report_is_answered(tmp_path: Path) -> None:
    """``--burst N --burst-every S``: N reports at once every S seconds (split over the
    workers), none shed, every one acked."""
    doc = _bench(tmp_path, "--devices", "40", "--position-every", "5", "--rate", "0",
                 "--burst", "400", "--burst-every", "2", "--screens", "0", "--warmup", "1",
                 "--duration", "2", "--processes", "2", "--no-probe")
    c = doc["counters"]
    assert doc["errors"] == {}
    assert c["shed"] == 0
    assert c["reports_sent"] >= 400 and c["reports_sent"] % 200 == 0  # 200 a worker a burst
    assert c["reports_acked"] == c["reports_sent"] and c["reports_failed"] == 0
