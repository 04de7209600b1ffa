"""Accuracy of the analytic memory model against the exact trace (`ltune trace`), without a GPU.

For each configuration of the matrix below, prints the analytic per-GPU peak
(ltune.planner.memory.estimate_memory) beside the traced one (ltune.trace.trace_memory: the
trainer's model, attention and loss on fake CPU tensors under PyTorch's MemTracker, ZeRO and
sequence-parallel partitioning applied per DeepSpeed) and the relative error, per configuration
and per term. Both totals leave out the terms a trace cannot see (CUDA context, NCCL buffers,
allocator fragmentation, DeepSpeed's buckets: ltune.trace.UNTRACED_TERMS); everything else --
model states, activation checkpoints, a layer's working set, logits and loss -- is compared.

error = (analytic - traced) / traced. The last line reads
`max_abs_error_pct=X median_abs_error_pct=Y`. Goal: max <= 3, median <= 1.5.

Usage: python bench/accuracy.py [--quick] [--only qwen3,gemma,phi] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from ltune.planner.memory import estimate_memory
from ltune.planner.schema import Layout, Method
from ltune.profiles import load_gpu, resolve_model
from ltune.trace import UNTRACED_TERMS, comparable_totals, trace_memory

MIB = 2**20
GPU = "a100-80g"

# (model, ctx, num_gpus, zero_stage, sp_degree, recompute, loss, micro_batch, attention[, precision])
MATRIX = [
    ("qwen2.5-0.5b", 2048, 1, 0, 1, "full", "full", 1, "varlen"),
    ("qwen2.5-0.5b", 4096, 1, 0, 1, "none", "chunked", 2, "varlen"),
    ("qwen2.5-0.5b", 2048, 2, 2, 1, "full", "full", 1, "eager"),
    ("qwen2.5-0.5b", 2048, 8, 3, 1, "none", "full", 1, "eager"),
    ("qwen2.5-1.5b", 4096, 4, 2, 1, "full", "full", 2, "varlen"),
    ("qwen2.5-1.5b", 8192, 8, 3, 1, "full", "chunked", 1, "varlen"),
    ("internlm2-1.8b", 2048, 4, 1, 1, "none", "full", 1, "varlen"),
    ("internlm2-1.8b", 16384, 8, 3, 1, "full", "chunked", 1, "varlen"),
    ("internlm2-1.8b", 32768, 8, 3, 4, "full", "full", 1, "varlen"),
    ("llama2-7b", 4096, 8, 3, 1, "full", "full", 2, "varlen"),
    ("llama2-7b", 8192, 8, 3, 1, "none", "chunked", 1, "varlen"),
    ("llama2-7b", 2048, 8, 2, 1, "none", "full", 2, "varlen"),
    ("llama3.1-8b", 8192, 8, 3, 1, "full", "full", 1, "varlen"),
    ("llama3.1-8b", 16384, 8, 3, 2, "full", "full", 1, "varlen"),
    ("llama3.1-8b", 32768, 8, 3, 1, "full", "chunked", 1, "varlen"),
    ("qwen2.5-1.5b", 32768, 8, 3, 1, "full", "chunked", 2, "varlen"),
    ("llama2-7b", 16384, 8, 3, 1, "full", "chunked", 2, "varlen"),
    ("qwen2.5-0.5b", 4096, 8, 3, 1, "full", "chunked", 1, "eager"),
    ("qwen2.5-0.5b", 8192, 8, 3, 1, "full", "chunked", 1, "eager"),
    ("qwen2.5-0.5b", 4096, 2, 0, 1, "none", "chunked", 1, "varlen", "fp32"),
    ("qwen2.5-1.5b", 8192, 8, 3, 1, "full", "chunked", 1, "varlen", "fp32"),
    ("llama3.1-8b", 8192, 8, 3, 2, "full", "full", 1, "varlen", "fp32"),
    # the newer families: q/k norms (qwen3, gemma3), four fp32 norms, GeGLU, soft-capping, sliding
    # windows (gemma2/3), fused qkv and gate_up (phi3)
    ("qwen3-0.6b", 4096, 1, 0, 1, "full", "full", 1, "varlen"),
    ("qwen3-0.6b", 4096, 8, 3, 1, "none", "chunked", 1, "varlen"),
    ("gemma-3-1b-shaped", 4096, 8, 3, 1, "full", "chunked", 1, "varlen"),
    ("gemma-3-1b-shaped", 2048, 8, 2, 1, "none", "full", 1, "varlen"),
    ("phi-3-mini", 4096, 8, 3, 1, "full", "chunked", 1, "varlen"),
    ("phi-3-mini", 2048, 8, 3, 1, "none", "full", 1, "varlen"),
    ("gemma-2-9b", 4096, 8, 3, 1, "full", "chunked", 1, "varlen"),
    # adapters (LoRA, QLoRA): frozen base, peft adapters; QLoRA's 4-bit layers traced by
    # ltune/trace/quant4.py (bitsandbytes Linear4bit's memory)
    ("llama3.2-1b", 8192, 1, 0, 1, "full", "chunked", 1, "varlen", "bf16", {"kind": "lora"}),
    ("llama3.2-1b", 4096, 2, 2, 1, "none", "chunked", 1, "varlen", "bf16", {"kind": "lora"}),
    ("qwen3-0.6b", 4096, 1, 0, 1, "none", "full", 1, "varlen", "bf16",
     {"kind": "lora", "lora_targets": ("q_proj", "v_proj"), "lora_dropout": 0.05}),
    ("qwen2.5-0.5b", 8192, 2, 1, 2, "full", "chunked", 1, "varlen", "bf16", {"kind": "qlora"}),
    ("qwen2.5-0.5b", 4096, 1, 0, 1, "none", "full", 1, "varlen", "bf16", {"kind": "qlora", "double_quant": False}),
    # mixture of experts (grouped_mm experts: memory set by tokens x top-k, not by the routing) and
    # multi-head latent attention (deepseek-v2), small shapes of each family
    ("mixtral-small-shaped", 4096, 1, 0, 1, "none", "chunked", 1, "varlen"),
    ("mixtral-small-shaped", 8192, 8, 3, 1, "full", "chunked", 1, "varlen"),
    ("qwen3-moe-small-shaped", 4096, 8, 3, 1, "none", "chunked", 1, "varlen"),
    ("qwen3-moe-small-shaped", 8192, 1, 0, 1, "full", "full", 1, "varlen"),
    ("deepseek-v2-small-shaped", 2048, 1, 0, 1, "none", "full", 1, "varlen"),
    ("deepseek-v2-small-shaped", 4096, 8, 3, 1, "full", "chunked", 1, "varlen"),
]
QUICK = [0, 1, 5, 12]

#: shapes traced here that ltune ships no profile for: Gemma 3 1B's text model, as its
#: config.json (google/gemma-3-1b-pt) publishes it
BENCH_MODELS = {
    "gemma-3-1b-shaped": dict(
        name="gemma-3-1b-shaped", source="google/gemma-3-1b-pt config.json", family="gemma3",
        hidden_size=1152, num_layers=26, num_attention_heads=4, num_kv_heads=1, head_dim=256,
        intermediate_size=6912, vocab_size=262144, tie_word_embeddings=True, max_position_embeddings=32768,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, qk_norm=True, mlp_activation="gelu_tanh", norms_per_layer=4,
        embedding_multiplier=1152**0.5, query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
    ),
    # small mixture-of-experts shapes of each family (no published model this small): Mixtral's
    # layout (every layer sparse, top-2 of 8), Qwen3-MoE's (q/k norms, top-4 of 16, renormalised
    # bf16 weights), each with its config's load-balancing coefficient, DeepSeek-V2-Lite's (a dense first layer, 2 shared experts, MLA without q
    # compression, v head smaller than q/k's)
    "mixtral-small-shaped": dict(
        name="mixtral-small-shaped", source="Mixtral-8x7B config.json, scaled down", family="mixtral",
        hidden_size=1024, num_layers=4, num_attention_heads=16, num_kv_heads=4, intermediate_size=2048,
        vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=1_000_000.0,
        rms_norm_eps=1e-5, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=2048, router_aux_loss_coef=0.02,
    ),
    "qwen3-moe-small-shaped": dict(
        name="qwen3-moe-small-shaped", source="Qwen3-30B-A3B config.json, scaled down", family="qwen3_moe",
        hidden_size=1024, num_layers=4, num_attention_heads=16, num_kv_heads=4, head_dim=64, qk_norm=True,
        intermediate_size=3072, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=32768,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=512, norm_topk_prob=True, router_aux_loss_coef=0.001,
    ),
    "deepseek-v2-small-shaped": dict(
        name="deepseek-v2-small-shaped", source="DeepSeek-V2-Lite config.json, scaled down", family="deepseek_v2",
        hidden_size=1024, num_layers=4, num_attention_heads=8, num_kv_heads=8, intermediate_size=2816,
        vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=10000.0,
        rms_norm_eps=1e-6, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=512,
        num_shared_experts=2, dense_layers=(0,), kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64,
        v_head_dim=64, norm_topk_prob=False, router_aux_loss_coef=0.001,
    ),
}


def bench_model(name: str):
    """A shipped profile, or one of BENCH_MODELS."""
    if name in BENCH_MODELS:
        from ltune.profiles.schema import ModelProfile

        return ModelProfile(**BENCH_MODELS[name])
    return resolve_model(name)


def run_one(cfg) -> dict:
    name, ctx, gpus, zero, sp, recompute, loss, mb, attn, precision, method = (*cfg, "bf16", None)[:11] if len(cfg) == 9 else (*cfg, None)[:11]
    model = bench_model(name)
    layout = Layout(
        num_gpus=gpus, zero_stage=zero, sp_degree=sp, recompute=recompute, loss=loss,
        micro_batch_size=mb, attention=attn,
    )
    method = Method(**method) if method is not None else None  # None: full fine-tuning
    analytic = estimate_memory(model, load_gpu(GPU), layout, ctx, precision=precision, method=method)
    traced = trace_memory(model, ctx, layout, precision, method=method)
    a_total, t_total = comparable_totals(traced, analytic.terms)
    terms = {}
    for term in list(analytic.terms) + [k for k in traced.terms if k not in analytic.terms]:
        if term in UNTRACED_TERMS:
            continue
        terms[term] = {"analytic_bytes": analytic.terms.get(term, 0), "traced_bytes": traced.terms.get(term, 0)}
    return {
        "config": f"{name} ctx={ctx} gpus={gpus} zero={zero} sp={sp} rc={recompute} loss={loss} mb={mb} attn={attn}"
                  + (f" {precision}" if precision != "bf16" else "")
                  + (f" {method_label(method)}" if method is not None else ""),
        "analytic_bytes": a_total,
        "traced_bytes": t_total,
        "error_pct": 100.0 * (a_total - t_total) / t_total,
        "analytic_phase": analytic.peak_phase,
        "traced_phase": traced.peak_phase,
        "terms": terms,
        "trace_s": traced.trace_s,
    }


def method_label(method) -> str:
    """lora r16, qlora r16 nf4 dq, targets and dropout when set."""
    label = f"{method.kind} r{method.lora_rank}"
    if method.kind == "qlora":
        label += f" {method.quant_type}" + (" dq" if method.double_quant else "")
    if method.lora_targets:
        label += " " + ",".join(method.lora_targets)
    if method.lora_dropout:
        label += f" drop{method.lora_dropout}"
    return label


ACTIVATION_TERMS = ("activations_checkpoints", "activations_layer", "logits_loss")


def activation_error_pct(r: dict) -> float:
    """Error over the activation, logits and loss terms only (what the trace measures
    independently of the ZeRO arithmetic both sides share)."""
    a = sum(r["terms"].get(t, {}).get("analytic_bytes", 0) for t in ACTIVATION_TERMS)
    t = sum(r["terms"].get(t, {}).get("traced_bytes", 0) for t in ACTIVATION_TERMS)
    return 100.0 * (a - t) / t if t else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="four configurations only")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--only", help="configurations whose model name contains this text (comma-separated)")
    args = ap.parse_args(argv)
    matrix = [MATRIX[i] for i in QUICK] if args.quick else MATRIX
    if args.only:
        matrix = [c for c in matrix if any(part in c[0] for part in args.only.split(","))]
    start = time.perf_counter()
    results = []
    print(f"{'configuration':<110} {'analytic MiB':>12} {'traced MiB':>11} {'error %':>8}  phase a/t")
    for cfg in matrix:
        r = run_one(cfg)
        results.append(r)
        print(
            f"{r['config']:<110} {r['analytic_bytes'] / MIB:>12.1f} {r['traced_bytes'] / MIB:>11.1f} "
            f"{r['error_pct']:>+8.2f}  {r['analytic_phase']}/{r['traced_phase']}",
            flush=True,
        )
    print("\nper term (MiB, analytic - traced), terms that differ by more than 1 MiB:")
    for r in results:
        diffs = [
            f"{t}: {(v['analytic_bytes'] - v['traced_bytes']) / MIB:+.1f} "
            f"({v['analytic_bytes'] / MIB:.1f} vs {v['traced_bytes'] / MIB:.1f})"
            for t, v in r["terms"].items()
            if abs(v["analytic_bytes"] - v["traced_bytes"]) > MIB
        ]
        print(f"  {r['config']}: " + ("; ".join(diffs) if diffs else "all within 1 MiB"))
    errors = [abs(r["error_pct"]) for r in results]
    act_errors = [abs(activation_error_pct(r)) for r in results]
    print(f"\n{len(results)} configurations, {time.perf_counter() - start:.0f} s")
    print("model states are partition arithmetic on both sides; the traced part alone "
          f"(activations, logits, loss): max_abs_error_pct={max(act_errors):.2f} "
          f"median_abs_error_pct={statistics.median(act_errors):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(f"max_abs_error_pct={max(errors):.2f} median_abs_error_pct={statistics.median(errors):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
