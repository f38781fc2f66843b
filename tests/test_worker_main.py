"""The worker process's chunk loop (bigpool._worker_main.serve), run in this process on
in-memory channels: what each record gets back, by the short way and the general one."""

from __future__ import annotations

import io
import pickle
import threading

import dill

from bigpool import _worker_main as wm
from bigpool.h2rpc.errors import decode_error
from bigpool.pool_wire import Chunk, RecordAssembler, decode_result, encode_chunk


def double(x: int) -> int:
    return 2 * x


def add(x: int, y: int) -> int:
    return x + y


def _records(*chunks: tuple[Chunk, bool]) -> bytes:
    return b"".join(bytes(part) for chunk, with_func in chunks
                    for part in encode_chunk(chunk, with_func))


def _serve(data: bytes, gate: wm.Gate | None = None) -> list[tuple[int, int, object]]:
    """(kind, tasks, result) for each frame the loop writes; a result is (chunk id, status,
    unpickled payload)."""
    out = io.BytesIO()
    wm.serve(io.BufferedReader(io.BytesIO(data)), out, threading.Lock(), gate or wm.Gate(),
             wm.SharedRings(None), wm.expvar.version())
    frames = []
    for (_, kind, ntasks), body in RecordAssembler(header=wm.HEADER).feed(out.getvalue()):
        result = decode_result(body[4:])
        payload = bytes(result.payload)
        value = (pickle.loads(payload) if result.status == wm.OK
                 else decode_error(payload) if result.status == wm.TASK_ERROR else payload)
        frames.append((kind, ntasks, (result.chunk_id, result.status, value)))
    return frames


def test_chunks_with_and_without_their_function_all_run() -> None:
    f, g = dill.dumps(double), dill.dumps(add)
    data = _records(
        (Chunk(1, b"f", f, pickle.dumps([1, 2]), False, False), True),
        (Chunk(2, b"f", None, pickle.dumps([3]), False, False), False),  # the short way
        (Chunk(3, b"g", g, dill.dumps([(1, 2)]), True, True), True),
        (Chunk(4, b"g", None, pickle.dumps([(5, 6), (7, 8)]), True, False), False),
        (Chunk(5, b"f", None, pickle.dumps([b"x" * 100_000], protocol=5), False, False), False),
    )
    frames = _serve(data)
    assert [(kind, n) for kind, n, _ in frames] == [(wm.MSG_RESULT, 2), (wm.MSG_RESULT, 1),
                                                   (wm.MSG_RESULT, 1), (wm.MSG_RESULT, 2),
                                                   (wm.MSG_RESULT, 1)]
    assert [r for _, _, r in frames] == [
        (1, wm.OK, [2, 4]), (2, wm.OK, [6]), (3, wm.OK, [3]), (4, wm.OK, [11, 15]),
        (5, wm.OK, [b"x" * 200_000])]


def test_a_function_never_sent_fails_its_chunk_by_name() -> None:
    frames = _serve(_records((Chunk(7, b"nope", None, pickle.dumps([1]), False, False), False)))
    ((_, _, (chunk_id, status, error)),) = frames
    assert (chunk_id, status) == (7, wm.TASK_ERROR)
    assert isinstance(error, LookupError) and "b'nope' was never sent" in str(error)


def test_a_function_that_cannot_load_fails_every_chunk_using_it() -> None:
    data = _records((Chunk(1, b"bad", b"not a pickle", pickle.dumps([1]), False, False), True),
                    (Chunk(2, b"bad", None, pickle.dumps([2]), False, False), False))
    statuses = [(r[0], r[1], type(r[2]).__name__) for _, _, r in _serve(data)]
    assert [s[:2] for s in statuses] == [(1, wm.TASK_ERROR), (2, wm.TASK_ERROR)]
    assert statuses[0][2] == statuses[1][2] != "LookupError"


def test_a_task_error_reaches_the_driver_with_its_type() -> None:
    frames = _serve(_records((Chunk(1, b"f", dill.dumps(double), pickle.dumps([None]), False,
                                    False), True)))
    ((_, _, (_, status, error)),) = frames
    assert status == wm.TASK_ERROR and isinstance(error, TypeError)


def test_revoked_chunks_are_skipped_but_keep_the_function_table_in_step() -> None:
    f = dill.dumps(double)
    gate = wm.Gate()
    with gate.lock:
        assert gate.revoke([1, 2]) == [1, 2]
    data = _records(
        (Chunk(10, b"f", f, pickle.dumps([1]), False, False), True),
        (Chunk(11, b"g", dill.dumps(add), pickle.dumps([(1, 1)]), True, False), True),  # revoked
        (Chunk(12, b"f", None, pickle.dumps([2]), False, False), False),  # revoked, short way
        (Chunk(13, b"g", None, pickle.dumps([(2, 3)]), True, False), False),
    )
    assert [r for _, _, r in _serve(data, gate)] == [(10, wm.OK, [2]), (13, wm.OK, [5])]


def test_a_stream_that_ends_inside_a_record_ends_the_loop() -> None:
    data = _records((Chunk(1, b"f", dill.dumps(double), pickle.dumps([1]), False, False), True))
    assert _serve(data + data[:-3]) == _serve(data)


class Blob:
    """Pickles its buffer out of band, as a numpy array does."""

    def __init__(self, data: bytearray | memoryview) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: object) -> tuple[object, ...]:
        return Blob, (pickle.PickleBuffer(self.data),)


def poke(blob: Blob) -> bytes:
    view = memoryview(blob.data)
    view[0] = ord("!")  # raises if the worker handed over a read-only buffer
    return bytes(view)


def test_out_of_band_buffers_arrive_writable() -> None:
    buffers: list[pickle.PickleBuffer] = []
    args = pickle.dumps([Blob(bytearray(b"abc" * 30_000))], protocol=5,
                        buffer_callback=buffers.append)
    assert len(buffers) == 1
    raw = bytes(buffers[0].raw())
    data = _records((Chunk(1, b"p", dill.dumps(poke), args, False, False, (raw,)), True),
                    (Chunk(2, b"p", None, args, False, False, (raw,)), False))
    results = [r for _, _, r in _serve(data)]
    expected = b"!" + raw[1:]
    assert results == [(1, wm.OK, [expected]), (2, wm.OK, [expected])]
