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
    """A plan's relative path is relative to base_dir (the plan file's folder)."""
    p = Path(path)
    try:
        p = p.expanduser()
    except RuntimeError:  # ~user of a user this machine does not know: the path as written
        pass
    return p if p.is_absolute() else (Path(base_dir) / p).resolve()


def resolve_model_path(path: str, base_dir: str | Path) -> Path:
    """A model or tokenizer folder: a path (relative to base_dir), or a Hugging Face name
    (`org/name`) that is no folder there but sits in the local Hugging Face cache, as its
    cached snapshot (ltune.profiles.hf_cache_snapshot: no network)."""
    from ..profiles import hf_cache_snapshot

    folder = resolve_path(path, base_dir)
    if not _exists(folder):
        cached = hf_cache_snapshot(path)
        if cached is not None:
            return cached
    return folder


def resolve_plan_paths(plan: Plan, base_dir: str | Path) -> Plan:
    """The same plan with data, model and tokenizer paths made absolute against base_dir
    (model and tokenizer may name a model in the local Hugging Face cache)."""
    model_updates = {}
    if plan.model.path:
        model_updates["path"] = str(resolve_model_path(plan.model.path, base_dir))
    if plan.model.tokenizer:
        model_updates["tokenizer"] = str(resolve_model_path(plan.model.tokenizer, base_dir))
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


def validate_plan_paths(plan: Plan, plan_dir: str | Path) -> list[str]:
    """One line per path of the plan that does not exist where the plan will run:
    model.path and model.tokenizer (folders, or names in the local Hugging Face cache) and
    each training.data entry (file or folder)."""
    problems = []
    for field, value in (("model.path", plan.model.path), ("model.tokenizer", plan.model.tokenizer)):
        if value is not None and not _exists(folder := resolve_model_path(value, plan_dir), is_folder=True):
            problems.append(f"{field}: folder {folder} not found")
    for entry in plan.training.data:
        if not _exists(path := resolve_path(entry, plan_dir)):
            problems.append(f"training.data: {path}: data file not found")
    return problems


def _exists(path: Path, is_folder: bool = False) -> bool:
    """Whether a path exists (a folder, if `is_folder`); False for a name the system refuses (too long)."""
    try:
        return path.is_dir() if is_folder else path.exists()
    except OSError:
        return False
