"""The orchestrator: scratch folders, the time budget, worker subprocesses, results.json; never CUDA."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ltune.profiles import load_gpu
from ltune.profiles.schema import GpuProfile

from bench.gpu_validate import cuda_context, longest_context, memory_matrix, trainer_runs
from bench.gpu_validate.common import MIB, REPO, git_commit, nvidia_smi
from bench.gpu_validate.configs import Config, Setup
from bench.gpu_validate.data import free_port, make_plan, write_data, write_run_dir
from bench.gpu_validate.prediction import gpu_profile_for
from bench.gpu_validate.report import format_table

# In the order they run: longest_context last, since it spends whatever time is left.
CHECKS = {
    "cuda_context": cuda_context.run,
    "trainer_runs": trainer_runs.run,
    "memory_matrix": memory_matrix.run,
    "longest_context": longest_context.run,
}
SCHEMA = "ltune-gpu-validate/2"  # /2: results under "checks", named by what they measure


def _subprocess_env(work: Path, smoke: bool) -> dict:
    """The environment of every worker: offline, its caches under the scratch folder (and CPU DeepSpeed when smoke)."""
    env = {
        **os.environ,
        "LTUNE_CACHE_DIR": str(work / "cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if smoke:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/ltune/torch_extensions"))
    return env


def _fresh_folder(path: Path) -> Path:
    """An empty folder at path (what was there is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _package_versions() -> dict:
    """Installed versions of the packages the run depends on, read without importing them (no CUDA here)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "deepspeed", "pydantic"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


class Runner:
    """State shared by the checks: setup, GPU profile, scratch folders, time budget, results."""

    def __init__(self, args, setup: Setup):
        self.args = args
        self.setup = setup
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = _fresh_folder(Path(args.work or ("/tmp/gv_work" if not setup.smoke else self.out / "work")).resolve())
        self.data_dir = self.work / "data"
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.env = _subprocess_env(self.work, setup.smoke)
        self.results: dict = self._results_header()
        self.gpu: GpuProfile = load_gpu("cpu")
        self.overhead_s = 30.0 if not setup.smoke else 20.0  # per worker process, refined as runs finish
        self.step_time_ratio = 2.0  # measured / predicted step time, refined by trainer_runs

    def _results_header(self) -> dict:
        return {
            "schema": SCHEMA,
            "commit": os.environ.get("LTUNE_COMMIT") or git_commit(),
            "mode": "cpu-smoke" if self.setup.smoke else "gpu",
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(),
            "budget_s": self.args.budget_s,
            "model": self.setup.model.model_dump(),
            "model_params": self.setup.model.num_params(),
            "checks": {},
        }

    # -------------------------------------------------------- plumbing used by the checks

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        print(f"[gv {time.monotonic() - self.started:6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        """Rewrite $OUT/results.json (atomically), so a run cut short keeps what it measured."""
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / "results.json")

    def run_subprocess(self, argv: list[str], env: dict, timeout_s: float) -> tuple[int, float]:
        """Run argv (its output into ours), its process group killed at timeout_s; (exit code, -9 when killed; wall seconds)."""
        start = time.monotonic()
        proc = subprocess.Popen(argv, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -9
        return rc, time.monotonic() - start

    def run_dir_for(self, name: str) -> Path:
        return self.work / "runs" / name

    def prepare_run_dir(self, cfg: Config, run_dir: Path, steps: int) -> dict:
        """Write the run folder of a configuration as ``ltune launch`` does; the launch's environment."""
        return write_run_dir(make_plan(cfg, self.gpu.name, self.data_dir, run_dir, steps), run_dir)

    def fake_oom_cap(self, kind: str) -> int | None:
        """--cpu-smoke's fake OOM context for a kind ("ltune"/"hf"); None on a GPU."""
        return self.setup.fake_oom_tokens.get(kind) if self.setup.smoke else None

    def job_env(self, launch_env: dict, fake_cap: int | None = None) -> dict:
        """A worker's environment: the launch's, a process group of one on a free port, the fake OOM cap."""
        env = {**self.env, **launch_env, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        if fake_cap is not None:
            env["GV_FAKE_OOM_TOKENS"] = str(fake_cap)
        return env

    # -------------------------------------------------------- the run

    def record_environment(self) -> None:
        """GPU name and profile (nvidia-smi; cuda_context refines it), the generated data, package versions."""
        smi = nvidia_smi("gpu=name,memory.total") if not self.setup.smoke else None
        if smi:
            name, total_mib = [x.strip() for x in smi[0].split(",")]
            self.gpu, _ = gpu_profile_for(name, int(float(total_mib)) * MIB, False)
            self.results["gpu"], self.results["gpu_profile"] = name, self.gpu.name
        t0 = time.monotonic()
        self.results["data"] = write_data(self.data_dir, self.setup.num_docs, self.setup.doc_tokens)
        self.results["data"]["write_s"] = round(time.monotonic() - t0, 1)
        self.results.update(_package_versions())

    def _run_check(self, name: str) -> None:
        """One check; an exception is recorded in its results and the next check still runs."""
        if name != "cuda_context" and self.time_left() < 20:
            self.results["checks"][name] = {"skipped": "budget"}
            return
        self.log(f"check {name}")
        try:
            CHECKS[name](self)
        except Exception as e:  # noqa: BLE001 - keep the other checks' numbers
            import traceback

            traceback.print_exc()
            self.results["checks"].setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"[:500]

    def run(self, only: set[str]) -> int:
        """The checks in ``only`` (all by default) in CHECKS' order, results saved after each; the table last."""
        self.record_environment()
        self.save()
        for name in CHECKS:
            if name in only:
                self._run_check(name)
                self.save()
        self.results["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.save()
        print(format_table(self.results), flush=True)
        return 0
