"""The records a pool's driver and machines exchange, sans-IO: bytes in, values out.

Chunks travel from the driver to a machine on one long-lived streamed call
(``BigPoolWorker.submit_stream``), one record per chunk::

    >I  record length (of all that follows)
    >B  flags (bit 0: star, the tasks are argument tuples; bit 1: the arguments need dill)
    >Q  chunk id
    >B  length of the function id
    >I  length of the function's pickle (0: sent before, the machine has it)
        the function id, the function's pickle, then the arguments' pickle (to the end)

With flag bit 2 (buffers) the arguments' pickle has out-of-band buffers (pickle protocol 5),
and the arguments' part of the record is::

    >I  number of buffers, n
    >Q  length of each buffer (n of them)
        the pickle, then the n buffers (each where the one before ends)

so a large ``bytes`` argument travels as itself: the driver neither copies it into a pickle
nor pickles it twice, and the machine passes the buffers on with the rest of the record.

With flag bit 3 (shared) the buffers are in a shared-memory ring instead
(:mod:`bigpool.pool_shm`, for machines on the driver's host) and the arguments' part is the
ring's descriptor (:func:`bigpool.pool_shm.encode_shared`) followed by the pickle.

Machines hand chunks to their worker processes in the same record. Results come back, from
worker to machine and on to the driver (the ``BigPoolWorker.results`` stream), as::

    >I  record length
    >Q  chunk id
    >B  status (OK, TASK_ERROR, ENCODE_ERROR, WORKER_DIED: see bigpool.worker)
    >B  flags (bit 1: the payload needs dill; bit 3: shared, the payload is a shared-memory
        descriptor, then a pickle whose out-of-band buffers it describes)
    >i  pid of the worker that ran it (-1: none)
    >d  seconds the chunk took
        the payload (to the end)

Records are written back to back; a record's bytes may be split anywhere across the frames
that carry them. Arguments and results are never re-pickled on the way: the machine passes
the very bytes between the driver and its worker processes.
"""

from __future__ import annotations

import collections
import pickle
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from .pool_shm import Shared, SharedError, decode_shared, encode_shared

__all__ = [
    "DRIVER_FUNCTIONS",
    "MACHINE_FUNCTIONS",
    "MAX_RECORD",
    "OUT_OF_BAND_FROM",
    "WORKER_FUNCTIONS",
    "Chunk",
    "ChunkDecoder",
    "LRUTable",
    "OutOfBand",
    "Pieces",
    "PiecesReader",
    "RecordAssembler",
    "RecordError",
    "Result",
    "ResultDecoder",
    "decode_chunk",
    "decode_result",
    "encode_chunk",
    "encode_chunk_fields",
    "encode_result",
    "encode_result_fields",
    "join_small",
    "payload_bytes",
    "raw_buffer",
]

LENGTH = struct.Struct(">I")
CHUNK_HEADER = struct.Struct(">BQBI")
RESULT_HEADER = struct.Struct(">QBBid")
# The length prefix and the header together, packed at once for a record in one buffer.
CHUNK_HEAD = struct.Struct(">IBQBI")
RESULT_HEAD = struct.Struct(">IQBBid")
FLAG_STAR = 1
FLAG_DILL = 2
FLAG_BUFFERS = 4
FLAG_SHARED = 8
BUFFER_COUNT = struct.Struct(">I")
BUFFER_LENGTH = struct.Struct(">Q")
# Functions remembered: by a driver per machine (as sent), by a machine (as received; never
# fewer than the driver's), and by a machine per worker process and that worker (the same).
DRIVER_FUNCTIONS = 256
MACHINE_FUNCTIONS = 512
WORKER_FUNCTIONS = 128
# Largest record a decoder accepts (a bound on what one peer's record can make us allocate).
MAX_RECORD = (1 << 32) - 1
# Arguments at least this large are sent as their own buffer rather than copied into the
# record's head.
INLINE_LIMIT = 64 * 1024

# Task arguments and results (bytes), and pickle buffers, at least this large travel out of
# band: sent as they are, never copied into a pickle.
OUT_OF_BAND_FROM = INLINE_LIMIT

Buffer = bytes | bytearray | memoryview


class OutOfBand:
    """A large ``bytes`` value, pickled as a protocol-5 out-of-band buffer: the record (or a
    shared-memory ring) carries the object itself, no copy goes into the pickle, and it loads
    as ``bytes``."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return bytes, (pickle.PickleBuffer(self.data),)


def raw_buffer(buffer: pickle.PickleBuffer) -> Buffer:
    """An out-of-band buffer's bytes to write: the ``bytes`` object itself where it is one
    (sent uncopied, and known to load as ``bytes``)."""
    view = buffer.raw()
    obj = view.obj
    if type(obj) is bytes and len(obj) == view.nbytes:
        return obj
    return view


@dataclass(slots=True)
class Chunk:
    """A chunk of tasks for a machine's :class:`~bigpool.worker.PoolWorkerService`.

    ``func`` (the dill pickle of the function) must come with, or before, the first chunk using
    ``func_id`` on a machine; later chunks may send ``None``. ``args`` is a pickle (plain or
    dill) of the chunk's tasks, loaded with ``buffers`` as its out-of-band buffers: with
    ``star`` argument tuples, called as ``func(*t)``; without, single arguments, called as
    ``func(x)`` (no tuple per task to build and pickle).

    Each side remembers the functions it was sent in a least-recently-used table, touched by
    every chunk in the order chunks travel: the sender's table (``*_FUNCTIONS`` below) is never
    larger than the receiver's, so whatever the sender still remembers having sent, the
    receiver still has, and a long-running pool of ever-new lambdas holds bounded memory.
    """

    chunk_id: int
    func_id: bytes
    func: bytes | None
    args: Buffer
    star: bool
    args_dill: bool = True
    buffers: tuple[Buffer, ...] = ()  # out-of-band buffers of ``args`` (byte-format views)
    shared: Shared | None = None  # or where they are in shared memory (see pool_shm)
    # A decoded chunk's record body (length prefix removed), and whether it holds ``func``:
    # a machine passes the record on as it came when its worker needs what it holds.
    record: Buffer | None = None
    record_has_func: bool = False


@dataclass(slots=True)
class Result:
    """One chunk's result record (see the module docstring and :mod:`bigpool.worker`)."""

    chunk_id: int
    status: int
    payload: Buffer | Pieces
    pid: int | None
    seconds: float
    payload_dill: bool = True
    shared: Shared | None = None  # the payload's out-of-band buffers in shared memory


K = TypeVar("K")
V = TypeVar("V")


class LRUTable(Generic[K, V]):
    """A bounded mapping whose least recently used entry goes first; ``touch`` uses one."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: collections.OrderedDict[K, V] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def touch(self, key: K) -> V | None:
        """The value for ``key``, now the most recently used; ``None`` if absent."""
        entries = self._entries
        value = entries.get(key)
        if value is not None:
            entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Set ``key`` (now the most recently used), dropping the least recent over capacity."""
        entries = self._entries
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > self.capacity:
            entries.popitem(last=False)


class RecordError(ValueError):
    """Bytes that are not a well-formed record stream; the message says what is wrong."""


def encode_chunk(chunk: Chunk, include_function: bool = True) -> list[Buffer]:
    """The buffers of ``chunk``'s record, to be written in order (large arguments uncopied);
    without ``include_function``, the record leaves the function out (the receiver has it)."""
    return encode_chunk_fields(chunk.chunk_id, chunk.func_id,
                               chunk.func if include_function else None, chunk.args,
                               chunk.star, chunk.args_dill, chunk.buffers, chunk.shared)


def encode_chunk_fields(chunk_id: int, func_id: bytes, func: bytes | None, args: Buffer,
                        star: bool, args_dill: bool, buffers: tuple[Buffer, ...] = (),
                        shared: Shared | None = None) -> list[Buffer]:
    """:func:`encode_chunk` from the fields of a :class:`Chunk` (``func``: ``None`` to leave
    it out), for a sender that has them at hand: a small chunk's record is one buffer made
    with one join."""
    func = func or b""
    if len(func_id) > 255:
        raise ValueError(f"a function id has at most 255 bytes, not {len(func_id)}")
    flags = (FLAG_STAR if star else 0) | (FLAG_DILL if args_dill else 0)
    if not buffers and shared is None:
        size = CHUNK_HEADER.size + len(func_id) + len(func) + len(args)
        if len(args) < INLINE_LIMIT:
            return [b"".join((CHUNK_HEAD.pack(size, flags, chunk_id, len(func_id), len(func)),
                              func_id, func, args))]
        layout = b""
    elif shared is not None:
        if buffers:
            raise ValueError("a chunk's buffers are either in the record or shared, not both")
        flags |= FLAG_SHARED
        layout = encode_shared(shared)
    else:
        flags |= FLAG_BUFFERS
        layout = BUFFER_COUNT.pack(len(buffers)) + b"".join(
            BUFFER_LENGTH.pack(len(buffer)) for buffer in buffers
        )
    size = (CHUNK_HEADER.size + len(func_id) + len(func) + len(layout) + len(args)
            + sum(len(buffer) for buffer in buffers))
    if size > MAX_RECORD:
        raise ValueError(f"a chunk of {size} bytes is larger than a record may be ({MAX_RECORD})")
    head = CHUNK_HEAD.pack(size, flags, chunk_id, len(func_id), len(func))
    if len(args) < INLINE_LIMIT:
        parts: list[Buffer] = [b"".join((head, func_id, func, layout, args))]
    else:
        parts = [b"".join((head, func_id, func, layout)), args]
    parts.extend(buffers)
    return parts


def join_small(parts: Iterable[Buffer]) -> list[Buffer]:
    """``parts`` to write in order, each run of small ones (under :data:`INLINE_LIMIT`) joined
    into one buffer and large ones left as they are (uncopied): one write per run."""
    out: list[Buffer] = []
    small: list[Buffer] = []
    for part in parts:
        if len(part) < INLINE_LIMIT:
            small.append(part)
            continue
        if small:
            out.append(small[0] if len(small) == 1 else b"".join(small))
            small = []
        out.append(part)
    if small:
        out.append(small[0] if len(small) == 1 else b"".join(small))
    return out


def decode_chunk(body: memoryview) -> Chunk:
    """The chunk in a record's ``body`` (its length prefix removed). Raises RecordError."""
    if len(body) < CHUNK_HEADER.size:
        raise RecordError(f"a chunk record of {len(body)} bytes is shorter than its header")
    flags, chunk_id, id_size, func_size = CHUNK_HEADER.unpack_from(body)
    start = CHUNK_HEADER.size
    args_start = start + id_size + func_size
    if args_start > len(body):
        raise RecordError(f"chunk {chunk_id}: function of {func_size} bytes overruns its record")
    func_id = bytes(body[start : start + id_size])
    func = bytes(body[start + id_size : args_start]) if func_size else None
    if not flags & ~(FLAG_STAR | FLAG_DILL):
        return Chunk(chunk_id, func_id, func, body[args_start:], flags & FLAG_STAR != 0,
                     flags & FLAG_DILL != 0, (), None, body, func_size != 0)
    if flags & ~(FLAG_STAR | FLAG_DILL | FLAG_BUFFERS | FLAG_SHARED) or (
            flags & FLAG_BUFFERS and flags & FLAG_SHARED):
        raise RecordError(f"chunk {chunk_id}: unknown flags {flags:#x}")
    args = body[args_start:]
    buffers: tuple[memoryview, ...] = ()
    shared = None
    if flags & FLAG_BUFFERS:
        args, buffers = _split_buffers(chunk_id, args)
    else:
        shared, args = _split_shared(f"chunk {chunk_id}", args)
    return Chunk(chunk_id, func_id, func, args, flags & FLAG_STAR != 0, flags & FLAG_DILL != 0,
                 buffers, shared, body, func_size != 0)


def _split_shared(what: str, field: memoryview) -> tuple[Shared, memoryview]:
    """The shared-memory descriptor at the start of ``field`` and the pickle after it."""
    try:
        shared, size = decode_shared(field)
    except SharedError as exc:
        raise RecordError(f"{what}: {exc}") from None
    return shared, field[size:]


def _split_buffers(chunk_id: int, field: memoryview) -> tuple[memoryview, tuple[memoryview, ...]]:
    """The pickle and the out-of-band buffers of an arguments field with buffers."""
    if len(field) < BUFFER_COUNT.size:
        raise RecordError(f"chunk {chunk_id}: its arguments end before their buffer count")
    (count,) = BUFFER_COUNT.unpack_from(field)
    pickle_start = BUFFER_COUNT.size + count * BUFFER_LENGTH.size
    if count == 0 or pickle_start > len(field):
        raise RecordError(f"chunk {chunk_id}: a buffer count of {count} does not fit its "
                          f"{len(field)}-byte arguments")
    lengths = struct.unpack_from(f">{count}Q", field, BUFFER_COUNT.size)
    pickle_end = len(field) - sum(lengths)
    if pickle_end < pickle_start:
        raise RecordError(f"chunk {chunk_id}: buffers of {sum(lengths)} bytes overrun its "
                          f"{len(field)}-byte arguments")
    buffers = []
    offset = pickle_end
    for length in lengths:
        buffers.append(field[offset : offset + length])
        offset += length
    return field[pickle_start:pickle_end], tuple(buffers)


def encode_result(result: Result) -> list[Buffer]:
    """The buffers of ``result``'s record, to be written in order (a large payload uncopied)."""
    payload = bytes(result.payload) if isinstance(result.payload, Pieces) else result.payload
    return encode_result_fields(result.chunk_id, result.status, payload, result.pid,
                                result.seconds, result.payload_dill, result.shared)


def encode_result_fields(chunk_id: int, status: int, payload: Buffer, pid: int | None,
                         seconds: float, payload_dill: bool,
                         shared: Shared | None = None) -> list[Buffer]:
    """:func:`encode_result` from the fields of a :class:`Result`, for a sender that has them
    at hand (a worker, for every chunk it runs)."""
    flags = FLAG_DILL if payload_dill else 0
    if shared is not None:
        flags |= FLAG_SHARED
        payload = encode_shared(shared) + payload
    size = RESULT_HEADER.size + len(payload)
    if size > MAX_RECORD:
        raise ValueError(f"a result of {size} bytes is larger than a record may be ({MAX_RECORD})")
    head = RESULT_HEAD.pack(size, chunk_id, status, flags, -1 if pid is None else pid, seconds)
    if len(payload) < INLINE_LIMIT:
        return [head + payload]
    return [head, payload]


def payload_bytes(result: Result) -> Buffer:
    """``result``'s payload as one buffer (joined, if it is :class:`Pieces`)."""
    return bytes(result.payload) if isinstance(result.payload, Pieces) else result.payload


def decode_result(body: memoryview | Pieces) -> Result:
    """The result in a record's ``body`` (its length prefix removed). Raises RecordError."""
    if len(body) < RESULT_HEADER.size:
        raise RecordError(f"a result record of {len(body)} bytes is shorter than its header")
    if isinstance(body, Pieces):
        head: Buffer = body.prefix(RESULT_HEADER.size)
        payload: Buffer | Pieces = body.after(RESULT_HEADER.size)
    else:
        head, payload = body, body[RESULT_HEADER.size :]
    chunk_id, status, flags, pid, seconds = RESULT_HEADER.unpack_from(head)
    shared = None
    if flags & FLAG_SHARED:
        field = bytes(payload) if isinstance(payload, Pieces) else payload
        shared, payload = _split_shared(f"result of chunk {chunk_id}", memoryview(field))
    return Result(chunk_id, status, payload, None if pid < 0 else pid, seconds,
                  bool(flags & FLAG_DILL), shared)


class Pieces:
    """A record body kept as the pieces it arrived in, uncopied; :meth:`reader` reads it.

    A large result is unpickled straight from its pieces: the unpickler reads a large
    ``bytes`` value with one ``readinto`` into the new object, so the body is never gathered
    into one buffer first (a copy, and as much memory again, per result).
    """

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[memoryview]) -> None:
        self.parts = parts
        self.size = sum(len(part) for part in parts)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def prefix(self, n: int) -> bytes:
        """The first ``n`` bytes (fewer if the body is shorter)."""
        out = bytearray()
        for part in self.parts:
            if len(out) >= n:
                break
            out += part[: n - len(out)]
        return bytes(out)

    def after(self, offset: int) -> Pieces:
        """The body from ``offset`` on, still uncopied."""
        parts = []
        for part in self.parts:
            if offset >= len(part):
                offset -= len(part)
                continue
            parts.append(part[offset:] if offset else part)
            offset = 0
        return Pieces(parts)

    def reader(self) -> PiecesReader:
        return PiecesReader(self.parts)


class PiecesReader:
    """A binary file over :class:`Pieces`: ``read``, ``readinto`` and ``readline``, as
    :class:`pickle.Unpickler` needs."""

    def __init__(self, parts: list[memoryview]) -> None:
        self._parts = parts
        self._index = 0
        self._offset = 0

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target) and self._index < len(self._parts):
            part = self._parts[self._index]
            take = min(len(part) - self._offset, len(target) - filled)
            target[filled : filled + take] = part[self._offset : self._offset + take]
            filled += take
            self._offset += take
            if self._offset == len(part):
                self._index += 1
                self._offset = 0
        return filled

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = sum(len(p) for p in self._parts[self._index :]) - self._offset
        out = bytearray(n)
        return bytes(out[: self.readinto(out)])

    def readline(self) -> bytes:
        out = bytearray()
        while self._index < len(self._parts):
            part = self._parts[self._index]
            while self._offset < len(part):
                window = bytes(part[self._offset : self._offset + 65536])
                newline = window.find(b"\n")
                if newline >= 0:
                    out += window[: newline + 1]
                    self._offset += newline + 1
                    return bytes(out)
                out += window
                self._offset += len(window)
            self._index += 1
            self._offset = 0
        return bytes(out)


class RecordAssembler:
    """Cuts a byte stream into records: a fixed ``header`` whose first field is the length of
    the body that follows (by default ``>I``, the length alone), then the body.

    Small records are returned as views of the data fed (no copy); a record split across
    feeds is gathered into one buffer allocated at its full size when its length is known, or,
    if it is at least ``pieces_from`` bytes long, returned as :class:`Pieces` (views of the
    data fed, which must then not change).
    """

    def __init__(self, max_record: int = MAX_RECORD, header: struct.Struct = LENGTH,
                 pieces_from: int | None = None) -> None:
        self.max_record = max_record
        self.header = header
        self.pieces_from = pieces_from
        self._parts: list[memoryview] | None = None  # a large record's pieces so far
        self._head = bytearray()  # a header not yet complete
        self._fields: tuple[Any, ...] = ()  # the header of the record being filled
        self._body: bytearray | None = None  # the record being filled
        self._filled = 0

    @property
    def partial(self) -> bool:
        """Whether a record has started and not ended."""
        return bool(self._head) or self._body is not None or self._parts is not None

    def feed(self, data: Buffer) -> list[tuple[tuple[Any, ...], memoryview]]:
        """The records completed by ``data``, in order: (header fields, body) each. For an
        assembler without ``pieces_from``."""
        if self.pieces_from is not None:
            raise TypeError("an assembler with pieces_from is read with feed_pieces")
        # Without pieces_from every body is a memoryview: no need to look at each.
        return cast("list[tuple[tuple[Any, ...], memoryview]]", self.feed_pieces(data))

    def feed_pieces(self, data: Buffer) -> list[tuple[tuple[Any, ...], memoryview | Pieces]]:
        """The records completed by ``data``, in order: (header fields, body) each, a large
        body as :class:`Pieces`."""
        out: list[tuple[tuple[Any, ...], memoryview | Pieces]] = []
        header = self.header
        hsize = header.size
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        pos = 0
        end = len(view)
        while pos < end:
            if self._parts is not None:
                take = min(self._filled, end - pos)  # _filled counts what is still missing
                self._parts.append(view[pos : pos + take])
                self._filled -= take
                pos += take
                if not self._filled:
                    out.append((self._fields, Pieces(self._parts)))
                    self._parts = None
                continue
            if self._body is not None:
                take = min(len(self._body) - self._filled, end - pos)
                self._body[self._filled : self._filled + take] = view[pos : pos + take]
                self._filled += take
                pos += take
                if self._filled == len(self._body):
                    out.append((self._fields, memoryview(self._body)))
                    self._body = None
                continue
            if self._head or end - pos < hsize:
                need = hsize - len(self._head)
                self._head += view[pos : pos + need]
                pos += min(need, end - pos)
                if len(self._head) < hsize:
                    break
                fields = header.unpack(self._head)
                self._head.clear()
            else:
                fields = header.unpack_from(view, pos)
                pos += hsize
            size = fields[0]
            if size > self.max_record:
                raise RecordError(
                    f"a record of {size} bytes is larger than allowed ({self.max_record})")
            if size <= end - pos:
                out.append((fields, view[pos : pos + size]))
                pos += size
            elif self.pieces_from is not None and size >= self.pieces_from:
                self._fields = fields
                self._parts = []
                self._filled = size
            else:
                self._fields = fields
                self._body = bytearray(size)
                self._filled = 0
        return out


class ChunkDecoder:
    """Chunks from the bytes of a ``submit_stream`` body, as they arrive."""

    def __init__(self, max_record: int = MAX_RECORD) -> None:
        self._records = RecordAssembler(max_record)

    @property
    def partial(self) -> bool:
        """Whether the bytes fed so far end inside a record."""
        return self._records.partial

    def feed(self, data: Buffer) -> list[Chunk]:
        """The chunks whose records ``data`` completes. Raises :class:`RecordError`."""
        return [decode_chunk(body) for _, body in self._records.feed(data)]


class ResultDecoder:
    """Results from the bytes of a ``results`` stream, as they arrive; a result of at least
    ``pieces_from`` bytes that spans several feeds keeps its payload as :class:`Pieces`."""

    def __init__(self, max_record: int = MAX_RECORD, pieces_from: int | None = None) -> None:
        self._records = RecordAssembler(max_record, pieces_from=pieces_from)

    @property
    def partial(self) -> bool:
        """Whether the bytes fed so far end inside a record."""
        return self._records.partial

    def feed(self, data: Buffer) -> list[Result]:
        """The results whose records ``data`` completes. Raises :class:`RecordError`."""
        return [decode_result(body) for _, body in self._records.feed_pieces(data)]
