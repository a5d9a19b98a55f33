"""The plugin's shared context: configuration, the store, node state, locks.

One ``Plugin`` serves Identity, Controller and Node for its node's store. The
services hold a reference to it and nothing else.

Locking: an RPC that changes a volume or snapshot takes that object's operation
slot; a second RPC on the same object while the first runs gets ABORTED (the
spec's "operation pending"), so the CO retries instead of racing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from blockstore import Store

from .errors import CsiError
from .state import NodeState

log = logging.getLogger(__name__)

DEFAULT_DRIVER_NAME = "csi.fusedrive.io"
TOPOLOGY_KEY = "topology.fusedrive.io/node"
VERSION = "0.1.0"


@dataclass
class Config:
    node_id: str
    store_path: Path
    state_path: Path
    driver_name: str = DEFAULT_DRIVER_NAME
    # The mounter owning the FUSE daemons ('': one inside this process; docs/restart.md).
    mounter_socket: str = ""
    max_volumes_per_node: int = 0
    default_capacity: int = 1 << 30
    fusedrive_command: list[str] = field(default_factory=list)
    # Staging and target paths must lie below one of these (empty: anywhere).
    allowed_path_prefixes: list[str] = field(default_factory=list)
    # Seconds between noticing a dead FUSE daemon and remounting its volume.
    heal_delay: float = 0.0


class Plugin:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.store_path)
        self.state = NodeState(config.state_path)
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()

    @property
    def topology(self) -> dict[str, str]:
        return {TOPOLOGY_KEY: self.config.node_id}

    @contextlib.contextmanager
    def operation(self, *keys: str) -> Iterator[None]:
        """Hold the operation slots of ``keys``; ABORTED if one is taken."""
        with self._busy_lock:
            taken = [k for k in keys if k in self._busy]
            if taken:
                raise CsiError(
                    grpc.StatusCode.ABORTED, f"an operation on {taken[0]!r} is already in progress"
                )
            self._busy.update(keys)
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy.difference_update(keys)

    def close(self) -> None:
        self.store.close()

    def flush_volume(self, volume_id: str) -> None:
        """Make a staged volume's FUSE daemon commit its buffered writes now.

        Called before CreateSnapshot and before a clone of a live volume, so the
        snapshot holds every write that returned before the request, and after an
        expansion or a change of parameters, so the mount reports the new capacity
        and compresses at the new level.
        """
        rec = self.state.get(volume_id)
        if rec is None or not rec.staging_path:
            return
        from fusedrive.control import request_flush

        try:
            request_flush(Path(rec.staging_path), rec.staging_dev)
        except OSError as exc:
            raise CsiError(
                grpc.StatusCode.UNAVAILABLE,
                f"could not flush staged volume {volume_id!r}: {exc}",
            ) from exc
