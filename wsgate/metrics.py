"""Prometheus metrics of one gateway, served by ``GET /metrics``.

Each :class:`GatewayMetrics` owns its own ``CollectorRegistry`` (never the
process-global one), so several gateways in one process, as in the tests,
keep separate numbers.

Two kinds of numbers:

- Events the gateway reports as they happen (rejected subscribes, disconnects,
  audit write, ingest and delivery latency) are ordinary counters and
  histograms, updated by calls from the gateway and the handlers.
- State the gateway already holds (open connections, subscriptions, the
  ``Gateway.stats`` counters, audit and broker health, history size) is read
  at scrape time by :class:`GatewayCollector`, so the hot delivery path pays
  nothing for it.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from wsgate import errors

if TYPE_CHECKING:
    from wsgate.audit.witness import WitnessPublisher
    from wsgate.events import Event
    from wsgate.gateway.observer import NodeState

log = logging.getLogger("wsgate.metrics")

#: Latency buckets in seconds: sub-millisecond local work up to multi-second stalls.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)

#: Close codes counted under a label of their own: those a peer may send on
#: the wire below 3000 (RFC 6455 section 7.4.1, and 1012-1014 from IANA's
#: registry), 1006 (no close frame), and the server's own private codes.
_CLOSE_LABELS = frozenset((1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1010, 1011, 1012,
                           1013, 1014, errors.CLOSE_EXPIRED, errors.CLOSE_REVOKED,
                           errors.CLOSE_SLOW_CONSUMER))
#: The one label of every other private code (3000-4999: any application's).
PRIVATE_CLOSE_LABEL = "3000-4999"


def close_label(code: int) -> str:
    """The ``code`` label of ``wsgate_disconnects`` for a close code: a bounded
    set, whatever a peer sends (the WebSocket layer already records a code not
    valid on the wire as the 1002 it answered; "other" is only a safety net)."""
    if code in _CLOSE_LABELS:
        return str(code)
    if 3000 <= code <= 4999:
        return PRIVATE_CLOSE_LABEL
    return "other"


class LoopHistogram:
    """A histogram for one thread's observations (the event loop's), without a lock.

    Exposed exactly as ``prometheus_client.Histogram`` exposes one without
    labels (``_bucket`` with ``le``, ``_count``, ``_sum``, ``_created``), at a
    seventh of its cost per observation (0.25 us against 1.8: it takes a lock
    per bucket, the count and the sum), which the ingest path pays per request
    and per event. Observations from another thread would race: every caller
    of GatewayMetrics runs on the event loop, as do scrapes.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(set(bounds)) or math.inf in bounds:
            raise ValueError("buckets must be finite, increasing and distinct")
        self.name = name
        self.documentation = documentation
        self._bounds = bounds
        self._labels = [floatToGoString(b) for b in (*bounds, math.inf)]
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._created = time.time()
        registry.register(self)

    def observe(self, value: float) -> None:
        """Count one observation, in the first bucket whose bound is >= value."""
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation)
        running = 0
        buckets = []
        for label, count in zip(self._labels, self._counts, strict=True):
            running += count
            buckets.append((label, running))
        family.add_metric([], buckets, self._sum)
        family.add_sample(f"{self.name}_created", {}, self._created)
        yield family


class GatewayMetrics:
    """The instruments of one gateway and the registry that serves them.

    Made by the composition root (``wsgate.app.build_gateway``), one per gateway:
    the gateway reports to it as its :class:`~wsgate.gateway.observer.Observer`,
    and :meth:`watch` makes a scrape read the gateway's
    :class:`~wsgate.gateway.observer.NodeState`.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.subscribe_rejected = Counter(
            "wsgate_subscribe_rejected", "Subscribe topics refused, by reject code.",
            ["code"], registry=r)
        self.disconnects = Counter(
            "wsgate_disconnects", "Closed WebSocket connections, by close code "
            "(1006: the peer went away without a close code; 3000-4999: a client's "
            "private code other than 4001, 4003, 4008).", ["code"], registry=r)
        self.audit_write_seconds = LoopHistogram(
            "wsgate_audit_write_seconds", "Time a subscribe waited for its audit rows "
            "to be committed (or refused).", buckets=LATENCY_BUCKETS, registry=r)
        self.ingest_seconds = LoopHistogram(
            "wsgate_ingest_seconds", "Time to answer POST /v1.0/events, any status.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.ingest_requests = Counter(
            "wsgate_ingest_requests", "POST /v1.0/events answers, by HTTP status.",
            ["status"], registry=r)
        self.ingest_events = Counter(
            "wsgate_ingest_events_accepted", "Events accepted by POST /v1.0/events.",
            registry=r)
        self.delivery_seconds = LoopHistogram(
            "wsgate_delivery_seconds", "From an event's published_at to when this node "
            "had written it to its matching connections; one observation per event "
            "per node (published_at has millisecond resolution).",
            buckets=LATENCY_BUCKETS, registry=r)
        self._parsed_at = ("", 0.0)
        #: ``ingest_requests`` children by status (``labels()`` takes a lock per call).
        self._ingest_by_status: dict[int, Any] = {}

    def watch(self, node: NodeState) -> None:
        """Serve the node's state (connections, counters, health) at scrape time."""
        self.registry.register(GatewayCollector(node))

    # -- calls from the gateway and the handlers --------------------------------

    def rejected(self, rejections: Iterable[Mapping[str, str]]) -> None:
        """Count the rejected topics of one subscribe reply (``protocol.rejection`` dicts)."""
        for rejection in rejections:
            self.subscribe_rejected.labels(rejection["code"]).inc()

    def closed(self, code: int) -> None:
        """Count one closed connection under its close code."""
        self.disconnects.labels(close_label(code)).inc()

    def audit_waited(self, seconds: float) -> None:
        """Observe how long one subscribe waited for its audit rows."""
        self.audit_write_seconds.observe(seconds)

    def ingested(self, status: int, accepted: int, seconds: float) -> None:
        """Record one answered ingest request."""
        self.ingest_seconds.observe(seconds)
        counter = self._ingest_by_status.get(status)
        if counter is None:
            counter = self._ingest_by_status[status] = self.ingest_requests.labels(str(status))
        counter.inc()
        if accepted:
            self.ingest_events.inc(accepted)

    def delivered(self, events: Sequence[Event], now: float | None = None) -> None:
        """Observe the end-to-end latency of events this node has just delivered.

        Events of one ingest request share one ``published_at``, so its text is
        parsed once per batch, not once per event.
        """
        if now is None:
            now = time.time()
        text, stamp = self._parsed_at
        observe = self.delivery_seconds.observe
        for event in events:
            if event.published_at != text:
                text = event.published_at
                try:
                    stamp = datetime.fromisoformat(text).timestamp()
                except ValueError:
                    continue
            # Clocks of different nodes may disagree by a little: never negative.
            observe(max(0.0, now - stamp))
        self._parsed_at = (text, stamp)

    # -- serving ----------------------------------------------------------------

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for an ``Accept`` header: (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class GatewayCollector:
    """Reads a gateway's state when Prometheus scrapes (a custom collector).

    Each number is read on its own: a failing source (a broker that cannot
    answer) leaves only its own metric out of the scrape.
    """

    def __init__(self, node: NodeState) -> None:
        self.node = node

    def describe(self) -> Iterable[Metric]:
        # Naming no metrics up front keeps registration from calling collect()
        # before the gateway is fully built.
        return ()

    def collect(self) -> Iterator[Metric]:
        gw = self.node
        yield _gauge("wsgate_connections", "Open WebSocket connections.", gw.open_connections)
        yield _gauge("wsgate_subscriptions", "Subscriptions held by open connections.",
                     gw.subscription_count)
        counters = gw.counters()
        for key, name, doc in (
                ("events_received", "wsgate_events_received",
                 "Events this node received from the broker for delivery."),
                ("messages_delivered", "wsgate_messages_delivered",
                 "Event frames written to connections."),
                ("slow_consumer_closes", "wsgate_slow_consumer_closes",
                 "Connections closed with 4008 because their unsent output passed the limit."),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], counters.get(key, 0))
            yield counter
        yield _gauge("wsgate_audit_up", "1 when the last audit write reached the store.",
                     lambda: int(bool(gw.audit.healthy())))
        yield _gauge("wsgate_audit_queue_rows",
                     "Audit rows waiting for the writer (group commit queue).",
                     gw.audit.queue_depth)
        if gw.audit.witness is not None:
            yield from _witness_metrics(gw.audit.witness)
        yield _gauge("wsgate_broker_up", "1 when the broker can publish and receive.",
                     lambda: int(bool(gw.broker.healthy())))
        # Only brokers that can fail (Redis) keep these counts.
        failures = gw.broker.failure_counts()
        for key, name, doc in (
                ("publish_failures", "wsgate_broker_publish_failures",
                 "Events the broker could not publish (ingest answered 503)."),
                ("connect_failures", "wsgate_broker_connect_failures",
                 "Broker connections lost or not made."),
        ):
            if key in failures:
                counter = CounterMetricFamily(name, doc)
                counter.add_metric([], failures[key])
                yield counter
        yield _gauge("wsgate_history_events", "Events held in resume history on this node.",
                     gw.broker.history_size)
        yield _gauge("wsgate_draining", "1 while the node is shutting down.",
                     lambda: int(gw.draining))


def _witness_metrics(publisher: WitnessPublisher) -> Iterator[Metric]:
    """The wsgate_witness_* families, one sample per witness, labelled by its redacted URL."""
    up = GaugeMetricFamily("wsgate_witness_up", "1 when the witness took the last checkpoint "
                           "sent to it (or none was sent yet).", labels=["witness"])
    pending = GaugeMetricFamily("wsgate_witness_pending", "Checkpoints waiting to be "
                                "delivered to the witness.", labels=["witness"])
    delivered = CounterMetricFamily("wsgate_witness_delivered", "Checkpoints the witness "
                                    "took.", labels=["witness"])
    failures = CounterMetricFamily("wsgate_witness_failures", "Delivery attempts to the "
                                   "witness that failed (each retry counts).", labels=["witness"])
    dropped = CounterMetricFamily("wsgate_witness_dropped", "Checkpoints never delivered "
                                  "to the witness: its queue was full.", labels=["witness"])
    for w in publisher.witnesses:
        up.add_metric([w.name], int(w.up))
        pending.add_metric([w.name], w.pending())
        delivered.add_metric([w.name], w.delivered)
        failures.add_metric([w.name], w.failures)
        dropped.add_metric([w.name], w.dropped)
    return iter((up, pending, delivered, failures, dropped))


def _gauge(name: str, doc: str, read: Callable[[], float]) -> Metric:
    family = GaugeMetricFamily(name, doc)
    try:
        family.add_metric([], float(read()))
    except Exception:
        # An empty family is still a valid exposition; the scrape goes on.
        log.exception("metric %s could not be read", name)
    return family
