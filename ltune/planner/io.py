"""Reading and writing plan.yaml; errors name the field path and the bad value."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from .schema import SCHEMA_VERSION, Plan


class PlanError(ValueError):
    """A plan file that cannot be used (a user mistake, exit 2)."""


def describe_error(err: dict) -> str:
    """One pydantic error as `field.path: message (got value)`."""
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err.get("type") in ("missing",):
        return f"{where}: missing"
    if "input" in err and not isinstance(err["input"], (dict, list)):
        return f"{where}: {msg} (got {err['input']!r})"
    return f"{where}: {msg}"


def plan_from_dict(data: dict, source: str = "plan") -> Plan:
    if not isinstance(data, dict):
        raise PlanError(f"{source}: expected a mapping at the top level")
    version = data.get("schema_version")
    if version is not None and version != SCHEMA_VERSION:
        raise PlanError(
            f"{source}: schema_version {version!r} is not supported (this ltune reads {SCHEMA_VERSION})"
        )
    try:
        return Plan.model_validate(data)
    except ValidationError as e:
        raise PlanError(f"{source}: {describe_error(e.errors()[0])}") from None


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan.yaml."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PlanError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PlanError(f"{path}: not valid YAML{where}") from None
    return plan_from_dict(data, str(path))


def plan_to_yaml(plan: Plan) -> str:
    return yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False)


def dump_plan(plan: Plan, path: str | Path) -> None:
    """Write a plan.yaml (whole file or nothing)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(plan_to_yaml(plan))
    tmp.replace(path)
