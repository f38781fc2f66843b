"""CPU samples merged from many processes, and their pprof encoding. No I/O here.

:class:`Profile` collects stacks (py-spy's folded lines, see :mod:`bigpool.pyspy`) from every
process of the cluster, each sample labelled with the machine, pid and role it came from, and
writes them out as

* a pprof protobuf (``profile.proto`` of github.com/google/pprof), which ``go tool pprof``
  reads: sample types ``samples/count`` and ``cpu/nanoseconds``, a label per sample
  (``machine``, ``role``, and ``pid`` as a number), and the notes (processes or machines that
  could not be profiled) as the profile's comments;
* folded stacks, root first, for flame graph tools (``collapsed``).

The protobuf is written by hand: it is a handful of varint and length-delimited fields, and a
protobuf library would be the only reason to depend on one.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Frame", "Profile", "parse_frame"]

# py-spy's frame: "function (filename:line)"; the line is absent for some native frames.
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
_PROCESS = re.compile(r'^process (?P<pid>\d+):"(?P<role>.*)"$')

_LABEL_ORDER = ("machine", "role", "pid")


@dataclass(frozen=True, order=True)
class Frame:
    """One stack frame: a function, the file it is defined in, and the line running."""

    name: str
    filename: str = ""
    line: int = 0

    def folded(self, lines: bool = True) -> str:
        """The frame as py-spy writes it: ``name (file:line)``; ``lines=False`` drops the line
        (and the directories), which groups a function's lines together."""
        if not self.filename:
            return self.name
        if not lines:
            return f"{self.name} ({self.filename.rsplit('/', 1)[-1]})"
        return f"{self.name} ({self.filename}:{self.line})" if self.line else (
            f"{self.name} ({self.filename})"
        )


def parse_frame(text: str) -> Frame:
    """A :class:`Frame` from py-spy's ``name (file:line)``; any other text is a bare name."""
    match = _FRAME.match(text)
    if match is None:
        return Frame(text)
    line = match.group("line")
    return Frame(match.group("name"), match.group("file"), int(line) if line else 0)


Labels = tuple[tuple[str, str], ...]


class Profile:
    """Stacks and their sample counts, merged across processes.

    ``period_ns`` is the time one sample stands for (10 ms at py-spy's 100 Hz). Samples with
    the same stack and labels are counted together, so merging many processes' profiles costs
    memory by distinct stacks, not by samples.
    """

    def __init__(self, *, period_ns: int = 10_000_000, duration_ns: int = 0,
                 time_ns: int = 0) -> None:
        self.period_ns = period_ns
        self.duration_ns = duration_ns
        self.time_ns = time_ns
        self.samples: dict[tuple[tuple[Frame, ...], Labels], int] = {}
        self.notes: list[str] = []

    def add(self, stack: Iterable[Frame], count: int, labels: Mapping[str, str] | None = None) -> None:
        """Count ``count`` samples of ``stack`` (root first) with ``labels``."""
        if count <= 0:
            return
        key = (tuple(stack), _labels(labels or {}))
        self.samples[key] = self.samples.get(key, 0) + count

    def add_folded(self, text: str, labels: Mapping[str, str] | None = None) -> int:
        """Add py-spy's folded lines (``frame;frame;... count``); the number of samples added.

        A leading ``process PID:"ROLE"`` frame becomes the ``pid`` and ``role`` labels; a
        ``#`` line is a note (kept, prefixed with the ``machine`` label if there is one).
        Lines that are neither are skipped.
        """
        base = dict(labels or {})
        where = f"{base['machine']}: " if "machine" in base else ""
        added = 0
        for raw in text.splitlines():
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                self.notes.append(where + line.lstrip("#").strip())
                continue
            stack_text, _, count_text = line.rpartition(" ")
            if not stack_text or not count_text.isdigit():
                continue
            parts = stack_text.split(";")
            sample_labels = dict(base)
            process = _PROCESS.match(parts[0])
            if process is not None:
                sample_labels["pid"] = process.group("pid")
                sample_labels["role"] = process.group("role")
                parts = parts[1:]
            if not parts:
                continue
            count = int(count_text)
            self.add((parse_frame(p) for p in parts), count, sample_labels)
            added += count
        return added

    def merge(self, other: Profile) -> None:
        """Add every sample and note of ``other``."""
        for (stack, labels), count in other.samples.items():
            key = (stack, labels)
            self.samples[key] = self.samples.get(key, 0) + count
        self.notes.extend(other.notes)

    @property
    def total(self) -> int:
        """The number of samples."""
        return sum(self.samples.values())

    def label_values(self, key: str) -> set[str]:
        """The values the label ``key`` takes over the samples (the machines, say)."""
        return {value for (_, labels), _ in self.samples.items() for k, value in labels if k == key}

    def stacks(self, *, lines: bool = True, group_by: str | None = None) -> dict[tuple[str, ...], int]:
        """Folded frames (root first) and their counts. ``lines=False`` merges a function's
        lines; ``group_by`` (a label, as ``"machine"``) adds a root frame per label value."""
        out: dict[tuple[str, ...], int] = {}
        for (stack, labels), count in self.samples.items():
            frames = tuple(f.folded(lines) for f in stack)
            if group_by is not None:
                value = dict(labels).get(group_by, "?")
                frames = (f"{group_by} {value}", *frames)
            out[frames] = out.get(frames, 0) + count
        return out

    def collapsed(self, *, lines: bool = True, group_by: str | None = None) -> str:
        """Folded stacks, one ``frame;...;leaf count`` line per stack, sorted; notes first
        as ``# `` lines (flame graph tools skip them)."""
        notes = [f"# {note}\n" for note in self.notes]
        body = [
            f"{';'.join(frames)} {count}\n"
            for frames, count in sorted(self.stacks(lines=lines, group_by=group_by).items())
        ]
        return "".join(notes + body)

    def encode(self) -> bytes:
        """The profile as an uncompressed pprof ``Profile`` protobuf message."""
        return _Encoder(self).encode()

    def gzipped(self) -> bytes:
        """The profile as pprof files are stored: the protobuf, gzip'd."""
        return gzip.compress(self.encode(), mtime=0)


def _labels(labels: Mapping[str, str]) -> Labels:
    order = {k: i for i, k in enumerate(_LABEL_ORDER)}
    return tuple(sorted(((str(k), str(v)) for k, v in labels.items()),
                        key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


# protobuf ------------------------------------------------------------------------------------

_VARINT, _BYTES = 0, 2


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 as protobuf writes it: two's complement, ten bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int_field(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + _varint(value) if value else b""


def _bytes_field(field: int, value: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(value)) + value


def _packed(field: int, values: Iterable[int]) -> bytes:
    body = b"".join(_varint(v) for v in values)
    return _bytes_field(field, body) if body else b""


class _Encoder:
    """One pass over a :class:`Profile`, interning strings, functions and locations."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.strings: dict[str, int] = {"": 0}
        self.functions: dict[tuple[str, str], int] = {}
        self.locations: dict[Frame, int] = {}
        self.out: list[bytes] = []

    def string(self, value: str) -> int:
        index = self.strings.get(value)
        if index is None:
            index = self.strings[value] = len(self.strings)
        return index

    def value_type(self, type_: str, unit: str) -> bytes:
        return _int_field(1, self.string(type_)) + _int_field(2, self.string(unit))

    def location(self, frame: Frame) -> int:
        location_id = self.locations.get(frame)
        if location_id is not None:
            return location_id
        function_key = (frame.name, frame.filename)
        function_id = self.functions.get(function_key)
        if function_id is None:
            function_id = self.functions[function_key] = len(self.functions) + 1
            name = self.string(frame.name)
            # No system_name: pprof would "demangle" it into name, and C++ template stripping
            # turns Python's "<module>" into "".
            self.out.append(_bytes_field(5, (
                _int_field(1, function_id) + _int_field(2, name)
                + _int_field(4, self.string(frame.filename))
            )))
        location_id = self.locations[frame] = len(self.locations) + 1
        line = _int_field(1, function_id) + _int_field(2, frame.line)
        self.out.append(_bytes_field(4, (
            _int_field(1, location_id) + _int_field(2, 1) + _bytes_field(4, line)
        )))
        return location_id

    def encode(self) -> bytes:
        profile = self.profile
        out = self.out
        out.append(_bytes_field(1, self.value_type("samples", "count")))
        out.append(_bytes_field(1, self.value_type("cpu", "nanoseconds")))
        # One mapping that says functions are already symbolized: pprof then looks for no binary.
        out.append(_bytes_field(3, (
            _int_field(1, 1) + _int_field(5, self.string("python"))
            + _int_field(7, 1) + _int_field(8, 1) + _int_field(9, 1)
        )))
        for (stack, labels), count in sorted(profile.samples.items()):
            ids = [self.location(frame) for frame in reversed(stack)]  # pprof: leaf first
            body = _packed(1, ids) + _packed(2, [count, count * profile.period_ns])
            for key, value in labels:
                if key == "pid" and value.isdigit():
                    label = _int_field(1, self.string(key)) + _int_field(3, int(value))
                else:
                    label = _int_field(1, self.string(key)) + _int_field(2, self.string(value))
                body += _bytes_field(3, label)
            out.append(_bytes_field(2, body))
        out.append(_int_field(9, profile.time_ns))
        out.append(_int_field(10, profile.duration_ns))
        out.append(_bytes_field(11, self.value_type("cpu", "nanoseconds")))
        out.append(_int_field(12, profile.period_ns))
        out.append(_packed(13, [self.string(note) for note in profile.notes if note]))
        out.append(_int_field(14, self.string("cpu")))
        strings = b"".join(_bytes_field(6, s.encode("utf-8")) for s in self.strings)
        return b"".join(out) + strings
