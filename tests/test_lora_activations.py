"""LoRA/QLoRA activations: the planner's terms (ltune/planner/activations.py lora_*) against the
exact trace (`ltune trace` with peft adapters, quant4's 4-bit stand-in, CUDA-like dropout) on tiny
llama shapes, and by hand."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import tiny_arch  # noqa: E402
from ltune.planner.memory import activation_terms  # noqa: E402
from ltune.planner.schema import Layout, Method  # noqa: E402
from ltune.planner.shape import Shape  # noqa: E402
from ltune.trace import trace_memory  # noqa: E402

TINY = tiny_arch(hidden_size=128, num_layers=3, intermediate_size=352, vocab_size=512)
T = 256  # tokens: 256 x 2 bytes per element is one 512 B block, so the trace rounds nothing away


def _trace(method: Method, recompute: str, arch=TINY, seq_len: int = T):
    lay = Layout(num_gpus=1, zero_stage=0, recompute=recompute, loss="full")
    return lay, trace_memory(arch, seq_len, lay, num_docs=2, method=method)


def _activations(terms: dict) -> int:
    return terms["activations_checkpoints"] + terms["activations_layer"] + terms["logits_loss"]


def test_lora_a_outputs_by_hand():
    """Each adapter keeps its lora_A output (r per token, saved by lora_B): doubling r from 16 to
    32 adds L x 7 adapted modules x 16 x tokens x 2 bytes to what the forward keeps."""
    _, r16 = _trace(Method(kind="lora", lora_rank=16), "none")
    _, r32 = _trace(Method(kind="lora", lora_rank=32), "none")
    extra = r32.phase_terms["loss"]["activations_checkpoints"] - r16.phase_terms["loss"]["activations_checkpoints"]
    assert extra == TINY.num_layers * 7 * 16 * T * 2


@pytest.mark.parametrize(
    "method, recompute, golden_loss, golden_backward",
    [
        # golden: the trace's activations + logits (bytes) at its loss and backward peaks
        (Method(kind="lora"), "full", 1_936_384, 2_023_936),
        (Method(kind="lora"), "none", 5_731_840, 4_444_672),
        (Method(kind="lora", lora_targets=("q_proj", "v_proj"), lora_dropout=0.1), "none", 5_199_360, 4_100_608),
        (Method(kind="qlora"), "none", 5_731_840, 4_444_672),
    ],
)
def test_planner_matches_trace(method, recompute, golden_loss, golden_backward):
    """Activations, logits and loss at the loss and backward moments within 0.5% of the trace
    (the planner leaves out the norms' 4-byte rsqrt per token and DeepSpeed's RNG state)."""
    lay, traced = _trace(method, recompute)
    s = Shape.of(TINY, T, method=method)
    for phase, golden in (("loss", golden_loss), ("backward", golden_backward)):
        t = _activations(traced.phase_terms[phase])
        if golden is not None:
            assert t == golden
        a = _activations(activation_terms(s, lay, phase))
        assert abs(a - t) <= 0.005 * t, (phase, a, t)


def test_dropout_copies_and_masks_by_hand():
    """lora_dropout > 0: each adapted module keeps its dropped copy (2 bytes x in) instead of the
    shared input, and a bool mask (1 x in) where the input needs a gradient (not layer 0's q/k/v)."""
    _, plain = _trace(Method(kind="lora"), "none")
    _, dropped = _trace(Method(kind="lora", lora_dropout=0.1), "none")
    h, f, L = TINY.hidden_size, TINY.intermediate_size, TINY.num_layers
    ins = [h, h, h, h, h, h, f]  # q, k, v, o, gate, up, down
    copies = L * sum(ins) * 2
    masks = L * sum(ins) - 3 * h  # layer 0: q, k, v read a norm output that needs no gradient
    shared = L * (2 * h + h + f) * 2 - 0  # each layer's two norm outputs and the product, and o's input stays
    shared -= L * h * 2  # o_proj's input is the attention output, kept by the attention anyway
    extra = dropped.phase_terms["loss"]["activations_checkpoints"] - plain.phase_terms["loss"]["activations_checkpoints"]
    assert extra == (copies + masks - shared) * T


def test_qlora_dequantized_weight_in_backward():
    """QLoRA with few tokens and a wide MLP: the backward peak is down_proj's dequantized weight
    (bf16, whole) beside the gradients; the planner within 2% of the trace."""
    wide = tiny_arch(hidden_size=128, num_layers=2, intermediate_size=2048, vocab_size=256)
    method = Method(kind="qlora")
    lay, traced = _trace(method, "none", wide, seq_len=32)
    s = Shape.of(wide, 32, method=method)
    layer_t = traced.phase_terms["backward"]["activations_layer"]
    assert layer_t >= 2 * 128 * 2048  # the dequantized 4-bit weight itself
    t = _activations(traced.phase_terms["backward"])
    a = _activations(activation_terms(s, lay, "backward"))
    assert abs(a - t) <= 0.02 * t, (a, t)
