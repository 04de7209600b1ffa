"""Shared fixtures: tiny real-shaped plans for the trainer tests."""

from __future__ import annotations

import os

import pytest

# DeepSpeed JIT-builds a CPU comm op on first use; keep it in a cache folder.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ltune/torch_extensions"))


# ltune's schemas (pydantic) are imported lazily, so that the GPU-only tests can run on a
# machine that has torch but not the rest of ltune's dependencies.


def tiny_arch(**overrides):
    """A llama-shaped model of ~100k parameters (hidden 64, 2 layers, GQA 4/2) -> ModelProfile."""
    from ltune.profiles.schema import ModelProfile

    fields = dict(
        name="tiny-test",
        source="test fixture",
        family="llama",
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=384,
        max_position_embeddings=1024,
    )
    fields.update(overrides)
    return ModelProfile(**fields)


def make_plan(
    *,
    arch=None,
    layout: dict | None = None,
    training: dict | None = None,
    model: dict | None = None,
    gpu: str = "cpu",
):
    """A Plan built from small dicts of overrides (validated like a plan.yaml)."""
    from ltune.planner.schema import Plan

    arch = arch or tiny_arch()
    model_fields = {"name": arch.name, "architecture": arch.model_dump()}
    model_fields.update(model or {})
    layout_fields = {"num_gpus": 2, "zero_stage": 3}
    layout_fields.update(layout or {})
    training_fields = {"seq_len": 128, "max_steps": 4}
    training_fields.update(training or {})
    return Plan.model_validate(
        {
            "model": model_fields,
            "hardware": {"gpu": gpu},
            "layout": layout_fields,
            "training": training_fields,
        }
    )


@pytest.fixture
def plan_factory():
    return make_plan


def fake_checkpoint(run_dir, step: int, world_size: int = 2, *, marker: bool = True):
    """checkpoints/step_<step> as the trainer leaves it: a 100-byte model file, one state file
    per rank and, unless `marker` is False, the completion marker
    (ltune.trainer.checkpoint._write_marker writes exactly ``checkpoints.manifest``)."""
    import json
    from pathlib import Path

    from ltune.job import checkpoints

    path = Path(run_dir) / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    for rank in range(world_size):
        checkpoints.rank_state_file(path, rank).write_text("{}")
    if marker:
        (path / checkpoints.MARKER).write_text(json.dumps(checkpoints.manifest(path, step, world_size)))
    return path


def free_port() -> int:
    """A free TCP port for a test's rendezvous: the launcher's own rule (ltune.launcher.ports).

    Imported when called, so that collecting a test file needs no more than torch.
    """
    from ltune.launcher.ports import free_port as launcher_free_port

    port = launcher_free_port()
    _PORTS_GIVEN.append(port)
    return port


#: the rendezvous ports free_port gave: the DeepSpeed jobs started outside `ltune launch` leave
#: their CPU all-reduce buffers in /dev/shm, removed at the end of the session
_PORTS_GIVEN: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    if _PORTS_GIVEN:
        from ltune.launcher.process import remove_shm_buffers

        for port in _PORTS_GIVEN:
            remove_shm_buffers(port)


def pytest_terminal_summary(terminalreporter):
    """The bad-input tests count the cases they tried, per surface (tests/_fuzz.py)."""
    import sys

    fuzz = sys.modules.get("_fuzz")
    if fuzz is not None and fuzz.CASES:
        counts = ", ".join(f"{surface} {n}" for surface, n in sorted(fuzz.CASES.items()))
        terminalreporter.write_line(f"bad-input cases tried: {counts}; total {sum(fuzz.CASES.values())}")
