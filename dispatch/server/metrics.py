"""Prometheus metrics, prefix ``dispatch_``. Label sets are bounded: categories, sources, reasons,
levels, roles and statuses — never incident or responder ids.

Each app has its own registry (tests run several apps in one process). Counters are fed from the
events the town writer makes durable (:meth:`Metrics.observe_event`); gauges of open incidents and
responder statuses are computed at scrape time from the engines (:class:`_StateCollector`).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dispatch.engine.events import (
    Event,
    IncidentAssigned,
    IncidentClosed,
    IncidentDeclined,
    IncidentEscalated,
    IncidentOffered,
    IncidentOfferExpired,
    IncidentReported,
    IncidentTransferred,
)

# `<name>_created` series (the time each counter was created) only double the exposition here:
# the process start time says the same.
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)
APPEND_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)


class _LoopChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopCounter(Collector):
    """A labelled counter for the event loop's hot paths (a message, an event): read at scrape.

    prometheus_client's ``Counter`` takes a lock on every ``inc``; these counters are only
    touched on the event loop's thread, so a plain add is exact and costs a fraction of that.
    Exposed like a ``Counter`` (``<name>_total``), without the ``_created`` sample."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _LoopChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> _LoopChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
            child = self._children[values] = _LoopChild()
        return child

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._doc, labels=self._labelnames)


class _StateCollector(Collector):
    def __init__(
        self, engines: Callable[[], Iterable[Any]], extra: Callable[[], Iterable[Any]] | None = None
    ) -> None:
        self._engines = engines
        self._extra = extra

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._extra is not None:
            yield from self._extra()
        open_g = GaugeMetricFamily(
            "dispatch_open_incidents",
            "Open incidents by owning level and status",
            labels=["level", "status"],
        )
        resp_g = GaugeMetricFamily("dispatch_responders", "Responders by status", labels=["status"])
        overdue_g = GaugeMetricFamily(
            "dispatch_overdue_incidents", "Open level-1 incidents past their time limit"
        )
        inc_tally: Tally[tuple[str, str]] = Tally()
        resp_tally: Tally[str] = Tally()
        overdue = 0
        for engine in self._engines():
            state = engine.state
            for iid in state.open_ids:
                inc = state.incidents[iid]
                inc_tally[(str(inc.level), inc.status)] += 1
                overdue += inc.overdue
            for r in state.responders.values():
                resp_tally[r.status] += 1
        for level in ("3", "2", "1"):
            for status in ("new", "offered", "assigned", "on_scene", "resolved"):
                open_g.add_metric([level, status], inc_tally[(level, status)])
        for status in ("offline", "available", "offered", "assigned", "on_scene", "off_duty"):
            resp_g.add_metric([status], resp_tally[status])
        overdue_g.add_metric([], overdue)
        yield open_g
        yield resp_g
        yield overdue_g


class Metrics:
    def __init__(
        self,
        engines: Callable[[], Iterable[Any]] | None = None,
        extra: Callable[[], Iterable[Any]] | None = None,
    ) -> None:
        """``engines`` feeds the open-incident and responder gauges at scrape time; ``extra``
        yields further metric families (the governance statistics)."""
        r = self.registry = CollectorRegistry()
        self.incidents = LoopCounter(
            "dispatch_incidents_reported", "Incidents reported", ["category", "source"], r
        )
        self.escalations = Counter(
            "dispatch_escalations",
            "Escalations between levels",
            ["reason", "from_level", "to_level"],
            registry=r,
        )
        self.offers = LoopCounter("dispatch_offers", "Offers by outcome", ["outcome"], r)
        self.report_to_offer = Histogram(
            "dispatch_report_to_offer_seconds",
            "From report to the first offer",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.offer_to_accept = Histogram(
            "dispatch_offer_to_accept_seconds",
            "From an offer to its acceptance",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.append_latency = Histogram(
            "dispatch_log_append_seconds",
            "Event log append (durable) latency per batch",
            buckets=APPEND_BUCKETS,
            registry=r,
        )
        self.append_batch = Histogram(
            "dispatch_log_append_batch_events",
            "Events per durable append",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.append_errors = Counter("dispatch_log_append_errors", "Failed log appends", registry=r)
        self.connections = Gauge(
            "dispatch_connections", "Open websocket connections by role", ["role"], registry=r
        )
        self.messages = LoopCounter(
            "dispatch_messages_received", "Client messages received", ["channel"], r
        )
        self.errors = LoopCounter("dispatch_client_errors", "Errors sent to clients", ["code"], r)
        self.evictions = Counter(
            "dispatch_slow_consumers_closed",
            "Connections closed because they could not keep up",
            registry=r,
        )
        self.events = LoopCounter("dispatch_events", "Durable events by type", ["type"], r)
        for role in ("field", "screen"):
            self.connections.labels(role)
        for outcome in ("offered", "accepted", "declined", "expired"):
            self.offers.labels(outcome)
        if engines is not None:
            r.register(_StateCollector(engines, extra))
        self._by_type: dict[type, Any] = {}
        self._offered_at: dict[str, float] = {}
        self._reported_at: dict[str, float] = {}

    def observe_event(self, event: Event) -> None:
        """Count one durable event (called by the town writer after each append)."""
        counter = self._by_type.get(type(event))
        if counter is None:
            counter = self._by_type[type(event)] = self.events.labels(event.type_name())
        counter.inc()
        match event:
            case IncidentReported():
                self.incidents.labels(event.category, event.source).inc()
                if not event.handled:
                    self._reported_at[event.incident] = event.at
            case IncidentOffered():
                self.offers.labels("offered").inc()
                self._offered_at[event.incident] = event.at
                t0 = self._reported_at.pop(event.incident, None)
                if t0 is not None:
                    self.report_to_offer.observe(max(0.0, event.at - t0))
            case IncidentAssigned():
                t0 = self._offered_at.pop(event.incident, None)
                if t0 is not None and event.by is None:
                    self.offers.labels("accepted").inc()
                    self.offer_to_accept.observe(max(0.0, event.at - t0))
            case IncidentDeclined():
                self.offers.labels("declined").inc()
                self._offered_at.pop(event.incident, None)
            case IncidentOfferExpired():
                self.offers.labels("expired").inc()
                self._offered_at.pop(event.incident, None)
            case IncidentEscalated():
                self.escalations.labels(
                    event.reason, str(event.from_level), str(event.to_level)
                ).inc()
                self._offered_at.pop(event.incident, None)
                self._reported_at.pop(event.incident, None)
            case IncidentClosed() | IncidentTransferred():
                # no acceptance will follow: forget the start times, or they pile up forever
                self._offered_at.pop(event.incident, None)
                self._reported_at.pop(event.incident, None)
            case _:
                pass

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
