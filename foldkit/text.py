"""Text that is safe to show: any node name, message or file name, printed as one line.

Node names come from the model file and may hold anything: newlines, ESC sequences that recolour a
terminal, NUL bytes, or (in file names) bytes that are not UTF-8, which Python keeps as lone
surrogates. :func:`printable` escapes every such character the way Python's repr() does, so what
reaches a terminal, a log or a CI annotation is always one line of plain, encodable text.
"""

from __future__ import annotations

import re

_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def printable(text) -> str:
    """Control characters, lone surrogates and other non-printables as backslash escapes."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
        elif "\udc80" <= c <= "\udcff":  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(c) - 0xdc00:02x}")
        else:
            out.append(repr(c)[1:-1] if c not in "'\"" else c)
    return "".join(out)


def xml_safe(text) -> str:
    """``text`` with the characters XML 1.0 forbids escaped (tab, CR and LF are allowed)."""
    return _XML_ILLEGAL.sub(lambda m: printable(m.group()), str(text))


def _finite(obj):
    if isinstance(obj, float):
        if obj != obj:
            return "nan"
        if obj in (float("inf"), float("-inf")):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(obj, indent: int = 2) -> str:
    """Strict JSON (RFC 8259) for every report foldkit writes: a non-finite number (``--atol inf``,
    a NaN error) is written as the string "inf", "-inf" or "nan", never as bare Infinity/NaN."""
    import json

    return json.dumps(_finite(obj), indent=indent, sort_keys=True, allow_nan=False) + "\n"
