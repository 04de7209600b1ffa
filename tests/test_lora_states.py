"""Model states of adapter fine-tuning (LoRA, QLoRA): the ZeRO partition of frozen and trainable
parameters, the 4-bit weights, the buffers, host memory and checkpoint bytes, against counts made
by hand here (not by the planner's formulas).

Llama-3.1-8B: hidden 4096, 32 layers, 32 query / 8 kv heads of 128, MLP 14336, vocab 128256,
untied head. LoRA r=16 on every linear layer of every decoder layer: 41,943,040 trainable
parameters (what peft's `print_trainable_parameters` reports for this model and config) beside the
8,030,261,248 frozen ones.
"""

import math

import pytest

from ltune.planner import checkpointing as C
from ltune.planner import memory as M
from ltune.planner.schema import Layout, Method
from ltune.planner.shape import Shape
from ltune.planner.zero import ParamPartition, model_state_bytes
from ltune.profiles import load_model
from ltune.trace.sharding import shard
from ltune.trace.types import CATEGORIES, ORIGINS, RawTrace, Timeline

LLAMA = load_model("llama3.1-8b")
FROZEN = 8_030_261_248  # Meta's Llama-3.1-8B parameter count
TRAINABLE = 41_943_040  # peft: "trainable params: 41,943,040" for r=16 on all linear layers
ALL = FROZEN + TRAINABLE  # adapters are tensors beside the base weights, in bf16

# one decoder layer's linear weights (out x in): q, o 4096x4096; k, v 1024x4096; gate, up, down 14336x4096
LINEAR_PER_LAYER = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096
LINEAR = 32 * LINEAR_PER_LAYER  # 6,979,321,856 weights QLoRA stores in 4 bits
BF16_REST = FROZEN - LINEAR  # embedding, head, norms stay in bf16
# LoRA tensors of at most 100k elements (ZeRO-3 keeps them whole): lora_A (16 x in) of every layer
# but down_proj's (16 x 14336); lora_B (out x 16) of q, k, v, o, down (gate/up's are 14336 x 16)
SMALL_ADAPTERS = 32 * (16 * 4096 * 6 + 16 * (4096 + 1024 + 1024 + 4096 + 4096))
NORMS = 2 * 32 * 4096 + 4096  # RMSNorm weights: two per layer and the final one, whole under ZeRO-3
BIGGEST_ADAPTER = 16 * 14336  # down_proj's lora_A, gate/up_proj's lora_B


def lay(n, stage, offload="none"):
    return Layout(num_gpus=n, zero_stage=stage, offload=offload)


def lora_shape(kind="lora", precision="bf16"):
    return Shape.of(LLAMA, 8192, precision, method=Method(kind=kind, lora_rank=16))


def states(kind, n, stage, phase="backward", offload="none"):
    return M.model_states(lora_shape(kind), lay(n, stage, offload), phase)


def test_the_hand_counts_are_the_published_ones():
    assert LINEAR == 6_979_321_856
    assert BF16_REST == 2 * 128256 * 4096 + NORMS
    assert TRAINABLE == 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    s = lora_shape()
    assert (s.params, s.trainable_params) == (FROZEN, TRAINABLE)


@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_lora_weights_stay_whole_below_zero3(n, stage):
    """ZeRO 0-2 partition the optimizer's (trainable) group only: frozen and adapter weights whole."""
    assert states("lora", n, stage)["weights"] == 2 * ALL


def test_lora_weights_at_zero3_partition_frozen_weights_too():
    """ZeRO-3 splits every tensor over 100k elements, frozen or not, ceil(n/8) each."""
    persistent = NORMS + SMALL_ADAPTERS
    assert persistent == 266_240 + 19_922_944
    split = ALL - persistent  # every tensor split divides by 8 exactly here
    assert states("lora", 8, 3)["weights"] == 2 * (persistent + split // 8) == 2_053_382_144
    assert states("lora", 1, 3)["weights"] == 2 * ALL


@pytest.mark.parametrize(
    "n, stage, grads, grads32, master, moments",
    [
        # ZeRO-0 in bf16: whole bf16 gradients, whole fp32 master, grads (at the step) and moments
        (1, 0, 2 * TRAINABLE, 4 * TRAINABLE, 4 * TRAINABLE, 8 * TRAINABLE),
        (8, 1, 2 * TRAINABLE, 4 * TRAINABLE // 8, 4 * TRAINABLE // 8, 8 * TRAINABLE // 8),
        (8, 2, 2 * TRAINABLE // 8, 4 * TRAINABLE // 8, 4 * TRAINABLE // 8, 8 * TRAINABLE // 8),
        (8, 3, 2 * TRAINABLE // 8, 4 * TRAINABLE // 8, 4 * TRAINABLE // 8, 8 * TRAINABLE // 8),
    ],
)
def test_lora_gradients_and_optimizer_cover_the_adapters_only(n, stage, grads, grads32, master, moments):
    step = states("lora", n, stage, "step")
    assert step["gradients"] == grads
    assert step["gradients_fp32"] == grads32
    assert step["master_weights"] == master
    assert step["optimizer_states"] == moments


def test_qlora_weights_hold_4bit_weights_whole():
    """NF4 with double quantization: 4 + 8/64 + 32/(64*256) = 4.127 bits per linear weight (QLoRA
    paper, section 3), every block full here; the rest of the model and the adapters in bf16."""
    bits = 4 + 8 / 64 + 32 / (64 * 256)
    assert round(bits, 3) == 4.127
    four_bit = LINEAR * bits / 8
    assert four_bit == int(four_bit) == 3_600_416_768
    expected = 2 * (BF16_REST + TRAINABLE) + int(four_bit)
    for n in (1, 8):
        for stage in (0, 2):
            assert states("qlora", n, stage)["weights"] == expected
    step = states("qlora", 8, 2, "step")
    assert (step["gradients"], step["master_weights"], step["optimizer_states"]) == (
        2 * TRAINABLE // 8, 4 * TRAINABLE // 8, 8 * TRAINABLE // 8)


def test_full_finetuning_is_the_zero_paper_16_bytes():
    """Full fine-tuning, ZeRO-2 on 8: 2P weights, 2P/8 gradients, 12P/8 master and moments."""
    s = Shape.of(LLAMA, 8192, "bf16")
    terms = M.model_states(s, lay(8, 2), "backward")
    assert (terms["weights"], terms["gradients"], terms["master_weights"], terms["optimizer_states"]) == (
        2 * FROZEN, 2 * FROZEN // 8, 4 * FROZEN // 8, 8 * FROZEN // 8)


def test_zero_buffers_of_an_adapter_run():
    """ZeRO 1-2 allocate the whole reduce bucket (stage_1_and_2.py setup_buckets: 5e8 elements);
    ZeRO-0's all-reduce flattens the trainable gradients only (all 41.9M fit one 5e8 bucket);
    ZeRO-3 gathers the largest tensor (the embedding, frozen) and a 5e7 prefetch, and holds the
    whole gradient of the biggest trainable tensor (16 x 14336)."""
    s = lora_shape()
    assert M.zero_buffers_bytes(s, lay(8, 2), "backward") == 2 * 500_000_000
    assert M.zero_buffers_bytes(s, lay(8, 2), "step") == 0
    assert M.allreduce_bucket_bytes(s, lay(8, 0)) == 2 * TRAINABLE
    gathered = 128256 * 4096 + 50_000_000
    assert M.zero_buffers_bytes(s, lay(8, 3), "backward") == 2 * 500_000_000 + 2 * (gathered + BIGGEST_ADAPTER)


def test_zero3_fp32_gradients_of_a_sub_group():
    """ZeRO-3 makes fp32 gradients one sub-group (1e9) at a time: the adapters are one group."""
    assert states("lora", 2, 3, "step")["gradients_fp32"] == 4 * TRAINABLE // 2


def test_offloaded_host_memory_holds_the_adapters_states():
    """Offload optimizer: 16 bytes fp32 (master, 2 moments, grads) + 2 bytes bf16 grads per
    trainable parameter of the partition; offload all adds every parameter's bf16 partition."""
    s = lora_shape()
    assert M.host_offload_bytes_per_gpu(s, lay(8, 2, "optimizer")) == 18 * (TRAINABLE // 8)
    assert M.host_offload_bytes_per_gpu(s, lay(8, 3, "all")) == 18 * (TRAINABLE // 8) + 2 * (ALL // 8)


def test_lora_checkpoint_bytes():
    """exclude_frozen_parameters=True: rank 0 writes the bf16 adapters, every rank 1/8 of the fp32
    master and 2 moments of the adapters (12 bytes each)."""
    pred = C.predict_checkpoint(TRAINABLE, lay(8, 2), "bf16", 8, 1.0)
    assert pred.total_bytes == 14 * TRAINABLE == 587_202_560
    assert pred.max_rank_bytes == 2 * TRAINABLE + 12 * TRAINABLE // 8
    assert pred.max_node_bytes == pred.total_bytes
    zero0 = C.predict_checkpoint(TRAINABLE, lay(1, 0), "bf16", 1, 1.0)
    assert zero0.total_bytes == zero0.max_rank_bytes == 14 * TRAINABLE


def test_adapter_checkpoints_save_the_adapters_only():
    """LoRA and QLoRA checkpoints hold the adapters (rank 16 on every linear layer: 41,943,040, peft's
    count for Llama-3.1-8B) and their optimizer states, nothing of the frozen base: no 4-bit
    quantization constants either (the trainer's state-dict hook drops every non-adapter key);
    full fine-tuning saves every parameter."""
    model = load_model("llama3.1-8b")
    for kind in ("lora", "qlora"):
        assert C.saved_params(model, Method(kind=kind)) == TRAINABLE == 41_943_040
    assert C.saved_params(model, Method()) == model.num_params()
    pred = C.predict_checkpoint(C.saved_params(model, Method(kind="qlora")), lay(2, 2), "bf16", 2, 1.0)
    assert pred.total_bytes == 14 * TRAINABLE
    assert pred.max_rank_bytes == 2 * TRAINABLE + 6 * TRAINABLE


def test_of_tensors_with_a_trainable_mask():
    """A frozen 4096x4096 weight and norm, two adapters (one over the 100k persistence threshold,
    odd sized so ceil shows), on 8 ranks, counted by hand."""
    numels = [16_777_216, 65_536, 229_377, 4096]
    part = ParamPartition.of_tensors(numels, 8, trainable=[False, True, True, False], quantized_bytes=1000)
    assert part.params == 17_076_225
    assert part.trainable_params == 294_913
    assert part.largest_trainable_params == 229_377
    assert part.largest_leaf_params == 16_777_216
    assert part.flat_optimizer_params == 36_865  # ceil(294913 / 8)
    assert part.stage3_optimizer_params == 8192 + 28_673  # per tensor: ceil(65536/8) + ceil(229377/8)
    assert part.persistent_params == 65_536 + 4096
    assert part.stage3_shard_params == 2_097_152 + 28_673
    assert part.stage3_partition_params == 2_097_152 + 8192 + 28_673 + 512
    z2 = model_state_bytes(part, 2, lay(8, 2), "bf16", "step")
    assert z2 == {"weights": 2 * 17_076_225 + 1000, "gradients": 2 * 36_865, "gradients_fp32": 4 * 36_865,
                  "master_weights": 4 * 36_865, "optimizer_states": 8 * 36_865}
    z0 = model_state_bytes(part, 2, lay(8, 0), "bf16", "backward")
    assert (z0["gradients"], z0["master_weights"]) == (2 * 294_913, 4 * 294_913)
    with pytest.raises(ValueError, match="trainable has 1 entries"):
        ParamPartition.of_tensors(numels, 8, trainable=[True])


def test_of_tensors_all_trainable_is_the_default():
    numels = [16_777_216, 65_536, 229_377, 4096]
    assert ParamPartition.of_tensors(numels, 3, trainable=[True] * 4) == ParamPartition.of_tensors(numels, 3)


def _raw(numels, trainable, quantized_bytes=0):
    """A one-snapshot timeline: no activations, only the parameters' states to partition."""
    tl = Timeline(phases=["forward"], regions=["layer"], values=[tuple(0 for _ in CATEGORIES)],
                  origins=[tuple(0 for _ in ORIGINS)])
    return RawTrace(timeline=tl, num_params=sum(n for n, t in zip(numels, trainable) if t), param_numels=numels,
                    dtype_bytes=2, tokens_per_rank=8, micro_batch_size=1, num_docs=1, trace_s=0.0, max_rss_bytes=0,
                    param_trainable=trainable, quantized_bytes=quantized_bytes)


def test_trace_sharding_counts_frozen_weights_but_no_frozen_states():
    numels = [16_777_216, 65_536, 229_377, 4096]
    res = shard(_raw(numels, [False, True, True, False], 5000), "m", 8, lay(8, 2), "bf16")
    terms = res.phase_terms["forward"]
    assert terms["weights"] == 2 * sum(numels) + 5000
    assert terms["gradients"] == 2 * math.ceil(294_913 / 8)
    assert terms["optimizer_states"] == 8 * math.ceil(294_913 / 8)


def test_zero3_fp32_gradient_sub_group_is_bounded_by_trainable_tensors():
    """ZeRO-3 makes fp32 gradients one sub-group at a time: at most sub_group_size (1e9) plus the
    tensor that crosses it, a trainable one; a frozen 1.5e9 tensor has no gradient to add."""
    numels = [100_000_000] * 20 + [1_500_000_000]
    part = ParamPartition.of_tensors(numels, 1, trainable=[True] * 20 + [False])
    assert model_state_bytes(part, 2, lay(1, 3), "bf16", "step")["gradients_fp32"] == 4 * (1_000_000_000 + 100_000_000)


@pytest.mark.parametrize("stage", [2, 3])
def test_traced_lora_model_states_match_the_planner(stage):
    """The trainer's peft model on fake tensors (every parameter, frozen or not, with whether it
    trains) partitioned per tensor gives the planner's aggregate numbers, ZeRO-3 persistence of
    the small adapters included."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from ltune.trace.tracer import trace_step

    model, method, layout = load_model("qwen2.5-0.5b"), Method(kind="lora", lora_rank=16), lay(8, stage)
    raw = trace_step(model, 256, layout, "bf16", num_docs=1, method=method)
    s = Shape.of(model, 256, "bf16", method=method)
    assert sum(raw.param_numels) == s.params + s.trainable_params
    assert raw.num_params == sum(n for n, t in zip(raw.param_numels, raw.param_trainable) if t) == s.trainable_params
    traced = shard(raw, model.name, 256, layout, "bf16").phase_terms["backward"]
    planned = M.model_states(s, layout, "backward")
    for term in ("weights", "gradients", "master_weights", "optimizer_states"):
        assert traced[term] == planned[term], term
