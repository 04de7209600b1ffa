"""Reading and writing plan.yaml; errors name the field path and the bad value."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

import yaml
from pydantic import ValidationError

from ..datafiles import load_yaml
from .schema import CONTROL_CHARACTERS, SCHEMA_VERSION, Plan


class PlanError(ValueError):
    """A plan file that cannot be used (a user mistake, exit 2)."""


#: longest repr of a bad value quoted in an error
_REPR_CHARS = 60


def short_repr(value) -> str:
    """repr() of a value, cut to one short line (a 4,000-digit number, a long string)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's 4,300-digit str() limit
        return "a number of over 4,300 digits"
    return text if len(text) <= _REPR_CHARS else text[: _REPR_CHARS - 3] + "..."


def describe_error(err: dict) -> str:
    """One pydantic error as `field.path: message (got value)`."""
    where = ".".join(str(p) if not CONTROL_CHARACTERS.search(str(p)) else short_repr(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err.get("type") in ("missing",):
        return f"{where}: missing"
    if "input" in err and not isinstance(err["input"], (dict, list, tuple)):
        msg = f"{msg} (got {short_repr(err['input'])})"
    return f"{where}: {msg}" if where else msg


def plan_from_dict(data: dict, source: str = "plan") -> Plan:
    if not isinstance(data, dict):
        raise PlanError(f"{source}: expected a mapping at the top level")
    version = data.get("schema_version")
    if version is not None and (type(version) is not int or version != SCHEMA_VERSION):
        raise PlanError(
            f"{source}: schema_version {short_repr(version)} is not supported (this ltune reads {SCHEMA_VERSION})"
        )
    try:
        return Plan.model_validate(data)
    except ValidationError as e:
        raise PlanError(f"{source}: {describe_error(e.errors()[0])}") from None
    except RecursionError:
        raise PlanError(f"{source}: nested too deeply to read") from None


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan.yaml (UTF-8, safe YAML; a one-line PlanError otherwise)."""
    if "\x00" in str(path):  # the system refuses such a name before any read
        raise PlanError(f"{short_repr(str(path))}: a file name cannot hold a NUL character")
    path = Path(path)
    return plan_from_dict(load_yaml(path, PlanError), str(path))


def plan_to_yaml(plan: Plan) -> str:
    return yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False)


def check_output_path(path: str | Path, flag: str = "--output") -> Path:
    """Where a plan may be written: a file name in an existing folder, not a folder itself."""
    text = str(path)
    if not text:
        raise PlanError(f"{flag}: empty path")
    if CONTROL_CHARACTERS.search(text):
        raise PlanError(f"{flag}: {short_repr(text)} holds a control character")
    path = Path(text)
    try:
        if text.endswith(("/", os.sep)) or path.is_dir():
            raise PlanError(f"{flag}: {path} is a folder; give a file name such as {path / 'plan.yaml'}")
        folder = path.parent
        if not folder.is_dir():
            raise PlanError(f"{flag}: folder {folder} does not exist")
    except OSError as e:  # a name too long, a loop of links
        raise PlanError(f"{flag}: {short_repr(text)}: {e.strerror}") from None
    return path


def dump_plan(plan: Plan, path: str | Path) -> None:
    """Write a plan.yaml, whole or not at all, never through a link planted at its
    temporary name: the text goes to a new file (O_CREAT | O_EXCL, random name, in the
    target's folder) that is then renamed over the target. PlanError for a bad target."""
    path = check_output_path(path)
    text = plan_to_yaml(plan).encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(10):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise PlanError(f"{path}: cannot write ({e.strerror})") from None
    else:
        raise PlanError(f"{path}: cannot create a temporary file beside it")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        reason = "is a folder" if e.errno == errno.EISDIR else e.strerror
        raise PlanError(f"{path}: cannot write ({reason})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
