"""How much GPU memory HyperDAS training needs: parameters counted exactly, activations estimated.

    python benchmarks/memory.py --model llama3-8b                     # the paper's settings, batch 16
    python benchmarks/memory.py --model llama3-8b --checkpoint_blocks --freeze_embedding
    python benchmarks/memory.py --config path/to/config.json --blocks 4 --batch 8

The target (its published configuration) and the hypernetwork are built without weights on the meta
device, so this runs in seconds on any machine and counts every parameter exactly. Activations are an
analytic estimate: the tensors each operation saves for the backward pass under bf16 autocast, written
out below, formula by formula. With CUDA the script also trains 3 steps on random bf16 weights and
prints the real peak (torch.cuda.max_memory_allocated). GB here are 10^9 bytes.

Levers modelled (the table at the end says what each saves against the code before them): K/V per KV
head (the g query heads that share a K/V head folded into the query axis, where the code before
repeat_interleave'd K/V per query head) with the cross-attention memory cast to bf16 once per block,
fused AdamW (no optimizer temporaries), checkpoint_blocks (block activations recomputed in the backward
pass), freeze_embedding (no gradient or moments for the embedding copy), grad_accum K (activations of
batch/K, gradients held across the micro-steps). The first three are what this hyperdas.py does
(targets.code_features reads them from its source); the others are its options.
"""
import argparse
import dataclasses
import itertools
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import targets
from targets import H

GB = 1e9
BF16, FP32 = 2, 4


KV_LEVER = "K/V per KV head (query groups folded) + one memory cast"


@dataclasses.dataclass(frozen=True)
class Levers:
    """What the estimate assumes of the code and the options. The defaults are the current hyperdas.py."""
    grouped_kv: bool = True      # K/V per KV head, the g query heads of a group folded into the query axis
                                 # (else repeat_interleave: K/V copied per query head, g x the bytes)
    one_cast: bool = True        # Block.cross casts the normed memory to bf16 once (else k_proj and v_proj each do)
    fused: bool = True           # fused AdamW: no param-sized temporaries in the optimizer step (else foreach)
    checkpoint: bool = False     # checkpoint_blocks: keep each block's input only, recompute in backward
    freeze_embedding: bool = False
    grad_accum: int = 1

    def code(self):
        kv = KV_LEVER if self.grouped_kv and self.one_cast else \
            "K/V per KV head (query groups folded)" if self.grouped_kv else "one memory cast" if self.one_cast else ""
        return [kv, "fused AdamW" if self.fused else ""]

    def options(self):
        return ["checkpoint_blocks" if self.checkpoint else "", "freeze_embedding" if self.freeze_embedding else "",
                f"grad_accum {self.grad_accum}" if self.grad_accum > 1 else ""]

    def name(self, parts=None):
        return " + ".join(p for p in (parts or self.code() + self.options()) if p) or "none"


# The code before the attention and optimizer changes: K/V repeat_interleave'd per query head, the memory
# cast by k_proj and by v_proj, foreach AdamW.
BEFORE = Levers(grouped_kv=False, one_cast=False, fused=False)


# ----------------------------------------------------------------------------------------------------
# Parameters: counted on the meta-device hypernetwork, exactly.


PARTS = (("embedding", "encoder.embed."), ("blocks", "encoder."), ("selector", "selector."),
         ("subspace head", "subspace."))


def part_of(name):
    return next((part for part, prefix in PARTS if name.startswith(prefix)), "other")


def count_parameters(net, freeze_embedding):
    """Per part: trainable and frozen parameter bytes, and the bytes of the bf16 copies autocast makes of
    trainable Linear weights (the orthogonal basis is computed with autocast off, so it has none)."""
    embed = getattr(net.encoder, "embed", None)
    if freeze_embedding and embed is not None:   # what train_embedding=False does, whether or not this code has it
        embed.weight.requires_grad_(False)
    count = {part: dict(trainable=0, weight_bytes=0) for part, _ in PARTS + (("other", ""),)}
    for name, p in net.named_parameters():
        c = count[part_of(name)]
        c["weight_bytes"] += p.numel() * p.element_size()      # frozen or not, the weights are held
        if p.requires_grad:
            c["trainable"] += p.numel()
    for name, buffer in net.named_buffers():    # rotary tables, the orthogonal parametrization's [d, d] base
        count[part_of(name)]["weight_bytes"] += buffer.numel() * buffer.element_size()
    for m in net.subspace.modules():            # ... which is not made on the meta device
        if nn.utils.parametrize.is_parametrized(m) and getattr(m.parametrizations.weight[0], "base", None) is None:
            count["subspace head"]["weight_bytes"] += FP32 * m.parametrizations.weight.original.shape[0] ** 2
    casts = lambda module: sum(m.weight.numel() * BF16 for m in module.modules() if isinstance(m, nn.Linear)
                               and not nn.utils.parametrize.is_parametrized(m) and m.weight.requires_grad)
    blocks = list(net.encoder.blocks)
    return dict(parts=count, block_params=[sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks],
                block_casts=[casts(b) for b in blocks], head_casts=casts(net.selector) + casts(net.subspace),
                trainable=sum(c["trainable"] for c in count.values()),
                weight_bytes=sum(c["weight_bytes"] for c in count.values()))


def build_meta(config, settings, freeze_embedding):
    target = targets.meta_target(config)
    options, _ = targets.hyperdas_options(freeze_embedding=freeze_embedding)
    keys = {f.name for f in dataclasses.fields(H.HyperDASConfig)}
    cfg = H.HyperDASConfig(**{k: v for k, v in settings.items() if k in keys}, **options)
    with torch.device("meta"):
        net = H.HyperNetwork(target, cfg)
    return target, net


# ----------------------------------------------------------------------------------------------------
# Activations: the tensors autograd keeps for the backward pass, per part. An estimate: it counts the
# large saved tensors of the code as written (bf16 autocast on the GPU, fp32 master weights) and ignores
# kilobyte-sized ones, allocator rounding and the transients of a single operation.


def aligned(n, to=16):
    return -(-n // to) * to


def attention_saved(b, tq, tk, d, heads, kv_heads, head_dim, lv, memory_side, softcap=False):
    """Bytes one Attention call saves. Query side: its input cast to bf16 for q_proj, q after rotary,
    the SDPA output and the o_proj input (a transposed copy), each bf16 [b, tq, heads*head_dim], and the
    kernel's fp32 logsumexp [b, heads, tq]. K/V side, [b, tk, ...]: the inputs cast to bf16 for k_proj and
    v_proj (twice; once for a cross-attention whose memory Block.cross cast itself), and K and V after rotary:
    per KV head when the query groups are folded, per query head after repeat_interleave. The efficient
    SDPA kernel keeps the boolean mask as a bf16 bias, [b, 1, g*tq, tk] when folded (the mask is repeated
    once per query head of a group) or [b, 1, tq, tk], its last dimension padded for alignment.
    With Gemma-2's soft-capped scores there is no SDPA: per score [b, heads, tq, tk] it keeps the fp32 tanh
    and softmax outputs, the bf16 copy of the weights for the product with V and the boolean mask, and no
    logsumexp, and the product's output is not kept."""
    hq, hkv, g = heads * head_dim, kv_heads * head_dim, heads // kv_heads
    query = BF16 * b * tq * (d + 3 * hq) + FP32 * b * heads * tq
    if softcap:
        query = BF16 * b * tq * (d + 2 * hq)
    casts = (1 if memory_side and lv.one_cast else 2) * BF16 * b * tk * d
    kv = 2 * BF16 * b * tk * (hkv if lv.grouped_kv else hq)
    mask = BF16 * b * (g if lv.grouped_kv else 1) * tq * aligned(tk)
    if softcap:
        mask = (FP32 + FP32 + BF16) * b * heads * tq * tk + b * (g if lv.grouped_kv else 1) * tq * tk
    # A cross-attention's memory passes through the block's RMSNorm first: from bf16 items that need no
    # gradient, only the normalised bf16 tensor is kept (for the norm weight's gradient), [b, tk, d].
    norm = BF16 * b * tk * d if memory_side else 0
    return query + casts + kv + mask + norm


def block_saved(b, n, tk, shapes, lv):
    """One hypernetwork block on an instruction of n tokens: four RMSNorms of the fp32 residual stream
    (each keeps its fp32 input and output, 2 x [b, n, d]; Gemma-2 has four more, after the sublayers);
    self-attention over the instruction (Block.forward calls it directly, so q_proj, k_proj and v_proj each
    cast its input); two cross-attentions (Block.cross) over tk = T x (layers + 1) memory items; the SwiGLU
    MLP (its input cast twice, and gate, silu(gate), up and their product, 4 x bf16 [b, n, d_ff])."""
    d, ff, heads, kv_heads, dh, softcap, post_norm = shapes
    norms = 4 * 2 * FP32 * b * n * d
    if post_norm:      # Gemma-2: each sublayer's bf16 output normed again: its fp32 upcast and bf16 result
        norms += 4 * (FP32 + BF16) * b * n * d
    self_attention = attention_saved(b, n, n, d, heads, kv_heads, dh, lv, False, softcap)
    cross = 2 * attention_saved(b, n, tk, d, heads, kv_heads, dh, lv, True, softcap)
    mlp = 2 * BF16 * b * n * d + 4 * BF16 * b * n * ff
    return norms + self_attention + cross + mlp


def target_layer_saved(b, t, shapes):
    """One frozen target layer above the intervention, in bf16. Its weights need no gradient, so its
    Linear layers keep nothing; what the backward to the intervention needs: the fp32 upcast in each of
    its two RMSNorms (4 bytes x [b, t, d]); q, k, v (repeated per head: a padded batch gives transformers
    a mask, which rules out its GQA path) and the attention output (bf16); gate, silu(gate) and up
    (bf16 [b, t, d_ff]). Gemma-2's extra norms and soft-capped eager attention are not counted (at a small
    Gemma-2 the check on CPU counts ~25% more than this in the intervened target)."""
    d, ff, heads, _, dh, _, _ = shapes
    return 2 * FP32 * b * t * d + 4 * BF16 * b * t * heads * dh + BF16 * b * t * t + 3 * BF16 * b * t * ff


def activations(tc, settings, b, t, n, lv):
    """Saved bytes per part at micro-batch b, prompts of t tokens, instruction of n tokens."""
    d, V, layers = tc.hidden_size, tc.vocab_size, tc.num_hidden_layers
    dh = getattr(tc, "head_dim", None) or d // tc.num_attention_heads
    arch = H.architecture(tc)      # what Block computes for this target
    shapes = (d, tc.intermediate_size, tc.num_attention_heads, tc.num_key_value_heads, dh, arch["softcap"] is not None,
              arch["post_norm"])
    N, L, k = settings["num_blocks"], settings["layer"], settings["feature_dim"]
    tk = t * (layers + 1)                                 # memory items: every token at every hidden state
    keep = 3                                              # logits kept: a 2-token answer + 1 (answer_window)
    block = block_saved(b, n, tk, shapes, lv)
    return dict(
        # the base's and the source's stacked hidden states [b, t, layers+1, d] in bf16, from the two
        # no-grad target passes, live for the whole step; plus the rotary tables of the memory positions
        memories=2 * BF16 * b * tk * d + 2 * 2 * FP32 * b * tk * dh,
        # checkpointed blocks keep only their fp32 input [b, n, d]; the rest is recomputed in backward
        blocks=N * (FP32 * b * n * d if lv.checkpoint else block),
        block=block,
        # the selector's pair tensor [b, t+1, t, d], twice: silu's input in fp32 (the keep row is an fp32
        # parameter, and autocast's cat promotes to fp32) and the bf16 copy the score einsum's bmm keeps;
        # its two key inputs cast to bf16, and the fp32 softmax [b, t+1, t]
        selector=(FP32 + BF16) * b * (t + 1) * t * d + 2 * BF16 * b * t * d + FP32 * b * (t + 1) * t,
        # the interchange in fp32: h_source and h_base upcast, (mix - h_base), its projection [b, t, k],
        # and the basis W [b, d, k]
        interchange=3 * FP32 * b * t * d + FP32 * b * t * k + FP32 * b * d * k,
        # the intervened target pass: layers L .. layers-1 lie between the patch and the loss; plus the
        # final norm's upcast and the fp32 log-softmax of the kept logits [b, keep, V] (and its input)
        target=(layers - L) * target_layer_saved(b, t, shapes) + FP32 * b * t * d + 2 * FP32 * b * keep * V,
    )


# ----------------------------------------------------------------------------------------------------
# Peak: the running total through one training step, in three phases.


def plan(params, act, lv):
    """Bytes at the end of the forward pass, the highest point of the backward pass, and the optimizer step.
    Always present: fp32 weights, bf16 target, AdamW moments (2 x fp32 per trainable parameter, from the
    first step on). The forward pass adds its activations and autocast's bf16 weight copies (cached until
    autocast exits, and kept by the Linear layers for their input gradients). The backward pass runs from
    the loss back: the target layers (no gradients), the heads, the blocks from the last one (each
    recomputed first when checkpointed; its gradients appear while its saved tensors still exist), the
    embedding. With grad_accum the micro-steps after the first hold the summed gradients all the way and
    each new gradient is a transient. The optimizer step holds the gradients and, for the foreach AdamW,
    one param-sized fp32 temporary (the sqrt of the second moment)."""
    P = params["trainable"]
    grads = FP32 * P
    moments = 2 * FP32 * P
    casts = sum(params["block_casts"]) + params["head_casts"]
    static = params["weight_bytes"] + params["target_bytes"] + moments
    carry = grads if lv.grad_accum > 1 else 0
    fwd = static + carry + sum(v for k, v in act.items() if k != "block") + casts
    live, peak = fwd - act["target"], 0
    if lv.checkpoint:
        live -= sum(params["block_casts"])   # not saved by checkpointed blocks: freed when autocast exits

    def backward_through(saved, cast_bytes, grad_bytes, recompute=0):
        nonlocal live, peak
        live += recompute
        peak = max(peak, live + grad_bytes)
        live += (0 if carry else grad_bytes) - saved - cast_bytes

    parts = params["parts"]
    head_grads = FP32 * (parts["selector"]["trainable"] + parts["subspace head"]["trainable"])
    backward_through(act["selector"] + act["interchange"], params["head_casts"], head_grads)
    for block_params, block_casts in zip(reversed(params["block_params"]), reversed(params["block_casts"])):
        if lv.checkpoint:
            per_block = act["blocks"] / len(params["block_params"])
            backward_through(per_block + act["block"], block_casts, FP32 * block_params, act["block"] + block_casts)
        else:
            backward_through(act["block"], block_casts, FP32 * block_params)
    backward_through(0, 0, FP32 * parts["embedding"]["trainable"])
    optimizer = static + grads + (0 if lv.fused else FP32 * P)
    return dict(forward=fwd, backward=peak, optimizer=optimizer, static=static, grads=grads, moments=moments,
                casts=casts, optimizer_temporaries=0 if lv.fused else FP32 * P)


def estimate(config, settings, B, T, n, lv):
    target, net = build_meta(config, settings, lv.freeze_embedding)
    params = count_parameters(net, lv.freeze_embedding)
    params["target_bytes"] = sum(p.numel() for p in target.parameters()) * BF16
    params["target_parameters"] = sum(p.numel() for p in target.parameters())
    act = activations(config, settings, math.ceil(B / lv.grad_accum), T, n, lv)
    return params, act, plan(params, act, lv)


def peak_of(p):
    phase = max(("forward", "backward", "optimizer"), key=lambda k: p[k])
    return p[phase], phase


# ----------------------------------------------------------------------------------------------------
# Measured, on CUDA: 3 training steps on random bf16 weights.


def train_steps(hd, examples, grad_accum, steps, report=print):
    """`steps` optimizer steps of HyperDAS training on `examples` (one batch), each split into grad_accum
    micro-steps, as train_step does it: prediction + sparsity loss, backward, clipping, AdamW."""
    opt = hd.make_optimizer()
    B, micro = len(examples), math.ceil(len(examples) / grad_accum)
    hd.net.train()
    for step in range(steps):
        start = time.perf_counter()
        for i in range(0, B, micro):
            logits, labels, is_causal, weights = hd.forward(examples[i:i + micro])
            loss = H.prediction_loss(logits, labels, is_causal, hd.cfg.causal_weight, hd.cfg.isolate_weight) \
                + hd.cfg.sparsity_end * H.sparsity_loss(weights)
            (loss * len(labels) / B).backward()          # the mean over the whole batch
        torch.nn.utils.clip_grad_norm_(hd.trainable_parameters(), hd.cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        report(step, time.perf_counter() - start, loss.item())
    return opt


def measure(config, settings, B, T, n, checkpoint_blocks, freeze_embedding, grad_accum, steps=3):
    """Peak bytes allocated over `steps` training steps, and the bytes held after building (CUDA)."""
    options, missing = targets.hyperdas_options(checkpoint_blocks, freeze_embedding)
    for name in missing:
        print(f"measured: this hyperdas.py has no {name}" + ("; measuring without it" if name != "train_embedding"
                                                             else "; freezing the embedding copy by hand"))
    torch.cuda.empty_cache()
    model = targets.random_target(config, "cuda", torch.bfloat16)
    hd = targets.build_hyperdas(model, settings, options, "cuda")
    if freeze_embedding and "train_embedding" in missing:
        hd.net.encoder.embed.weight.requires_grad_(False)   # the same lever, by hand
    examples = targets.synthetic_examples(B, T, n, seed=0)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()

    def report(step, seconds, loss):
        torch.cuda.synchronize()
        print(f"measured: step {step + 1} {seconds:.2f} s, loss {loss:.3f}, "
              f"peak so far {torch.cuda.max_memory_allocated() / GB:.2f} GB")
    opt = train_steps(hd, examples, grad_accum, steps, report)
    peak = torch.cuda.max_memory_allocated()
    del hd, opt, model
    torch.cuda.empty_cache()
    return peak, held


def grouped_attention(q, k, v, mask, folded):
    """Masked grouped-query attention, q [B, H, Tq, dh], k/v [B, Hkv, Tk, dh], mask [B, Tq, Tk] -> [B, H, Tq, dh],
    as hyperdas.Attention computes it (folded: the g query heads of a K/V head stacked on the query axis,
    the mask repeated to [B, 1, g*Tq, Tk]) or as the code before did (K/V repeat_interleave'd per query head)."""
    B, heads, Tq, dh = q.shape
    g = heads // k.shape[1]
    if folded:
        out = F.scaled_dot_product_attention(q.reshape(B, heads // g, g * Tq, dh), k, v,
                                             attn_mask=mask.repeat(1, g, 1)[:, None])
        return out.reshape(B, heads, Tq, dh)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                          attn_mask=mask[:, None])


def sdpa_probe(B, n, tk, heads, kv_heads, head_dim, device="cuda"):
    """One masked cross-attention at the block's shape (bf16, forward + backward), in both forms: the peak
    bytes above its inputs of each (CUDA), the largest difference between their outputs and input gradients,
    and whether the efficient kernel takes the folded form (the estimate assumes it does: a bf16 mask bias,
    no [b, heads, tq, tk] weights)."""
    g = torch.Generator(device=device).manual_seed(0)
    cuda = torch.device(device).type == "cuda"
    q = torch.randn(B, heads, n, head_dim, device=device, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, kv_heads, tk, head_dim, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
    mask = torch.rand(B, n, tk, device=device, generator=g) < 0.9
    mask[..., 0] = True                                            # every query sees something
    grad_out = torch.randn(B, heads, n, head_dim, device=device, dtype=torch.bfloat16, generator=g)
    out, results = {}, {}
    for form in ("repeat_interleave", "folded"):
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        o = grouped_attention(*inputs, mask, folded=form == "folded")
        o.backward(grad_out)
        if cuda:
            torch.cuda.synchronize()
            results[form] = torch.cuda.max_memory_allocated() - base
        out[form] = [o.detach()] + [t.grad for t in inputs]
        del o, inputs
    results["max_difference"] = max((a.float() - b.float()).abs().max().item()
                                    for a, b in zip(out["repeat_interleave"], out["folded"]))
    results["efficient_kernel"] = None
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        try:
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                grouped_attention(q[:1].clone().requires_grad_(), k[:1], v[:1], mask[:1], folded=True).sum().backward()
            results["efficient_kernel"] = True
        except RuntimeError:
            results["efficient_kernel"] = False
    return results


CHECK_TARGET = dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2, vocab_size=4096)


def check_on_cpu(lv, fields=CHECK_TARGET):
    """The activation formulas against what autograd really saves: one forward on the CPU (bf16 target,
    bf16 autocast) at a small shape, every saved tensor's storage counted once with saved-tensor hooks, by
    the module that saved it. The CPU's SDPA kernel stands in for the GPU's (it keeps the same q, k, v,
    output, logsumexp and bf16 mask bias, the bias without the GPU kernel's alignment padding); the rest
    is the same code on both. Returns {part: (counted, estimated)} bytes."""
    config, (B, T, n) = targets.make_config(fields), (4, 20, 12)
    settings = dict(H.settings_for(config)[0], num_blocks=2)
    model = targets.random_target(config, "cpu", torch.bfloat16)
    hd = targets.build_hyperdas(model, settings, {}, "cpu")
    batch = hd.collate(targets.synthetic_examples(B, T, n))
    held = {t.untyped_storage().data_ptr() for t in itertools.chain(hd.net.parameters(), hd.net.buffers(),
                                                                    model.parameters(), model.buffers())}
    weight_shapes = {shape for m in hd.net.modules() if isinstance(m, nn.Linear)
                     for shape in (m.weight.shape, m.weight.shape[::-1])}     # a weight, or its transpose
    saved, region = {}, ["target"]

    def enter(name):
        def hook(module, args):
            region.append(name)
        return hook

    def leave(module, args, output):
        region.pop()                          # (returns None: the output stays the module's)
    parts = [(block, "blocks") for block in hd.net.encoder.blocks] + [
        (hd.net.selector, "selector"), (hd.net.subspace, "other"), (hd.net.encoder.norm, "other"),
        (hd.net.encoder.embed, "other")]
    hooks = [h for module, name in parts
             for h in (module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave))]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in held and storage.data_ptr() not in saved:
            cast = t.dtype == torch.bfloat16 and t.shape in weight_shapes   # autocast's copy of a weight
            saved[storage.data_ptr()] = ("bf16 weight copies" if cast else region[-1], storage.nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        base, source = batch["base"], batch["source"]
        base_states, source_states = H.hidden_states(model, base), H.hidden_states(model, source)
        weights, basis = hd.net(batch["instruction"], base_states, base["visible"], source_states, source["visible"])
        region[-1] = "intervened target"
        hd.intervened_logits(base, weights, basis, source_states[:, :, hd.cfg.layer], H.answer_window(base["labels"]))
    for h in hooks:
        h.remove()
    counted = {}
    for name, nbytes in saved.values():
        counted[name] = counted.get(name, 0) + nbytes
    act = activations(config, settings, B, T, n, lv)
    params = count_parameters(hd.net, False)
    dh = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = 2 * 2 * FP32 * B * (T * (config.num_hidden_layers + 1) + n) * dh   # memory and instruction tables
    # the GPU kernel's alignment padding of the mask bias, which the CPU kernel does not add
    heads, kv_heads, tk = config.num_attention_heads, config.num_key_value_heads, T * (config.num_hidden_layers + 1)
    rows = B * (heads // kv_heads if lv.grouped_kv else 1) * n
    padding = settings["num_blocks"] * BF16 * rows * (2 * (aligned(tk) - tk) + aligned(n) - n) \
        if H.architecture(config)["softcap"] is None else 0
    estimated = {"blocks": act["blocks"] + rope - padding, "selector": act["selector"],
                 "intervened target": act["interchange"] + act["target"] - 2 * FP32 * B * 3 * config.vocab_size,
                 "bf16 weight copies": sum(params["block_casts"]) + params["head_casts"], "other": None}
    c = config
    print(f"\nestimate check on CPU ({c.model_type}, d {c.hidden_size}, {c.num_hidden_layers} layers, "
          f"{c.num_attention_heads}/{c.num_key_value_heads} heads, 2 blocks, batch {B}, length {T}, instruction {n}; "
          f"{lv.name(lv.code())}): saved-tensor MB, counted / estimated\n  (the weight copies' estimate also has "
          "the selector's key projections, which autocast caches through the forward but autograd does not keep)")
    result = {}
    for name, value in estimated.items():
        got = counted.get(name, 0)
        result[name] = (got, value)
        shown = "       -  (subspace head, final norm: not estimated)" if value is None else f"{value / 1e6:8.2f}"
        print(f"  {name:<20} {got / 1e6:8.2f} / {shown}")
    drift = [name for name, (got, value) in result.items() if value is not None and abs(got - value) > 0.06 * value]
    print(f"  warning: {', '.join(drift)} differ by more than 6%: the formulas no longer describe this code" if drift
          else "  every estimated part within 6% of what autograd keeps")
    return result


# ----------------------------------------------------------------------------------------------------


def lever_table(config, settings, B, T, n, default):
    """Peak for the code before the attention and optimizer changes, each lever alone on top of it, the
    default (this hyperdas.py, no options), and the options' combinations on top of the default."""
    rows = [("before: repeat_interleave, two casts, foreach AdamW", BEFORE),
            ("+ " + KV_LEVER, dataclasses.replace(BEFORE, grouped_kv=True, one_cast=True)),
            ("+ fused AdamW", dataclasses.replace(BEFORE, fused=True)),
            ("+ checkpoint_blocks", dataclasses.replace(BEFORE, checkpoint=True)),
            ("+ freeze_embedding", dataclasses.replace(BEFORE, freeze_embedding=True)),
            ("+ grad_accum 4", dataclasses.replace(BEFORE, grad_accum=4)),
            ("default: this hyperdas.py, no options", default)]
    for ckpt, freeze, accum in itertools.product((False, True), (False, True), (1, 4)):
        if ckpt or freeze or accum > 1:
            lv = dataclasses.replace(default, checkpoint=ckpt, freeze_embedding=freeze, grad_accum=accum)
            rows.append(("default + " + lv.name(lv.options()), lv))
    before, _ = peak_of(estimate(config, settings, B, T, n, BEFORE)[2])
    base, _ = peak_of(estimate(config, settings, B, T, n, default)[2])
    print(f"\nwhat each lever saves (estimated, batch {B}, length {T}; GB = 1e9 bytes). Peak: the highest of the "
          "three phases;\nsaves: peak against the code before (a lever that lowers another phase than the highest "
          "saves nothing alone);\nvs default: against this hyperdas.py without options "
          f"({default.name(default.code())}).")
    print(f"  {'setting':<62} {'forward':>8} {'backward':>9} {'optimizer':>10} {'peak':>7} {'saves':>7} "
          f"{'vs default':>10}")
    results = []
    for label, lv in rows:
        p = estimate(config, settings, B, T, n, lv)[2]
        peak, _ = peak_of(p)
        results.append((label, lv, peak))
        print(f"  {label:<62} {p['forward'] / GB:8.1f} {p['backward'] / GB:9.1f} {p['optimizer'] / GB:10.1f} "
              f"{peak / GB:7.1f} {(before - peak) / GB:7.1f} {(base - peak) / GB:10.1f}")
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=targets.MODELS, default="llama3-8b", help="a published target shape")
    p.add_argument("--config", help="a local config.json (or its folder) instead of --model")
    p.add_argument("--blocks", type=int, help="hypernetwork blocks (default: hyperdas.settings_for the target)")
    p.add_argument("--batch", type=int, default=16, help="examples per optimizer step")
    p.add_argument("--length", type=int, default=50, help="tokens per base and source prompt")
    p.add_argument("--instruction_length", type=int,
                   help="tokens per instruction (default: --length, as issue 13 asks; RAVEL's are ~10)")
    p.add_argument("--checkpoint_blocks", action="store_true", help="activation checkpointing of the blocks")
    p.add_argument("--freeze_embedding", action="store_true", help="no gradient for the embedding copy")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--no_measure", action="store_true", help="estimate only, even with CUDA")
    p.add_argument("--check_on_cpu", action="store_true", help="also compare the activation formulas with the "
                   "tensors autograd saves in a small CPU forward (about 10 s)")
    args = p.parse_args()
    name = args.config or args.model
    config = targets.read_config(args.config) if args.config else targets.make_config(targets.MODELS[args.model])
    settings, why = H.settings_for(config)
    if args.blocks:
        settings["num_blocks"] = args.blocks
    B, T, n = args.batch, args.length, args.instruction_length or args.length
    features = targets.code_features()
    print(f"{name}: {config.num_hidden_layers} layers, d {config.hidden_size}, {config.num_attention_heads}/"
          f"{config.num_key_value_heads} heads, vocab {config.vocab_size}; layer {settings['layer']}, "
          f"k {settings['feature_dim']}, {settings['num_blocks']} blocks ({why}); batch {B}, length {T}, "
          f"instruction {n}")
    print("this hyperdas.py: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in features.items()))
    # The requested run, as this code would do it on a GPU (its attention and optimizer, the flags given).
    default = Levers(grouped_kv=features["grouped_kv"], one_cast=features["one_cast"], fused=features["fused_adamw"])
    lv = dataclasses.replace(default, checkpoint=args.checkpoint_blocks, freeze_embedding=args.freeze_embedding,
                             grad_accum=args.grad_accum)
    params, act, phases = estimate(config, settings, B, T, n, lv)
    parts = params["parts"]
    print(f"\ntrainable parameters (levers: {lv.name()})")
    for part, _ in PARTS:
        extra = f"  ({len(params['block_params'])} x {params['block_params'][0] / 1e6:,.1f} M + final norm)" \
            if part == "blocks" else ""
        print(f"  {part:<14} {parts[part]['trainable'] / 1e6:10,.1f} M{extra}")
    print(f"  {'total':<14} {params['trainable'] / 1e6:10,.1f} M    "
          f"(target: {params['target_parameters'] / 1e9:.2f} B, frozen)")
    print(f"\nbytes (GB = 1e9)")
    rows = [("fp32 weights and buffers (hypernetwork)", params["weight_bytes"]), ("fp32 gradients", phases["grads"]),
            ("AdamW moments (2 x fp32)", phases["moments"]), ("bf16 target", params["target_bytes"]),
            ("bf16 autocast weight copies", phases["casts"]),
            (f"optimizer temporaries ({'fused: none' if lv.fused else 'foreach: one param-sized copy'})",
             phases["optimizer_temporaries"])]
    for label, value in rows:
        print(f"  {label:<52} {value / GB:7.2f}")
    micro = math.ceil(B / lv.grad_accum)
    print(f"  activations, estimated (micro-batch {micro}, length {T}, instruction {n}):")
    for part, value in act.items():
        label = "one block, for recompute" if part == "block" else part
        if part != "block" or lv.checkpoint:
            print(f"    {label:<50} {value / GB:7.2f}")
    print(f"  phases: end of forward {phases['forward'] / GB:.1f}, backward {phases['backward'] / GB:.1f}, "
          f"optimizer step {phases['optimizer'] / GB:.1f}")
    peak, phase = peak_of(phases)
    print(f"  estimated peak {peak / GB:.1f} GB, at the {phase} phase")

    if args.check_on_cpu:
        check_on_cpu(dataclasses.replace(lv, checkpoint=False, grad_accum=1))
    results = lever_table(config, settings, B, T, n, default)
    # The combinations on top of the default that fit in 64 GB, fewest levers first, then the lowest peak.
    extra = lambda lv_: lv_.checkpoint + lv_.freeze_embedding + (lv_.grad_accum > 1)
    fits = sorted((extra(lv_), peak_, label_) for label_, lv_, peak_ in results
                  if label_.startswith("default") and peak_ <= 64 * GB)
    if fits:
        print(f"\n<= 64 GB: {fits[0][2]} ({fits[0][1] / GB:.1f} GB) is the fewest-lever combination that fits")
    else:
        print("\nno combination in the table reaches 64 GB")

    label = "estimated"
    if torch.cuda.is_available() and not args.no_measure:
        print(f"\nmeasuring on {torch.cuda.get_device_name(0)} (random bf16 target, fp32 hypernetwork, 3 steps)")
        d = config.hidden_size
        dh = getattr(config, "head_dim", None) or d // config.num_attention_heads
        tk = T * (config.num_hidden_layers + 1)
        probe = sdpa_probe(math.ceil(B / args.grad_accum), n, tk, config.num_attention_heads,
                           config.num_key_value_heads, dh)
        kernel = {True: "yes", False: "no (the estimate's mask bias and logsumexp would not hold)"}
        print(f"one masked cross-attention ({n} queries x {tk} items), forward + backward, above its inputs: "
              f"repeat_interleave {probe['repeat_interleave'] / GB:.2f} GB, folded query groups "
              f"{probe['folded'] / GB:.2f} GB; outputs and gradients differ by at most "
              f"{probe['max_difference']:.2g} (bf16); "
              f"the efficient kernel takes the folded form: {kernel[probe['efficient_kernel']]}")
        try:
            estimated = peak
            peak, held = measure(config, settings, B, T, n, args.checkpoint_blocks, args.freeze_embedding,
                                 args.grad_accum)
            print(f"measured: {held / GB:.2f} GB held after building (estimated "
                  f"{(params['weight_bytes'] + params['target_bytes']) / GB:.2f}), peak {peak / GB:.2f} GB "
                  f"(estimated {estimated / GB:.2f})")
            label = "measured"
        except torch.cuda.OutOfMemoryError as err:
            print(f"measured: out of memory ({str(err).splitlines()[0]}); the line below is the estimate")
    print(f"{name}, {settings['num_blocks']} blocks, batch {B}: {params['trainable'] / 1e9:.3f} B trainable, "
          f"peak {peak / GB:.1f} GB ({label})")


if __name__ == "__main__":
    main()
