"""A flame graph of folded stacks as a standalone SVG (no script, no external files).

Brendan Gregg's layout: the root at the bottom, each frame as wide as the samples under it,
children in alphabetical order so two graphs of the same program line up. Hovering a frame
shows its full name, samples and share (an SVG ``<title>``). No I/O here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from xml.sax.saxutils import escape, quoteattr

__all__ = ["render"]

WIDTH = 1200
FRAME_HEIGHT = 16
FONT_SIZE = 11
# Rough advance of one character at FONT_SIZE in a sans-serif font: decides what text fits.
CHAR_WIDTH = 6.5
# Frames narrower than this (pixels) are left out: invisible, and they would bloat the file.
MIN_WIDTH = 0.3
PAD = 10


class _Node:
    __slots__ = ("children", "name", "value")

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0
        self.children: dict[str, _Node] = {}


def _tree(stacks: Mapping[tuple[str, ...], int]) -> _Node:
    root = _Node("all")
    for frames, count in stacks.items():
        root.value += count
        node = root
        for frame in frames:
            child = node.children.get(frame)
            if child is None:
                child = node.children[frame] = _Node(frame)
            child.value += count
            node = child
    return root


def _depth(root: _Node) -> int:
    deepest = 0
    todo = [(root, 1)]  # iterative: a deeply recursive program has deep stacks
    while todo:
        node, level = todo.pop()
        deepest = max(deepest, level)
        todo.extend((child, level + 1) for child in node.children.values())
    return deepest


def _color(name: str) -> str:
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=3).digest()
    red = 205 + digest[0] % 50
    green = digest[1] % 230
    blue = digest[2] % 55
    return f"rgb({red},{green},{blue})"


def _fit(text: str, width: float) -> str:
    chars = int((width - 6) / CHAR_WIDTH)
    if chars < 3:
        return ""
    return text if len(text) <= chars else text[: chars - 2] + ".."


def render(stacks: Mapping[tuple[str, ...], int], *, title: str = "Flame Graph",
           notes: Iterable[str] = (), unit: str = "samples") -> str:
    """The SVG document (text) of the flame graph of ``stacks`` (folded frames, root first,
    to sample counts). ``notes`` are printed under the title (say, machines left out)."""
    root = _tree(stacks)
    note_lines = list(notes)
    depth = _depth(root)
    header = 2 * FRAME_HEIGHT + len(note_lines) * FRAME_HEIGHT
    height = header + depth * FRAME_HEIGHT + 2 * PAD
    total = max(root.value, 1)
    scale = (WIDTH - 2 * PAD) / total
    parts = [
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n',
        f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{WIDTH}" '
        f'height="{height}" viewBox="0 0 {WIDTH} {height}" '
        f'font-family="Verdana, sans-serif" font-size="{FONT_SIZE}">\n',
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#f8f8f0"/>\n',
        f'<text x="{WIDTH / 2}" y="{FRAME_HEIGHT + 2}" text-anchor="middle" '
        f'font-size="{FONT_SIZE + 5}">{escape(title)}</text>\n',
        f'<text x="{PAD}" y="{2 * FRAME_HEIGHT}" fill="#555">'
        f"{root.value} {escape(unit)} in all</text>\n",
    ]
    for i, note in enumerate(note_lines):
        parts.append(f'<text x="{PAD}" y="{(3 + i) * FRAME_HEIGHT}" fill="#a00">'
                     f"{escape(note)}</text>\n")
    bottom = height - PAD

    def draw(node: _Node, x: float, level: int) -> list[tuple[_Node, float, int]]:
        width = node.value * scale
        if width < MIN_WIDTH:
            return []
        y = bottom - (level + 1) * FRAME_HEIGHT
        share = 100.0 * node.value / total
        tip = f"{node.name} ({node.value} {unit}, {share:.2f}%)"
        parts.append(
            f'<g><title>{escape(tip)}</title><rect x="{x:.2f}" y="{y}" width="{width:.2f}" '
            f'height="{FRAME_HEIGHT - 1}" fill={quoteattr(_color(node.name))} rx="2"/>'
        )
        label = _fit(node.name, width)
        if label:
            parts.append(f'<text x="{x + 3:.2f}" y="{y + FRAME_HEIGHT - 4}">{escape(label)}</text>')
        parts.append("</g>\n")
        children = []
        child_x = x
        for name in sorted(node.children):
            child = node.children[name]
            children.append((child, child_x, level + 1))
            child_x += child.value * scale
        return children

    if root.value:
        todo = [(root, float(PAD), 0)]
        while todo:
            todo.extend(reversed(draw(*todo.pop())))
    else:
        parts.append(f'<text x="{PAD}" y="{header + FRAME_HEIGHT}">no samples: nothing ran on a '
                     "CPU while the profile was taken</text>\n")
    parts.append("</svg>\n")
    return "".join(parts)
