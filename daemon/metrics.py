"""The daemon's Prometheus metrics (``prometheus-client``), in a registry of its own.

:class:`Metrics` is told of phase changes and finished migrations by the audit
(:class:`~virtmig.daemon.audit.Audit`'s sinks) and of every RPC by the server interceptor
(:meth:`Metrics.rpc`); what the daemon holds now (migrations in flight by phase, domains by
state) is read from the registry when scraped.  Served by :mod:`virtmig.daemon.metrics_http`
when ``metrics_listen`` is set.  Names and labels (``role`` is ``source`` or ``destination``):

=============================================  ================================================
``virtmig_migrations_started_total``           role, mode, transport, protocol
``virtmig_migrations_succeeded_total``         role, mode, transport, protocol
``virtmig_migrations_failed_total``            role, mode, transport, protocol, reason
``virtmig_migration_phase_duration_seconds``   role, phase (histogram: time spent in a phase)
``virtmig_migration_duration_seconds``         role, outcome (histogram)
``virtmig_migration_downtime_seconds``         role, mode (histogram; completed migrations)
``virtmig_migration_bytes_total``              role (bytes transferred)
``virtmig_migrations_in_flight``               role, phase (gauge, at scrape time)
``virtmig_domains``                            state (gauge, at scrape time)
``virtmig_rpc_total``                          method, code
``virtmig_rpc_duration_seconds``               method (histogram)
``virtmig_last_migration_*``                   the last finished migration: ``info`` (labels
                                               migration_id, domain, role, outcome; value 1),
                                               ``duration_seconds``, ``downtime_seconds``,
                                               ``bytes``, ``end_timestamp_seconds``
=============================================  ================================================

``reason`` is a short class of the failure (bounded, never the message): ``cancelled``,
``timeout``, ``connection``, ``aborted``, ``destroyed``, ``rejected``, ``error``.  Labels hold
no caller text but the last migration's domain name (bounded to 200 characters).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from virtmig.daemon.audit import mode_of, transport_of
from virtmig.daemon.history import Entry
from virtmig.daemon.job import AsyncJob, MigrationJob, Phase

if TYPE_CHECKING:
    from virtmig.daemon.registry import Registry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MIG = ("role", "mode", "transport", "protocol")
_DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_RPC_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300)
_REASONS = (("cancel", "cancelled"), ("timed out", "timeout"), ("timeout", "timeout"),
            ("stall", "timeout"), ("connect", "connection"), ("refused", "connection"),
            ("abort", "aborted"), ("destroyed", "destroyed"), ("not allowed", "rejected"),
            ("unsupported", "rejected"), ("invalid", "rejected"))


def role_of(job: MigrationJob) -> str:
    return "source" if job.kind is AsyncJob.MIGRATION_OUT else "destination"


def reason_of(entry: Entry) -> str:
    """A bounded class of a failed migration's reason."""
    if entry.outcome == "cancelled":
        return "cancelled"
    text = entry.error.lower()
    return next((cls for word, cls in _REASONS if word in text), "error")


class _Live(Collector):
    """What the daemon holds at scrape time: migrations in flight by phase, domains by state."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        flight = GaugeMetricFamily("virtmig_migrations_in_flight",
                                   "Migration jobs on this daemon, by role and phase",
                                   labels=["role", "phase"])
        domains = GaugeMetricFamily("virtmig_domains", "Domains this daemon holds, by state",
                                    labels=["state"])
        jobs: dict[tuple[str, str], int] = {}
        states: dict[str, int] = {}
        for dom in self.registry:
            states[dom.state.name.lower()] = states.get(dom.state.name.lower(), 0) + 1
            if dom.job is not None:
                key = (role_of(dom.job), dom.job.phase.label)
                jobs[key] = jobs.get(key, 0) + 1
        for (role, phase), n in sorted(jobs.items()):
            flight.add_metric([role, phase], n)
        for state, n in sorted(states.items()):
            domains.add_metric([state], n)
        yield flight
        yield domains


class Metrics:
    """One daemon's metrics."""

    def __init__(self, registry: Registry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.started = Counter("virtmig_migrations_started", "Migrations started", _MIG,
                               registry=r)
        self.succeeded = Counter("virtmig_migrations_succeeded", "Migrations completed", _MIG,
                                 registry=r)
        self.failed = Counter("virtmig_migrations_failed", "Migrations failed or cancelled",
                              (*_MIG, "reason"), registry=r)
        self.phase_seconds = Histogram("virtmig_migration_phase_duration_seconds",
                                       "Time a migration job spent in a phase", ("role", "phase"),
                                       buckets=_DURATION_BUCKETS, registry=r)
        self.duration = Histogram("virtmig_migration_duration_seconds", "Migration duration",
                                  ("role", "outcome"), buckets=_DURATION_BUCKETS, registry=r)
        self.downtime = Histogram("virtmig_migration_downtime_seconds",
                                  "Guest downtime at the switchover", ("role", "mode"),
                                  buckets=_DOWNTIME_BUCKETS, registry=r)
        self.bytes = Counter("virtmig_migration_bytes", "Bytes of guest state transferred",
                             ("role",), registry=r)
        self.rpcs = Counter("virtmig_rpc", "RPCs served", ("method", "code"), registry=r)
        self.rpc_seconds = Histogram("virtmig_rpc_duration_seconds", "RPC duration",
                                     ("method",), buckets=_RPC_BUCKETS, registry=r)
        self.last_info = Gauge("virtmig_last_migration_info", "The last finished migration",
                               ("migration_id", "domain", "role", "outcome"), registry=r)
        self.last = {name: Gauge(f"virtmig_last_migration_{name}", f"The last finished "
                                 f"migration's {name.replace('_', ' ')}", registry=r)
                     for name in ("duration_seconds", "downtime_seconds", "bytes",
                                  "end_timestamp_seconds")}
        r.register(_Live(registry))
        # The labelled children every call and phase change counts in, kept once looked up
        # (``labels`` validates and locks each time); none of these metrics is ever cleared,
        # and their labels are bounded (the servicers' methods and status codes, roles and
        # phases).
        self._rpc_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._phase_children: dict[tuple[str, str], Any] = {}

    def scrape(self) -> bytes:
        return generate_latest(self.registry)

    # --- the audit's sink ---------------------------------------------------------------------

    def _started(self, job: MigrationJob) -> None:
        self.started.labels(role_of(job), mode_of(job), transport_of(job),
                            job.protocol or "-").inc()

    def phase(self, job: MigrationJob, old: Phase, spent: float) -> None:
        if old is Phase.NONE:
            self._started(job)
        else:
            self._phase_child(role_of(job), old.label).observe(max(0.0, spent))

    def _phase_child(self, role: str, phase: str) -> Any:
        child = self._phase_children.get((role, phase))
        if child is None:
            child = self._phase_children[(role, phase)] = self.phase_seconds.labels(role, phase)
        return child

    def ended(self, job: MigrationJob, entry: Entry, spent: float) -> None:
        if job.reported_phase is Phase.NONE:  # it ended before its first phase was saved
            self._started(job)
        else:
            self._phase_child(role_of(job), job.reported_phase.label).observe(max(0.0, spent))
        labels = (entry.role, entry.mode, entry.transport, entry.protocol or "-")
        if entry.outcome == "completed":
            self.succeeded.labels(*labels).inc()
            self.downtime.labels(entry.role, entry.mode).observe(entry.downtime_ms / 1000)
        else:
            self.failed.labels(*labels, reason_of(entry)).inc()
        self.duration.labels(entry.role, entry.outcome).observe(entry.duration_ms / 1000)
        self.bytes.labels(entry.role).inc(entry.bytes)
        self.last_info.clear()
        self.last_info.labels(entry.migration_id, entry.domain[:200], entry.role,
                              entry.outcome).set(1)
        self.last["duration_seconds"].set(entry.duration_ms / 1000)
        self.last["downtime_seconds"].set(entry.downtime_ms / 1000)
        self.last["bytes"].set(entry.bytes)
        self.last["end_timestamp_seconds"].set(time.time())

    # --- the interceptor's ----------------------------------------------------------------------

    def rpc(self, method: str, code: str, seconds: float) -> None:
        """One RPC (``/virtmig.v1.Domains/List``: labelled ``virtmig.v1.Domains/List``) ended
        with ``code`` (``OK``, ``NOT_FOUND``...) after ``seconds``."""
        children = self._rpc_children.get((method, code))
        if children is None:
            name = method.lstrip("/")
            children = self._rpc_children[(method, code)] = (
                self.rpcs.labels(name, code), self.rpc_seconds.labels(name))
        children[0].inc()
        children[1].observe(seconds)
