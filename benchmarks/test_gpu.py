"""CUDA and bf16 checks, the GPU counterparts of test_hyperdas.py's CPU tests (skipped without CUDA).

    python -m pytest -q benchmarks/test_gpu.py        # on a GPU machine; benchmarks/gpu_check.sh runs it

Random-weight targets, nothing downloaded. The tolerances are bf16's: the target runs in bf16 and the
hypernetwork under bf16 autocast, while bases and the interchange stay fp32.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hyperdas as H  # noqa: E402
from test_hyperdas import EXAMPLES, make_model, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def bf16_model(seed=0, layers=4):
    return make_model(seed, layers, dtype=torch.bfloat16).cuda()


def new_hd(model, tok, **kw):
    return H.HyperDAS(model, tok, **{"layer": 2, "feature_dim": 8, "num_blocks": 2, "lr": 1e-3, **kw})


def test_bases_stay_fp32_orthonormal_under_bf16_autocast(tok):
    hd = new_hd(bf16_model(), tok)
    das = H.DAS(hd.model, tok, attributes=["Country", "Continent"], layer=2, feature_dim=8)
    for method in (hd, das):
        with method.autocast():
            _, basis, _ = method.plan(method.collate(EXAMPLES))
        assert basis.dtype == torch.float32 and basis.is_cuda
        eye = torch.eye(basis.shape[-1], device="cuda").expand(len(EXAMPLES), -1, -1)
        assert (basis.transpose(1, 2) @ basis - eye).abs().max() < 1e-5
    # At Llama-3-8B's width, where a bf16 parametrization drifts to 4e-3 (design notes §8). fp32 itself
    # reaches 1.5e-5 there (measured on CPU), so the bound is 5e-5: still 80x below the bf16 drift.
    torch.manual_seed(0)
    basis = H.orthonormal_basis(4096, 128).cuda()
    v = torch.nn.functional.normalize(torch.randn(4, 4096, device="cuda"), dim=-1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        W = H.reflect(H.basis_weight(basis), v)
    assert W.dtype == torch.float32
    assert (W.transpose(1, 2) @ W - torch.eye(128, device="cuda")).abs().max() < 5e-5


def test_bf16_target_keeps_fp32_master_weights_and_trains_every_part(tok):
    model = bf16_model()
    target_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hd = new_hd(model, tok)
    before = {n: p.detach().clone() for n, p in hd.net.named_parameters()}
    history = hd.train(EXAMPLES, epochs=2, batch_size=4, progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in hd.net.parameters())
    assert [n for n, p in hd.net.named_parameters() if torch.equal(p, before[n])] == []
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in model.parameters())
    assert all(torch.equal(p, target_before[n]) for n, p in model.named_parameters())


def test_intervened_forward_equals_manual_activation_patching_in_bf16(tok):
    """A one-hot selection with a random basis, against a hand-written hook on layers[L-1], both bf16."""
    model = bf16_model()
    hd = new_hd(model, tok)
    L = hd.cfg.layer
    base = {k: v.cuda() for k, v in H.tokenize(tok, ["the city of Vienna is in"]).items()}
    source = {k: v.cuda() for k, v in H.tokenize(tok, ["I love Paris"]).items()}
    with torch.no_grad():
        h_source = model(**H.target_inputs(source), output_hidden_states=True).hidden_states[L]
        plain = model(**H.target_inputs(base)).logits.float()
    i, j = 3, 4                                   # "Paris" in the source, "Vienna" in the base
    Ts, Tb = h_source.shape[1], base["input_ids"].shape[1]
    A = torch.zeros(1, Ts + 1, Tb, device="cuda")
    A[0, Ts], A[0, Ts, j], A[0, i, j] = 1, 0, 1
    torch.manual_seed(3)
    W = torch.linalg.qr(torch.randn(1, 32, 16, device="cuda")).Q

    def manual(module, args, out):
        out = out.clone()                         # the patch in fp32, written back in bf16
        h = out[:, j].float()
        out[:, j] = (h + (h_source[:, i].float() - h) @ W[0] @ W[0].T).to(out.dtype)
        return out
    handle = model.model.layers[L - 1].register_forward_hook(manual)
    with torch.no_grad():
        expected = model(**H.target_inputs(base)).logits.float()
    handle.remove()
    with torch.no_grad(), hd.autocast():
        got = hd.intervened_logits(base, A, W, h_source).float()
    assert got.dtype == torch.float32 and (expected - plain).abs().max() > 0.05   # the patch changes the answer
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def test_hypernetwork_attention_in_bf16_matches_fp32(tok):
    """The hypernetwork's masked grouped-query attention (however SDPA runs it on this GPU) against the
    same module in fp32, at the cross-attention's shape (queries: instruction; keys: memory items)."""
    torch.manual_seed(0)
    d, heads, kv_heads, dh, n, tk = 256, 8, 2, 32, 10, 300
    attn = H.Attention(d, heads, kv_heads, dh).cuda()
    rope = H.Rotary(10000.0 ** (-torch.arange(0, dh, 2).float() / dh)).cuda()
    x, memory = torch.randn(2, n, d, device="cuda"), torch.randn(2, tk, d, device="cuda")
    mask = torch.rand(2, n, tk, device="cuda") < 0.7
    mask[:, :, 0] = True                                   # every query sees at least one item
    pos_q = torch.arange(n, device="cuda")[None].expand(2, -1)
    pos_k = torch.arange(tk, device="cuda")[None].expand(2, -1)
    reference = attn(x, rope(pos_q), memory, rope(pos_k), mask)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = attn(x, rope(pos_q), memory, rope(pos_k), mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference, atol=3e-2, rtol=3e-2)
