"""An independent reader of pprof files for the tests: a small protobuf decoder written from
profile.proto (github.com/google/pprof/proto/profile.proto), sharing no code with bigpool's
encoder. Accepts packed and unpacked repeated integers, as any protobuf reader must."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from typing import Any


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) for each field of a message, in order."""
    out = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value = data[pos : pos + length]
            if len(value) != length:
                raise ValueError("truncated field")
            pos += length
        elif wire == 1:
            value = int.from_bytes(data[pos : pos + 8], "little")
            pos += 8
        elif wire == 5:
            value = int.from_bytes(data[pos : pos + 4], "little")
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")
        out.append((number, wire, value))
    return out


def _ints(wire: int, value: Any) -> list[int]:
    if wire == 0:
        return [value]
    values = []
    pos = 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        values.append(v)
    return values


@dataclass
class Sample:
    functions: list[str]  # leaf first
    files: list[str]
    values: list[int]
    labels: dict[str, str] = field(default_factory=dict)
    num_labels: dict[str, int] = field(default_factory=dict)


@dataclass
class Pprof:
    sample_types: list[tuple[str, str]]
    samples: list[Sample]
    comments: list[str]
    period: int
    period_type: tuple[str, str]
    duration_nanos: int


def read(data: bytes) -> Pprof:
    """Decode a (gzip'd or plain) pprof Profile."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    top = fields(data)
    strings = [v.decode("utf-8") for n, _, v in top if n == 6]
    assert strings and strings[0] == "", "string_table[0] must be empty"
    functions: dict[int, tuple[str, str]] = {}
    for n, _, v in top:
        if n == 5:
            f = {fn: val for fn, _, val in fields(v)}
            functions[f.get(1, 0)] = (strings[f.get(2, 0)], strings[f.get(4, 0)])
    locations: dict[int, list[int]] = {}
    for n, _, v in top:
        if n == 4:
            loc_id = 0
            fids = []
            for fn, _, val in fields(v):
                if fn == 1:
                    loc_id = val
                elif fn == 4:
                    line = {k: x for k, _, x in fields(val)}
                    fids.append(line.get(1, 0))
            locations[loc_id] = fids
    samples = []
    sample_types = []
    comments: list[str] = []
    period = duration = 0
    period_type = ("", "")
    for n, wire, v in top:
        if n == 1:
            vt = {k: x for k, _, x in fields(v)}
            sample_types.append((strings[vt.get(1, 0)], strings[vt.get(2, 0)]))
        elif n == 2:
            loc_ids: list[int] = []
            values: list[int] = []
            sample = Sample([], [], [])
            for fn, fw, val in fields(v):
                if fn == 1:
                    loc_ids.extend(_ints(fw, val))
                elif fn == 2:
                    values.extend(_ints(fw, val))
                elif fn == 3:
                    lab = {k: x for k, _, x in fields(val)}
                    key = strings[lab.get(1, 0)]
                    if 3 in lab:
                        sample.num_labels[key] = lab[3]
                    else:
                        sample.labels[key] = strings[lab.get(2, 0)]
            for loc in loc_ids:
                for fid in locations[loc]:
                    name, filename = functions[fid]
                    sample.functions.append(name)
                    sample.files.append(filename)
            sample.values = values
            samples.append(sample)
        elif n == 13:
            comments.extend(strings[i] for i in _ints(wire, v))
        elif n == 12:
            period = v
        elif n == 10:
            duration = v
        elif n == 11:
            vt = {k: x for k, _, x in fields(v)}
            period_type = (strings[vt.get(1, 0)], strings[vt.get(2, 0)])
    return Pprof(sample_types, samples, comments, period, period_type, duration)
