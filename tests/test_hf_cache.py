"""`--model org/name` from the local Hugging Face cache: no network, no huggingface_hub."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ltune.profiles import ProfileError, hf_cache_snapshot, load_model, resolve_model

DATA = Path(__file__).parent / "data"


def _cache(root: Path, repo: str, revs: dict[str, str], main: str | None) -> Path:
    """A hub cache as huggingface_hub lays it out: models--org--name/{refs/main,snapshots/<rev>/}."""
    folder = root / ("models--" + repo.replace("/", "--"))
    for rev, fixture in revs.items():
        snap = folder / "snapshots" / rev
        snap.mkdir(parents=True)
        shutil.copy(DATA / fixture / "config.json", snap / "config.json")
    if main is not None:
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(main)  # huggingface_hub writes no newline
    return folder


@pytest.fixture
def no_hf_env(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_hf_hub_cache_resolves_refs_main(no_hf_env, tmp_path):
    """refs/main names the revision to read, not the newest folder."""
    hub = tmp_path / "hub"
    _cache(hub, "Qwen/Qwen3-8B", {"aaa111": "qwen3", "bbb222": "llama3.2"}, main="aaa111")
    no_hf_env.setenv("HF_HUB_CACHE", str(hub))
    assert hf_cache_snapshot("Qwen/Qwen3-8B") == hub / "models--Qwen--Qwen3-8B" / "snapshots" / "aaa111"
    model = resolve_model("Qwen/Qwen3-8B")
    assert model.name == "Qwen/Qwen3-8B" and model.family == "qwen3"
    assert model.num_params() == load_model("qwen3-8b").num_params()


def test_hf_home_and_default_folder(no_hf_env, tmp_path):
    _cache(tmp_path / "hfhome" / "hub", "google/gemma-2-9b", {"c0ffee": "gemma2"}, main="c0ffee")
    no_hf_env.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert resolve_model("google/gemma-2-9b").num_params() == load_model("gemma-2-9b").num_params()
    no_hf_env.delenv("HF_HOME")
    _cache(tmp_path / "home" / ".cache" / "huggingface" / "hub", "meta-llama/Llama-3.2-3B", {"d00d": "llama3.2"},
           main=None)  # no refs/main: the one snapshot
    assert resolve_model("meta-llama/Llama-3.2-3B").num_params() == load_model("llama3.2-3b").num_params()


def test_not_cached_says_where_it_looked(no_hf_env, tmp_path):
    no_hf_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ProfileError) as err:
        resolve_model("meta-llama/Llama-3.1-8B")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "models--meta-llama--Llama-3.1-8B") in msg
    assert "local model folder or a config.json path also works" in msg and "\n" not in msg


def test_a_real_folder_wins_over_the_cache(no_hf_env, tmp_path, monkeypatch):
    """An existing relative path `org/name` is read as a folder, never looked up."""
    (tmp_path / "org" / "name").mkdir(parents=True)
    shutil.copy(DATA / "gemma2" / "config.json", tmp_path / "org" / "name" / "config.json")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/name").family == "gemma2"


def test_lookup_imports_neither_transformers_nor_huggingface_hub(tmp_path):
    hub = tmp_path / "hub"
    _cache(hub, "Qwen/Qwen3-8B", {"aaa111": "qwen3"}, main="aaa111")
    code = (
        "import sys; from ltune.profiles import resolve_model; resolve_model('Qwen/Qwen3-8B'); "
        "bad = [m for m in ('transformers', 'huggingface_hub', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = {"HF_HUB_CACHE": str(hub), "PATH": "", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_a_plan_naming_a_cached_model_runs_from_its_snapshot(no_hf_env, tmp_path):
    """model.path / model.tokenizer `org/name`: the trainer and the launcher read the cached
    snapshot; a folder of that relative name next to the plan wins over the cache."""
    from conftest import make_plan
    from ltune.job.paths import resolve_plan_paths, validate_plan_paths

    hub = tmp_path / "hub"
    _cache(hub, "Qwen/Qwen3-8B", {"aaa111": "qwen3"}, main="aaa111")
    no_hf_env.setenv("HF_HUB_CACHE", str(hub))
    snapshot = hub / "models--Qwen--Qwen3-8B" / "snapshots" / "aaa111"
    plans = tmp_path / "plans"
    plans.mkdir()
    plan = make_plan(model={"path": "Qwen/Qwen3-8B", "tokenizer": "Qwen/Qwen3-8B"})
    resolved = resolve_plan_paths(plan, plans)
    assert (resolved.model.path, resolved.model.tokenizer) == (str(snapshot), str(snapshot))
    assert validate_plan_paths(plan, plans) == []
    (plans / "Qwen" / "Qwen3-8B").mkdir(parents=True)
    assert resolve_plan_paths(plan, plans).model.path == str(plans / "Qwen" / "Qwen3-8B")
    no_hf_env.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert validate_plan_paths(make_plan(model={"path": "Org/Missing"}), plans) == [
        f"model.path: folder {plans / 'Org' / 'Missing'} not found"]


def test_plan_o_keeps_a_cached_name(no_hf_env, tmp_path, monkeypatch):
    """`plan -o --model-path org/name` writes the name (found again where the job runs), while a
    real folder is written relative to the plan."""
    import yaml
    from typer.testing import CliRunner

    from ltune.cli import app

    hub = tmp_path / "hub"
    _cache(hub, "Qwen/Qwen3-8B", {"aaa111": "qwen3"}, main="aaa111")
    no_hf_env.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    (tmp_path / "out").mkdir()
    args = ["plan", "-m", "Qwen/Qwen3-8B", "--ctx", "4096", "--gpu", "h100-80g", "--gpus", "8",
            "--model-path", "Qwen/Qwen3-8B", "--tokenizer", "tok", "-o", "out/plan.yaml"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    model = yaml.safe_load((tmp_path / "out" / "plan.yaml").read_text())["model"]
    assert (model["path"], model["tokenizer"]) == ("Qwen/Qwen3-8B", "../tok")
