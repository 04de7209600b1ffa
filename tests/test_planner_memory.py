"""The memory model: terms against their formulas, published facts, and invariants."""

import dataclasses

import pytest

from ltune.planner import activations as A
from ltune.planner import memory as M
from ltune.planner import shape as S
from ltune.planner.schema import Layout
from ltune.planner.search import Request
from ltune.planner.search import _shape as search_shape
from ltune.profiles import GIB, load_gpu, load_model

A100 = load_gpu("a100-80g")
XTUNER = dict(zero_stage=3, sp_degree=1, offload="none", recompute="full", loss="full", micro_batch_size=1)


def fits(model: str, ctx: int, n: int, gpu=A100, **layout) -> bool:
    lay = Layout(num_gpus=n, **{**XTUNER, **layout})
    return M.estimate_memory(load_model(model), gpu, lay, ctx).fits


@pytest.mark.parametrize(
    "ctx, fits_on, not_on",
    [(8192, 8, 4), (32768, 32, 16)],
    ids=["8k", "32k"],
)
def test_xtuner_internlm2_20b_facts(ctx, fits_on, not_on):
    """XTuner issue #424: InternLM2-20B full fine-tuning on A100-80G with ZeRO-3 needs
    8 GPUs at 8k and 32 at 32k (varlen attention, checkpointing, micro-batch 1)."""
    assert fits("internlm2-20b", ctx, fits_on)
    assert not fits("internlm2-20b", ctx, not_on)


def shape(model="llama2-7b", seq_len=4096, **kw):
    return S.Shape.of(load_model(model), seq_len, **kw)


# The ZeRO paper's example (Rajbhandari et al. 2020, Figure 1): a model of PSI = 7.5B parameters
# on N_d = 64 GPUs, mixed precision with Adam: 2 + 2 + 12 bytes per parameter. One rank's
# partition is PSI / 64 = 117,187,500 elements.
PSI = 7_500_000_000
PART = 117_187_500


def paper_shape(precision="bf16", **kw):
    """Llama-2-7B's architecture with the paper's 7.5B parameters and no persistent tensors."""
    return dataclasses.replace(shape(precision=precision), **{"params": PSI, "persistent_params": 0, **kw})


@pytest.mark.parametrize(
    "stage, published_gb, hand_bytes",
    [
        (0, 120.0, 120_000_000_000),  # baseline: (2 + 2 + 12) x 7.5e9
        (1, 31.4, 31_406_250_000),  # P_os: 2 x 7.5e9 + 2 x 7.5e9 + 12 x 117,187,500
        (2, 16.6, 16_640_625_000),  # P_os+g: 2 x 7.5e9 + (2 + 12) x 117,187,500
        (3, 1.9, 1_875_000_000),  # P_os+g+p: (2 + 2 + 12) x 117,187,500
    ],
)
def test_model_states_match_the_zero_paper(stage, published_gb, hand_bytes):
    """ZeRO paper, Figure 1: 120, 31.4, 16.6 and 1.9 GB of model states per GPU at ZeRO 0-3
    (the paper counts no fp32 gradient copy; DeepSpeed makes it at the optimizer step only)."""
    states = M.model_states(paper_shape(), Layout(num_gpus=64, zero_stage=stage), "backward")
    assert sum(states.values()) == hand_bytes
    assert hand_bytes / 1e9 == pytest.approx(published_gb, abs=0.05)


def test_model_state_terms_by_stage_at_the_step():
    """Per term and stage, bf16, 7.5B on 64 GPUs: ZeRO-1 partitions the optimizer states, ZeRO-2
    also the 16-bit gradients, ZeRO-3 also the 16-bit weights; ZeRO-0 in bf16 is DeepSpeed's
    FP16_UnfusedOptimizer (engine.py `_do_optimizer_sanity_check`): whole fp32 master and moments.
    The fp32 gradient copy (4 bytes per partition element) exists at the step only."""
    whole16, part16, whole32, part32 = 15_000_000_000, 234_375_000, 30_000_000_000, 468_750_000
    expected = {
        0: dict(weights=whole16, gradients=whole16, gradients_fp32=whole32, master_weights=whole32,
                optimizer_states=2 * whole32),
        1: dict(weights=whole16, gradients=whole16, gradients_fp32=part32, master_weights=part32,
                optimizer_states=2 * part32),
        2: dict(weights=whole16, gradients=part16, gradients_fp32=part32, master_weights=part32,
                optimizer_states=2 * part32),
        3: dict(weights=part16, gradients=part16, gradients_fp32=part32, master_weights=part32,
                optimizer_states=2 * part32),
    }
    for stage, terms in expected.items():
        lay = Layout(num_gpus=64, zero_stage=stage)
        assert M.model_states(paper_shape(), lay, "step") == terms, stage
        assert M.model_states(paper_shape(), lay, "backward") == terms | {"gradients_fp32": 0}, stage


def test_fp32_model_states():
    """fp32: ZeRO-0 runs torch AdamW bare on the parameters (4 + 4 + 8 = 16 bytes/param, no
    master copy, no gradient copy); ZeRO-3 still clones an fp32 master partition (stage3.py
    `_create_fp32_partitions`): 4 + 4 + 4 + 8 = 20 bytes per partition element. fp16 at ZeRO-0
    is FP16_UnfusedOptimizer like bf16: a whole fp32 master copy."""
    z0 = M.model_states(paper_shape("fp32"), Layout(num_gpus=1, zero_stage=0), "step")
    assert z0 == dict(weights=30_000_000_000, gradients=30_000_000_000, gradients_fp32=0,
                      master_weights=0, optimizer_states=60_000_000_000)
    z3 = M.model_states(paper_shape("fp32"), Layout(num_gpus=64, zero_stage=3), "backward")
    assert sum(z3.values()) == 2_343_750_000  # 20 x 117,187,500
    fp16 = M.model_states(paper_shape("fp16"), Layout(num_gpus=4, zero_stage=0), "backward")
    assert fp16["master_weights"] == 30_000_000_000 and fp16["gradients"] == 15_000_000_000
    # activations in the model dtype: full recompute keeps each layer's fp32 input, 32 x 4 x 4096 x 4096
    rc = Layout(num_gpus=8, zero_stage=3, recompute="full")
    assert A.activation_checkpoints_bytes(shape(precision="fp32"), rc) == 2_147_483_648


def test_zero3_fp32_gradients_one_sub_group_at_a_time():
    """ZeRO-3 upcasts gradients to fp32 one sub-group (sub_group_size, 1e9 elements) at a time
    (stage3.py `_prepare_fp32_grad_for_sub_group`); a sub-group closes after the tensor slice that
    crosses it. 70B on 8 GPUs, largest tensor 8e8: partition 8.75e9 > 1e9 + 8e8 / 8 = 1.1e9."""
    s = paper_shape(params=70_000_000_000, largest_leaf_params=800_000_000)
    states = M.model_states(s, Layout(num_gpus=8, zero_stage=3), "step")
    assert states["gradients_fp32"] == 4_400_000_000  # 4 x 1.1e9
    assert states["master_weights"] == 35_000_000_000  # 4 x 8.75e9: the master is not capped


def test_persistent_tensors_stay_whole_under_zero3():
    """stage3_param_persistence_threshold (1e5 elements) keeps the RMSNorm weights and q/k/v
    biases whole on every rank. Llama-2-7B: (2 x 32 + 1) x 4096 = 266,240 norm elements;
    Qwen2.5-0.5B adds biases: (2 x 24 + 1) x 896 + 24 x (896 + 2 x 128) = 71,552."""
    assert shape().persistent_params == 266_240
    assert shape("qwen2.5-0.5b").persistent_params == 71_552
    # Llama-2-7B on 8 GPUs: the 6,738,415,616 - 266,240 = 6,738,149,376 split elements (every
    # split tensor divides by 8) give 842,268,672 per rank, plus the whole norms
    assert M.weights_bytes(shape(), Layout(num_gpus=8, zero_stage=3)) == 2 * (842_268_672 + 266_240)
    # one GPU holds every parameter exactly once
    assert M.weights_bytes(shape(), Layout(num_gpus=1, zero_stage=3)) == 2 * 6_738_415_616


def test_model_states_agree_with_deepspeed_estimator():
    """DeepSpeed's estimate_zero3_model_states_mem_needs: 4 x largest layer + 18 P / N.
    ltune's step-phase states differ in detail (fp32 grads per sub-group, the reduce
    bucket) but must land within 15% for a 7B on 8 GPUs."""
    s = shape()
    lay = Layout(num_gpus=8, zero_stage=3)
    ours = sum(M.state_terms(s, lay, "step").values()) - s.dtype_bytes * M.REDUCE_BUCKET_SIZE
    deepspeed = 4 * s.largest_leaf_params + 18 * s.params // 8
    assert ours == pytest.approx(deepspeed, rel=0.15)


def test_offload_moves_states_to_host():
    """ZeRO-Offload (Ren et al. 2021): the fp32 master, two moments and fp32 gradients (16 bytes)
    and the 16-bit gradient (2) of the rank's partition live in host memory; offload "all" adds
    the 16-bit parameter partition (2). 7.5B on 64 GPUs: 117,187,500 elements per rank."""
    s = paper_shape()
    off = Layout(num_gpus=64, zero_stage=3, offload="optimizer")
    assert M.model_states(s, off, "step") == dict(weights=234_375_000, gradients=0, gradients_fp32=0,
                                                  master_weights=0, optimizer_states=0)
    assert M.host_offload_bytes_per_gpu(s, off) == 2_109_375_000  # 18 x 117,187,500
    all_off = Layout(num_gpus=64, zero_stage=3, offload="all")
    assert M.host_offload_bytes_per_gpu(s, all_off) == 2_343_750_000  # 20 x 117,187,500
    assert M.host_offload_bytes_per_gpu(s, Layout(num_gpus=64, zero_stage=3)) == 0
    # only the persistent tensors stay on the GPU: Llama-2-7B's 266,240 norm elements in bf16
    assert M.weights_bytes(shape(), Layout(num_gpus=8, zero_stage=3, offload="all")) == 532_480


def test_host_memory_counts_build_export_and_data():
    """Llama-3.1-8B (V 128,256, h 4,096, ffn 14,336; one layer 218,112,000 parameters; the
    embedding 525,336,576 is its largest tensor) at 8k, bf16, 8 ranks per node. Per rank: data =
    2 copies x 3 int64 arrays x 8,192 tokens = 393,216. ZeRO-2 build: fp32 random init
    4 x (525,336,576 + 218,112,000) = 2,973,794,304, above a load's embedding read and cast
    (2 x 2 x 525,336,576 = 2,101,346,304); per node 8 x (393,216 + 2,973,794,304) =
    23,793,500,160. ZeRO-3: the build is
    on the device; rank 0 holds one embedding in bf16 (1,050,673,152) to load or export:
    8 x 393,216 + 1,050,673,152 = 1,053,818,880."""
    s = shape("llama3.1-8b", seq_len=8192)
    z2 = Layout(num_gpus=8, zero_stage=2)
    assert M.host_data_bytes_per_gpu(s, z2) == 393_216
    assert M.host_build_bytes_per_gpu(s, z2) == 2_973_794_304
    assert M.host_build_bytes_per_gpu(s, Layout(num_gpus=8, zero_stage=3)) == 0
    assert M.host_rank0_bytes(s, z2) == 1_050_673_152
    assert M.host_bytes_per_node(s, z2, 8) == 23_793_500_160
    h100 = load_gpu("h100-80g")
    assert M.estimate_memory(load_model("llama3.1-8b"), h100, z2, 8192).host_bytes_per_node == 23_793_500_160
    assert M.host_bytes_per_node(s, Layout(num_gpus=16, zero_stage=3), 8) == 1_053_818_880
    # fp32 doubles the load's tensors (2 x 4 x 525,336,576, now above the random init) and the export's
    s32 = shape("llama3.1-8b", seq_len=8192, precision="fp32")
    assert M.host_build_bytes_per_gpu(s32, z2) == 4_202_692_608
    assert M.host_rank0_bytes(s32, z2) == 2_101_346_304


def test_host_memory_adds_offload_and_export_after_the_build():
    """ZeRO-3 optimizer offload on 16 ranks: 18 bytes x 501,891,328 parameters = 9,034,043,904
    per rank (unchanged), 8 ranks per node, micro-batch 2 (786,432 data bytes), and rank 0's
    export of the embedding: 8 x (9,034,043,904 + 786,432) + 1,050,673,152 = 73,329,315,840."""
    s = shape("llama3.1-8b", seq_len=8192)
    off = Layout(num_gpus=16, zero_stage=3, offload="optimizer", micro_batch_size=2)
    assert M.host_offload_bytes_per_gpu(s, off) == 9_034_043_904
    assert M.host_bytes_per_node(s, off, 8) == 73_329_315_840


def test_layer_activations_counted_from_the_architecture():
    """Llama-2-7B: h = 4096, MHA (kv = h), ffn 11008, 32 heads. Per token and layer:
    two RMSNorms 8h each, flash attention q,k,v,out (2 bytes) + fp32 lse, SwiGLU 4 x ffn."""
    s = shape()
    h, f = 4096, 11008
    expected = 2 * 8 * h + 2 * (2 * h + 2 * h) + 4 * 32 + 8 * f
    assert A.layer_saved_bytes_per_token(s, Layout(num_gpus=1)) == expected


def test_gqa_shrinks_attention_activations():
    """Flash attention saves q, k, v, out (2 bytes) and an fp32 logsumexp per head and token.
    Llama-2-7B (MHA): 2 x (4096 + 4096 + 4096 + 4096) + 4 x 32 = 32,896 bytes per token;
    Llama-3.1-8B (GQA, 8 kv heads of 128): 2 x (4096 + 1024 + 1024 + 4096) + 4 x 32 = 20,608."""
    assert A.attention_saved_bytes_per_token(shape("llama2-7b"), Layout(num_gpus=1)) == 32_896
    assert A.attention_saved_bytes_per_token(shape("llama3.1-8b"), Layout(num_gpus=1)) == 20_608


def test_full_recompute_keeps_one_input_per_layer():
    """Korthikanti et al. 2022: full recompute keeps 2 s b h bytes per layer."""
    s = shape(seq_len=8192)
    lay = Layout(num_gpus=1, micro_batch_size=2, recompute="full")
    assert A.activation_checkpoints_bytes(s, lay) == 32 * 2 * 2 * 8192 * 4096


def test_sequence_parallel_divides_sequence_terms():
    s = shape(seq_len=32768)
    s_half = shape(seq_len=16384)
    for kw in (dict(recompute="full"), dict(recompute="none"), dict(loss="full"), dict(loss="chunked")):
        sp2 = Layout(num_gpus=2, sp_degree=2, **kw)
        sp1 = Layout(num_gpus=2, sp_degree=1, **kw)
        assert M.activation_terms(s, sp2, "backward") == M.activation_terms(s_half, sp1, "backward")
        assert A.logits_loss_bytes(s, sp2) == A.logits_loss_bytes(s_half, sp1)


def test_eager_attention_is_quadratic_and_varlen_linear():
    """Eager attention (transformers' eager_attention_forward) keeps its fp32 softmax and the bf16
    probabilities: 32 heads x 4096^2 scores x (4 + 2) bytes = 3 GiB per Llama-2-7B layer at 4k,
    12 GiB at 8k; with sp_degree 2 each rank has 16 heads over the whole sequence."""
    lay_e = Layout(num_gpus=1, attention="eager", recompute="none")
    assert A.eager_attention_bytes_per_layer(shape(seq_len=4096), lay_e) == 3_221_225_472
    assert A.eager_attention_bytes_per_layer(shape(seq_len=8192), lay_e) == 12_884_901_888
    sp2 = Layout(num_gpus=2, sp_degree=2, attention="eager", recompute="none")
    assert A.eager_attention_bytes_per_layer(shape(seq_len=8192), sp2) == 6_442_450_944
    lay_v = Layout(num_gpus=1, attention="varlen", recompute="none")
    assert A.eager_attention_bytes_per_layer(shape(seq_len=8192), lay_v) == 0
    v1 = A.activation_checkpoints_bytes(shape(seq_len=4096), lay_v)
    assert A.activation_checkpoints_bytes(shape(seq_len=8192), lay_v) == 2 * v1


def test_full_loss_holds_fp32_logits_and_chunked_does_not():
    s = shape("internlm2-20b", seq_len=32768, loss_chunk_tokens=4096)
    full = A.logits_loss_bytes(s, Layout(num_gpus=1, loss="full"))
    chunked = A.logits_loss_bytes(s, Layout(num_gpus=1, loss="chunked"))
    assert full == 3 * 4 * 92544 * 32768  # fp32 log-probs, their gradient, the input gradient
    assert chunked < full / 5


def test_peak_moment_of_each_step():
    """The peak is the largest moment, terms summed once. XTuner's InternLM2-20B layout at 8k:
    the full loss's three fp32 copies of the logits (3 x 4 x 92544 x 8192 = 9.1 GB) make the loss
    the peak. Llama-2-7B (6,738,415,616 parameters) at ZeRO-0 on a short context: the optimizer
    step's whole fp32 gradient copy (4 bytes each, FP16_UnfusedOptimizer) makes the step the peak."""
    b = M.estimate_memory(load_model("internlm2-20b"), A100, Layout(num_gpus=8, **XTUNER), 8192)
    assert sum(b.terms.values()) == b.total_bytes
    assert b.peak_phase == "loss" and b.terms["logits_loss"] == 9_097_445_376
    z0 = M.estimate_memory(load_model("llama2-7b"), A100, Layout(num_gpus=8, zero_stage=0), 512)
    assert z0.peak_phase == "step" and z0.terms["gradients_fp32"] == 26_953_662_464
    assert z0.terms["logits_loss"] == z0.terms["activations_layer"] == 0  # activations freed at the step


def test_usable_memory_keeps_the_margin():
    b = M.estimate_memory(load_model("llama2-7b"), A100, Layout(num_gpus=8), 4096, safety_margin=0.1)
    assert b.usable_bytes == 77_309_411_328  # 0.9 x 80 GiB
    assert b.capacity_bytes == 80 * GIB


# ---------------------------------------------------------------- the newer families, by hand


def _fam(family, **kw):
    from ltune.profiles.schema import ModelProfile

    base = dict(name=family, source="test", family=family, hidden_size=1024, num_layers=4, num_attention_heads=8,
                num_kv_heads=2, intermediate_size=3072, vocab_size=4096, head_dim=128)
    return ModelProfile(**{**base, **kw})


def test_qwen3_qk_norm_saved_by_hand():
    """Qwen3RMSNorm on each head of q (8 x 128) and k (2 x 128): fp32 input (4) and the
    bf16 normalised x (2) per element, one fp32 rsqrt per head: 6 x 1280 + 4 x 10 bytes/token."""
    s = S.Shape.of(_fam("qwen3", qk_norm=True), 1024)
    assert A.qk_norm_saved_bytes_per_token(s) == 6 * 1280 + 40
    base = S.Shape.of(_fam("qwen3"), 1024)
    lay = Layout(num_gpus=1, recompute="none")
    assert A.layer_saved_bytes_per_token(s, lay) - A.layer_saved_bytes_per_token(base, lay) == 6 * 1280 + 40
    # fp32: the input is the q_proj output itself (4), the normalised x fp32 (4)
    assert A.qk_norm_saved_bytes_per_token(S.Shape.of(_fam("qwen3", qk_norm=True), 1024, "fp32")) == 8 * 1280 + 40


def test_gemma_norms_and_geglu_by_hand():
    """Four Gemma2RMSNorms per layer, fp32 to the end: input and pre-feedforward keep fp32 x (4h),
    fp32 normalised x (4h) and their bf16 output for the next linear (2h); post-attention and
    post-feedforward feed the residual add (8h): 36h. GeGLU saves what SwiGLU does (4 x 2 x ffn)."""
    m = _fam("gemma2", norms_per_layer=4, mlp_activation="gelu_tanh")
    s = S.Shape.of(m, 1024)
    assert A.layer_norms_saved_bytes_per_token(s) == 36 * 1024
    assert A.mlp_saved_bytes_per_token(s) == 8 * 3072
    # gemma3's q/k norms are Gemma3RMSNorm: fp32 input and fp32 normalised x
    s3 = S.Shape.of(_fam("gemma3", norms_per_layer=4, qk_norm=True), 1024)
    assert A.qk_norm_saved_bytes_per_token(s3) == 8 * 1280 + 40
    # the norm's backward (20h fp32 + 2h) beats the MLP's (2 x (h + 2 ffn)) only for narrow MLPs
    narrow = S.Shape.of(_fam("gemma2", norms_per_layer=4, intermediate_size=1024), 1024)
    assert A.layer_backward_transient_bytes_per_token(narrow) == 22 * 1024
    assert A.layer_backward_transient_bytes_per_token(narrow, recompute=True) == 18 * 1024


def test_final_logit_softcapping_by_hand():
    """Full loss: tanh's fp32 output (4V per token) beside the three fp32 logits-sized tensors;
    chunked: the fp32 chunk gradient and its fp32 factor 1 - (s/c)^2 beside the accumulator."""
    t, v, h = 1024, 4096, 1024
    lay = Layout(num_gpus=1, loss="full")
    capped = S.Shape.of(_fam("gemma2", final_logit_softcapping=30.0), t)
    assert A.logits_loss_bytes(capped, lay) == 16 * v * t
    assert A.logits_loss_bytes(S.Shape.of(_fam("gemma2"), t), lay) == 12 * v * t
    m = A.chunked_loss_bytes(chunk_tokens=512, num_tokens=t, vocab_size=v, hidden_size=h, softcap=True)
    assert m["backward_bytes"] == max(512 * v * 8 + v * h * 4, 512 * v * 2 + v * h * 6)


def test_phi3_fused_qkv_by_hand():
    """Phi3: flash saves v as a view of the fused qkv output (q + 2kv = 1536 bf16 per token
    instead of kv = 256) and o_proj saves a contiguous copy of the head-major attention output (dq)."""
    fused = S.Shape.of(_fam("phi3", fused_qkv=True, fused_gate_up=True), 1024)
    base = S.Shape.of(_fam("llama"), 1024)
    lay = Layout(num_gpus=1)
    diff = A.attention_saved_bytes_per_token(fused, lay) - A.attention_saved_bytes_per_token(base, lay)
    assert diff == 2 * (1536 - 256) + 2 * 1024
    assert A.mlp_saved_bytes_per_token(fused) == A.mlp_saved_bytes_per_token(base)


def test_local_layers_masks_and_rope():
    """Gemma3 with local and global layers: two RoPE cos/sin pairs; eager: two S x S masks."""
    m = _fam("gemma3", num_layers=7, norms_per_layer=4, sliding_window=512, sliding_window_pattern=6)
    s = S.Shape.of(m, 1024)
    assert (s.local_layers, s.local_rope) == (6, True)
    eager = Layout(num_gpus=1, attention="eager")
    assert A.shared_layer_inputs_bytes(s, eager) == 2 * (2 * 2 * 1024 * 128) + 2 * 2 * 1024 * 1024


# ---------------------------------------------------------------- pre-Ampere: SDPA per document


def test_sdpa_math_term_by_hand_and_by_trace():
    """V100 (no bf16): varlen attention is SDPA's math backend per document. Llama-2-7B, 4096 tokens
    in documents of 1024, 32 heads of 128: saved fp32 q, k, v and probabilities
    32 x 4096 x 4 x (3 x 128 + 1024) = 738,197,504 bytes; one document's softmax backward
    32 x 2 x 4 x 1024^2 = 268,435,456. And the trainer's own `_sdpa_per_document` (CPU, bf16, GQA),
    its saved tensors counted by autograd's pack hook, saves what the formula says."""
    req = Request(model=load_model("llama2-7b"), gpu=load_gpu("v100-32g"), seq_len=4096, doc_tokens=1024)
    s = search_shape(req)
    assert s.sdpa_math
    lay = Layout(num_gpus=1, recompute="none")
    assert A.sdpa_math_bytes_per_layer(s, lay) == {"saved_bytes": 738_197_504, "backward_temp_bytes": 268_435_456}
    assert A.sdpa_math_bytes_per_layer(s, Layout(num_gpus=1, recompute="none", attention="eager"))["saved_bytes"] == 0

    torch = pytest.importorskip("torch")
    from ltune.trainer.attention import _sdpa_per_document

    heads, kv_heads, head_dim, doc, docs = 4, 2, 8, 16, 3
    q, k, v = (torch.randn(doc * docs, h, head_dim, dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _sdpa_per_document(q, k, v, torch.tensor([0, 16, 32, 48], dtype=torch.int32), True, None)
    assert sum(saved.values()) == 4 * 16 * 3 * 4 * (3 * 8 + 16) == A.sdpa_math_attention_bytes(
        heads=heads, num_tokens=doc * docs, doc_tokens=doc, head_dim=head_dim)["saved_bytes"]


def test_varlen_on_v100_counts_the_sdpa_term_beyond_a100():
    """The same varlen layout: a V100 plan's checkpointed activations exceed an A100 plan's by the
    SDPA term over the 32 layers, less flash's saved q, k, v and logsumexp it replaces (both keep the output, which o_proj saves):
    4096 tokens x (3 x 2 x 4096 + 4 x 32) bytes (fp16; llama2-7b has no GQA)."""
    model = load_model("llama2-7b")
    shapes = [search_shape(Request(model=model, gpu=load_gpu(g), seq_len=4096, doc_tokens=1024))
              for g in ("v100-32g", "a100-80g")]
    lay = Layout(num_gpus=1, recompute="none")
    v100, a100 = (A.activation_checkpoints_bytes(s, lay) for s in shapes)
    assert v100 - a100 == 32 * (738_197_504 - 4096 * (3 * 2 * 4096 + 4 * 32))
    full = Layout(num_gpus=1, recompute="full")
    working = A.activation_working_bytes(shapes[0], full) - A.activation_working_bytes(shapes[1], full)
    # full recompute: the recomputed layer grows by the same difference, and its backward peak moves
    # from the MLP's gradients (2 x 4096 x (4096 + 2 x 11008)) to one document's SDPA backward
    assert working == 738_197_504 - 4096 * (3 * 2 * 4096 + 4 * 32) + 268_435_456 - 2 * 4096 * (4096 + 2 * 11008)


def test_pre_ampere_plan_line_says_what_runs():
    from typer.testing import CliRunner

    from ltune.cli import app

    out = CliRunner().invoke(app, ["plan", "-m", "llama2-7b", "--ctx", "8k", "--gpu", "v100-32g"],
                             env={"COLUMNS": "300"}).stdout
    assert "the trainer runs scaled_dot_product_attention once per document" in out, out
