"""chunked_cross_entropy: equal to the full loss and its gradients, and never holds N x V logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

from ltune.trainer.chunked_loss import chunked_cross_entropy, chunked_loss_bytes


def _inputs(num_tokens: int, vocab_size: int, hidden_size: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab_size, hidden_size, generator=gen) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=gen)
    labels[torch.rand(num_tokens, generator=gen) < 0.3] = -100  # ignored tokens, scattered
    labels[:5] = -100  # and a run at the start of a chunk
    return hidden, weight, labels


def _full_loss(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def _loss_and_grads(loss_fn, hidden, weight, labels, grad_scale: float = 1.0):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss = loss_fn(hidden, weight, labels)
    (loss * grad_scale).backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_tokens", [7, 37, 64, 1000])
def test_equals_full_loss_and_gradients_fp32(chunk_tokens):
    hidden, weight, labels = _inputs(num_tokens=100, vocab_size=300, hidden_size=32)
    # a grad scale other than 1 (the 1/token-count division, or a loss scale) must reach both grads
    full = _loss_and_grads(_full_loss, hidden, weight, labels, grad_scale=0.37)
    chunked = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_tokens), hidden, weight, labels, grad_scale=0.37
    )
    assert chunked[0].dtype == torch.float32
    for name, expected, got in zip(("loss", "grad_hidden", "grad_weight"), full, chunked):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{name} differs")
    # ignored tokens get no gradient
    assert torch.count_nonzero(chunked[1][labels == -100]) == 0


def test_all_labels_ignored_gives_zero():
    hidden, weight, labels = _inputs(num_tokens=20, vocab_size=50, hidden_size=8)
    labels[:] = -100
    loss, grad_hidden, grad_weight = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy(h, w, y, 6), hidden, weight, labels
    )
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad_hidden) == 0 and torch.count_nonzero(grad_weight) == 0


def test_bf16_close_to_full_and_grads_in_model_dtype():
    hidden, weight, labels = _inputs(num_tokens=96, vocab_size=256, hidden_size=32, dtype=torch.bfloat16)
    full = _loss_and_grads(_full_loss, hidden, weight, labels)
    chunked = _loss_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, 40), hidden, weight, labels)
    assert chunked[0].dtype == torch.float32
    assert chunked[1].dtype == torch.bfloat16 and chunked[2].dtype == torch.bfloat16
    torch.testing.assert_close(chunked[0], full[0], rtol=1e-5, atol=1e-4)  # same bf16 logits, fp32 math
    torch.testing.assert_close(chunked[1], full[1], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(chunked[2], full[2], rtol=2e-2, atol=2e-2)


def test_bad_arguments_are_refused():
    hidden, weight, labels = _inputs(num_tokens=10, vocab_size=20, hidden_size=4)
    with pytest.raises(ValueError, match=r"chunk_tokens \(0\)"):
        chunked_cross_entropy(hidden, weight, labels, 0)
    with pytest.raises(ValueError, match="do not match"):
        chunked_cross_entropy(hidden, weight, labels[:5], 4)


def _saved_tensor_bytes(loss_fn, hidden, weight, labels):
    """Bytes autograd keeps for backward (saved tensors, counted by storage) and the largest one."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(hidden, weight, labels)
    return loss, sum(seen.values()), max(seen.values())


def _peak_bytes(loss_fn, hidden, weight, labels):
    """Peak of live tensor bytes, forward + backward, measured by MemTracker (inputs included)."""
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    tracker = MemTracker()
    tracker.track_external(hidden, weight, labels)
    with tracker:
        loss_fn(hidden, weight, labels).backward()
    peak = tracker.get_tracker_snapshot("peak")
    return peak[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_never_holds_full_logits(dtype):
    num_tokens, vocab_size, hidden_size, chunk_tokens = 512, 2048, 16, 64
    hidden, weight, labels = _inputs(num_tokens, vocab_size, hidden_size, dtype)
    logits_bytes = num_tokens * vocab_size * 4
    inputs_bytes = hidden.nbytes + weight.nbytes + labels.nbytes

    # what autograd keeps between forward and backward
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    _, full_saved, full_largest = _saved_tensor_bytes(_full_loss, h, w, labels)
    _, chunked_saved, chunked_largest = _saved_tensor_bytes(
        lambda a, b, y: chunked_cross_entropy(a, b, y, chunk_tokens), h, w, labels
    )
    assert full_largest >= logits_bytes  # the reference does hold the logits (the check can fail)
    # chunked keeps hidden, weight, labels (alive anyway) and the fp32 log-sum-exp: nothing N x V
    assert chunked_largest < logits_bytes / 8
    assert chunked_saved == inputs_bytes + num_tokens * 4

    # peak of everything alive at once, forward and backward
    full_peak = _peak_bytes(_full_loss, hidden, weight, labels)
    chunked_peak = _peak_bytes(lambda a, b, y: chunked_cross_entropy(a, b, y, chunk_tokens), hidden, weight, labels)
    terms = chunked_loss_bytes(
        chunk_tokens=chunk_tokens, num_tokens=num_tokens, vocab_size=vocab_size, hidden_size=hidden_size,
        dtype_bytes=hidden.element_size(),
    )
    grads_bytes = hidden.nbytes + weight.nbytes  # the two gradients returned
    assert full_peak >= inputs_bytes + 2 * logits_bytes  # fp32 logits and their gradient, at least
    assert chunked_peak < inputs_bytes + logits_bytes / 2
    # MemTracker sees every tensor but not the temporaries inside one kernel (logsumexp's)
    assert chunked_peak <= inputs_bytes + grads_bytes + terms["peak_bytes"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_within_the_formula():
    """On a GPU, llama-3-like output layer (V 128256, h 2048), 16k tokens, bf16: the chunked loss's
    measured peak (forward + backward, CUDA caching allocator) stays within chunked_loss_bytes plus
    the two gradients it returns, and is a fraction of the full loss's."""
    num_tokens, vocab_size, hidden_size, chunk_tokens = 16384, 128256, 2048, 4096
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(num_tokens, hidden_size, device=dev, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(vocab_size, hidden_size, device=dev, generator=gen) / hidden_size**0.5).to(torch.bfloat16)
    labels = torch.randint(0, vocab_size, (num_tokens,), device=dev, generator=gen)
    labels[::7] = -100
    (hidden[:256] @ weight[:256].t()).sum().item()  # cuBLAS workspace, outside the measurement
    measured = {}
    for name, fn in (
        ("chunked", lambda h, w: chunked_cross_entropy(h, w, labels, chunk_tokens)),
        ("full", lambda h, w: _full_loss(h, w, labels)),
    ):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = fn(h, w)
        loss.backward()
        torch.cuda.synchronize()
        measured[name] = (loss.item(), torch.cuda.max_memory_allocated() - base)
        del h, w, loss
    terms = chunked_loss_bytes(
        chunk_tokens=chunk_tokens, num_tokens=num_tokens, vocab_size=vocab_size, hidden_size=hidden_size
    )
    grads_bytes = hidden.nbytes + weight.nbytes
    print(f"\nchunked peak {measured['chunked'][1] / 2**30:.3f} GiB, formula peak_bytes "
          f"{terms['peak_bytes'] / 2**30:.3f} GiB + gradients {grads_bytes / 2**30:.3f} GiB, "
          f"full peak {measured['full'][1] / 2**30:.3f} GiB; losses {measured['chunked'][0]:.6f} {measured['full'][0]:.6f}")
    assert measured["chunked"][0] == pytest.approx(measured["full"][0], rel=1e-4)
    assert measured["chunked"][1] <= terms["peak_bytes"] + grads_bytes + 2**26
    assert measured["chunked"][1] >= 0.95 * terms["peak_bytes"]  # the formula is tight, not padded
    assert measured["full"][1] > 4 * measured["chunked"][1]


@pytest.mark.parametrize("chunk_tokens", [7, 1000])
def test_logit_softcap_equals_autograd_of_the_capped_full_loss(chunk_tokens):
    """softcap c: cross entropy of c * tanh(logits / c) (gemma2's final_logit_softcapping), loss
    and both gradients as autograd gives them through the full tensors (scale 3: logits up to
    ~10, so a cap of 1.5 changes every row)."""
    hidden, weight, labels = _inputs(num_tokens=100, vocab_size=300, hidden_size=32)
    hidden = 3 * hidden

    def capped_full(h, w, y):
        logits = (h @ w.t()).float()
        return F.cross_entropy(1.5 * torch.tanh(logits / 1.5), y, ignore_index=-100, reduction="sum")

    full = _loss_and_grads(capped_full, hidden, weight, labels, grad_scale=0.37)
    chunked = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_tokens, softcap=1.5), hidden, weight, labels,
        grad_scale=0.37,
    )
    uncapped = _full_loss(hidden, weight, labels)
    assert abs(uncapped.item() - full[0].item()) > 1.0, "the cap must change the loss in this test"
    for name, expected, got in zip(("loss", "grad_hidden", "grad_weight"), full, chunked):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{name} differs")
