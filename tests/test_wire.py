"""The sans-IO wire format: parsing, encoding and the error envelope, with no sockets."""

from __future__ import annotations

import base64
import io
import os
import pickle
import threading
import types
from typing import Any

import pytest

from bigpool.h2rpc import (
    BadRequestError,
    MethodNotFoundError,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    StreamBrokenError,
    wire,
)
from bigpool.h2rpc.errors import MAX_TRACEBACK_CHARS, decode_error, encode_error


def request(**overrides: bytes | None) -> list[tuple[bytes, bytes]]:
    fields: dict[bytes, bytes | None] = {
        b":method": b"POST",
        b":scheme": b"https",
        b":authority": b"h:1",
        b":path": b"/bigrpc/Svc.meth",
        b"content-type": wire.CONTENT_TYPE_VALUE,
    }
    for name, value in overrides.items():
        fields[name.replace("_", "-").encode()] = value
    return [(k, v) for k, v in fields.items() if v is not None]


# -- paths and requests -----------------------------------------------------------------------


def test_parse_path_accepts_service_dot_method() -> None:
    assert wire.parse_path(b"/bigrpc/Svc.meth") == ("Svc", "meth")
    assert wire.method_path("A.b") == b"/bigrpc/A.b"


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        (b"/other/Svc.meth", "does not start with /bigrpc/"),
        (b"/bigrpc/noservice", "not of the form Service.method"),
        (b"/bigrpc/a.b.c", "not of the form Service.method"),
        (b"/bigrpc/.meth", "not of the form Service.method"),
        (b"/bigrpc/Svc.", "not of the form Service.method"),
        (b"/bigrpc/", "not of the form Service.method"),
        (b"/bigrpc/S\xc3\xa9.m", "not ASCII"),
        (b"/bigrpc/S." + b"m" * wire.MAX_METHOD_NAME, "too long"),
    ],
)
def test_parse_path_names_the_problem(path: bytes, problem: str) -> None:
    with pytest.raises(BadRequestError, match=problem):
        wire.parse_path(path)


def test_method_path_checks_like_the_server() -> None:
    with pytest.raises(BadRequestError):
        wire.method_path("a.b.c")
    with pytest.raises(BadRequestError, match="not ASCII"):
        wire.method_path("S.café")


def test_parse_request_round_trips_request_headers() -> None:
    headers = wire.request_headers(b"h:1", b"/bigrpc/S.m", streamed=True, timeout=2.5)
    assert wire.parse_request(headers) == ("S", "m", True, 2.5)
    headers = wire.request_headers(b"h:1", b"/bigrpc/S.m", streamed=False, timeout=None)
    assert wire.parse_request(headers) == ("S", "m", False, None)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({":method": b"GET"}, "not POST"),
        ({":method": None}, "not POST"),
        ({":path": None}, "no :path"),
        ({":path": b"/bigrpc/x"}, "Service.method"),
        ({"content-type": b"text/plain"}, "content-type"),
        ({"content-type": None}, "content-type"),
        ({"bigrpc-timeout": b"soon"}, "not a number"),
        ({"bigrpc-timeout": b"0"}, "not a positive number"),
        ({"bigrpc-timeout": b"-1"}, "not a positive number"),
        ({"bigrpc-timeout": b"nan"}, "not a positive number"),
        ({"bigrpc-timeout": b"inf"}, "not a positive number"),
    ],
)
def test_parse_request_names_the_problem(overrides: dict[str, bytes | None], problem: str) -> None:
    headers = request(**{k.replace("-", "_"): v for k, v in overrides.items()})
    with pytest.raises(BadRequestError, match=problem):
        wire.parse_request(headers)


def test_parse_response() -> None:
    assert wire.parse_response(wire.response_headers(200, wire.CONTENT_TYPE_VALUE)) == (
        200,
        wire.CONTENT_TYPE_VALUE,
    )
    assert wire.parse_response([(b":status", b"404")]) == (404, None)
    for bad in ([], [(b":status", b"ok")], [(b"content-type", wire.CONTENT_TYPE_VALUE)]):
        with pytest.raises(ProtocolError, match=":status"):
            wire.parse_response(bad)


def test_response_error_for_unexpected_content_type() -> None:
    err = wire.response_error(502, b"text/html", b"<html>bad gateway</html>")
    assert isinstance(err, ProtocolError)
    assert "502" in str(err)


# -- values -----------------------------------------------------------------------------------


class Point:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and other.x == self.x

    __hash__ = None  # type: ignore[assignment]


@pytest.mark.parametrize(
    "value",
    [
        None, True, 0, -(2**80), 1.5, 1j, "héllo", b"\x00\xff", bytearray(b"ab"),
        (1, (2, (3, (4, (5,))))), [1, "a", None], {"k": [1, 2]}, {1, 2}, frozenset({3}),
        list(range(1000)), Point(3), [Point(1), {"p": Point(2)}],
    ],
)
def test_encode_decode_value_round_trip(value: Any) -> None:
    assert wire.decode_value(wire.encode_value(value)) == value
    assert wire.decode_value(memoryview(wire.encode_value(value))) == value


def test_encode_value_carries_closures() -> None:
    k = 5
    f = wire.decode_value(wire.encode_value(lambda x: x + k))
    assert f(1) == 6


def test_encode_value_refuses_unpicklable() -> None:
    with pytest.raises(TypeError):
        wire.encode_value(threading.local())


def test_is_streamed() -> None:
    assert wire.is_streamed(io.BytesIO(b"x"))
    assert wire.is_streamed(iter([b"x"]))
    assert wire.is_streamed(x for x in [b"x"])
    for value in (b"x", bytearray(b"x"), memoryview(b"x"), "x", [b"x"], None, 3):
        assert not wire.is_streamed(value)
    with pytest.raises(TypeError, match="binary mode"):
        wire.is_streamed(io.StringIO("text"))


def test_iter_slices_covers_the_data_without_copying() -> None:
    data = bytes(range(256)) * 10
    slices = list(wire.iter_slices(data, 1000))
    assert [len(s) for s in slices] == [1000, 1000, 560]
    assert b"".join(slices) == data
    assert all(isinstance(s, memoryview) and s.obj is data for s in slices)


# -- the error envelope -----------------------------------------------------------------------


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


class NotRebuildable(Exception):
    """Pickles fine, but its constructor needs two arguments and args holds one."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def test_error_envelope_round_trips_exception_type_and_traceback() -> None:
    err = decode_error(encode_error(raised(KeyError("k"))))
    assert type(err) is KeyError and err.args == ("k",)
    assert isinstance(err.__cause__, RemoteTraceback)
    assert "raise exc" in str(err.__cause__)
    assert "KeyError" in err.__cause__.tb


def test_error_envelope_keeps_bigpool_errors() -> None:
    for exc in (MethodNotFoundError("no method x"), BadRequestError("bad"), StreamBrokenError("s")):
        err = decode_error(encode_error(exc))
        assert type(err) is type(exc) and str(err) == str(exc)


def test_error_envelope_for_unrebuildable_exception_gives_remote_error() -> None:
    err = decode_error(encode_error(raised(NotRebuildable("x", "y"))))
    assert isinstance(err, RemoteError)
    assert err.type_name.endswith("NotRebuildable")
    assert err.message == "x/y"
    assert "NotRebuildable" in err.remote_traceback
    assert str(err) == f"{err.type_name}: x/y"


def test_error_envelope_for_unpicklable_exception_gives_remote_error() -> None:
    exc = ValueError("holds a local")
    exc.local = threading.local()  # type: ignore[attr-defined]
    err = decode_error(encode_error(raised(exc)))
    assert isinstance(err, RemoteError)
    assert err.type_name == "ValueError" and err.message == "holds a local"


def test_error_envelope_keeps_original_exception_intact() -> None:
    cause = OSError("root")
    exc = raised(RuntimeError("top"))
    exc.__cause__ = cause
    tb = exc.__traceback__
    encode_error(exc)
    assert exc.__cause__ is cause and exc.__traceback__ is tb


def test_error_envelope_traceback_is_bounded() -> None:
    exc = raised(ValueError("x" * (3 * MAX_TRACEBACK_CHARS)))
    err = decode_error(encode_error(exc))
    tb = err.__cause__
    assert isinstance(tb, RemoteTraceback)
    assert len(tb.tb) <= MAX_TRACEBACK_CHARS + 100
    assert tb.tb.startswith("... (traceback cut)")


def test_malformed_error_envelope_is_a_protocol_error() -> None:
    for data in (b"not a pickle", pickle.dumps({"type": "X"}), pickle.dumps([1, 2])):
        err = decode_error(data)
        assert isinstance(err, ProtocolError)
        assert "malformed error envelope" in str(err)


def test_response_error_decodes_the_envelope() -> None:
    headers, body = wire.error_response(wire.STATUS_REMOTE_ERROR, raised(ZeroDivisionError("z")))
    status, ctype = wire.parse_response(headers)
    err = wire.response_error(status, ctype, body)
    assert type(err) is ZeroDivisionError


# -- stream trailers --------------------------------------------------------------------------


def test_stream_trailer_ok() -> None:
    assert wire.stream_trailer_error(wire.ok_trailers()) is None


def test_stream_without_trailers_is_broken() -> None:
    err = wire.stream_trailer_error(None)
    assert isinstance(err, StreamBrokenError)
    assert "completion trailer" in str(err)


def test_stream_error_trailer_carries_the_exception() -> None:
    err = wire.stream_trailer_error(wire.error_trailers(raised(ValueError("boom"))))
    assert type(err) is ValueError and str(err) == "boom"
    assert isinstance(err.__cause__, RemoteTraceback)


def test_oversized_stream_error_is_cut_to_fit_a_trailer() -> None:
    trailers = wire.error_trailers(raised(ValueError("y" * 200_000)))
    assert sum(len(k) + len(v) for k, v in trailers) <= wire.MAX_TRAILER_ERROR + 100
    err = wire.stream_trailer_error(trailers)
    assert isinstance(err, StreamBrokenError)
    assert "ValueError" in str(err)


@pytest.mark.parametrize(
    ("trailers", "problem"),
    [
        ([(wire.TRAILER_STATUS, b"error"), (wire.TRAILER_ERROR, b"!!not base64!!")], "base64"),
        ([(wire.TRAILER_STATUS, b"weird")], "unknown status"),
        ([(wire.TRAILER_STATUS, b"error")], "unknown status"),
        ([], "unknown status"),
    ],
)
def test_bad_stream_trailers_are_protocol_errors(
    trailers: list[tuple[bytes, bytes]], problem: str
) -> None:
    err = wire.stream_trailer_error(trailers)
    assert isinstance(err, ProtocolError)
    assert problem in str(err)


def test_error_trailer_with_garbage_envelope() -> None:
    trailers = [(wire.TRAILER_STATUS, b"error"), (wire.TRAILER_ERROR, base64.b64encode(b"junk"))]
    assert isinstance(wire.stream_trailer_error(trailers), ProtocolError)


def test_pickle_value_copies_what_main_defines_by_value() -> None:
    main_class = type("Point", (), {"__module__": "__main__"})
    main_function = types.FunctionType((lambda: 7).__code__, {"__name__": "__main__"}, "seven")
    main_function.__module__ = "__main__"
    for value in (main_class, main_class(), [1, main_function], {"k": (main_class,)}):
        assert wire.pickle_value(value)[1], value
    assert wire.decode_value(wire.pickle_value([1, main_function])[0])[1]() == 7


def test_pickle_value_keeps_importable_values_on_the_c_pickler() -> None:
    big = os.urandom(1 << 20)
    for value in ({"a": [1, 2.5, "x"]}, big, [big, 3], wire.pickle_value):
        data, by_value = wire.pickle_value(value)
        assert not by_value
        assert pickle.loads(data) == value
