"""``dispatch serve`` with a stethoscope: the same server, plus a record of its pauses.

    python -m tests.bench.serve_instrumented --config FILE --stats OUT.json [--lag-every 0.01]

It does exactly what ``dispatch serve`` does (``dispatch.cli.cmd_serve``: load the settings and
the town, ``run_server``), without touching server code, and adds two observers so a benchmark
can say which side of the socket a latency tail comes from:

* **garbage-collector pauses** — ``gc.callbacks``: every collection's generation, start time,
  duration and objects collected (the cost is two ``perf_counter`` calls a collection);
* **event-loop lag** — a task that sleeps ``--lag-every`` seconds and records how late it woke
  (any pause of the loop: a long callback, a GC, a blocked syscall, a CPU stolen by another
  process). Set ``--lag-every 0`` to leave it out.

Two EXPERIMENT switches change how the collector runs (not how the server works), to measure
what a fix in the server would buy: ``--gc-threshold``, ``--gc-freeze-every`` and
``--switch-interval``.

The record goes to ``--stats`` (JSON) at exit and on ``SIGUSR2``: ``gc`` = [[t, gen, ms,
collected], …] and ``lag`` = [[t, ms], …] with ``t`` in epoch seconds, plus totals.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class Stethoscope:
    def __init__(self, path: Path | None, lag_every: float) -> None:
        self.path = path
        self.lag_every = lag_every
        self.gc: list[list[float]] = []
        self.lag: list[list[float]] = []
        self._gc_t0 = 0.0

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            ms = (time.perf_counter() - self._gc_t0) * 1000
            self.gc.append([round(time.time(), 4), info.get("generation", -1), round(ms, 3),
                            info.get("collected", 0)])

    async def monitor(self) -> None:
        period = self.lag_every
        if period <= 0:
            return
        lag = self.lag
        while True:
            t = time.perf_counter()
            await asyncio.sleep(period)
            late = (time.perf_counter() - t - period) * 1000
            lag.append([round(time.time(), 4), round(late, 3)])

    def write(self) -> None:
        if self.path is None:
            return
        doc = {
            "pid": os.getpid(),
            "lag_every": self.lag_every,
            "gc_thresholds": gc.get_threshold(),
            "gc": self.gc,
            "lag": self.lag,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.path)


async def freezer(every: float) -> None:
    """Move everything alive into the permanent generation, now and every ``every`` s."""
    while True:
        gc.freeze()
        await asyncio.sleep(every)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--config", "-c", required=True)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--stats", type=Path, default=None, help="write the pause record here")
    ap.add_argument("--lag-every", type=float, default=0.01)
    ap.add_argument("--gc-threshold", default=None, metavar="G0,G1,G2",
                    help="EXPERIMENT: gc.set_threshold(G0, G1, G2) before serving")
    ap.add_argument("--gc-freeze-every", type=float, default=0.0, metavar="S",
                    help="EXPERIMENT: gc.freeze() once serving and then every S seconds "
                         "(survivors leave the collected generations; cyclic garbage that "
                         "is frozen is never freed)")
    ap.add_argument("--switch-interval", type=float, default=None, metavar="S",
                    help="EXPERIMENT: sys.setswitchinterval(S) (the GIL hand-over period)")
    args = ap.parse_args(argv)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)

    from dispatch.cli import _settings, run_server
    from dispatch.config import load_data
    from dispatch.logs import configure

    settings = _settings(args.config)
    configure(settings.log.level, settings.log.format)
    settings.require_secret()
    data = load_data(settings)
    scope = Stethoscope(args.stats, args.lag_every)
    if args.gc_threshold:
        gc.set_threshold(*(int(x) for x in args.gc_threshold.split(",")))
    gc.callbacks.append(scope.on_gc)
    tasks: list[asyncio.Task[None]] = []

    async def ready(_app: Any) -> None:
        loop = asyncio.get_running_loop()
        tasks.append(loop.create_task(scope.monitor()))
        if args.gc_freeze_every > 0:
            tasks.append(loop.create_task(freezer(args.gc_freeze_every)))
        loop.add_signal_handler(signal.SIGUSR2, scope.write)

    try:
        run_server(settings, data, port=args.port, ready=ready)
    finally:
        scope.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
