"""Hostile values for the bad-input tests: hypothesis strategies and a case counter.

Every surface (plan files, config.json, data files, command-line options) is fed valid
inputs mutated by these strategies; the tests count what they tried, and
`pytest_terminal_summary` in conftest.py prints the counts.
"""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import strategies as st

#: cases tried per surface, printed at the end of the run
CASES: Counter = Counter()

HUGE_INT = int("9" * 400)

#: scalars that break arithmetic, parsing or printing
nasty_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), HUGE_INT, -HUGE_INT]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.inf, -math.inf, math.nan, 1e308, -0.0, 5e-324]),
    st.text(max_size=30),
    st.sampled_from(["", "\n", "a\nb", "\x00", "\ud800", "$(touch PWNED)", "`id`", "../../etc/passwd",
                     "é" * 3, "1e400", "inf", "nan", "-1", "0x10"]),
)

#: any JSON-shaped value, nested a little
nasty_values = st.recursive(nasty_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=6)

#: documents that no parser should be asked to recurse through
DEEP_DOCS = ("[" * 1000, "{\"a\": " * 1000, "[" * 100000, "a: " + "[" * 5000)

#: bytes that are not UTF-8
BAD_BYTES = (b"\xff\xfe\x00", "schema_version: 1\nmodel: caf\xe9\n".encode("latin-1"),
             "{\"text\": \"hi\"}".encode("utf-16"), b"\x80abc", b"abc\xc3")


def mutate_mapping(data: dict, draw, depth: int = 0) -> dict:
    """A copy of ``data`` with one key replaced by a hostile value, removed, or added (nested)."""
    out = dict(data)
    keys = sorted(out)
    action = draw(st.sampled_from(["replace", "replace", "replace", "remove", "add", "descend"]))
    if action == "add" or not keys:
        out[draw(st.text(min_size=1, max_size=12))] = draw(nasty_values)
        return out
    key = draw(st.sampled_from(keys))
    if action == "remove":
        del out[key]
    elif action == "descend" and isinstance(out[key], dict) and depth < 3:
        out[key] = mutate_mapping(out[key], draw, depth + 1)
    else:
        out[key] = draw(nasty_values)
    return out


def one_line(message: str) -> bool:
    """An error a person reads: one line, no traceback."""
    text = message.strip()
    return bool(text) and "\n" not in text and "Traceback" not in text
