"""Chunks: content-addressed, compressed, reference-counted file data.

A chunk is at most ``MAX_CHUNK_SIZE`` bytes. It is stored once under the hash of
its raw bytes and verified against that hash on every read: a mismatch raises
``Corrupt``, wrong bytes are never returned. The hash is cryptographic (a tenant
who could forge collisions could read another tenant's data) and one per store,
recorded when the store is created: blake3 for new stores, sha256 for stores made
before blake3 became the default (both 32 bytes). Measured on this 2-core VM with
64 KiB chunks: sha256 37 µs (OpenSSL with SHA-NI), blake3 11 µs; every chunk read
verifies, so the hash is a large part of a random 4 KiB read's CPU. All-zero chunks
are holes and are never stored (``prepare`` marks them, callers turn them into deletions).

Hashing and compression happen in ``prepare`` outside any LMDB transaction (both
release the GIL, so callers may run them in worker threads); the write
transaction only stores the prepared bytes. A chunk of 16 KiB or more is first
probed: four 2 KiB slices spread over it are compressed at level 1, and if they
save less than the 1/32 that makes a chunk worth storing compressed, the chunk is
stored raw without compressing all of it (random, encrypted or already compressed
data). Measured on 64 KiB of random data: the probe 5-10 µs; compressing the
whole chunk 11 µs at level 3, 29 µs at level 9, 3 ms at level 19. The probe can
miss a chunk that compresses only across its slices, or only at a higher level;
that chunk is stored raw, which costs space, never correctness.

Databases (see ``layers.py`` for the entries that reference chunks):

``chunks``     digest (32 bytes) -> location of the chunk's record in a segment file
               (``segments.py``); the record is codec (1 byte: 0 raw, 1 zstd) +
               stored bytes
``chunkrefs``  digest (32 bytes) -> struct ``>QII``: reference count, raw length,
               stored length. A row exists exactly when the chunk exists; the
               count is the number of entry versions that name the digest. A
               chunk whose count reaches zero is deleted in the same transaction.
``damaged``    digest (32 bytes) -> why (UTF-8 text): the stored copy of this chunk
               was found damaged (a read that failed its hash, or fsck). A row may
               exist only while the chunk does.

Damage heals by storing the chunk again. A put of a digest that is already stored
(dedup) first checks the stored copy (``copy_is_sound``): a marked chunk, a missing
record or a record that does not read back as these bytes is replaced by the new
copy, in the same transaction, for every entry that names the digest (every
file, volume and snapshot sharing it). The check reads the stored record and
compares it byte for byte with the record the put would write (a record stored
at another compression level is decoded and hashed instead). Measured on this
2-core VM (``python -m benchmarks.dedup_verify``, 64 KiB chunks): the check about
doubles the cost of a dedup hit (50-69 us against 23-36 us per chunk with the
records in the page cache, 69-112 against 38-56 us with them dropped from it),
which stays below the cost of storing a new chunk (73-258 us); docs/store.md,
"Damage", has the numbers.

Invariant kept by every writer: counters ``chunk_count``, ``unique_raw_bytes``,
``stored_bytes`` and ``referenced_raw_bytes`` in the ``meta`` database equal the
sums over ``chunkrefs`` (fsck recounts them).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import blake3
import zstandard

from .errors import Corrupt, InvalidArgument

MAX_CHUNK_SIZE = 4 * 1024 * 1024
DIGEST_SIZE = 32
CODEC_RAW = 0
CODEC_ZSTD = 1
_REFS = struct.Struct(">QII")

# Compression must save at least this fraction to be kept.
_MIN_SAVING = 1 / 32
_PROBE_MIN = 16 * 1024  # chunks at least this large are probed before compressing
_PROBE_SLICES = 4
_PROBE_SLICE = 2048
_PROBE_LEVEL = 1

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


HASHES = ("blake3", "sha256")
DEFAULT_HASH = "blake3"


def digest_of(data: bytes | memoryview, algorithm: str = DEFAULT_HASH) -> bytes:
    """The chunk hash of ``data`` (``algorithm`` is one of ``HASHES``)."""
    if algorithm == "blake3":
        return blake3.blake3(data).digest()
    if algorithm == "sha256":
        return hashlib.sha256(data).digest()
    raise InvalidArgument(f"unknown chunk hash {algorithm!r} (known: {', '.join(HASHES)})")


@dataclass(frozen=True, slots=True)
class PreparedChunk:
    """A chunk hashed and compressed, ready to be stored in a write transaction."""

    digest: bytes
    raw_length: int
    codec: int
    payload: bytes  # what goes into the ``chunks`` database after the codec byte

    @property
    def is_hole(self) -> bool:
        return self.raw_length == 0


HOLE = PreparedChunk(digest=b"", raw_length=0, codec=CODEC_RAW, payload=b"")


def is_zero(data: bytes | memoryview) -> bool:
    mv = memoryview(data)
    if not mv:
        return True
    # Cheap rejection first: most data chunks have a non-zero byte at either end.
    if mv[0] or mv[-1]:
        return False
    return mv == bytes(len(mv))


def prepare(
    data: bytes | memoryview, level: int = 3, algorithm: str = DEFAULT_HASH
) -> PreparedChunk:
    """Hash and compress ``data``; all-zero data yields ``HOLE``."""
    if len(data) > MAX_CHUNK_SIZE:
        raise InvalidArgument(f"chunk of {len(data)} bytes exceeds {MAX_CHUNK_SIZE}")
    if is_zero(data):
        return HOLE
    raw = bytes(data)
    digest = digest_of(raw, algorithm)
    if level > 0 and not looks_incompressible(raw):
        packed = _compressor(level).compress(raw)
        if len(packed) <= len(raw) * (1 - _MIN_SAVING):
            return PreparedChunk(digest, len(raw), CODEC_ZSTD, packed)
    return PreparedChunk(digest, len(raw), CODEC_RAW, raw)


def looks_incompressible(raw: bytes) -> bool:
    """True if slices of ``raw`` (16 KiB or more) do not compress enough to bother."""
    n = len(raw)
    if n < _PROBE_MIN:
        return False
    step = n // _PROBE_SLICES
    sample = b"".join(raw[i * step : i * step + _PROBE_SLICE] for i in range(_PROBE_SLICES))
    return len(_compressor(_PROBE_LEVEL).compress(sample)) > len(sample) * (1 - _MIN_SAVING)


def pack_refs(count: int, raw_length: int, stored_length: int) -> bytes:
    return _REFS.pack(count, raw_length, stored_length)


def unpack_refs(value: bytes) -> tuple[int, int, int]:
    try:
        count, raw, stored = _REFS.unpack(value)
    except struct.error as exc:
        raise Corrupt(f"bad chunk reference record of {len(value)} bytes") from exc
    return count, raw, stored


def record_of(prep: PreparedChunk) -> bytes:
    """The record ``prep`` is stored as: codec byte + payload."""
    return bytes((prep.codec,)) + prep.payload


def copy_is_sound(
    prep: PreparedChunk,
    location: bytes | None,
    read: Callable[[bytes], bytes],
    algorithm: str,
    marked: bool,
) -> bool:
    """Whether the stored copy of ``prep``'s chunk (at ``location``) holds its bytes.

    False for a chunk marked damaged, a missing record, a record that cannot be
    read, or one that does not decode to a chunk of this hash and length.
    """
    if marked or location is None:
        return False
    try:
        stored = read(location)
    except (OSError, Corrupt):
        return False
    # The very record a fresh put would write. (A bytes slice, not a memoryview:
    # comparing memoryviews goes item by item, 800 us for 64 KiB against 3 us.)
    if stored[:1] == bytes((prep.codec,)) and bytes(stored[1:]) == prep.payload:
        return True
    return record_is_sound(prep.digest, prep.raw_length, location, lambda _: stored, algorithm)


def record_is_sound(
    digest: bytes,
    raw_length: int | None,
    location: bytes,
    read: Callable[[bytes], bytes],
    algorithm: str,
) -> bool:
    """Whether the record at ``location`` reads and decodes to the chunk ``digest``."""
    try:
        decode(digest, read(location), raw_length, algorithm)
    except (OSError, Corrupt):
        return False
    return True


def decode(
    digest: bytes,
    stored: bytes | memoryview,
    raw_length: int | None = None,
    algorithm: str = DEFAULT_HASH,
) -> bytes:
    """Turn a ``chunks`` value back into raw bytes, verifying the hash."""
    if not stored:
        raise Corrupt(f"chunk {digest.hex()[:16]} has an empty record")
    codec, payload = stored[0], memoryview(stored)[1:]
    if codec == CODEC_RAW:
        raw = bytes(payload)
    elif codec == CODEC_ZSTD:
        try:
            raw = _decompressor().decompress(payload, max_output_size=MAX_CHUNK_SIZE)
        except zstandard.ZstdError as exc:
            raise Corrupt(f"chunk {digest.hex()[:16]} does not decompress: {exc}") from exc
    else:
        raise Corrupt(f"chunk {digest.hex()[:16]} has unknown codec {codec}")
    if raw_length is not None and len(raw) != raw_length:
        raise Corrupt(f"chunk {digest.hex()[:16]} has {len(raw)} bytes, expected {raw_length}")
    if digest_of(raw, algorithm) != digest:
        raise Corrupt(f"chunk {digest.hex()[:16]} does not match its hash")
    return raw
