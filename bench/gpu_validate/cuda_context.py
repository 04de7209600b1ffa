"""cuda_context: device memory a fresh CUDA process uses outside the allocator's tensors.

The worker (``_cuda_context OUT_FILE``) reads ``torch.cuda.mem_get_info`` after
``torch.cuda.init()``, the first tensor, a bf16 matmul (cuBLAS) and a varlen attention
forward/backward, and nvidia-smi's per-process figure; ``context_bytes`` is the device's used
memory after the matmul less the allocator's reserved memory and what other processes used
before: the planner's ``cuda_context`` term, beside the profile's ``cuda_context_bytes``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.gpu_validate.common import MIB, nvidia_smi, worker_argv
from bench.gpu_validate.prediction import gpu_profile_for

TIMEOUT_S = 120


# ---------------------------------------------------------------- worker (CUDA)


def _device_used_bytes(total_bytes: int) -> int:
    """Device memory in use now (all processes), after the queued work is done."""
    import torch

    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    return total_bytes - free


def _attention_used_bytes(total_bytes: int) -> tuple[int, list]:
    """Device memory in use after one varlen attention forward and backward (GQA 32/8, 4096
    tokens), and its inputs (kept alive by the caller until the allocator is read)."""
    import torch

    from ltune.trainer.attention import varlen_attention

    q = torch.randn(4096, 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(4096, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 1024, 4096], device="cuda", dtype=torch.int32)
    varlen_attention(q, k, k, cu, 3072).sum().backward()
    return _device_used_bytes(total_bytes), [q, k, cu]


def _used_bytes_by_stage(result: dict) -> dict:
    """Device used memory after init, the first tensor, a bf16 matmul and (if it runs) varlen
    attention; the allocator's reserved and allocated bytes at the end, all tensors still alive."""
    import torch

    torch.cuda.init()
    torch.cuda.set_device(0)
    free, total = torch.cuda.mem_get_info()
    props = torch.cuda.get_device_properties(0)
    result.update(device_name=props.name, total_bytes=total, sm_count=props.multi_processor_count)
    stages = {"after_init": total - free}
    x = torch.ones(1, device="cuda")
    stages["after_first_tensor"] = _device_used_bytes(total)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    stages["after_bf16_matmul"] = _device_used_bytes(total)
    kept = [x, a]
    try:
        stages["after_varlen_attention_fwd_bwd"], attention_inputs = _attention_used_bytes(total)
        kept.extend(attention_inputs)
    except Exception as e:  # noqa: BLE001 - a measurement, not a test
        result["varlen_error"] = f"{type(e).__name__}: {e}"[:300]
    result.update(reserved_bytes=torch.cuda.memory_reserved(), allocated_bytes=torch.cuda.memory_allocated())
    del kept
    return stages


def _process_mib_by_nvidia_smi() -> int | None:
    """What nvidia-smi says this process uses (device level, context included)."""
    apps = nvidia_smi("compute-apps=pid,used_memory") or []
    mine = [line for line in apps if line.split(",")[0].strip() == str(os.getpid())]
    return int(mine[0].split(",")[1]) if mine else None


def context_bytes(used_bytes: int, reserved_bytes: int, used_before_mib: int | None) -> int:
    """The CUDA context: device memory in use less what the allocator holds and what was in use before."""
    return used_bytes - reserved_bytes - (used_before_mib * MIB if used_before_mib is not None else 0)


def measure(out_file: str) -> int:
    """Worker: the CUDA context of this fresh process, stage by stage, into out_file (JSON)."""
    import torch

    result: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "pid": os.getpid(),
                    "module_loading": os.environ.get("CUDA_MODULE_LOADING", "(default: lazy)")}
    smi_before = nvidia_smi("gpu=memory.used,memory.total,name,driver_version")
    result["nvidia_smi_before"] = smi_before
    if not torch.cuda.is_available():
        result["skipped"] = "no CUDA"
        Path(out_file).write_text(json.dumps(result, indent=1))
        return 0
    stages = _used_bytes_by_stage(result)
    reserved = result["reserved_bytes"]
    before_mib = int(smi_before[0].split(",")[0]) if smi_before else None
    result.update(used_bytes=stages,
                  nvidia_smi_process_mib=_process_mib_by_nvidia_smi(), nvidia_smi_after=nvidia_smi("gpu=memory.used"),
                  used_before_process_mib=before_mib,
                  context_bytes=context_bytes(stages["after_bf16_matmul"], reserved, before_mib))
    if "after_varlen_attention_fwd_bwd" in stages:
        result["context_with_attention_bytes"] = context_bytes(stages["after_varlen_attention_fwd_bwd"], reserved, before_mib)
    Path(out_file).write_text(json.dumps(result, indent=1))
    return 0


# ---------------------------------------------------------------- orchestrator (no CUDA)


def run(runner) -> None:
    """Measure the CUDA context in a fresh process; match the GPU profile from CUDA's own figures."""
    out_file = runner.work / "cuda_context.json"
    rc, wall = runner.run_subprocess(worker_argv("_cuda_context", str(out_file)), runner.env, TIMEOUT_S)
    ctx = json.loads(out_file.read_text()) if out_file.is_file() else {"error": f"rc={rc}"}
    ctx["wall_s"] = round(wall, 1)
    runner.gpu, note = gpu_profile_for(ctx.get("device_name"), ctx.get("total_bytes"), runner.setup.smoke)
    ctx["profile"] = note
    ctx["profile_cuda_context_bytes"] = runner.gpu.cuda_context_bytes
    runner.results["gpu"] = ctx.get("device_name") or "cpu"
    runner.results["gpu_profile"] = runner.gpu.name
    runner.results["checks"]["cuda_context"] = ctx
