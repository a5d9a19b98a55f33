"""The gRPC server on a unix socket: wiring, logging, metrics, shutdown.

Every RPC goes through one wrapper that times it, turns exceptions into status
codes (``errors.status_of``), logs one line with method, code and duration, and
counts it in the metrics. Requests are never logged, so secrets never are.

The socket is created with mode 0600 (0660 with a group); a stale socket file
left by a killed plugin is replaced. SIGTERM stops the server gracefully; staged
volumes' FUSE daemons keep running and are found again by the next start.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from .controller import Controller
from .errors import status_of
from .group_controller import GroupController
from .identity import Identity
from .node import Node
from .plugin import Config, Plugin
from .proto import csi_pb2_grpc

log = logging.getLogger(__name__)


class Metrics:
    """Prometheus metrics; a no-op when no metrics address is configured."""

    def __init__(self, plugin: Plugin, address: str | None) -> None:
        self.enabled = bool(address)
        if not self.enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
        from prometheus_client.core import GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.rpcs = Counter(
            "fusedrive_csi_rpc_total",
            "CSI RPCs by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fusedrive_csi_rpc_seconds",
            "CSI RPC latency by method",
            ["method"],
            registry=self.registry,
        )
        self.deaths = Counter(
            "fusedrive_csi_daemon_deaths_total",
            "FUSE daemons of staged volumes that died (noticed by the plugin's watch)",
            registry=self.registry,
        )
        self.heals = Counter(
            "fusedrive_csi_daemon_heals_total",
            "attempts to remount a volume whose FUSE daemon died, by result",
            ["result"],
            registry=self.registry,
        )

        class StoreCollector:
            def collect(self) -> Any:
                st = plugin.store.stats()
                for name, value, doc in (
                    ("fusedrive_store_stored_bytes", st.stored_bytes, "compressed bytes stored"),
                    ("fusedrive_store_logical_bytes", st.logical_used_bytes, "bytes volumes use"),
                    ("fusedrive_store_chunks", st.chunk_count, "unique chunks stored"),
                    ("fusedrive_store_dedup_ratio", st.dedup_ratio, "referenced / unique bytes"),
                    ("fusedrive_store_compression_ratio", st.compression_ratio, "raw / stored"),
                    ("fusedrive_store_disk_free_bytes", st.disk_free_bytes, "free disk space"),
                    (
                        "fusedrive_volumes_staged",
                        sum(1 for r in plugin.state.all() if r.staging_path),
                        "staged volumes",
                    ),
                ):
                    yield GaugeMetricFamily(name, doc, value=value)

        self.registry.register(StoreCollector())
        host, _, port = (address or "").rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
        log.info("event=metrics_listening address=%s", address)

    def daemon_died(self, volume_id: str) -> None:
        if self.enabled:
            self.deaths.inc()

    def daemon_healed(self, volume_id: str, ok: bool) -> None:
        if self.enabled:
            self.heals.labels("ok" if ok else "failed").inc()

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        if self.enabled:
            self.rpcs.labels(method, code.name).inc()
            self.latency.labels(method).observe(seconds)


def _wrap(method: str, fn: Callable[..., Any], metrics: Metrics) -> Callable[..., Any]:
    @functools.wraps(fn)
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        t0 = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        try:
            return fn(request, context)
        except Exception as exc:
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("event=rpc_internal_error method=%s", method)
            context.abort(code, message)
        finally:
            took = time.perf_counter() - t0
            metrics.observe(method, code, took)
            log.info(
                "event=rpc method=%s code=%s ms=%.1f%s",
                method,
                code.name,
                took * 1000,
                f" message={message!r}" if message else "",
            )

    return handler


def _instrument(servicer: Any, base: type, metrics: Metrics) -> Any:
    for name in dir(base):
        if name[0].isupper():
            setattr(servicer, name, _wrap(name, getattr(servicer, name), metrics))
    return servicer


def _socket_path(endpoint: str) -> str:
    if not endpoint.startswith("unix://"):
        raise ValueError(f"endpoint must be unix:///absolute/path, not {endpoint!r}")
    path = endpoint[len("unix://") :]
    if not path.startswith("/"):
        path = "/" + path.lstrip("/")
    return path


class Server:
    def __init__(
        self,
        config: Config,
        endpoint: str,
        metrics_address: str | None = None,
        socket_group: str | None = None,
        workers: int = 8,
    ) -> None:
        self.socket_path = _socket_path(endpoint)
        self.socket_group = socket_group
        self.plugin = Plugin(config)
        self.metrics = Metrics(self.plugin, metrics_address)
        self.node = Node(self.plugin, self.metrics)
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
        csi_pb2_grpc.add_IdentityServicer_to_server(
            _instrument(Identity(self.plugin), csi_pb2_grpc.IdentityServicer, self.metrics),
            self.grpc,
        )
        csi_pb2_grpc.add_ControllerServicer_to_server(
            _instrument(Controller(self.plugin), csi_pb2_grpc.ControllerServicer, self.metrics),
            self.grpc,
        )
        csi_pb2_grpc.add_GroupControllerServicer_to_server(
            _instrument(
                GroupController(self.plugin), csi_pb2_grpc.GroupControllerServicer, self.metrics
            ),
            self.grpc,
        )
        csi_pb2_grpc.add_NodeServicer_to_server(
            _instrument(self.node, csi_pb2_grpc.NodeServicer, self.metrics), self.grpc
        )
        self._stop = threading.Event()
        self._gc_thread = threading.Thread(target=self._gc_loop, name="gc", daemon=True)

    def _gc_loop(self) -> None:
        """Release deleted volumes' space in small steps that never block writers long."""
        while not self._stop.is_set():
            try:
                more = self.plugin.store.gc_step(budget=0.005)
            except Exception:
                log.exception("event=gc_failed")
                more = False
            self._stop.wait(0.01 if more else 1.0)

    def start(self) -> None:
        path = self.socket_path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # stale socket of a previous run
            else:
                raise ValueError(f"{path} exists and is not a socket")
        self.node.start()
        old = os.umask(0o177 if not self.socket_group else 0o117)
        try:
            self.grpc.add_insecure_port(f"unix://{path}")
            self.grpc.start()
        finally:
            os.umask(old)
        if self.socket_group:
            os.chown(path, -1, grp.getgrnam(self.socket_group).gr_gid)
        self._gc_thread.start()
        log.info("event=listening endpoint=unix://%s node=%s", path, self.plugin.config.node_id)

    def stop(self, grace: float = 5.0) -> None:
        self._stop.set()
        self.grpc.stop(grace).wait()
        self.node.stop()
        if self._gc_thread.is_alive():
            self._gc_thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self.plugin.close()
        log.info("event=stopped")

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down cleanly."""
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        done.wait()
        self.stop()
