"""Prometheus metrics, served on 127.0.0.1 when ``daemon.metrics_port`` is set.

One registry per daemon (not the global one), so tests and several daemons in
one process never collide.  The names follow Prometheus conventions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

__all__ = ["Metrics"]


def _registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


@dataclass
class Metrics:
    """The daemon's counters and gauges."""

    registry: CollectorRegistry = field(default_factory=_registry)

    def __post_init__(self) -> None:
        r = self.registry
        self.syncs = Counter(
            "provisioner_syncs",
            "Applies of the store into the target",
            ["kind", "result"],
            registry=r,
        )
        self.objects = Counter(
            "provisioner_users_applied",
            "Users added, updated or removed in the target",
            ["op"],
            registry=r,
        )
        self.reloads = Counter(
            "provisioner_reloads",
            "res_pjsip.so reloads by outcome",
            ["server", "result"],
            registry=r,
        )
        self.reconnects = Counter(
            "provisioner_ami_reconnects",
            "Main AMI sessions after the first, per server name (across links a SIGHUP remade)",
            ["server"],
            registry=r,
        )
        self.events = Counter(
            "provisioner_registration_events",
            "Registration events ingested",
            ["server"],
            registry=r,
        )
        self.owed = Gauge(
            "provisioner_ami_owed_actions",
            "Cache expiries and contact removals waiting to be sent, per server",
            ["server"],
            registry=r,
        )
        self.provisioned = Gauge(
            "provisioner_users_provisioned", "Users with PJSIP objects", registry=r
        )
        self.conflicts = Gauge(
            "provisioner_users_conflicting",
            "Users skipped because a row provisioner did not create holds one of their ids",
            registry=r,
        )
        self.skipped = Gauge(
            "provisioner_users_skipped",
            "Users skipped because their row cannot be rendered (each keeps its last good objects)",
            registry=r,
        )
        self.online = Gauge(
            "provisioner_contacts_online",
            "Endpoints with a usable contact (NaN while the server is not read)",
            ["server"],
            registry=r,
        )
        self.not_live = Gauge(
            "provisioner_endpoints_not_live",
            "Endpoints the check after an apply found not held as rendered, until fixed",
            ["server"],
            registry=r,
        )
        self.live = Gauge(
            "provisioner_registrations_live",
            "1 while the server's registration state is read (session up, snapshot stored)",
            ["server"],
            registry=r,
        )

    def drop_server(self, server: str, reload_results: Iterable[str]) -> None:
        """Drop every series labelled ``server``, counters and gauges alike (a server a
        SIGHUP took out: its gauges would say its last figures for good, its counters
        would be served for a server no longer there).  ``reload_results``: the
        ``result`` labels its reloads were counted under.  A series never made is no
        error."""
        for metric in (
            self.reconnects,
            self.events,
            self.owed,
            self.online,
            self.not_live,
            self.live,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(server)
        for result in reload_results:
            with contextlib.suppress(KeyError):
                self.reloads.remove(server, result)

    def serve(self, port: int) -> None:
        """Serve ``/metrics`` on 127.0.0.1:``port`` from a daemon thread."""
        start_http_server(port, addr="127.0.0.1", registry=self.registry)
