"""The machine side of :class:`bigpool.BigPool`: a service that runs task chunks in worker
processes and streams their results back.

Every machine of a pool serves a :class:`PoolWorkerService` under :data:`SERVICE_NAME`. The
driver sends it :class:`Chunk` records on one long-lived streamed call (``submit_stream``; or
pickled lists of chunks with ``submit``), reads one long-lived streamed reply of result
records (``results``); a machine on the driver's host carries both on one Unix socket
instead (``open_channel``, :mod:`bigpool.pool_socket`). The driver may take back chunks not
begun (``cancel``) and finally stops the workers (``shutdown_workers``). Inside the machine,
chunks wait in a FIFO; each idle worker process takes the next one. Workers are
``python -m bigpool._worker_main`` subprocesses (never forks of the machine, which has threads
and an event loop), driven over private socket pairs from the machine's event loop without
blocking it.

Result records (the ``results`` stream, a :class:`bigpool.h2rpc.StreamWriter` written to as
chunks complete: the records one read of the workers' sockets brings go out together) are
:class:`bigpool.pool_wire.Result` records. ``status`` and ``payload``:

* :data:`OK`: the pickle (dill's when ``payload_dill``) of the chunk's list of results, made
  in the worker. The machine never unpickles user data.
* :data:`TASK_ERROR`: :func:`bigpool.h2rpc.errors.encode_error` of the first exception a task
  raised (or of the failure to unpickle the function or the arguments, or of a replacement
  worker's initializer failure); rebuild it with ``decode_error``.
* :data:`ENCODE_ERROR`: ``pickle((repr(exception), repr(value)))``: the result could not be
  pickled.
* :data:`WORKER_DIED`: ``pickle(dict)`` with ``{"pid", "exitcode", "signal", "oom",
  "stderr_tail", "message"}``: the worker process died while running the chunk (it is
  replaced).
* :data:`WORKER_EXITED`: no payload, ``chunk_id`` 0; the worker ``pid`` has exited and
  will send nothing more (the driver lets go of its shared-memory result ring).

:func:`result_details` unpickles the last two. ``pid`` is the worker's (``None`` for a record
the machine made without a worker) and ``seconds`` the time the chunk took.

This module runs on machines; it imports :mod:`bigpool.h2rpc` and the standard library only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from . import expvar
from ._worker_main import (
    ENCODE_ERROR,
    ENV_FDS,
    ENV_SHARED_DIR,
    HEADER,
    LENGTH,
    MSG_EXPVARS,
    MSG_READY,
    MSG_RESULT,
    MSG_REVOKED,
    OK,
    TASK_ERROR,
    WORKER_DIED,
    WORKER_EXITED,
    pack_seqs,
    unpack_seqs,
)
from .h2rpc import StreamReader, StreamWriter
from .h2rpc.errors import decode_error, encode_error
from .pool_socket import ChannelBrokenError, Listener, RecordChannel, listen_once
from .pool_wire import (
    MACHINE_FUNCTIONS,
    WORKER_FUNCTIONS,
    Buffer,
    Chunk,
    ChunkDecoder,
    LRUTable,
    RecordAssembler,
    Result,
    encode_chunk,
    encode_result,
    join_small,
    payload_bytes,
)

__all__ = [
    "ENCODE_ERROR",
    "OK",
    "SERVICE_NAME",
    "TASK_ERROR",
    "WORKER_DIED",
    "WORKER_EXITED",
    "Chunk",
    "PoolWorkerService",
    "WorkerStartError",
    "result_details",
]

SERVICE_NAME = "BigPoolWorker"

_log = logging.getLogger(__name__)

# Lines of a worker's stderr kept to explain its death.
STDERR_TAIL_LINES = 20
# How long the first workers may take to start and run the initializer.
START_TIMEOUT = 60.0
# How long workers get to exit after SIGTERM (shutdown) before they are killed.
TERMINATE_GRACE = 2.0
# How often the service checks that its workers are alive (EOF on their channel is the main way).
POLL_SECONDS = 0.5
# A worker whose last chunk took less than this is sent its next chunk while it runs the
# current one (one-deep prefetch), hiding the round trip for tiny chunks. Longer chunks are
# sent one at a time, so a queued chunk never waits behind a long one while a worker idles.
PREFETCH_BELOW_SECONDS = 0.005
# How much work (seconds) a worker on tiny chunks may hold ahead, and the most chunks that is:
# enough that it never waits on the machine between chunks, little enough that the machine's
# queue (which the driver balances across machines) keeps the rest.
PREFETCH_SECONDS = 0.002
PREFETCH_DEPTH = 64
# How long cancel waits for a worker to answer a revocation (it answers while a task runs,
# once the task lets go of the GIL).
REVOKE_TIMEOUT = 2.0
# Backoff for replacing workers that die before they are ready (a broken environment).
RESPAWN_BACKOFF_INITIAL = 0.1
RESPAWN_BACKOFF_MAX = 5.0


class WorkerStartError(RuntimeError):
    """The worker processes could not start, or their initializer failed (``__cause__``)."""


def _record(chunk_id: int, status: int, payload: bytes, pid: int | None, seconds: float) -> bytes:
    return b"".join(encode_result(Result(chunk_id, status, payload, pid, seconds, False)))


def result_details(result: Result) -> Any:
    """The payload of an :data:`ENCODE_ERROR` or :data:`WORKER_DIED` record, unpickled."""
    return pickle.loads(payload_bytes(result))


def _oom_kill_count() -> int | None:
    """The OOM killer's kill counter of this process's memory cgroup (best effort)."""
    candidates = ["/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"]
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                parts = line.strip().split(":", 2)
                if len(parts) != 3 or parts[2] in ("", "/"):
                    continue
                if parts[0] == "0":
                    candidates.insert(0, f"/sys/fs/cgroup{parts[2]}/memory.events")
                elif "memory" in parts[1].split(","):  # cgroup v1: the memory controller's own
                    candidates.insert(0, f"/sys/fs/cgroup/memory{parts[2]}/memory.oom_control")
    except OSError:
        pass
    for path in candidates:
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    entries = [os.path.abspath(p or os.curdir) for p in sys.path if os.path.isdir(p or os.curdir)]
    if env.get("PYTHONPATH"):
        entries.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(entries))
    return env


class _Worker:
    """The machine's record of one worker process."""

    def __init__(self, proc: subprocess.Popen[bytes], replacement: bool) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.replacement = replacement
        self.transport: asyncio.WriteTransport | None = None
        self.revoke_transport: asyncio.WriteTransport | None = None
        self.read_transports: list[asyncio.BaseTransport] = []
        # The machine's ends of the commands, revocations, results and stderr channels, in
        # that order (connected to transports in that order too).
        self.sockets: tuple[socket.socket, ...] = ()
        self.socket_ids: list[tuple[int, int]] = []  # their (st_dev, st_ino)
        self.handed = 0  # how many of them were handed to the event loop
        self.ready: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self.init_error: bytes | None = None
        # The functions this worker has (it keeps the same table, touched in the same order).
        self.func_ids: LRUTable[bytes, bool] = LRUTable(WORKER_FUNCTIONS)
        # Chunks sent and not answered, oldest (running) first, with when they were sent and
        # their sequence numbers (see bigpool._worker_main).
        self.inflight: collections.deque[tuple[Chunk, float, int]] = collections.deque()
        self.sent = 0  # the sequence number of the next chunk sent
        self.outgoing: list[Buffer] = []  # records of chunks sent, not yet written
        # Revocation requests not answered yet, oldest first: each waits for its answer.
        self.revocations: collections.deque[asyncio.Future[list[Chunk]]] = collections.deque()
        # How many of those were not known to be quick when sent (nothing goes ahead of them).
        self.unquick = 0
        self.unquick_ids: set[int] = set()
        self.tasks_done = 0
        self.last_seconds = float("inf")
        self.last_result_at = 0.0
        self.retiring = False
        self.gone = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.stderr_done = asyncio.get_running_loop().create_future()
        self.oom_before = _oom_kill_count()
        self.expvars: dict[str, Any] = {}  # what the process published (bigpool.expvar)

    def __repr__(self) -> str:
        return f"<worker {self.pid} inflight={len(self.inflight)} tasks={self.tasks_done}>"

    def send_init(self, initializer: bytes | None) -> None:
        assert self.transport is not None
        frame = pickle.dumps(("init", initializer), protocol=5)
        self.transport.write(LENGTH.pack(len(frame)) + frame)

    def send_chunk(self, chunk: Chunk, include_function: bool, now: float) -> None:
        """Queue ``chunk``'s record for :meth:`flush` (its function's pickle included or not);
        ``now``: ``time.monotonic()``."""
        self.inflight.append((chunk, now, self.sent))
        self.sent += 1
        record = chunk.record
        if record is not None and chunk.record_has_func == include_function:
            self.outgoing.append(LENGTH.pack(len(record)))  # passed on as the driver sent it
            self.outgoing.append(record)
        else:
            self.outgoing.extend(encode_chunk(chunk, include_function))

    def flush(self) -> None:
        """Write the records :meth:`send_chunk` queued: small ones in one system call."""
        assert self.transport is not None
        parts, self.outgoing = self.outgoing, []
        for part in join_small(parts):
            self.transport.write(part)

    def request_revocation(self, seqs: list[int]) -> asyncio.Future[list[Chunk]]:
        """Ask the worker for the chunks numbered ``seqs`` back; the future gets those it
        had not begun (they are out of :attr:`inflight` by then), or ``[]`` if it is gone."""
        future: asyncio.Future[list[Chunk]] = asyncio.get_running_loop().create_future()
        transport = self.revoke_transport
        if self.gone or transport is None or transport.is_closing():
            future.set_result([])
            return future
        self.revocations.append(future)
        request = pack_seqs(seqs)
        transport.write(LENGTH.pack(len(request)) + request)
        return future

    def revoked(self, body: Buffer) -> list[Chunk]:
        """The worker's answer to the oldest request: take its chunks out of flight."""
        seqs = set(unpack_seqs(body))
        kept: collections.deque[tuple[Chunk, float, int]] = collections.deque()
        chunks: list[Chunk] = []
        for entry in self.inflight:
            if entry[2] in seqs:
                chunks.append(entry[0])
                self.forget_unquick(entry[0])
            else:
                kept.append(entry)
        self.inflight = kept
        return chunks

    def forget_unquick(self, chunk: Chunk) -> None:
        if chunk.chunk_id in self.unquick_ids:
            self.unquick_ids.discard(chunk.chunk_id)
            self.unquick -= 1

    def settle_revocations(self) -> None:
        """The worker is gone: requests it will not answer revoke nothing."""
        while self.revocations:
            future = self.revocations.popleft()
            if not future.done():
                future.set_result([])

    def close_input(self) -> None:
        for transport in (self.transport, self.revoke_transport):
            if transport is not None and not transport.is_closing():
                transport.close()

    def close_pipes(self) -> None:
        self.close_input()
        for transport in self.read_transports:
            if not transport.is_closing():
                transport.close()

    def close_unconnected(self) -> None:
        """Close the channels never handed to the event loop (a transport closes its own)."""
        for end in self.sockets[self.handed:]:
            end.close()

    def settle_failed_connect(self) -> None:
        """The last channel handed to the loop did not become a transport (connect raised or
        was cancelled). The loop disposes of it, but differently: asyncio closes the socket
        object (soon), uvloop closes the descriptor and leaves the object pointing at the
        closed number, which it would close again when collected. Detach it in that case."""
        if not 0 < self.handed <= len(self.sockets) or self.handed <= self.connected:
            return
        end = self.sockets[self.handed - 1]
        fd = end.fileno()
        if fd < 0:
            return
        try:
            st = os.fstat(fd)
            same = (st.st_dev, st.st_ino) == self.socket_ids[self.handed - 1]
        except OSError:
            same = False
        if not same:
            end.detach()

    @property
    def connected(self) -> int:
        """How many channels are transports now."""
        return ((self.transport is not None) + (self.revoke_transport is not None)
                + len(self.read_transports))


class _ResultProtocol(asyncio.Protocol):
    """Reads a worker's frames; EOF means the worker is gone."""

    def __init__(self, service: PoolWorkerService, worker: _Worker) -> None:
        self._service = service
        self._worker = worker
        self._frames = RecordAssembler(header=HEADER)

    def data_received(self, data: bytes) -> None:
        service, worker = self._service, self._worker
        for (_, kind, ntasks), body in self._frames.feed(data):
            if kind == MSG_RESULT:
                service._on_result(worker, ntasks, body)
            elif kind == MSG_REVOKED:
                service._on_revoked(worker, body)
            elif kind == MSG_READY:
                service._on_ready(worker, body)
            elif kind == MSG_EXPVARS:
                service._on_expvars(worker, body)
        service._dispatch()  # once for the results of one read
        service._send_records()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._worker.settle_revocations()
        self._service._on_gone(self._worker)


class _StderrProtocol(asyncio.Protocol):
    """Forwards a worker's stderr to the machine's, line by line, keeping the last lines."""

    def __init__(self, worker: _Worker) -> None:
        self._worker = worker
        self._partial = b""

    def data_received(self, data: bytes) -> None:
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if lines:
            self._emit(lines)

    def _emit(self, lines: list[bytes]) -> None:
        text = [line.decode("utf-8", "replace") + "\n" for line in lines]
        self._worker.stderr_tail.extend(text)
        with contextlib.suppress(Exception):
            sys.stderr.write("".join(text))
            sys.stderr.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._partial:
            self._emit([self._partial])
            self._partial = b""
        if not self._worker.stderr_done.done():
            self._worker.stderr_done.set_result(None)


class _InputProtocol(asyncio.Protocol):
    pass


class PoolWorkerService:
    """Runs task chunks in ``processes`` worker processes on its machine.

    ``initializer`` is ``None`` or the dill pickle of ``(callable, initargs)``, run once in
    every worker process (also in replacements). ``maxtasksperchild``: a worker that has run
    that many tasks (not chunks) exits after its chunk and is replaced by a new process.

    ``shared_dir`` and ``shared_token`` offer the pool's shared-memory directory
    (:mod:`bigpool.pool_shm`): the machine uses it if it finds ``shared_token`` in the file
    ``probe`` there, that is, if it shares the driver's host (:meth:`shared_memory` says).

    The object is pickled on the driver and used on the machine: only this configuration
    travels; the processes and queues are made by :meth:`init` on the machine.
    """

    def __init__(
        self,
        processes: int,
        initializer: bytes | None = None,
        maxtasksperchild: int | None = None,
        shared_dir: str | None = None,
        shared_token: str | None = None,
    ) -> None:
        if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
            raise ValueError(f"processes must be a positive integer, not {processes!r}")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or maxtasksperchild < 1
        ):
            raise ValueError(
                f"maxtasksperchild must be None or a positive integer, not {maxtasksperchild!r}"
            )
        if initializer is not None and not isinstance(initializer, bytes):
            raise TypeError("initializer must be the dill pickle of (callable, initargs) or None")
        self.processes = processes
        self.initializer = initializer
        self.maxtasksperchild = maxtasksperchild
        self.shared_dir = shared_dir
        self.shared_token = shared_token
        self._setup()

    def _setup(self) -> None:
        self._shared = False  # the shared-memory directory is in use here
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[_Worker] = []  # live, not retiring
        self._all: set[_Worker] = set()  # every process not yet reaped
        self._queue: collections.deque[Chunk] = collections.deque()
        self._funcs: LRUTable[bytes, bytes] = LRUTable(MACHINE_FUNCTIONS)
        # Seconds the last chunk of each function took here: decides what may be sent ahead.
        self._func_seconds: dict[bytes, float] = {}
        self._records: collections.deque[Buffer] = collections.deque()
        self._writer: StreamWriter | RecordChannel | None = None
        self._listeners: list[Listener] = []
        self._closed = False
        self._done = 0
        self._restarts = 0
        self._respawn_backoff = 0.0
        self._monitor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._env: dict[str, str] = {}
        # Expvars of workers that have exited, folded together (numbers summed).
        self._past_expvars: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {
            "processes": self.processes,
            "initializer": self.initializer,
            "maxtasksperchild": self.maxtasksperchild,
            "shared_dir": self.shared_dir,
            "shared_token": self.shared_token,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.processes = state["processes"]
        self.initializer = state["initializer"]
        self.maxtasksperchild = state["maxtasksperchild"]
        self.shared_dir = state.get("shared_dir")
        self.shared_token = state.get("shared_token")
        self._setup()

    # service methods ----------------------------------------------------------------------

    async def init(self, b: object) -> None:
        """Start the worker processes and wait until each is ready (initializer done).

        Raises :class:`WorkerStartError` if a worker cannot start or exits first, if the
        initializer raises (its exception is the ``__cause__``), or after
        :data:`START_TIMEOUT` seconds; the workers already started are then stopped.
        """
        self._loop = asyncio.get_running_loop()
        self._env = _worker_env()
        self._shared = self._sees_shared_dir()
        if self._shared:
            assert self.shared_dir is not None
            self._env[ENV_SHARED_DIR] = self.shared_dir
        try:
            for _ in range(self.processes):
                await self._spawn(replacement=False)
            workers = list(self._workers)
            _, pending = await asyncio.wait(
                [w.ready for w in workers], timeout=START_TIMEOUT,
                return_when=asyncio.FIRST_EXCEPTION,
            )
            failed = [w for w in workers if w.ready.done() and w.ready.exception() is not None]
            if failed:
                raise failed[0].ready.exception()  # type: ignore[misc]
            if pending:
                raise WorkerStartError(
                    f"{len(pending)} of {len(workers)} worker processes were not ready "
                    f"after {START_TIMEOUT:g}s"
                )
            for w in workers:
                exc = w.ready.exception()
                if exc is not None:
                    raise exc
                error = w.ready.result()
                if error is not None:
                    cause = decode_error(error)
                    raise WorkerStartError(
                        f"the pool initializer failed in worker process {w.pid}: "
                        f"{type(cause).__name__}: {cause}"
                    ) from cause
        except BaseException:
            await self.shutdown_workers()
            raise
        self._monitor = self._loop.create_task(self._watch())

    def _sees_shared_dir(self) -> bool:
        if not self.shared_dir or not self.shared_token:
            return False
        try:
            fd = os.open(os.path.join(self.shared_dir, "probe"), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                found = os.read(fd, 256)
            finally:
                os.close(fd)
        except OSError:
            return False
        return found == self.shared_token.encode()

    def shared_memory(self, _: object = None) -> bool:
        """Whether large payloads may travel through the pool's shared-memory directory (this
        machine shares the driver's host: see :mod:`bigpool.pool_shm`)."""
        return self._shared

    async def submit(self, batch: list[Chunk]) -> int:
        """Queue ``batch``'s chunks (FIFO) and return at once how many were queued.

        Their results come later on the :meth:`results` stream. Raises ``RuntimeError`` after
        :meth:`shutdown_workers`, and ``TypeError`` for anything but a list of :class:`Chunk`.
        """
        if self._closed or self._loop is None:
            raise RuntimeError("the pool workers are shut down" if self._closed
                               else "the service was not started (init was not called)")
        if not isinstance(batch, list | tuple) or not all(isinstance(c, Chunk) for c in batch):
            raise TypeError("submit takes a list of Chunk")
        for chunk in batch:
            self._accept(chunk)
        self._dispatch()
        return len(batch)

    def _accept(self, chunk: Chunk) -> None:
        """Queue ``chunk`` holding its function's pickle (a later eviction cannot lose it)."""
        if chunk.func is not None:
            self._funcs.put(chunk.func_id, chunk.func)
        else:
            chunk.func = self._funcs.touch(chunk.func_id)
        self._queue.append(chunk)

    async def submit_stream(self, records: StreamReader) -> int:
        """Queue chunks as their records arrive on ``records`` (:mod:`bigpool.pool_wire`), until
        the caller ends the stream; how many there were.

        This is how a pool's driver feeds a machine over the network: one call for the pool's
        life, no round trip per batch. Raises ``ValueError`` naming the problem for a malformed
        record (the chunks before it stay queued) and ``RuntimeError`` after
        :meth:`shutdown_workers`.
        """
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._consume(records, done)
        try:
            return await done
        finally:
            records.on_arrival(None)

    def _consume(self, records: StreamReader | RecordChannel, done: asyncio.Future[int]) -> None:
        """Queue chunks as their records arrive on ``records``; ``done`` gets how many there
        were when the stream ends, or what went wrong."""
        decoder = ChunkDecoder()
        count = 0

        def drain() -> None:  # in the connection's callback: no turn of the loop per record
            nonlocal count
            if done.done():
                return
            try:
                while (data := records.read_chunk_nowait()) is not None:
                    if not data:
                        if decoder.partial:
                            raise ValueError("the chunk stream ended inside a record")
                        done.set_result(count)
                        return
                    if self._closed or self._loop is None:
                        raise RuntimeError("the pool workers are shut down" if self._closed else
                                           "the service was not started (init was not called)")
                    chunks = decoder.feed(data)
                    for chunk in chunks:
                        self._accept(chunk)
                    count += len(chunks)
                    self._dispatch()
            except BaseException as exc:
                done.set_exception(exc)

        records.on_arrival(drain)

    async def open_channel(self, token: bytes) -> str:
        """Listen for the driver on a Unix socket in the pool's directory (a
        :class:`bigpool.pool_socket.RecordChannel`); its path.

        The first connection that presents ``token`` within ``pool_socket.ACCEPT_TIMEOUT``
        seconds carries the chunk records in and the result records out, as
        :meth:`submit_stream` and :meth:`results` do over the network (it takes over from an
        open results stream). Raises ``RuntimeError`` if this machine does not share the
        driver's host (:meth:`shared_memory` is false) or after :meth:`shutdown_workers`.
        """
        if self._closed or self._loop is None:
            raise RuntimeError("the pool workers are shut down" if self._closed
                               else "the service was not started (init was not called)")
        if not self._shared or self.shared_dir is None:
            raise RuntimeError("open_channel: this machine does not share the driver's host "
                               "(it found no shared-memory probe)")
        listener = await listen_once(self.shared_dir, token, self._attach_channel)
        self._listeners = [x for x in self._listeners if not x.closed] + [listener]
        return listener.path

    def _attach_channel(self, channel: RecordChannel) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = channel
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def ended(future: asyncio.Future[int]) -> None:
            exc = future.exception()
            if exc is not None and not isinstance(exc, ChannelBrokenError):
                _log.warning("the pool channel's chunk records failed: %s", exc)
            channel.on_arrival(None)
            channel.abort()

        done.add_done_callback(ended)
        self._consume(channel, done)
        self._send_records()

    async def results(self, _: object = None) -> StreamWriter:
        """The stream of result records (see the module docstring), as chunks complete.

        Records made before the stream is opened wait for it. There is one reader at a time:
        a new call takes over and the previous stream ends. The stream ends after
        :meth:`shutdown_workers`, once the records made before it are sent.
        """
        if self._writer is not None:
            self._writer.close()
        self._writer = StreamWriter()
        self._send_records()
        if self._closed:
            self._writer.close()
        return self._writer

    def _send_records(self) -> None:
        """Write the records made since the last call to the results stream (small ones
        joined, so a burst of results is one DATA frame); they wait if no stream is open."""
        writer = self._writer
        records = self._records
        if not records or writer is None or writer.closed or writer.failed is not None:
            return
        for part in join_small(records):
            writer.write(part)
        records.clear()
        writer.flush()

    async def cancel(self, chunk_ids: list[int]) -> list[int]:
        """Drop the chunks among ``chunk_ids`` that no worker has begun; their ids.

        Those queued here go at once; those sent ahead to a worker process are revoked there
        (the worker answers while its task runs). A chunk begun runs to the end (its record
        still comes). A worker that does not answer within :data:`REVOKE_TIMEOUT` seconds
        keeps what it has; if it revokes them later, they are queued here again.
        """
        wanted = set(chunk_ids)
        kept: collections.deque[Chunk] = collections.deque()
        dropped: list[int] = []
        for chunk in self._queue:
            if chunk.chunk_id in wanted:
                dropped.append(chunk.chunk_id)
            else:
                kept.append(chunk)
        self._queue = kept
        requests = []
        for w in self._workers:
            seqs = [seq for chunk, _, seq in w.inflight if chunk.chunk_id in wanted]
            if seqs:
                requests.append(w.request_revocation(seqs))
        if requests:
            await asyncio.wait(requests, timeout=REVOKE_TIMEOUT)
            for future in requests:
                if future.done():
                    dropped.extend(chunk.chunk_id for chunk in future.result())
                else:
                    future.cancel()  # too late: what it revokes is queued here again
        return dropped

    def stats(self, _: object = None) -> dict[str, Any]:
        """``{"processes", "queued", "running", "done", "worker_pids", "worker_restarts",
        "functions"}`` (``functions``: function pickles held, at most MACHINE_FUNCTIONS).

        ``running`` counts chunks sent to workers and not yet answered; ``worker_restarts``
        counts replacements (deaths and ``maxtasksperchild`` retirements).
        """
        workers = list(self._workers)
        return {
            "processes": self.processes,
            "queued": len(self._queue),
            "running": sum(len(w.inflight) for w in workers),
            "done": self._done,
            "worker_pids": [w.pid for w in workers],
            "worker_restarts": self._restarts,
            "functions": len(self._funcs),
        }

    async def shutdown_workers(self, _: object = None) -> None:
        """Stop every worker (EOF and SIGTERM, SIGKILL after :data:`TERMINATE_GRACE` s) and
        wait for them; queued chunks are dropped and the results stream ends. Idempotent."""
        self._closed = True
        self._queue.clear()
        self._send_records()
        if self._writer is not None:
            self._writer.close()
        for listener in self._listeners:
            listener.close()
        if self._monitor is not None:
            self._monitor.cancel()
        workers = list(self._all)
        self._workers.clear()
        try:
            for w in workers:
                w.close_input()
                with contextlib.suppress(OSError):
                    w.proc.terminate()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + TERMINATE_GRACE
            while any(w.proc.poll() is None for w in workers) and loop.time() < deadline:
                await asyncio.sleep(0.02)
            for w in workers:
                if w.proc.poll() is None:
                    with contextlib.suppress(OSError):
                        w.proc.kill()
            for w in workers:
                while w.proc.poll() is None:
                    await asyncio.sleep(0.01)
                w.close_pipes()
        except BaseException:
            # Cancelled half way (the machine is being torn down): finish the job at once.
            self._kill_all()
            raise

    # workers ------------------------------------------------------------------------------

    async def _spawn(self, *, replacement: bool) -> _Worker:
        loop = asyncio.get_running_loop()
        # Socket pairs, not os.pipe(): uvloop closes a pipe's descriptor itself and then the
        # file object given to connect_*_pipe as well (a second close of the same number, which
        # can hit a descriptor another thread has opened meanwhile); a socket it detaches
        # instead. asyncio's loop closes the socket once, as it would a pipe.
        cmd, cmd_child = socket.socketpair()
        rev, rev_child = socket.socketpair()
        res, res_child = socket.socketpair()
        err, err_child = socket.socketpair()
        ends = (cmd, rev, res, err)
        env = dict(self._env)
        env[ENV_FDS] = f"{cmd_child.fileno()},{res_child.fileno()},{rev_child.fileno()}"
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bigpool._worker_main"],
                stdin=subprocess.DEVNULL,
                stdout=None,  # the machine's own: a task's print reaches the machine's output
                stderr=err_child.fileno(),
                pass_fds=(cmd_child.fileno(), res_child.fileno(), rev_child.fileno()),
                env=env,
                start_new_session=False,
            )
        except BaseException:
            for end in ends:
                end.close()
            raise
        finally:
            for child_end in (cmd_child, rev_child, res_child, err_child):
                child_end.close()
        w = _Worker(proc, replacement)
        w.sockets = ends
        w.socket_ids = [(st.st_dev, st.st_ino) for st in (os.fstat(e.fileno()) for e in ends)]
        if self._closed:  # shut down while this one was starting
            proc.kill()
            proc.wait()
            for end in ends:
                end.close()
            raise RuntimeError("the pool workers are shut down")
        self._all.add(w)
        self._workers.append(w)
        try:
            w.handed = 1
            transport, _ = await loop.connect_write_pipe(_InputProtocol, cmd)
            w.transport = transport
            w.handed = 2
            revoke_transport, _ = await loop.connect_write_pipe(_InputProtocol, rev)
            w.revoke_transport = revoke_transport
            w.handed = 3
            results, _ = await loop.connect_read_pipe(lambda: _ResultProtocol(self, w), res)
            w.read_transports = [results]
            w.handed = 4
            errors, _ = await loop.connect_read_pipe(lambda: _StderrProtocol(w), err)
            w.read_transports.append(errors)
            if self._closed:
                raise RuntimeError("the pool workers are shut down")
        except BaseException:
            # Shut down (or cancelled) while connecting: this worker must not outlive us.
            self._all.discard(w)
            if w in self._workers:
                self._workers.remove(w)
            proc.kill()
            proc.wait()
            w.close_pipes()
            w.settle_failed_connect()
            w.close_unconnected()
            raise
        w.send_init(self.initializer)
        return w

    def _on_ready(self, w: _Worker, body: Buffer) -> None:
        _, init_error = pickle.loads(body)
        w.init_error = init_error
        if init_error is None:
            self._respawn_backoff = 0.0
        if not w.ready.done():
            w.ready.set_result(init_error)
        self._dispatch()

    def _on_expvars(self, w: _Worker, body: Buffer) -> None:
        try:
            values = json.loads(bytes(body))
        except ValueError:
            return
        if isinstance(values, dict):
            w.expvars = values

    def _on_revoked(self, w: _Worker, body: Buffer) -> None:
        chunks = w.revoked(body)
        future = w.revocations.popleft() if w.revocations else None
        if future is not None and not future.done():
            future.set_result(chunks)
        elif chunks:
            self._queue.extendleft(reversed(chunks))
        self._dispatch()

    def _on_result(self, w: _Worker, ntasks: int, record: Buffer) -> None:
        if not w.inflight:
            return  # cannot happen: a worker answers only chunks it was sent
        chunk, sent, _ = w.inflight.popleft()
        w.forget_unquick(chunk)
        now = time.monotonic()
        w.last_seconds = now - max(sent, w.last_result_at)
        w.last_result_at = now
        self._func_seconds[chunk.func_id] = w.last_seconds
        w.tasks_done += ntasks
        self._done += 1
        self._emit(record, send=False)  # the protocol sends a read's records together
        if (self.maxtasksperchild is not None and w.tasks_done >= self.maxtasksperchild
                and not w.retiring):
            self._retire(w)

    def _emit(self, record: Buffer, *, send: bool = True) -> None:
        """Queue a result record; ``send`` writes it out now (else the caller will)."""
        self._records.append(record)
        if send:
            self._send_records()

    def _retire(self, w: _Worker) -> None:
        """Stop giving ``w`` chunks, let it exit (EOF on its input) and start a replacement."""
        w.retiring = True
        if w in self._workers:
            self._workers.remove(w)
        w.close_input()
        if not self._closed:
            self._restarts += 1
            self._start_replacement(0.0)

    def _start_replacement(self, delay: float) -> None:
        async def replace() -> None:
            if delay:
                await asyncio.sleep(delay)
            if self._closed:
                return
            try:
                await self._spawn(replacement=True)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    print(f"bigpool: could not start a pool worker process: "
                          f"{type(exc).__name__}: {exc}; retrying", file=sys.stderr, flush=True)
                self._respawn_backoff = min(
                    max(self._respawn_backoff * 2, RESPAWN_BACKOFF_INITIAL), RESPAWN_BACKOFF_MAX
                )
                self._start_replacement(self._respawn_backoff)

        self._spawn_task(replace())

    def _spawn_task(self, coro: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_gone(self, w: _Worker) -> None:
        """``w``'s result channel ended or its process exited: reap it, report, replace."""
        if w.gone:
            return
        w.gone = True
        if w in self._workers:
            self._workers.remove(w)
        if self._loop is None or self._loop.is_closed():
            return
        self._spawn_task(self._reap(w))

    async def _reap(self, w: _Worker) -> None:
        loop = asyncio.get_running_loop()
        w.close_input()
        deadline = loop.time() + 5.0
        while w.proc.poll() is None:
            if loop.time() > deadline:
                with contextlib.suppress(OSError):
                    w.proc.kill()
                deadline = float("inf")
            await asyncio.sleep(0.005)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(w.stderr_done), 1.0)
        w.close_pipes()
        self._all.discard(w)
        expvar.fold(self._past_expvars, w.expvars)
        if self._shared and not self._closed:
            self._emit(_record(0, WORKER_EXITED, b"", w.pid, 0.0))
        if self._closed or w.retiring:
            return
        exitcode = w.proc.returncode
        died_unready = not w.ready.done()
        if died_unready:
            w.ready.set_exception(WorkerStartError(
                f"worker process {w.pid} {_how(exitcode)} before it was ready"
                + _tail_text(w)
            ))
            w.ready.exception()  # retrieved: init may not be waiting (a replacement)
        w.settle_revocations()
        if w.inflight:
            chunk, sent, _ = w.inflight.popleft()
            self._emit(_record(chunk.chunk_id, WORKER_DIED,
                               pickle.dumps(self._death(w, exitcode), protocol=5),
                               w.pid, time.monotonic() - sent))
            # Chunks sent ahead (prefetched) never started: they go back to the queue's head.
            self._queue.extendleft(reversed([c for c, _, _ in w.inflight]))
            w.inflight.clear()
        self._restarts += 1
        delay = 0.0
        if died_unready:
            self._respawn_backoff = min(
                max(self._respawn_backoff * 2, RESPAWN_BACKOFF_INITIAL), RESPAWN_BACKOFF_MAX
            )
            delay = self._respawn_backoff
        self._start_replacement(delay)
        self._dispatch()

    def _death(self, w: _Worker, exitcode: int) -> dict[str, Any]:
        signame: str | None = None
        if exitcode < 0:
            try:
                signame = signal.Signals(-exitcode).name
            except ValueError:
                signame = f"signal {-exitcode}"
        oom = False
        if exitcode == -signal.SIGKILL and w.oom_before is not None:
            after = _oom_kill_count()
            oom = after is not None and after > w.oom_before
        message = f"worker process {w.pid} {_how(exitcode)} while running a task"
        if oom:
            message += " (the kernel's OOM killer killed it: the machine ran out of memory)"
        message += _tail_text(w)
        return {
            "pid": w.pid,
            "exitcode": exitcode,
            "signal": signame,
            "oom": oom,
            "stderr_tail": list(w.stderr_tail),
            "message": message,
        }

    def _dispatch(self) -> None:
        """Give queued chunks to idle workers (and a second one to workers on tiny chunks)."""
        queue = self._queue
        if not queue or self._closed:
            return
        workers = [w for w in self._workers if w.ready.done() and not w.gone]
        self._fill(workers, queue)
        for w in workers:
            if w.outgoing:
                w.flush()

    def _fill(self, workers: list[_Worker], queue: collections.deque[Chunk]) -> None:
        """Take chunks off ``queue`` for ``workers`` (their records wait in ``outgoing``)."""
        now = time.monotonic()
        for w in workers:  # first every idle worker gets a chunk
            if not queue:
                return
            if w.inflight or w.retiring:
                continue
            if w.init_error is not None:
                self._fail_init(w, queue.popleft())
            else:
                self._send(w, queue.popleft(), now)
        if self.maxtasksperchild is not None:
            return  # a prefetched chunk could run past the limit
        for w in workers:  # then workers on tiny chunks get their next one ahead
            if not queue:
                return
            if w.retiring or w.init_error is not None or w.last_seconds >= PREFETCH_BELOW_SECONDS:
                continue
            depth = min(PREFETCH_DEPTH, max(2, int(PREFETCH_SECONDS / max(w.last_seconds, 1e-6))))
            # Only quick chunks go ahead, and only behind quick ones: a chunk sent ahead that
            # waits behind a long one is taken back only when the driver asks for it.
            while queue and 0 < len(w.inflight) < depth and not w.unquick and self._quick(queue[0]):
                self._send(w, queue.popleft(), now)

    def _quick(self, chunk: Chunk) -> bool:
        seconds = self._func_seconds.get(chunk.func_id)
        return seconds is not None and seconds < PREFETCH_BELOW_SECONDS

    def _send(self, w: _Worker, chunk: Chunk, now: float) -> None:
        has_function = w.func_ids.touch(chunk.func_id) is not None
        if not has_function:
            if chunk.func is None:
                error = LookupError(
                    f"chunk {chunk.chunk_id}: function {chunk.func_id!r} was never sent to "
                    "this machine (send Chunk.func with the first chunk using it)"
                )
                self._done += 1
                self._emit(_record(chunk.chunk_id, TASK_ERROR, encode_error(error), None, 0.0))
                return
            w.func_ids.put(chunk.func_id, True)
        if not self._quick(chunk):
            w.unquick += 1
            w.unquick_ids.add(chunk.chunk_id)
        w.send_chunk(chunk, not has_function, now)

    def _fail_init(self, w: _Worker, chunk: Chunk) -> None:
        """``w``'s initializer failed: the chunk fails with that error; ``w`` is retired and a
        new worker tries the initializer again."""
        assert w.init_error is not None
        self._done += 1
        self._emit(_record(chunk.chunk_id, TASK_ERROR, w.init_error, w.pid, 0.0))
        self._respawn_backoff = min(
            max(self._respawn_backoff * 2, RESPAWN_BACKOFF_INITIAL), RESPAWN_BACKOFF_MAX
        )
        w.retiring = True
        if w in self._workers:
            self._workers.remove(w)
        w.close_input()
        self._restarts += 1
        self._start_replacement(self._respawn_backoff)

    async def _watch(self) -> None:
        """Backstop for EOF: notice workers whose process exited; kill all on cancellation
        (the machine's loop closing) so no worker outlives its machine."""
        try:
            while not self._closed:
                await asyncio.sleep(POLL_SECONDS)
                for w in list(self._all):
                    if not w.gone and w.proc.poll() is not None:
                        self._on_gone(w)
        finally:
            if not self._closed:
                self._kill_all()

    def _bigpool_expvars(self) -> dict[str, Any]:
        """What the Supervisor's expvars show of this service: :meth:`stats`, and under
        ``"expvars"`` what its worker processes published (``bigpool.expvar_add`` in a
        task), over every worker this machine has had: numbers summed, other values the
        latest."""
        report = self.stats()
        total = dict(self._past_expvars)
        for w in list(self._all):
            expvar.fold(total, w.expvars)
        report["expvars"] = total
        return report

    def _bigpool_pids(self) -> list[int]:
        """The live worker processes, for the Supervisor's profiles of this machine."""
        return [w.pid for w in self._workers if w.proc.poll() is None]

    def _bigpool_close(self) -> None:
        """Called by in-process systems when the machine goes away: no worker may stay, and
        no socket to the driver either."""
        for listener in self._listeners:
            listener.close()
        if isinstance(self._writer, RecordChannel):
            self._writer.abort()
        if self._all:
            self._kill_all()

    def _kill_all(self) -> None:
        self._closed = True
        for w in list(self._all):
            if w.proc.poll() is None:
                with contextlib.suppress(OSError):
                    w.proc.kill()
        for w in list(self._all):  # the loop is closing: block a moment to reap them
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(1.0)
            w.close_pipes()
            w.close_unconnected()


def _how(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _tail_text(w: _Worker) -> str:
    tail = "".join(w.stderr_tail).rstrip()
    return f"; last stderr lines:\n{tail}" if tail else ""
