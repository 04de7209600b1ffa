"""Warnings about a plan that are not errors: one line each, shared by `ltune plan`, `check` and `launch`."""

from __future__ import annotations

from ..profiles.schema import ModelProfile
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


def context_warning(model: ModelProfile, seq_len: int) -> str | None:
    """One line when seq_len is past the context the model was trained (or rope-scaled) to, else None."""
    trained = model.trained_context()
    if seq_len <= trained:
        return None
    return (
        f"{seq_len:,} tokens is past the {trained:,} the model was trained to "
        f"(max_position_embeddings {model.max_position_embeddings:,}"
        f"{', with its rope_scaling' if model.rope_scaling else ''}); quality past it usually needs rope "
        "scaling in the plan (model.architecture.rope_scaling, e.g. YaRN) and fine-tuning at the new length"
    )
