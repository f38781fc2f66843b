"""A pool worker process: ``python -m bigpool._worker_main``, started by :mod:`bigpool.worker`.

The machine's :class:`~bigpool.worker.PoolWorkerService` starts these and talks to each over
three private channels (Unix socket pairs) whose descriptors arrive in
``$BIGPOOL_WORKER_FDS`` (``"<commands>,<results>,<revocations>"``):

* commands, machine -> worker: first ``>I length + pickle(("init", initializer))`` where
  ``initializer`` is ``None`` or the dill pickle of ``(callable, initargs)``; then any number
  of chunk records exactly as the driver sent them (:mod:`bigpool.pool_wire`). EOF means exit.
  The chunks are numbered from 0 in the order they come (their *sequence numbers*).
* results, worker -> machine, frames ``>IBI`` (body length, kind, tasks run) + body: first one
  :data:`MSG_READY` whose body is ``pickle((pid, encoded_initializer_error_or_None))``; then
  one :data:`MSG_RESULT` per chunk run, in the order the chunks came, whose body is already
  the result record (length prefix included) the driver reads (:mod:`bigpool.pool_wire`).
  Before a chunk's result (or the ready frame) when the worker's expvars changed, a
  :data:`MSG_EXPVARS` frame whose body is their JSON (``bigpool.expvar``; JSON, so the
  machine reads it without unpickling anything of the user's).
* revocations, machine -> worker: requests ``>I n`` + ``n`` ``>Q`` sequence numbers of
  chunks sent ahead that the machine wants back. A thread answers each at once (while a task
  runs) with one :data:`MSG_REVOKED` frame on the results channel whose body is the ``>Q``
  numbers of those not begun: the worker skips them (it sends no result for them). The answer
  comes before the result of any chunk begun after it, so the machine knows exactly which
  chunks will run.

The worker's ``stdin`` is ``/dev/null`` and its ``stdout`` is the machine's (line buffered, so a
task's ``print`` reaches the machine's output line by line); its ``stderr`` is read by the
machine (over a third socket pair), which forwards it and keeps the last lines to explain a
death. The worker exits when its command channel ends, and also when its parent changes (the
machine died), so no worker outlives its machine. It ignores SIGINT: the machine alone decides when it stops.

When the machine shares the driver's host, ``$BIGPOOL_SHARED_DIR`` names the pool's
shared-memory directory: chunks may then carry their arguments' buffers there, and large
``bytes`` results go back through a ring of this worker's (:mod:`bigpool.pool_shm`).

This module imports only the standard library, dill, :mod:`bigpool.pool_wire`,
:mod:`bigpool.pool_shm` and :mod:`bigpool._malloc` at start (the error encoder is loaded
on the first error), so a worker starts as fast as the ``bigpool`` package allows.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import struct
import sys
import threading
import time
from typing import IO, Any

import dill

from bigpool import expvar
from bigpool._malloc import tune_malloc
from bigpool.pool_shm import (
    SHARED_FROM,
    Ring,
    RingWriter,
    Shared,
    SharedError,
    materialize,
    remove_if_orphaned,
)
from bigpool.pool_wire import (
    CHUNK_HEADER,
    FLAG_DILL,
    FLAG_STAR,
    OUT_OF_BAND_FROM,
    WORKER_FUNCTIONS,
    LRUTable,
    OutOfBand,
    decode_chunk,
    encode_result_fields,
    raw_buffer,
)

# Result status codes (see bigpool.worker, which re-exports them).
OK, TASK_ERROR, ENCODE_ERROR, WORKER_DIED, WORKER_EXITED = 0, 1, 2, 3, 4

ENV_FDS = "BIGPOOL_WORKER_FDS"
# The pool's shared-memory directory, when the machine shares the driver's host (pool_shm).
ENV_SHARED_DIR = "BIGPOOL_SHARED_DIR"
# Kinds of worker -> machine frames.
MSG_READY = 1
MSG_RESULT = 2
MSG_EXPVARS = 3
MSG_REVOKED = 4
LENGTH = struct.Struct(">I")
# Worker -> machine frame header: body length, kind, number of tasks the chunk had.
HEADER = struct.Struct(">IBI")
# How long a worker waits for room in its full result ring before it sends a result over the
# network instead, and how often it looks meanwhile.
RESULT_ROOM_WAIT = 2.0
RESULT_ROOM_POLL = 0.0005
# How often a worker checks that its parent is still the machine that started it.
PARENT_CHECK_SECONDS = 0.2
# Longest repr of an unpicklable value sent back in an ENCODE_ERROR record.
MAX_REPR = 10_000
# A frame to the machine up to this size is joined into one write.
SMALL_FRAME = 64 * 1024


def _encode_error(exc: BaseException) -> bytes:
    from bigpool.h2rpc.errors import encode_error

    return encode_error(exc)


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<unrepresentable {type(value).__name__}: {exc!r}>"
    if len(text) > MAX_REPR:
        text = text[:MAX_REPR] + "...(cut)"
    return text


def dumps_result(value: object) -> tuple[bytes, bool]:
    """Pickle a chunk's result: (pickle, whether dill made it). Plain pickle when it can (the
    driver then loads it with the C unpickler), else dill. Raises if neither can."""
    try:
        return pickle.dumps(value, protocol=5), False
    except Exception:
        return bytes(dill.dumps(value, protocol=5)), True


class SharedRings:
    """A worker's shared memory (:mod:`bigpool.pool_shm`): the driver's argument rings, read,
    and a result ring of its own, made when first needed. ``directory`` is ``None`` where the
    machine does not share the driver's host."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self._read: LRUTable[str, Ring] = LRUTable(8)
        self._writer: RingWriter | None = None
        self._unusable = False  # the result ring could not be made: use the network

    def arguments(self, shared: Shared) -> list[bytes | bytearray | memoryview]:
        """Private copies of a chunk's arguments' buffers. Raises :class:`SharedError`."""
        if self.directory is None:
            raise SharedError("a chunk's arguments are in shared memory, but this machine "
                              "does not share the driver's host")
        ring = self._read.touch(shared.name)
        if ring is None:
            ring = Ring.open(self.directory, shared.name)
            self._read.put(shared.name, ring)  # an evicted ring unmaps when unused
        return materialize(ring, shared)

    def place_result(self, result: list[Any]) -> tuple[bytes, Shared] | None:
        """``result`` pickled with its large ``bytes`` values in this worker's result ring:
        (pickle, where they are); ``None`` when it has none, or they do not fit now."""
        if self.directory is None or self._unusable:
            return None
        limit = OUT_OF_BAND_FROM
        if sum(len(v) for v in result if type(v) is bytes and len(v) >= limit) < SHARED_FROM:
            return None
        wrappers: dict[int, OutOfBand] = {}  # one per object: the pickle's memo keeps one
        wrapped = [wrappers.setdefault(id(v), OutOfBand(v))
                   if type(v) is bytes and len(v) >= OUT_OF_BAND_FROM else v for v in result]
        if sum(len(w.data) for w in wrappers.values()) < SHARED_FROM:
            return None
        buffers: list[pickle.PickleBuffer] = []
        try:
            data = pickle.dumps(wrapped, protocol=5, buffer_callback=buffers.append)
        except Exception:
            return None  # dumps_result says why (or uses dill)
        if self._writer is None:
            name = f"w{os.getpid()}-{os.urandom(4).hex()}"
            try:
                self._writer = RingWriter(Ring.create(os.path.join(self.directory, name)))
            except OSError:
                self._unusable = True
                return None
        raw = [raw_buffer(b) for b in buffers]
        # A full ring holds results the driver has not read yet: it frees their space as it
        # reads them (it is the slower side), so wait for that a little before using the network.
        deadline = time.monotonic() + RESULT_ROOM_WAIT
        while (shared := self._writer.put(raw)) is None and time.monotonic() < deadline:
            time.sleep(RESULT_ROOM_POLL)
        return None if shared is None else (data, shared)


class LoadFailure:
    """A function that could not be unpickled here: its encoded error, kept for every chunk."""

    def __init__(self, encoded: bytes) -> None:
        self.encoded = encoded


def run_chunk(
    chunk_id: int,
    func: Any,
    args: bytes | bytearray | memoryview,
    star: bool,
    args_dill: bool = True,
    buffers: tuple[bytes | bytearray | memoryview, ...] = (),
    shared: Shared | None = None,
    rings: SharedRings | None = None,
    pid: int | None = None,
) -> tuple[list[bytes | bytearray | memoryview], int]:
    """Run one chunk; its result record (buffers to write in order) and how many tasks it had.

    ``func`` is the callable, or a :class:`LoadFailure` (the chunk then fails with its error).
    Semantics are ``multiprocessing.pool``'s ``mapstar``/``starmapstar``: the result is the list
    of return values, or the first exception raised (the whole chunk fails with it). With
    ``rings``, the arguments' buffers may be ``shared`` and large results go back through them.
    ``pid`` is the one to put in the record (this process's by default).
    """
    started = time.perf_counter()
    ntasks = 0
    payload: bytes
    payload_dill = False
    result_shared: Shared | None = None
    if type(func) is LoadFailure:
        status, payload = TASK_ERROR, func.encoded
    else:
        try:
            oob: Any = buffers or None  # the pickle's out-of-band buffers (see pool_wire)
            if shared is not None:
                oob = (rings or SharedRings(None)).arguments(shared)
            tasks = dill.loads(args, buffers=oob) if args_dill else pickle.loads(args, buffers=oob)
            del oob
            ntasks = len(tasks)
            result = [func(*t) for t in tasks] if star else [func(t) for t in tasks]
            del tasks
        except Exception as exc:
            status, payload = TASK_ERROR, _encode_error(exc)
        else:
            try:
                placed = (rings.place_result(result) if rings is not None
                          and rings.directory is not None else None)
                if placed is not None:
                    payload, result_shared = placed
                else:
                    payload, payload_dill = dumps_result(result)
                status = OK
            except Exception as exc:
                status = ENCODE_ERROR
                payload = pickle.dumps((_short_repr(exc), _short_repr(result)), protocol=5)
            del result
    return encode_result_fields(chunk_id, status, payload, os.getpid() if pid is None else pid,
                                time.perf_counter() - started, payload_dill, result_shared), ntasks


def _read_exactly(reader: IO[bytes], size: int) -> bytearray | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    filled = 0
    while filled < size:
        n = reader.readinto(view[filled:])  # type: ignore[attr-defined]
        if not n:
            return None
        filled += n
    return buffer


def _read_record(reader: IO[bytes]) -> bytearray | None:
    """The next machine -> worker record's body (length prefix removed), or ``None`` at EOF."""
    header = reader.read(LENGTH.size)
    if len(header) < LENGTH.size:
        return None
    (size,) = LENGTH.unpack(header)
    return _read_exactly(reader, size)


def pack_seqs(seqs: list[int]) -> bytes:
    """Chunk sequence numbers as a revocation request or answer carries them (``>Q`` each)."""
    return struct.pack(f">{len(seqs)}Q", *seqs)


def unpack_seqs(body: bytes | bytearray | memoryview) -> list[int]:
    return list(struct.unpack_from(f">{len(body) // 8}Q", body))


class Gate:
    """Which chunks this worker begins: the main thread takes them in order, the revocation
    thread may withdraw those not begun yet. One lock makes each decision exact."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.begun = 0  # sequence number of the next chunk to take
        self.revoked: set[int] = set()

    def take(self) -> bool:
        """The next chunk is taken: whether to run it (``False``: it was revoked)."""
        with self.lock:
            seq = self.begun
            self.begun += 1
            if seq in self.revoked:
                self.revoked.discard(seq)
                return False
            return True

    def revoke(self, seqs: list[int]) -> list[int]:
        """Withdraw the chunks among ``seqs`` not begun yet; those. Hold :attr:`lock`."""
        withdrawn = [seq for seq in seqs if seq >= self.begun and seq not in self.revoked]
        self.revoked.update(withdrawn)
        return withdrawn


def _send(writer: IO[bytes], lock: threading.Lock, kind: int, ntasks: int,
          parts: list[bytes | bytearray | memoryview]) -> None:
    header = HEADER.pack(sum(len(part) for part in parts), kind, ntasks)
    with lock:
        if len(parts) == 1 and len(parts[0]) < SMALL_FRAME:
            writer.write(header + parts[0])  # one copy of a small frame, one system call
        else:
            writer.write(header)
            for part in parts:
                writer.write(part)
        writer.flush()


def _serve_revocations(fd: int, gate: Gate, writer: IO[bytes], lock: threading.Lock) -> None:
    """Answer revocation requests until the channel ends (see the module docstring)."""
    def serve() -> None:
        with contextlib.suppress(OSError, ValueError), os.fdopen(fd, "rb") as requests:
            while (body := _read_record(requests)) is not None:
                with gate.lock:  # nothing begins until the answer is written
                    withdrawn = gate.revoke(unpack_seqs(body))
                    _send(writer, lock, MSG_REVOKED, 0, [pack_seqs(withdrawn)])

    threading.Thread(target=serve, name="bigpool-worker-revocations", daemon=True).start()


def _send_expvars(writer: IO[bytes], sent: int) -> int:
    """Send this process's expvars if they changed since version ``sent``; the version now."""
    now = expvar.version()
    if now != sent:
        body = json.dumps(expvar.expvars_snapshot(), default=str).encode()
        writer.write(HEADER.pack(len(body), MSG_EXPVARS, 0) + body)
    return now


def _watch_parent(ppid: int, shared_dir: str | None) -> None:
    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_SECONDS)
            if os.getppid() != ppid:
                _clean_up_after_driver(shared_dir)
                os._exit(1)

    threading.Thread(target=watch, name="bigpool-worker-parent-watch", daemon=True).start()


def _load_function(func_id: bytes, func: bytes | None, cache: LRUTable[bytes, Any]) -> Any:
    """The function for ``func_id`` (cached), or a :class:`LoadFailure` (cached too).

    The machine sends a function's pickle exactly when this worker's table (kept in step with
    the machine's record of it) does not hold it.
    """
    if func is None:
        found = cache.touch(func_id)
        if found is not None:
            return found
        return LoadFailure(_encode_error(
            LookupError(f"function {func_id!r} was never sent to this worker")))
    try:
        loaded = dill.loads(func)
        if loaded is None:
            raise TypeError("the function unpickled to None")
    except Exception as exc:
        loaded = LoadFailure(_encode_error(exc))
    cache.put(func_id, loaded)
    return loaded


def _clean_up_after_driver(shared_dir: str | None) -> None:
    """The machine is gone: if its driver is gone too, nobody else removes the pool's rings."""
    if shared_dir is not None:
        with contextlib.suppress(Exception):
            remove_if_orphaned(shared_dir)


def _exit(code: int) -> None:
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def serve(reader: IO[bytes], writer: IO[bytes], lock: threading.Lock, gate: Gate,
          rings: SharedRings, sent_expvars: int) -> None:
    """Run the chunk records read from ``reader`` until it ends, writing a result frame for
    each one the gate lets begin (see the module docstring); ``sent_expvars``: the version of
    the expvars the machine has.

    A small chunk whose function this worker has, with its arguments in the record, takes a
    short way here (no :class:`~bigpool.pool_wire.Chunk` is made): a no-op task's cost is
    mostly this loop's own.
    """
    cache: LRUTable[bytes, Any] = LRUTable(WORKER_FUNCTIONS)
    read = reader.read
    write = writer.write
    flush = writer.flush
    touch = cache.touch
    take = gate.take
    pid = os.getpid()
    head_size = CHUNK_HEADER.size
    while True:
        prefix = read(LENGTH.size)
        if len(prefix) < LENGTH.size:
            return
        (size,) = LENGTH.unpack(prefix)
        # Into a bytearray, so out-of-band buffers (a numpy array's) unpickle writable.
        body = _read_exactly(reader, size)
        if body is None:
            return
        view = memoryview(body)
        func: Any = None
        if size >= head_size:
            flags, chunk_id, id_size, func_size = CHUNK_HEADER.unpack_from(body)
            if not func_size and not flags & ~(FLAG_STAR | FLAG_DILL) and (
                    head_size + id_size <= size):
                func = touch(bytes(view[head_size : head_size + id_size]))
        if func is not None:
            args = view[head_size + id_size :]
            if not take():
                continue
            record, ntasks = run_chunk(chunk_id, func, args, flags & FLAG_STAR != 0,
                                       flags & FLAG_DILL != 0, (), None, rings, pid)
            del args
        else:
            chunk = decode_chunk(view)
            # A revoked chunk still updates the function table, which the machine's mirrors.
            func = _load_function(chunk.func_id, chunk.func, cache)
            if not take():
                del body, chunk
                continue
            record, ntasks = run_chunk(chunk.chunk_id, func, chunk.args, chunk.star,
                                       chunk.args_dill, chunk.buffers, chunk.shared, rings, pid)
            del chunk
        del view, body, func
        if expvar.version() != sent_expvars:
            with lock:
                sent_expvars = _send_expvars(writer, sent_expvars)
        if len(record) == 1 and len(record[0]) < SMALL_FRAME:
            frame = HEADER.pack(len(record[0]), MSG_RESULT, ntasks) + record[0]
            with lock:
                write(frame)
                flush()
        else:
            _send(writer, lock, MSG_RESULT, ntasks, record)
        del record


def main() -> None:
    """Serve the machine until the command channel ends (never returns: exits the process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_malloc()
    ppid = os.getppid()
    read_fd, write_fd, revoke_fd = (int(fd) for fd in os.environ.pop(ENV_FDS).split(","))
    shared_dir = os.environ.pop(ENV_SHARED_DIR, None) or None
    _watch_parent(ppid, shared_dir)
    for fd in (read_fd, write_fd, revoke_fd):
        os.set_inheritable(fd, False)
    with contextlib.suppress(Exception):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    reader = os.fdopen(read_fd, "rb")
    writer = os.fdopen(write_fd, "wb")

    first = _read_record(reader)
    if first is None:
        _exit(0)
        return
    _, initializer = pickle.loads(first)
    init_error: bytes | None = None
    if initializer is not None:
        try:
            function, initargs = dill.loads(initializer)
            function(*initargs)
        except Exception as exc:
            init_error = _encode_error(exc)
    lock = threading.Lock()  # one frame at a time on the results channel
    with lock:
        sent_expvars = _send_expvars(writer, 0)
    _send(writer, lock, MSG_READY, 0, [pickle.dumps((os.getpid(), init_error), protocol=5)])
    gate = Gate()
    _serve_revocations(revoke_fd, gate, writer, lock)

    rings = SharedRings(shared_dir)
    with contextlib.suppress(BrokenPipeError):  # the machine went away
        serve(reader, writer, lock, gate, rings, sent_expvars)
    _clean_up_after_driver(shared_dir)
    _exit(0)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:
        _exit(0)  # the machine went away
