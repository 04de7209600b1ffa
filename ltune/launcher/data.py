"""Early data checks, before anything is written or started.

The trainer's own ``ltune.trainer.data.validate_data(plan)`` is used when it exists (it
knows the record formats); otherwise these basic checks run: every path exists, a file
is not empty, a folder holds at least one non-empty ``.jsonl`` file, and every line is a
JSON object (a bad line is named file:line).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..planner.schema import Plan
from .errors import LaunchError


def validate_plan_data(plan: Plan) -> None:
    """Raise LaunchError (one line) when the plan's data cannot be read. Paths must be resolved."""
    try:
        from ..trainer.data import validate_data
    except ImportError:
        validate_data = None
    if validate_data is not None:
        from ..trainer.errors import TrainerInputError

        try:
            validate_data(plan)
        except TrainerInputError as e:
            raise LaunchError(str(e)) from None
        return
    basic_data_checks(plan.training.data)


def data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise LaunchError(f"data folder {path} holds no .jsonl file")
        return files
    if not path.exists():
        raise LaunchError(f"data file {path}: no such file")
    return [path]


def basic_data_checks(paths: list[str]) -> None:
    if not paths:
        raise LaunchError("training.data is empty: list JSONL files or folders of them")
    for entry in paths:
        for file in data_files(Path(entry)):
            check_jsonl(file)


def check_jsonl(file: Path) -> None:
    seen = False
    try:
        with file.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError:
                    raise LaunchError(f"{file}:{lineno}: not valid JSON") from None
                if not isinstance(record, dict):
                    raise LaunchError(f"{file}:{lineno}: expected a JSON object per line")
                seen = True
    except OSError as e:
        raise LaunchError(f"data file {file}: cannot read ({e.strerror})") from None
    if not seen:
        raise LaunchError(f"data file {file} is empty")
