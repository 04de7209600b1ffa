"""The step-time model against published throughput.

For each public run, prints the predicted tokens/s/GPU beside the measured one and their
ratio, and the kernel efficiency that would match each run exactly; the model's
KERNEL_EFFICIENCY is the geometric mean of those (one constant for every GPU).
"""

from __future__ import annotations

import math

from ltune.planner import throughput as T
from ltune.planner.shape import Shape
from ltune.planner.schema import Layout
from ltune.profiles import load_gpu, load_model

#: (label, model, gpu, seq_len, layout, measured tokens/s/GPU, source)
RUNS = [
    ("torchtitan Llama-3.1-8B 8k 8xH100 FSDP", "llama3.1-8b", "h100-80g", 8192,
     Layout(num_gpus=8, zero_stage=3, recompute="full"), 5762, "torchtitan docs/performance.md"),
    ("XTuner Llama2-7B 8k 8xA100 ZeRO-3", "llama2-7b", "a100-80g", 8192,
     Layout(num_gpus=8, zero_stage=3, recompute="full"), 3028, "XTuner README speed benchmark"),
]


def main() -> None:
    fitted = []
    print(f"{'run':45s} {'predicted':>10s} {'measured':>9s} {'ratio':>6s} {'eff. to match':>13s}")
    for label, model, gpu, seq, lay, measured, _src in RUNS:
        s = Shape.of(load_model(model), seq)
        pred = T.estimate_throughput(s, lay, load_gpu(gpu)).tokens_per_s_per_gpu
        exact = T.KERNEL_EFFICIENCY * measured / pred
        fitted.append(exact)
        print(f"{label:45s} {pred:10,.0f} {measured:9,} {pred / measured:6.2f} {exact:13.3f}")
    geo = math.exp(sum(math.log(x) for x in fitted) / len(fitted))
    print(f"KERNEL_EFFICIENCY={T.KERNEL_EFFICIENCY} geometric_mean_fit={geo:.3f}")


if __name__ == "__main__":
    main()
