"""Reading untrusted text files as data only: UTF-8 text, JSON and safe YAML.

Every failure is a ValueError of the caller's class with one line that names the file:
bytes that are not UTF-8, nesting too deep for the parser, integers longer than Python
converts (4,300 digits), syntax errors. YAML is read with ``yaml.safe_load`` (no tags
that build objects).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

#: libyaml's safe loader when PyYAML was built with it (~8x faster: `ltune check` reads many
#: plans), else the pure-Python one; both build plain data only
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: files larger than this are not plans or configs (a plan is a few KiB)
MAX_BYTES = 16 * 2**20


def read_text(path: Path, error: type[ValueError] = ValueError) -> str:
    """The file's text, decoded as UTF-8."""
    path = Path(path)
    try:
        if path.is_dir():
            raise error(f"{path}: is a folder, not a file")
        if path.stat().st_size > MAX_BYTES:
            raise error(f"{path}: {path.stat().st_size} bytes, larger than any plan or config ({MAX_BYTES})")
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def _too_deep_or_long(path: Path, e: Exception, error: type[ValueError]) -> ValueError:
    if isinstance(e, RecursionError):
        return error(f"{path}: nested too deeply to read")
    return error(f"{path}: {str(e).split(';')[0]}")  # int longer than 4,300 digits


def load_json(path: Path, error: type[ValueError] = ValueError) -> Any:
    text = read_text(path, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (RecursionError, ValueError) as e:
        raise _too_deep_or_long(path, e, error) from None


def load_yaml(path: Path, error: type[ValueError] = ValueError) -> Any:
    text = read_text(path, error)
    try:
        return yaml.load(text, Loader=_SAFE_LOADER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise error(f"{path}: not valid YAML{where}") from None
    except (RecursionError, ValueError) as e:
        raise _too_deep_or_long(path, e, error) from None
