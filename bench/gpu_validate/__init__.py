"""One GPU, one call: ltune's trainer and planner against what a real GPU measures.

Run by bench/gpu_validate.sh on a lent H100/H200 (see the device call there), or here with
``--cpu-smoke`` (tiny sizes, CPU, gloo) to exercise every code path but the CUDA-only calls::

    python -m bench.gpu_validate --out DIR [--budget-s 450] [--cpu-smoke]
                                 [--only cuda_context,trainer_runs,memory_matrix,longest_context]
    python -m bench.gpu_validate --write-trace   (here: precompute bench/gpu_validate_trace.json)

The checks, in the order they run, each beside the planner's prediction (results.json is
rewritten after each, so a run cut short still returns what it measured):

- ``cuda_context`` (cuda_context.py): device memory a fresh CUDA process uses after
  ``torch.cuda.init()``, a cuBLAS matmul and a varlen-attention call, beside nvidia-smi's
  figure, for the planner's ``cuda_context`` term.
- ``trainer_runs`` (trainer_runs.py): the real trainer on the ~1B llama shape at two context
  lengths, ZeRO-3, bf16, full recompute: peak memory and tokens/s/GPU beside ``check_fit``.
- ``memory_matrix`` (memory_matrix.py): single-GPU configurations, the layouts the planner
  recommends first (ZeRO-3 with optimizer and full offload, ZeRO-2, ZeRO-1, sp 2 as a trace
  only, micro-batch 2, chunked and full loss), then two models at several contexts, recompute
  on/off, ZeRO-0/3; two trainer steps each, peaks and per-term-group figures beside the
  planner's terms and the CPU trace (``ltune.trace``).
- ``longest_context`` (longest_context.py): the longest context that trains with ltune's
  trainer and with transformers' defaults, searched by doubling then bisecting under a time
  budget, beside the planner's predicted longest context for both.

Every GPU process is a subprocess (``python -m bench.gpu_validate _WORKER ...``); the
orchestrator (runner.py) never touches CUDA, since its own context would count in every
measurement.
"""
