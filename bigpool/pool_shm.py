"""Large pool payloads through shared memory, for machines on the driver's own host.

Over the network a large argument or result crosses TLS and HTTP/2 twice in the driver and
twice in its machine. When a machine shares the driver's host (the ``local`` system), the
payload's bytes can skip all of that: the writer copies them into a *ring* (a file in the
pool's directory under ``/dev/shm``, mapped by both sides) and the record that still travels
on the network names where they are (:class:`Shared`). Rings are reused, so after warm-up no
page is allocated or faulted in to move a payload: on virtual machines that costs more than
copying it.

* The driver writes task arguments into one ring per machine, anywhere it is free
  (:class:`ArenaWriter`), and frees a region when the machine answers the chunk or confirms it
  will not run it. A lost machine's ring is dropped whole, never reused: its workers may still
  read it.
* A worker process writes results into a ring of its own (:class:`RingWriter`); the driver
  copies each result out and then moves the ring's *released* mark (in the ring's header,
  which the worker reads before reusing space). A worker's results reach the driver in the
  order it made them, so a region before the mark is one released already and is refused.
* Whoever cannot place a payload in a ring (full, ``/dev/shm`` missing or out of space) sends
  it over the network as before: the ring is a fast path, never a requirement.

Nothing here trusts a region description blindly: names must be plain file names of the
pool's directory, and regions must lie inside their ring.

A pool's directory is ``/dev/shm/bigpool-<driver pid>-<random>``, made private (0700) to the
user; the pool removes it when it ends, and a pool starting removes those of drivers that are
no longer running. This module is imported by worker processes: the standard library only.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import re
import secrets
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ALIGN",
    "RING_CAPACITY",
    "SHARED_FROM",
    "ArenaWriter",
    "Ring",
    "RingWriter",
    "Shared",
    "SharedError",
    "decode_shared",
    "encode_shared",
    "make_pool_dir",
    "materialize",
    "remove_pool_dir",
    "sweep_stale_dirs",
]

Buffer = bytes | bytearray | memoryview

SHM_ROOT = "/dev/shm"
DIR_PREFIX = "bigpool-"
# A payload (all of one chunk's or one result's out-of-band buffers) at least this large goes
# through a ring when it can; smaller ones are cheap enough on the network.
SHARED_FROM = 1024 * 1024
# Each ring's data area. The file is sparse: only pages ever used take memory, and a ring
# whose regions are all released starts again at its beginning, so it stays compact when its
# reader keeps up.
RING_CAPACITY = 256 * 1024 * 1024
# Regions start at multiples of this (cache lines: copies run at full speed).
ALIGN = 64
# A ring that empties after a burst gives its pages beyond this back to the system (the next
# burst pays their page faults again); up to this much stays warm for the next payloads.
KEEP_WARM = 64 * 1024 * 1024
MAGIC = b"BPRING01"
# The header page: magic, capacity, released position (written by the consumer).
HEADER = struct.Struct("=8sQQ")
HEADER_BYTES = 4096
RELEASED_AT = 16
KIND_BYTEARRAY = 0  # the reader gets a writable copy (as from the network)
KIND_BYTES = 1  # the reader gets ``bytes`` (a ``bytes`` argument or result travelled)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_DIR = re.compile(DIR_PREFIX + r"(\d+)-[0-9a-f]{16}\Z")
_DESCRIPTOR = struct.Struct(">HQI")
_BUFFER = struct.Struct(">QB")


class SharedError(ValueError):
    """A shared-memory region or ring that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class Shared:
    """Where a payload's buffers are: ring ``name`` (in the pool's directory), from logical
    position ``position``, one after another (each at an :data:`ALIGN` boundary), as
    ``(length, kind)`` each."""

    name: str
    position: int
    buffers: tuple[tuple[int, int], ...]

    @property
    def end(self) -> int:
        """The logical position after the last buffer (what a release moves to)."""
        return self.position + _span(length for length, _ in self.buffers)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def _span(lengths: Iterable[int]) -> int:
    return sum(_aligned(n) for n in lengths)


def encode_shared(shared: Shared) -> bytes:
    """``shared`` as it travels in a record."""
    name = shared.name.encode()
    return (_DESCRIPTOR.pack(len(name), shared.position, len(shared.buffers)) + name
            + b"".join(_BUFFER.pack(length, kind) for length, kind in shared.buffers))


def decode_shared(field: Buffer) -> tuple[Shared, int]:
    """The :class:`Shared` at the start of ``field`` and how many bytes it took.

    Raises :class:`SharedError` for a malformed one."""
    view = memoryview(field)
    if len(view) < _DESCRIPTOR.size:
        raise SharedError(f"a shared-memory descriptor of {len(view)} bytes is too short")
    name_size, position, count = _DESCRIPTOR.unpack_from(view)
    end = _DESCRIPTOR.size + name_size + count * _BUFFER.size
    if count == 0 or end > len(view):
        raise SharedError(f"a shared-memory descriptor of {count} buffers does not fit its "
                          f"{len(view)} bytes")
    try:
        name = bytes(view[_DESCRIPTOR.size : _DESCRIPTOR.size + name_size]).decode()
    except UnicodeDecodeError:
        raise SharedError("a shared-memory ring name is not UTF-8") from None
    if not _NAME.match(name):
        raise SharedError(f"{name!r} is not a shared-memory ring name")
    buffers = []
    offset = _DESCRIPTOR.size + name_size
    for _ in range(count):
        length, kind = _BUFFER.unpack_from(view, offset)
        if kind not in (KIND_BYTEARRAY, KIND_BYTES):
            raise SharedError(f"unknown shared-memory buffer kind {kind}")
        buffers.append((length, kind))
        offset += _BUFFER.size
    return Shared(name, position, tuple(buffers)), end


class Ring:
    """A ring file mapped into this process: a header page, then ``capacity`` bytes of data.

    Positions are logical (they only grow); a position's byte is at ``position % capacity``.
    """

    def __init__(self, path: str, mapping: mmap.mmap, capacity: int) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self.capacity = capacity
        self._mmap = mapping
        self._view = memoryview(mapping)

    @classmethod
    def create(cls, path: str, capacity: int | None = None) -> Ring:
        """A new ring at ``path`` (which must not exist), readable and writable by this user
        only, of ``capacity`` bytes (default :data:`RING_CAPACITY`). Raises ``OSError``
        (``/dev/shm`` missing or full, say)."""
        if capacity is None:
            capacity = RING_CAPACITY
        if capacity <= 0 or capacity % ALIGN:
            raise ValueError(f"a ring's capacity must be a positive multiple of {ALIGN}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.ftruncate(fd, HEADER_BYTES + capacity)
            mapping = mmap.mmap(fd, HEADER_BYTES + capacity)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)
        HEADER.pack_into(mapping, 0, MAGIC, capacity, 0)
        return cls(path, mapping, capacity)

    @classmethod
    def open(cls, directory: str, name: str, *, writable: bool = False) -> Ring:
        """The ring ``name`` of ``directory``, made by another process. ``writable`` maps it
        so that :meth:`release` can move its mark. Raises :class:`SharedError`."""
        if not _NAME.match(name):
            raise SharedError(f"{name!r} is not a shared-memory ring name")
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
        except OSError as exc:
            raise SharedError(f"shared-memory ring {path} cannot be opened: {exc}") from None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise SharedError(f"shared-memory ring {path} is only {size} bytes")
            mapping = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if writable
                                else mmap.ACCESS_READ)
        except OSError as exc:
            raise SharedError(f"shared-memory ring {path} cannot be mapped: {exc}") from None
        finally:
            os.close(fd)
        magic, capacity, _ = HEADER.unpack_from(mapping, 0)
        if magic != MAGIC or capacity + HEADER_BYTES != size:
            mapping.close()
            raise SharedError(f"{path} is not a shared-memory ring")
        return cls(path, mapping, capacity)

    @property
    def released(self) -> int:
        """The position up to which the reader is done (space before it may be reused)."""
        return int.from_bytes(self._view[RELEASED_AT : RELEASED_AT + 8], "little")

    def release(self, position: int) -> None:
        """Mark everything before ``position`` free for the writer to reuse."""
        self._view[RELEASED_AT : RELEASED_AT + 8] = position.to_bytes(8, "little")

    def region(self, position: int, length: int) -> memoryview:
        """The ``length`` bytes at logical ``position``. Raises :class:`SharedError` if they
        do not lie inside the ring."""
        offset = position % self.capacity
        if length < 0 or offset + length > self.capacity:
            raise SharedError(f"a region of {length} bytes at {position} overruns ring "
                              f"{self.name} of {self.capacity} bytes")
        return self._view[HEADER_BYTES + offset : HEADER_BYTES + offset + length]

    def regions(self, shared: Shared) -> list[memoryview]:
        """The buffers ``shared`` describes, as views of the ring (valid until released)."""
        span = shared.end - shared.position
        if shared.position % self.capacity + span > self.capacity:
            raise SharedError(f"buffers of {span} bytes at {shared.position} overrun ring "
                              f"{self.name} of {self.capacity} bytes")
        views = []
        position = shared.position
        for length, _ in shared.buffers:
            views.append(self.region(position, length))
            position += _aligned(length)
        return views

    def trim(self, keep: int, end: int) -> None:
        """Give back the pages of the data area from ``keep`` to ``end`` (offsets): their
        contents are gone, for every process that maps the ring."""
        keep = -(-keep // mmap.PAGESIZE) * mmap.PAGESIZE
        if end > keep:
            with contextlib.suppress(OSError, ValueError):
                self._mmap.madvise(mmap.MADV_REMOVE, HEADER_BYTES + keep, end - keep)

    def close(self) -> None:
        """Unmap the ring (views handed out must be gone; a ring still in use stays mapped
        until they are)."""
        self._view.release()
        with contextlib.suppress(BufferError):
            self._mmap.close()

    def unlink(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def materialize(ring: Ring, shared: Shared) -> list[Buffer]:
    """Private copies of the buffers ``shared`` describes, as their kinds say: ``bytes`` for a
    ``bytes`` value, else a ``bytearray`` (writable, as buffers from the network are)."""
    out: list[Buffer] = []
    for view, (_, kind) in zip(ring.regions(shared), shared.buffers, strict=True):
        out.append(bytes(view) if kind == KIND_BYTES else bytearray(view))
        view.release()
    return out


def _copy_in(ring: Ring, position: int, buffers: Sequence[Buffer],
             lengths: list[int]) -> Shared:
    """Copy ``buffers`` into ``ring`` one after another from ``position``; where they are."""
    start = position
    for buffer, length in zip(buffers, lengths, strict=True):
        target = ring.region(position, length)
        target[:] = memoryview(buffer).cast("B")
        target.release()
        position += _aligned(length)
    kinds = [KIND_BYTES if type(b) is bytes else KIND_BYTEARRAY for b in buffers]
    return Shared(ring.name, start, tuple(zip(lengths, kinds, strict=True)))


class RingWriter:
    """Places payloads in a ring it made, reusing space its reader has released."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.head = 0  # the position after the last region placed
        self.high = 0  # the data area's offsets below this have been used

    def put(self, buffers: Sequence[Buffer]) -> Shared | None:
        """Copy ``buffers`` into the ring, one after another; where they are, or ``None`` if
        the ring has no room for them now (the caller sends them another way)."""
        lengths = [memoryview(b).nbytes for b in buffers]
        size = _span(lengths)
        capacity = self.ring.capacity
        if not buffers or size > capacity:
            return None
        released = self.ring.released
        position = self.head
        if position == released:  # empty: start again at the ring's start
            position = released = -(-position // capacity) * capacity
            if self.high > KEEP_WARM:
                self.ring.trim(KEEP_WARM, self.high)
                self.high = KEEP_WARM
        offset = position % capacity
        if offset + size > capacity:
            position += capacity - offset  # no region wraps: skip the ring's tail
        if position + size - released > capacity:
            return None
        self.head = position + size
        self.high = max(self.high, position % capacity + size)
        return _copy_in(self.ring, position, buffers, lengths)


class ArenaWriter:
    """Places payloads anywhere in a ring's space that is free, for a writer that frees them
    itself and in any order (the driver's argument rings: chunks finish in any order, and one
    long chunk must not hold up the space after it). First fit, so the low end is reused
    first and the pages in use stay few."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self._free: list[list[int]] = [[0, ring.capacity]]  # [start, end), sorted, disjoint
        self.placed_bytes = 0  # in use now
        self.total_placed = 0  # ever (for figures and tests)
        self.high = 0  # offsets below this have been used

    def put(self, buffers: Sequence[Buffer]) -> Shared | None:
        """Copy ``buffers`` into free space, one after another; where they are, or ``None``
        if no free extent is large enough now."""
        lengths = [memoryview(b).nbytes for b in buffers]
        size = _span(lengths)
        if not buffers:
            return None
        for extent in self._free:
            if extent[1] - extent[0] >= size:
                start = extent[0]
                extent[0] += size
                if extent[0] == extent[1]:
                    self._free.remove(extent)
                break
        else:
            return None
        self.placed_bytes += size
        self.total_placed += size
        self.high = max(self.high, start + size)
        return _copy_in(self.ring, start, buffers, lengths)

    def free(self, shared: Shared) -> None:
        """The reader is done with ``shared``: its space may be used again."""
        start, end = shared.position, shared.end
        free = self._free
        index = bisect.bisect_left(free, [start, end])
        if index > 0 and free[index - 1][1] == start:
            index -= 1
            free[index][1] = end
        else:
            free.insert(index, [start, end])
        if index + 1 < len(free) and free[index + 1][0] == free[index][1]:
            free[index][1] = free.pop(index + 1)[1]
        self.placed_bytes -= end - start
        if not self.placed_bytes and self.high > KEEP_WARM:
            self.ring.trim(KEEP_WARM, self.high)
            self.high = KEEP_WARM


def make_pool_dir(root: str = SHM_ROOT) -> str:
    """A new private directory for one pool's rings under ``root``. Raises ``OSError``."""
    path = os.path.join(root, f"{DIR_PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
    os.mkdir(path, 0o700)
    return path


def remove_pool_dir(path: str) -> None:
    """Remove a pool's directory and every ring in it (mappings stay valid until unmapped)."""
    shutil.rmtree(path, ignore_errors=True)


def remove_if_orphaned(path: str) -> bool:
    """Remove the pool directory ``path`` if the driver that made it (its pid is in the name)
    is no longer running; whether it did.

    A killed driver cannot remove its rings; its machines outlive it until their keepalives
    run out, and their worker processes call this as they exit, so the memory goes back then
    rather than when the next pool on this host sweeps (:func:`sweep_stale_dirs`)."""
    match = _DIR.match(os.path.basename(path.rstrip(os.sep)))
    if match is None or _running(int(match.group(1))):
        return False
    try:
        if os.lstat(path).st_uid != os.getuid():
            return False
    except OSError:
        return False
    remove_pool_dir(path)
    return True


def sweep_stale_dirs(root: str = SHM_ROOT) -> list[str]:
    """Remove this user's pool directories whose driver is no longer running (a driver that
    was killed leaves its rings behind); the paths removed."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    paths = (os.path.join(root, name) for name in names)
    return [path for path in paths if remove_if_orphaned(path)]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
