"""Warnings about a plan that are not errors: one line each, shared by `ltune plan`, `check` and `launch`."""

from __future__ import annotations

from .schema import Plan


def trust_remote_code_warning(plan: Plan) -> str | None:
    """One line when the plan lets transformers run the model folder's own code, else None."""
    if not plan.model.trust_remote_code:
        return None
    folders = [repr(f) for f in (plan.model.path, plan.model.tokenizer) if f]
    where = f"the model and tokenizer folders ({', '.join(folders)})" if folders else "the model and tokenizer folders"
    return (
        "model.trust_remote_code is true: transformers will run Python code from "
        f"{where} when the job starts; launch it only if you trust that code"
    )
