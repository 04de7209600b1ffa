"""Can this machine run the plan's training method? (pure Python: no torch)

QLoRA keeps the frozen weights in bitsandbytes' 4-bit ``Linear4bit``, whose kernels run on CUDA
only: a qlora plan cannot run on the cpu target, nor on a machine without a CUDA device, nor
without bitsandbytes installed. ``ltune launch`` asks ``refuse_unrunnable_method`` before any
process starts (for the machine it runs on: a slurm script or a multi-node hostfile runs the
job elsewhere, so only the target is checked then); the trainer asks again as a backstop.

The CUDA devices are counted through the driver (``libcuda``'s cuInit and cuDeviceGetCount,
which honour CUDA_VISIBLE_DEVICES), so the check imports no torch.
"""

from __future__ import annotations

import ctypes
import importlib.util

from ..planner.io import PlanError
from ..planner.schema import CPU_TARGET, Plan


def cuda_device_count() -> int:
    """CUDA devices this process may use, from the driver API (0 when there is no driver)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def bitsandbytes_installed() -> bool:
    """bitsandbytes can be imported (looked up, not imported: it imports torch)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def unrunnable_reason(plan: Plan, *, local: bool = True, cuda_devices: int | None = None,
                      has_bitsandbytes: bool | None = None) -> str | None:
    """Why the plan's method cannot run (one line), or None when it can.

    local: the job runs on this machine (its CUDA devices and bitsandbytes are checked);
    cuda_devices / has_bitsandbytes: what to assume instead of asking the machine.
    """
    method = plan.method
    if method.kind != "qlora":
        return None
    if plan.hardware.gpu == CPU_TARGET:
        return ("method qlora needs CUDA (bitsandbytes' 4-bit layers) but the plan's target is the cpu target: "
                "use method lora there")
    if plan.layout.zero_stage == 3:
        return f"method qlora needs zero_stage 0, 1 or 2 (got {plan.layout.zero_stage})"
    if not local:
        return None
    devices = cuda_device_count() if cuda_devices is None else cuda_devices
    if devices == 0:
        return "method qlora needs CUDA (bitsandbytes' 4-bit layers) and this machine has no CUDA device"
    installed = bitsandbytes_installed() if has_bitsandbytes is None else has_bitsandbytes
    if not installed:
        return "method qlora needs bitsandbytes: pip install bitsandbytes"
    return None


def refuse_unrunnable_method(plan: Plan, *, local: bool = True) -> None:
    """Raise PlanError (one line, exit 2) when ``unrunnable_reason`` gives a reason."""
    reason = unrunnable_reason(plan, local=local)
    if reason is not None:
        raise PlanError(reason)
