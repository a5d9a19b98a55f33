"""Node state: what this node has staged and published, kept on disk.

One JSON file per volume under ``<state dir>/volumes/<volume id>.json``, written
atomically (temporary file, fsync, rename, fsync of the directory), so a plugin
killed at any point finds either the old or the new record. A restarted plugin
reads every record to find its mounts again (``node.py``'s ``recover``).

Record fields:
- ``staging_path``: where the volume's FUSE mount lives ('' when not staged);
- ``block``: whether it is a raw block volume (its loop device in ``loop_device``);
- ``read_only``: the FUSE mount is read-only;
- ``staging_dev``: the device number (``major:minor`` in mountinfo) of the FUSE
  mount we made at the staging path; a target bind of it shows the same number,
  which is how ``ownership.py`` tells our binds from anything else;
- ``loops``: every loop device attached for this volume that may still be
  attached, as ``/dev/loopN@DISKSEQ`` (the kernel's sequence number of that
  attachment, so a device number reused by another attachment is never taken for
  ours): once the mount under a device has died, ``losetup`` can name neither its
  backing file's path nor its file system, and this is how it is found and detached;
- ``retired``: what earlier staging mounts of this volume were, whose daemons died
  (``dev:MAJ:MIN`` of the FUSE mount, ``loop:/dev/loopN`` of a block volume's
  device): healing stacks a fresh bind over a target's dead one, and the dead
  layers below are still ours to unmount at unpublish;
- ``targets``: target path -> {"read_only": bool, "created": bool} for every
  publish; ``created`` says the plugin created the target (and may remove it);
- ``ephemeral``: the volume was created at publish time and is deleted at unpublish.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class VolumeRecord:
    volume_id: str
    staging_path: str = ""
    block: bool = False
    read_only: bool = False
    loop_device: str = ""
    staging_dev: str = ""
    retired: list[str] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)
    targets: dict[str, dict[str, bool]] = field(default_factory=dict)
    ephemeral: bool = False


class NodeState:
    """Durable records of staged and published volumes, one file per volume."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory / "volumes"
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)

    def _path(self, volume_id: str) -> Path:
        # Volume ids are validated by the caller (store names never contain '/').
        return self.dir / f"{volume_id}.json"

    def get(self, volume_id: str) -> VolumeRecord | None:
        try:
            raw = self._path(volume_id).read_text()
        except FileNotFoundError:
            return None
        try:
            return VolumeRecord(**json.loads(raw))
        except (ValueError, TypeError) as exc:
            log.error("event=state_unreadable volume=%s error=%s", volume_id, exc)
            return None

    def put(self, rec: VolumeRecord) -> None:
        path = self._path(rec.volume_id)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(rec), f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def delete(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(volume_id).unlink()

    def all(self) -> list[VolumeRecord]:
        recs = []
        for p in sorted(self.dir.glob("*.json")):
            rec = self.get(p.stem)
            if rec is not None:
                recs.append(rec)
        return recs

    def staged_at(self, staging_path: str) -> VolumeRecord | None:
        for rec in self.all():
            if rec.staging_path == staging_path:
                return rec
        return None
