"""Where a plan's relative paths point (pure Python).

Convention: a relative path in a plan file (``training.data``, ``model.path``,
``model.tokenizer``) is relative to the folder holding that plan file. The launcher
resolves them to absolute paths when it writes RUN_DIR/plan.yaml; the trainer applies
the same rule to RUN_DIR/plan.yaml, so an already-absolute path is left alone.
"""

from __future__ import annotations

from pathlib import Path

from ..planner.schema import Plan

#: the run folder's files, as the launcher writes them and the trainer reads them
PLAN_FILE = "plan.yaml"
DS_CONFIG_FILE = "ds_config.json"


def resolve_path(path: str, base_dir: str | Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (Path(base_dir) / p).resolve()


def resolve_plan_paths(plan: Plan, base_dir: str | Path) -> Plan:
    """The same plan with data, model and tokenizer paths made absolute against base_dir."""
    model_updates = {}
    if plan.model.path:
        model_updates["path"] = str(resolve_path(plan.model.path, base_dir))
    if plan.model.tokenizer:
        model_updates["tokenizer"] = str(resolve_path(plan.model.tokenizer, base_dir))
    data = [str(resolve_path(p, base_dir)) for p in plan.training.data]
    return plan.model_copy(
        update={
            "model": plan.model.model_copy(update=model_updates),
            "training": plan.training.model_copy(update={"data": data}),
        }
    )


def tokenizer_dir(plan: Plan) -> Path | None:
    """The tokenizer folder: model.tokenizer, else model.path, else None."""
    folder = plan.model.tokenizer or plan.model.path
    return Path(folder) if folder else None
