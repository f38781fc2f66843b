"""The pool's chunk and result records, without sockets: round trips, any split, bad input."""

from __future__ import annotations

import itertools
import pickle
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigpool.pool_wire import (
    INLINE_LIMIT,
    Chunk,
    ChunkDecoder,
    LRUTable,
    Pieces,
    RecordAssembler,
    RecordError,
    Result,
    ResultDecoder,
    encode_chunk,
    encode_result,
    join_small,
    payload_bytes,
)


def _chunks() -> list[Chunk]:
    return [
        Chunk(1, b"f" * 16, b"function pickle", b"args", True, False),
        Chunk(2, b"f" * 16, None, b"", False, True),
        Chunk(2**64 - 1, b"id", None, bytes(range(256)) * 400, False, False),  # > INLINE_LIMIT
        Chunk(3, b"g" * 16, None, b"pickle", True, True, (b"one", bytes(INLINE_LIMIT), b"")),
    ]


def _same_chunk(a: Chunk, b: Chunk) -> bool:
    return (a.chunk_id, a.func_id, a.func, bytes(a.args), a.star, a.args_dill,
            [bytes(x) for x in a.buffers]) == (
        b.chunk_id, b.func_id, b.func, bytes(b.args), b.star, b.args_dill,
        [bytes(x) for x in b.buffers])


def _stream(chunks: list[Chunk]) -> bytes:
    return b"".join(bytes(part) for c in chunks for part in encode_chunk(c))


def test_chunks_round_trip_in_one_feed() -> None:
    decoded = ChunkDecoder().feed(_stream(_chunks()))
    assert len(decoded) == 4
    assert all(_same_chunk(a, b) for a, b in zip(decoded, _chunks(), strict=True))


def test_large_arguments_are_a_separate_buffer_not_a_copy() -> None:
    args = bytes(INLINE_LIMIT)
    parts = encode_chunk(Chunk(7, b"x" * 16, None, args, False))
    assert len(parts) == 2 and parts[1] is args


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(_stream(_chunks())) - 1), max_size=12))
def test_chunks_decode_however_the_bytes_are_split(cuts: list[int]) -> None:
    data = _stream(_chunks())
    bounds = [0, *sorted(set(cuts)), len(data)]
    decoder = ChunkDecoder()
    decoded: list[Chunk] = []
    for start, end in itertools.pairwise(bounds):
        decoded += decoder.feed(data[start:end])
    assert not decoder.partial
    assert len(decoded) == 4
    assert all(_same_chunk(a, b) for a, b in zip(decoded, _chunks(), strict=True))


def test_out_of_band_buffers_are_sent_as_themselves() -> None:
    big = bytes(INLINE_LIMIT)
    parts = encode_chunk(Chunk(7, b"x" * 16, None, b"pickle", False, False, (b"small", big)))
    assert parts[-1] is big and parts[-2] == b"small"


def _buffers_field(count: int, lengths: list[int], rest: bytes) -> bytes:
    body = struct.pack(">BQBI", 4, 9, 0, 0) + struct.pack(">I", count)
    return body + b"".join(struct.pack(">Q", n) for n in lengths) + rest


def test_a_stream_cut_inside_a_record_is_partial() -> None:
    data = _stream(_chunks()[:1])
    decoder = ChunkDecoder()
    assert decoder.feed(data[:-1]) == []
    assert decoder.partial
    assert len(decoder.feed(data[-1:])) == 1 and not decoder.partial


def test_results_round_trip() -> None:
    results = [Result(3, 0, b"payload", 1234, 0.25, False),
               Result(4, 3, bytes(INLINE_LIMIT * 2), None, 1.5, True)]
    data = b"".join(bytes(p) for r in results for p in encode_result(r))
    decoder = ResultDecoder()
    decoded = decoder.feed(data[:10]) + decoder.feed(data[10:])
    assert [(r.chunk_id, r.status, bytes(r.payload), r.pid, r.seconds, r.payload_dill)
            for r in decoded] == [
        (3, 0, b"payload", 1234, 0.25, False), (4, 3, bytes(INLINE_LIMIT * 2), None, 1.5, True)]


def test_a_record_longer_than_allowed_is_refused_before_allocation() -> None:
    assembler = RecordAssembler(max_record=100)
    with pytest.raises(RecordError, match="101 bytes is larger than allowed"):
        assembler.feed(struct.pack(">I", 101))


@pytest.mark.parametrize(("body", "message"), [
    (b"\x00" * 5, "shorter than its header"),
    (struct.pack(">BQBI", 0, 9, 16, 100) + b"x" * 20, "overruns its record"),
    (struct.pack(">BQBI", 0x80, 9, 0, 0), "unknown flags"),
    (struct.pack(">BQBI", 4, 9, 0, 0) + b"\x00\x00", "end before their buffer count"),
    (_buffers_field(0, [], b"pickle"), "buffer count of 0 does not fit"),
    (_buffers_field(3, [1], b""), "buffer count of 3 does not fit"),
    (_buffers_field(2, [4, 5], b"pickl"), "buffers of 9 bytes overrun"),
    (_buffers_field(1, [2**63], b"xx"), "overrun"),
])
def test_malformed_chunk_records_are_named(body: bytes, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        ChunkDecoder().feed(struct.pack(">I", len(body)) + body)


def test_a_header_with_more_fields_carries_them() -> None:
    header = struct.Struct(">IBI")
    assembler = RecordAssembler(header=header)
    data = header.pack(3, 2, 40) + b"abc" + header.pack(0, 1, 0)
    out = assembler.feed(data[:5]) + assembler.feed(data[5:])
    assert [(fields, bytes(body)) for fields, body in out] == [((3, 2, 40), b"abc"),
                                                               ((0, 1, 0), b"")]


def test_lru_table_drops_the_least_recently_used() -> None:
    table: LRUTable[str, int] = LRUTable(2)
    table.put("a", 1)
    table.put("b", 2)
    assert table.touch("a") == 1  # now b is the least recent
    table.put("c", 3)
    assert "b" not in table and table.touch("a") == 1 and table.touch("c") == 3
    assert table.touch("b") is None and len(table) == 2


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_a_large_result_in_pieces_unpickles_straight_from_them(protocol: int) -> None:
    value = [bytes(range(256)) * 4096, "text\nwith newline", 12345, {"k": (1.5, None)}]
    payload = pickle.dumps(value, protocol=protocol)
    record = b"".join(bytes(p) for p in encode_result(Result(9, 0, payload, 77, 0.5, False)))
    decoder = ResultDecoder(pieces_from=64 * 1024)
    results = []
    for start in range(0, len(record), 100_000):  # arrives in pieces
        results += decoder.feed(record[start : start + 100_000])
    (result,) = results
    assert isinstance(result.payload, Pieces)
    assert (result.chunk_id, result.pid, result.seconds) == (9, 77, 0.5)
    assert payload_bytes(result) == payload
    assert pickle.Unpickler(result.payload.reader()).load() == value


def test_a_small_or_whole_result_is_a_plain_view() -> None:
    record = b"".join(bytes(p) for p in encode_result(Result(1, 0, b"x" * 1000, 1, 0.0)))
    decoder = ResultDecoder(pieces_from=64 * 1024)
    (result,) = decoder.feed(record[:10]) + decoder.feed(record[10:])
    assert isinstance(result.payload, memoryview) and bytes(result.payload) == b"x" * 1000


def test_pieces_reader_reads_lines_and_runs() -> None:
    reader = Pieces([memoryview(b"ab\ncd"), memoryview(b"e\nf")]).after(1).reader()
    assert reader.readline() == b"b\n"
    assert reader.readline() == b"cde\n"
    buffer = bytearray(5)
    assert reader.readinto(buffer) == 1 and buffer[:1] == b"f"
    assert reader.read() == b""


def test_a_decoded_chunk_keeps_its_record_to_pass_on_as_it_came() -> None:
    for chunk in _chunks():
        for include_function in (True, False):
            record = b"".join(bytes(p) for p in encode_chunk(chunk, include_function))
            decoded = ChunkDecoder().feed(record)[0]
            assert decoded.record is not None
            assert struct.pack(">I", len(decoded.record)) + bytes(decoded.record) == record
            assert decoded.record_has_func == (include_function and bool(chunk.func))


def test_join_small_joins_each_run_of_small_parts_and_leaves_large_ones_uncopied() -> None:
    big, other = bytes(INLINE_LIMIT), bytearray(INLINE_LIMIT + 1)
    out = join_small([b"a", b"b", big, b"c", other, memoryview(b"d"), b"e"])
    assert [bytes(x) for x in out] == [b"ab", big, b"c", bytes(other), b"de"]
    assert out[1] is big and out[3] is other
    only = b"x"
    assert join_small([only])[0] is only and join_small([]) == []
