"""HyperDAS: a transformer hypernetwork that finds and patches concepts in a frozen language model.

Sun et al., "HyperDAS: Towards Automating Mechanistic Interpretability with Hypernetworks", ICLR 2025.

Given a concept ("the country of a city"), a base prompt ("Vienna is in") and a counterfactual prompt
("I love Paris"), the hypernetwork reads both prompts' hidden states and
  (1) encodes the concept instruction while cross-attending to the two prompts,
  (2) chooses which source token positions to write into which base token positions,
  (3) builds an orthonormal subspace of the residual stream for the concept, and
  (4) performs an interchange intervention there: base states take the source's values inside the
      subspace and keep their own outside it.
It is trained so the model's answer changes exactly as the counterfactual says (cause) and nothing
else changes (isolate). The file follows that order: configuration, target model access, the
hypernetwork's parts, steps 2-4, loss, training, evaluation, the `HyperDAS` class, the DAS baseline,
and the command line. Importing it has no side effects.
"""
import argparse
import contextlib
import json
import math
import os
import random
import string
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class HyperDASConfig:
    layer: int = 15                 # intervene on hidden_states[layer], the stream entering decoder layer `layer`
    feature_dim: int = 128          # k: dimension of the concept subspace
    num_blocks: int = 8             # N: hypernetwork decoder blocks
    init_from_target: bool = True   # blocks start as copies of the target's first N layers (else random)
    lr: float = 2e-5                # hypernetwork learning rate
    basis_lr: float = 1e-3          # learning rate of the shared orthonormal basis (never weight-decayed)
    weight_decay: float = 0.01
    grad_clip: float = 4.0
    causal_weight: float = 3.5      # loss weight of cause examples (the answer must change)
    isolate_weight: float = 0.5     # loss weight of isolate examples (the answer must not change)
    sparsity_start: float = 0.15    # source-selection sparsity weight: 0 during the warm-up fraction of
    sparsity_end: float = 1.5       # the steps, then the linear ramp start -> end over all steps
    sparsity_warmup: float = 0.5
    bidding_threshold: float = 0.1  # a source token must beat max(keep share, threshold) in one-to-one mode
    eval_tokens: int = 3            # exact match is judged on the first 3 answer tokens
    instruction_template: str = "{base} ; {source} - {attribute}"
    seed: int = 0


# Settings per target model. "llama3-8b" is the paper's; the others are scaled to the model's depth.
# "toy": lr 1e-3 at batch 16 beat 3e-4 at batch 32 (which ended still recovering from the sparsity loss's
# switch-on) on four of the five toy domains; city does better at 5e-4 (README, "Choosing the preset").
PRESETS = {
    "llama3-8b": dict(layer=15, feature_dim=128, num_blocks=8, lr=2e-5, epochs=3, batch_size=16),
    "tinyllama": dict(layer=10, feature_dim=64, num_blocks=4, lr=3e-5, epochs=3, batch_size=16),
    "toy": dict(layer=2, feature_dim=16, num_blocks=2, lr=1e-3, epochs=5, batch_size=16),
}

SIZES = {"train": 6000, "test": 2000}   # RAVEL pairs generated per split before the model filter

MODES = ("soft", "one_to_many", "one_to_one")   # the paper's Soft / One-to-Many / One-to-One

# ----------------------------------------------------------------------------------------------------
# Target model access: load, tokenize, hidden states, and the one hook we place.


def load_target(name_or_path, device=None):
    """Load a Hugging Face causal LM (bf16 on GPU, fp32 on CPU) and its tokenizer; freeze the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device)
    return freeze(model), AutoTokenizer.from_pretrained(name_or_path)


def freeze(model):
    model.eval()
    model.requires_grad_(False)
    return model


def decoder_layers(model):
    """The target's list of decoder layers (Llama, Mistral, Qwen, Gemma keep them at model.model.layers)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"Cannot find the decoder layers of {type(model).__name__}: HyperDAS supports models "
                     "that keep them at model.model.layers (Llama, TinyLlama, Llama-3, Mistral, Qwen).")


def check_layer(model, layer):
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise ValueError(f"layer={layer} is out of range: this model has {n} decoder layers, so the residual "
                         f"stream hidden_states[layer] can be patched for 0 <= layer <= {n - 1}.")


@contextlib.contextmanager
def patch_layer(model, layer, fn):
    """Inside the block, every forward uses fn(h) in place of h = hidden_states[layer] (the output of
    decoder layer layer-1, or of the embeddings for layer 0). The hook is removed on exit, also on errors."""
    check_layer(model, layer)
    module = model.get_input_embeddings() if layer == 0 else decoder_layers(model)[layer - 1]

    def hook(module, args, output):
        # Llama layers return a bare tensor in transformers 5 and a tuple in 4.x: return a new value,
        # never edit output[0] in place (on a bare tensor that would silently be batch row 0).
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def answer_separator(prompt):
    """The official space rule: a space before the answer unless the prompt ends in whitespace, " ' or (."""
    return "" if not prompt or prompt[-1].isspace() or prompt[-1] in "\"'(" else " "


def tokenize(tokenizer, prompts, answers=None, visible_chars=None):
    """BOS + prompt [+ separator + answer] for each row, left-padded into one batch.

    BOS is added by hand exactly once (tokenizers that add their own would give two; official bug).
    `visible` marks the tokens the hypernetwork may read and intervene on: BOS and the first
    visible_chars[i] characters of the prompt (the whole prompt by default). `labels` is -100 except on
    the answer tokens. Boundaries come from tokenizing the prompt pieces the way they occur in the text."""
    texts = list(prompts) if answers is None else [p + answer_separator(p) + a for p, a in zip(prompts, answers)]
    visible_parts = list(prompts) if visible_chars is None else [p[:n] for p, n in zip(prompts, visible_chars)]
    encode = lambda strings: tokenizer(strings, add_special_tokens=False)["input_ids"]
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rows = [bos + ids for ids in encode(texts)]
    n_prompt = [len(bos) + len(ids) for ids in encode(list(prompts))]
    n_visible = [len(bos) + len(ids) for ids in encode(visible_parts)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    B, T = len(rows), max(len(r) for r in rows)
    out = dict(input_ids=torch.full((B, T), pad), attention_mask=torch.zeros(B, T, dtype=torch.long),
               visible=torch.zeros(B, T, dtype=torch.bool), labels=torch.full((B, T), -100))
    for i, ids in enumerate(rows):
        start = T - len(ids)                                           # left padding
        out["input_ids"][i, start:] = torch.tensor(ids)
        out["attention_mask"][i, start:] = 1
        out["visible"][i, start:start + n_visible[i]] = True
        out["labels"][i, start + n_prompt[i]:] = out["input_ids"][i, start + n_prompt[i]:]
    out["position_ids"] = (out["attention_mask"].cumsum(1) - 1).clamp(min=0)   # explicit, since left-padded
    return out


def answer_correct(logits, labels, first_n=None):
    """Teacher-forced exact match per row: argmax at t-1 equals the label at t for every answer token
    (only the first `first_n`). logits may cover just the last k positions of the sequence: [B, k, V]."""
    k = logits.shape[1]
    target = labels[:, labels.shape[1] - k + 1:]                          # [B, k-1]
    is_answer = target != -100
    if first_n is not None:
        is_answer &= is_answer.cumsum(1) <= first_n
    return ((logits[:, :-1].argmax(-1) == target) | ~is_answer).all(1)    # [B]


def target_inputs(enc):
    return {k: enc[k] for k in ("input_ids", "attention_mask", "position_ids")}


@torch.no_grad()
def hidden_states(model, enc):
    """All hidden states of one unintervened pass: [B, T, n_layers+1, d]. Index 0 is the embeddings."""
    out = model(**target_inputs(enc), output_hidden_states=True, logits_to_keep=1)
    return torch.stack(out.hidden_states, dim=2)


# ----------------------------------------------------------------------------------------------------
# The hypernetwork's parts: the target's own building blocks (RMSNorm, rotary positions, grouped-query
# attention, SwiGLU), written out so that no transformers internals are needed.


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary(x, pos, theta):
    """Rotary position embedding in the Llama (rotate-half) layout. x: [B, H, T, dh], pos: [B, T].
    Rope scaling (Llama-3) is left out: it only changes wavelengths far longer than our prompts."""
    dh = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh)
    angle = pos[:, None, :, None].float() * inv_freq                      # [B, 1, T, dh/2]
    cos, sin = angle.cos().repeat(1, 1, 1, 2), angle.sin().repeat(1, 1, 1, 2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention with rotary positions; `mask` [B, Tq, Tk] says who may attend to whom."""

    def __init__(self, d, n_heads, n_kv_heads, head_dim, theta):
        super().__init__()
        self.h, self.h_kv, self.dh, self.theta = n_heads, n_kv_heads, head_dim, theta
        self.q_proj = nn.Linear(d, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d, bias=False)

    def forward(self, x, x_pos, memory, memory_pos, mask):
        B, Tq, Tk = x.shape[0], x.shape[1], memory.shape[1]
        q = self.q_proj(x).view(B, Tq, self.h, self.dh).transpose(1, 2)            # [B, H, Tq, dh]
        k = self.k_proj(memory).view(B, Tk, self.h_kv, self.dh).transpose(1, 2)    # [B, Hkv, Tk, dh]
        v = self.v_proj(memory).view(B, Tk, self.h_kv, self.dh).transpose(1, 2)
        q, k = rotary(q, x_pos, self.theta), rotary(k, memory_pos, self.theta)
        k, v = (t.repeat_interleave(self.h // self.h_kv, dim=1) for t in (k, v))  # [B, H, Tk, dh]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])     # [B, H, Tq, dh]
        return self.o_proj(out.transpose(1, 2).reshape(B, Tq, self.h * self.dh))


class MLP(nn.Module):
    def __init__(self, d, d_ff, d_out=None):
        super().__init__()
        self.gate_proj = nn.Linear(d, d_ff, bias=False)
        self.up_proj = nn.Linear(d, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_out or d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One hypernetwork block (official order): causal self-attention over the instruction,
    cross-attention to the source's hidden states, cross-attention to the base's, then the MLP."""

    def __init__(self, d, n_heads, n_kv_heads, head_dim, d_ff, theta, eps):
        super().__init__()
        attention = lambda: Attention(d, n_heads, n_kv_heads, head_dim, theta)
        self.self_norm, self.self_attn = RMSNorm(d, eps), attention()
        self.source_norm, self.source_attn = RMSNorm(d, eps), attention()
        self.base_norm, self.base_attn = RMSNorm(d, eps), attention()
        self.mlp_norm, self.mlp = RMSNorm(d, eps), MLP(d, d_ff)

    def forward(self, h, pos, self_mask, source, base):
        x = self.self_norm(h)
        h = h + self.self_attn(x, pos, x, pos, self_mask)
        h = h + self.source_attn(self.source_norm(h), pos, *source)
        h = h + self.base_attn(self.base_norm(h), pos, *base)
        return h + self.mlp(self.mlp_norm(h))

    def copy_from(self, layer):
        """Start from a target decoder layer; both cross-attentions are clones of its self-attention."""
        weights = {k: v.detach().float() for k, v in layer.state_dict().items()}
        for attn, norm in ((self.self_attn, self.self_norm), (self.source_attn, self.source_norm),
                           (self.base_attn, self.base_norm)):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(attn, name).weight.data.copy_(weights[f"self_attn.{name}.weight"])
            norm.weight.data.copy_(weights["input_layernorm.weight"])
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(self.mlp, name).weight.data.copy_(weights[f"mlp.{name}.weight"])
        self.mlp_norm.weight.data.copy_(weights["post_attention_layernorm.weight"])


def memory(states, visible):
    """Step 1's view of a prompt: every visible token at every layer, unit-normalised as in the official
    code, flattened token-major to [B, T*(n_layers+1), d]; rotary positions number the visible items."""
    B, T, L1, d = states.shape
    items = F.normalize(states.float(), dim=-1).reshape(B, T * L1, d)
    seen = visible[:, :, None].expand(B, T, L1).reshape(B, T * L1)
    return items, (seen.cumsum(1) - 1).clamp(min=0), seen


# ----------------------------------------------------------------------------------------------------
# Step 2 (paper Fig. 1): pairwise token-position selection.


class TokenSelector(nn.Module):
    """Scores every (source token i, base token j) pair, plus a "keep base" row, from the instruction.

    Official head: key_ij = k_proj(W [h_base_j ; h_source_i]) and score = q . key_ij. Being linear, that
    score splits into f(j) + g(i), so after the softmax over i every base position gets the same
    distribution over source tokens (only rotary positions over the pair's flattened index broke this).
    Here the pair key has a nonlinearity, silu(W_s h_source_i + W_b h_base_j), so the choice of source
    token can depend on the base position. The keep row uses a learned vector in place of a source
    token. Cost is one [B, Ts+1, Tb, P] tensor; the [B, Ts, Tb, 2d] concatenation is never built."""

    def __init__(self, d, pair_dim):
        super().__init__()
        self.query = nn.Linear(d, pair_dim, bias=False)
        self.base_key = nn.Linear(d, pair_dim, bias=False)
        self.source_key = nn.Linear(d, pair_dim, bias=False)
        self.keep_key = nn.Parameter(torch.zeros(pair_dim))
        for w in (self.query.weight, self.base_key.weight, self.source_key.weight, self.keep_key):
            nn.init.normal_(w, std=0.02)    # the init the official head actually ran with

    def forward(self, instruction, h_base, base_visible, h_source, source_visible):
        B, Ts = h_source.shape[:2]
        q = self.query(instruction)                                                   # [B, P]
        rows = torch.cat((self.source_key(h_source), self.keep_key.expand(B, 1, -1)), 1)  # [B, Ts+1, P]
        pairs = F.silu(rows[:, :, None, :] + self.base_key(h_base)[:, None, :, :])    # [B, Ts+1, Tb, P]
        scores = torch.einsum("bijp,bp->bij", pairs, q).float() / math.sqrt(q.shape[-1])  # [B, Ts+1, Tb]
        row_ok = torch.cat((source_visible, source_visible.new_ones(B, 1)), 1)        # [B, Ts+1]
        allowed = row_ok[:, :, None] & base_visible[:, None, :]
        allowed[:, Ts] = True                     # an invisible base position keeps itself entirely
        return scores.masked_fill(~allowed, float("-inf")).softmax(dim=1)            # columns sum to 1


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}: choose one of {', '.join(MODES)}.")
    return mode


def harden(weights, mode, threshold=0.1):
    """Inference modes. weights: [B, Ts+1, Tb], columns sum to 1, last row = keep base.
    one_to_many: each base position takes its argmax row (several may copy one source token).
    one_to_one: each source token bids on its best base position; a bid wins a column if it beats the
    keep share floored at `threshold`, so every source token lands in at most one base position."""
    if check_mode(mode) == "soft":
        return weights
    rows, cols = weights.shape[1], weights.shape[2]
    if mode == "one_to_one":
        source = weights[:, :-1]
        bids = source * F.one_hot(source.argmax(2), cols).to(source.dtype)            # [B, Ts, Tb]
        weights = torch.cat((bids, weights[:, -1:].clamp(min=threshold)), 1)          # [B, Ts+1, Tb]
    return F.one_hot(weights.argmax(1), rows).transpose(1, 2).to(weights.dtype)       # [B, Ts+1, Tb]


# ----------------------------------------------------------------------------------------------------
# Step 3 (paper Fig. 1): the concept's orthonormal subspace ("ReflectSelect").


def orthonormal_basis(d, k):
    """A learnable d x k matrix with orthonormal columns: orthogonally initialised (the official code
    started from uninitialised memory) and kept orthonormal by torch's parametrization. Never decay it."""
    layer = nn.Linear(k, d, bias=False)                                               # weight: [d, k]
    nn.init.orthogonal_(layer.weight)
    return nn.utils.parametrizations.orthogonal(layer)


def reflect(basis, v):
    """(I - 2 v v^T) R for a unit vector v per example, computed as R - 2 v (v^T R): O(B d k) work,
    where the official code built B dense d x d matrices. basis: [d, k], v: [B, d] -> [B, d, k]."""
    return basis - 2 * v[:, :, None] * (v[:, None, :] @ basis)


class SubspaceHead(nn.Module):
    def __init__(self, d, k, d_ff, eps):
        super().__init__()
        self.norm, self.mlp = RMSNorm(d, eps), MLP(d, d_ff)
        self.basis = orthonormal_basis(d, k)

    def forward(self, instruction):
        v = F.normalize(self.mlp(self.norm(instruction)).float(), dim=-1)           # [B, d]
        return reflect(self.basis.weight, v)                                          # [B, d, k]


# ----------------------------------------------------------------------------------------------------
# Step 4 (paper Fig. 1): the interchange intervention.


def interchange(h_base, h_source, weights, basis):
    """h_b,j + W W^T (sum_i A_ij h_s,i + A_keep,j h_b,j - h_b,j) for every base position j.
    h_base [B, Tb, d], h_source [B, Ts, d], weights A [B, Ts+1, Tb], basis W [B, d, k] -> [B, Tb, d].
    Computed in fp32 whatever the model's dtype (a bf16 projection drifts from orthonormal)."""
    with torch.autocast(h_base.device.type, enabled=False):
        hb, W, A = h_base.float(), basis.float(), weights.float()
        mix = torch.einsum("bij,bid->bjd", A[:, :-1], h_source.float()) + A[:, -1, :, None] * hb  # [B, Tb, d]
        return (hb + ((mix - hb) @ W) @ W.transpose(1, 2)).to(h_base.dtype)                      # [B, Tb, d]


# ----------------------------------------------------------------------------------------------------
# Step 1 and the whole hypernetwork.


class HyperNetwork(nn.Module):
    """Instruction tokens -> N blocks (reading both prompts) -> selection weights and concept basis."""

    def __init__(self, target, cfg):
        super().__init__()
        tc = target.config
        d, heads, kv_heads = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads
        head_dim = getattr(tc, "head_dim", None) or d // heads
        theta = (getattr(tc, "rope_parameters", None) or {}).get("rope_theta", getattr(tc, "rope_theta", 1e4))
        self.layer = cfg.layer
        self.embed = nn.Embedding(tc.vocab_size, d)   # the hypernetwork's own trainable copy
        self.blocks = nn.ModuleList(Block(d, heads, kv_heads, head_dim, tc.intermediate_size, theta,
                                          tc.rms_norm_eps) for _ in range(cfg.num_blocks))
        self.norm = RMSNorm(d, tc.rms_norm_eps)
        self.selector = TokenSelector(d, d)
        self.subspace = SubspaceHead(d, cfg.feature_dim, tc.intermediate_size, tc.rms_norm_eps)
        if cfg.init_from_target:
            if cfg.num_blocks > len(decoder_layers(target)):
                raise ValueError(f"num_blocks={cfg.num_blocks} exceeds the target's {len(decoder_layers(target))} "
                                 "layers to copy from; use fewer blocks or init_from_target=False.")
            self.embed.weight.data.copy_(target.get_input_embeddings().weight.detach().float())
            for block, layer in zip(self.blocks, decoder_layers(target)):
                block.copy_from(layer)

    def encode(self, instruction, base, source):
        """Step 1: the instruction's states after N blocks reading the prompts, [B, n, d]."""
        ids, mask = instruction["input_ids"], instruction["attention_mask"].bool()
        n = ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        # Always causal, padded or not (the official mask vanished for unpadded batches); every row
        # may see itself, so left-pad rows stay finite.
        self_mask = (causal & mask[:, None, :]) | torch.eye(n, dtype=torch.bool, device=ids.device)
        as_cross = lambda items, pos, seen: (items, pos, seen[:, None, :].expand(-1, n, -1))
        h = self.embed(ids)                                                            # [B, n, d]
        for block in self.blocks:
            h = block(h, instruction["position_ids"], self_mask, as_cross(*source), as_cross(*base))
        return self.norm(h)

    def forward(self, instruction, base_states, base_visible, source_states, source_visible):
        """instruction: tokenize() output [B, n]; *_states: [B, T, n_layers+1, d] from hidden_states()."""
        h = self.encode(instruction, memory(base_states, base_visible), memory(source_states, source_visible))
        last = h[:, -1]                         # [B, d]: the last instruction token (left padding)
        unit = lambda states: F.normalize(states[:, :, self.layer].float(), dim=-1)  # layer-L states
        weights = self.selector(last, unit(base_states), base_visible, unit(source_states), source_visible)
        return weights, self.subspace(last)     # [B, Ts+1, Tb], [B, d, k]


# ----------------------------------------------------------------------------------------------------
# Loss and schedule (official: causal 3.5, isolate 0.5; sparsity off for half the steps, then a ramp).


def prediction_loss(logits, labels, is_causal, causal_weight, isolate_weight):
    """Teacher-forced cross-entropy on all answer tokens, each example weighted by its kind, averaged
    over answer tokens. logits cover the last k positions: [B, k, V]."""
    k = logits.shape[1]
    target = labels[:, labels.shape[1] - k + 1:]                                     # [B, k-1]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100, reduction="none")
    weight = torch.where(is_causal, causal_weight, isolate_weight)[:, None] * (target != -100)
    return (ce * weight).sum() / (target != -100).sum()


def sparsity_loss(weights):
    """Penalise source tokens whose total weight over base positions exceeds 1. The official loss adds
    the whole row sum; relu(sum - 1) has the same gradient and no jump at 1."""
    return F.relu(weights[:, :-1].sum(-1) - 1).sum(-1).mean()


def sparsity_weight(step, total, cfg):
    if step < int(cfg.sparsity_warmup * total):
        return 0.0
    return cfg.sparsity_start + (cfg.sparsity_end - cfg.sparsity_start) * step / total


def scores(examples, correct):
    """cause / isolate accuracy and disentangle = their mean, overall and per intervened attribute."""
    def summary(rows):
        cause = [c for e, c in rows if e["attribute_type"] == "causal"]
        iso = [c for e, c in rows if e["attribute_type"] != "causal"]
        mean = lambda xs: sum(xs) / len(xs) if xs else None
        parts = [x for x in (mean(cause), mean(iso)) if x is not None]
        return {"cause": mean(cause), "isolate": mean(iso), "disentangle": mean(parts), "n": len(rows)}
    rows = list(zip(examples, (bool(c) for c in correct)))
    per_attribute = {}
    for e, c in rows:
        per_attribute.setdefault(concept_of(e), []).append((e, c))
    return {**summary(rows), "per_attribute": {a: summary(r) for a, r in sorted(per_attribute.items())}}


def concept_of(example):
    """The intervened attribute: the instruction's last field (for isolate rows it is not `attribute`)."""
    return example["edit_instruction"].rsplit(" - ", 1)[-1]


def ravel_examples(domain, split, model, tokenizer, n=None, seed=0):
    """Generate `n` RAVEL pairs of a domain (default: SIZES, per domain for "all") and keep those whose
    label the unintervened target reproduces on verify_text (the paper's filter). A toy target draws
    pairs only from the entities and attributes it was taught."""
    import ravel_data
    n = n or SIZES[split] * (len(ravel_data.DOMAINS) if domain == "all" else 1)
    world = getattr(model.config, "toy_world", None) or {}
    taught = None if domain == "all" else world.get("attributes")   # the all world knows each domain's defaults
    if isinstance(taught, dict):        # the all world asked for one domain: {domain: attributes}
        taught = taught.get(domain)
    pairs = ravel_data.make_examples(domain, split, n, seed, attributes=taught,
                                     entities=world.get("entities"), isolate_attributes=taught)
    return ravel_data.filter_examples(pairs, model, tokenizer)


def atomic_write(path, write):
    tmp = Path(f"{path}.tmp")
    write(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# The user API.


class HyperDAS:
    """A trainable HyperDAS around a frozen causal LM.

    hd = HyperDAS(model=model, tokenizer=tokenizer, layer=15, feature_dim=128, num_blocks=8)
    hd.train(train_examples, epochs=5, batch_size=32); hd.evaluate(test_examples, mode="soft")"""

    method = "hyperdas"

    def __init__(self, model, tokenizer, **config):
        unknown = set(config) - {f.name for f in fields(HyperDASConfig)}
        if unknown:
            raise TypeError(f"Unknown HyperDAS option(s) {sorted(unknown)}; see HyperDASConfig.")
        self.cfg = HyperDASConfig(**config)
        self.model, self.tokenizer = freeze(model), tokenizer
        self.device = next(model.parameters()).device
        check_layer(model, self.cfg.layer)
        d = model.config.hidden_size
        if not 1 <= self.cfg.feature_dim <= d:
            raise ValueError(f"feature_dim={self.cfg.feature_dim} must be between 1 and the hidden size {d}.")
        torch.manual_seed(self.cfg.seed)
        self.net = self.build().to(self.device)      # fp32 master weights, also for a bf16 target
        self.step, self.history = 0, []

    def build(self):
        return HyperNetwork(self.model, self.cfg)

    # -- turning examples into tensors and running the method ------------------------------------

    def instruction(self, base, source, attribute):
        values = dict(base=base, source=source, attribute=attribute)
        needed = {name for _, name, _, _ in string.Formatter().parse(self.cfg.instruction_template) if name}
        missing = sorted(n for n in needed if values.get(n) is None)
        if missing:
            raise ValueError(f"The instruction template {self.cfg.instruction_template!r} needs {missing}: pass "
                             "base_entity= and source_entity= (or use a template without them).")
        return self.cfg.instruction_template.format(**values)

    def collate(self, examples):
        """Examples with the official fields -> tokenized base (with its answer), source and instruction."""
        e = examples
        prompts = [x["input_prefix"] + x["input_suffix"] for x in e]
        answers = [x["counterfactual_target"] if x["attribute_type"] == "causal" else x["target"] for x in e]
        # The hypernetwork sees BOS + prefix (which ends with the entity); suffix and answer stay hidden.
        base = tokenize(self.tokenizer, prompts, answers, [len(x["input_prefix"]) for x in e])
        source = tokenize(self.tokenizer, [x["counterfactual_input_prefix"] + x["counterfactual_input_suffix"] for x in e],
                          visible_chars=[len(x["counterfactual_input_prefix"]) for x in e])
        concepts = [concept_of(x) for x in e]
        instruction = tokenize(self.tokenizer, [self.instruction(x["entity"], x["counterfactual_entity"], c)
                                                for x, c in zip(e, concepts)])
        is_causal = torch.tensor([x["attribute_type"] == "causal" for x in e])
        return self.batch(base, source, instruction, concepts, is_causal)

    def batch(self, base, source, instruction, concepts, is_causal=None):
        to = lambda d: {k: v.to(self.device) for k, v in d.items()}
        return dict(base=to(base), source=to(source), instruction=to(instruction), concepts=concepts,
                    is_causal=None if is_causal is None else is_causal.to(self.device))

    def plan(self, batch):
        """Steps 1-3: read both prompts, return selection weights [B, Ts+1, Tb], basis [B, d, k] and the
        source's layer-L states [B, Ts, d], all from one unintervened pass per prompt."""
        base, source = batch["base"], batch["source"]
        base_states, source_states = hidden_states(self.model, base), hidden_states(self.model, source)
        weights, basis = self.net(batch["instruction"], base_states, base["visible"], source_states, source["visible"])
        return weights, basis, source_states[:, :, self.cfg.layer]

    def intervened_logits(self, base, weights, basis, h_source, keep=None):
        """Step 4: the base forward with the interchange at hidden_states[layer]; logits of the last
        `keep` positions (the answer's predictions) only, which skips most of the LM head."""
        with patch_layer(self.model, self.cfg.layer, lambda h: interchange(h, h_source, weights, basis)):
            return self.model(**target_inputs(base), logits_to_keep=keep or 0).logits

    def forward(self, examples, mode="soft"):
        batch = self.collate(examples)
        with self.autocast():
            weights, basis, h_source = self.plan(batch)
            weights = harden(weights, mode, self.cfg.bidding_threshold)
            keep = int((batch["base"]["labels"] != -100).sum(1).max()) + 1
            logits = self.intervened_logits(batch["base"], weights, basis, h_source, keep)
        return logits, batch["base"]["labels"], batch["is_causal"], weights

    def autocast(self):
        # bf16 matmuls on GPU with fp32 master weights; plain fp32 on CPU, where bf16 is 20-45x slower.
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    # -- training --------------------------------------------------------------------------------

    def parameters(self):
        return [p for p in self.net.parameters() if p.requires_grad]

    def optimizer(self):
        # Every orthogonally parametrised basis: its Householder diagonal is read through .int(), so any
        # weight decay would shrink it to 0 and silently delete basis columns.
        basis = {id(p) for name, p in self.net.named_parameters() if "parametrizations." in name}
        groups = [dict(params=[p for p in self.parameters() if id(p) in basis], lr=self.cfg.basis_lr, weight_decay=0.0),
                  dict(params=[p for p in self.parameters() if id(p) not in basis], lr=self.cfg.lr,
                       weight_decay=self.cfg.weight_decay)]
        return torch.optim.AdamW([g for g in groups if g["params"]])

    def train(self, data, epochs=5, batch_size=32, eval_data=None, eval_every=0, out_dir=None, save_every=0,
              progress=True):
        """Train on a list of examples (or a RAVEL domain name). With out_dir, checkpoints are written
        every `save_every` steps and at the end, and an interrupted run resumes from the last one."""
        examples = self.examples(data, "train")
        if not examples:
            raise ValueError("No training examples: check the data (and the model filter, if used).")
        steps_per_epoch = math.ceil(len(examples) / batch_size)
        total = epochs * steps_per_epoch
        opt = self.optimizer()
        if out_dir and (Path(out_dir) / "optimizer.safetensors").exists():
            self.load_training_state(out_dir, opt)
        self.net.train()
        bar = tqdm(range(self.step, total), initial=self.step, total=total, disable=not progress, desc="train")
        for step in bar:
            epoch, i = divmod(step, steps_per_epoch)
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            batch = [examples[j] for j in order[i * batch_size:(i + 1) * batch_size]]
            logits, labels, is_causal, weights = self.forward(batch)
            prediction = prediction_loss(logits, labels, is_causal, self.cfg.causal_weight, self.cfg.isolate_weight)
            w_sparse = sparsity_weight(step, total, self.cfg)
            sparse = sparsity_loss(weights)
            loss = prediction + w_sparse * sparse
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.step = step + 1
            record = dict(step=self.step, loss=loss.item(), prediction=prediction.item(), sparsity=sparse.item(),
                          sparsity_weight=w_sparse)
            if eval_data is not None and eval_every and self.step % eval_every == 0:
                record["eval"] = self.evaluate(eval_data, progress=False)
                self.net.train()
            self.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if out_dir and ((save_every and self.step % save_every == 0) or self.step == total):
                self.save(out_dir, opt)
        self.net.eval()
        return self.history

    def examples(self, data, split):
        if isinstance(data, str):
            return ravel_examples(data, split, self.model, self.tokenizer, seed=self.cfg.seed)
        return list(data)

    # -- evaluation --------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, data, mode="soft", batch_size=32, progress=True):
        """Teacher-forced exact match of the first `eval_tokens` answer tokens under the intervention:
        {'cause', 'isolate', 'disentangle', 'n', 'per_attribute': {attribute: {...}}}."""
        examples = self.examples(data, "test")
        return scores(examples, self.correct(examples, mode, batch_size, progress))

    @torch.no_grad()
    def correct(self, examples, mode="soft", batch_size=32, progress=False):
        """Per example: does the intervened model produce its label? In input order, so a short last
        batch cannot be mapped to the wrong rows (an official evaluation bug)."""
        check_mode(mode)
        self.net.eval()
        result = []
        for i in tqdm(range(0, len(examples), batch_size), disable=not progress, desc=f"eval {mode}"):
            logits, labels, _, _ = self.forward(examples[i:i + batch_size], mode)
            result += answer_correct(logits, labels, self.cfg.eval_tokens).tolist()
        return result

    @torch.no_grad()
    def intervene(self, base_prompt, counterfactual_prompt, concept, base_entity=None, source_entity=None,
                  max_new_tokens=8, mode="soft", return_positions=False):
        """Greedy continuation of base_prompt with `concept` taken from counterfactual_prompt. The
        hypernetwork sees each prompt up to its named entity (the whole prompt if none is named).
        With return_positions, also the (base token, source token,
        weight) pairs it chose: every base position whose largest share is a source token."""
        self.net.eval()
        tok = self.tokenizer
        upto = lambda prompt, entity: [prompt.index(entity) + len(entity)] if entity and entity in prompt else None
        batch = self.batch(tokenize(tok, [base_prompt], visible_chars=upto(base_prompt, base_entity)),
                           tokenize(tok, [counterfactual_prompt], visible_chars=upto(counterfactual_prompt, source_entity)),
                           tokenize(tok, [self.instruction(base_entity, source_entity, concept)]), [concept])
        base = batch["base"]
        with self.autocast():
            weights, basis, h_source = self.plan(batch)
            weights = harden(weights, mode, self.cfg.bidding_threshold)
            with patch_layer(self.model, self.cfg.layer, lambda h: interchange(h, h_source, weights, basis)):
                out = self.model(**target_inputs(base), use_cache=True)   # the prompt, intervened once
            new, cache, position = [], out.past_key_values, base["input_ids"].shape[1]
            for _ in range(max_new_tokens):   # later tokens read the intervened prompt through the cache
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                if token.item() == tok.eos_token_id:
                    break
                new.append(token.item())
                out = self.model(input_ids=token, past_key_values=cache, use_cache=True,
                                 position_ids=torch.tensor([[position]], device=self.device))
                position += 1
        text = tok.decode(new)
        if not return_positions:
            return text
        names = lambda enc: tok.convert_ids_to_tokens(enc["input_ids"][0].tolist())
        base_tokens, source_tokens = names(base), names(batch["source"])
        w = weights[0].float()                                                  # [Ts+1, Tb]
        chosen = [(base_tokens[j], source_tokens[i], round(w[i, j].item(), 3))
                  for j, i in enumerate(w.argmax(0).tolist()) if i < len(source_tokens)]
        return text, chosen

    # -- saving and loading: safetensors + JSON, written atomically --------------------------------

    def save(self, path, optimizer=None):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.net.state_dict().items()}
        atomic_write(path / "weights.safetensors", lambda p: save_file(state, str(p)))
        if optimizer is not None:   # everything needed to resume: optimizer moments, step, history
            tensors, meta = {}, {"step": self.step, "history": self.history, "groups": []}
            for g, group in enumerate(optimizer.state_dict()["param_groups"]):
                meta["groups"].append({k: v for k, v in group.items() if k != "params"})
            for idx, st in optimizer.state_dict()["state"].items():
                tensors.update({f"{idx}.{k}": torch.as_tensor(v).contiguous().cpu() for k, v in st.items()})
            atomic_write(path / "optimizer.safetensors", lambda p: save_file(tensors, str(p)))
            atomic_write(path / "training.json", lambda p: p.write_text(json.dumps(meta)))
        info = {"method": self.method, "config": asdict(self.cfg), "step": self.step}
        atomic_write(path / "config.json", lambda p: p.write_text(json.dumps(info, indent=2)))

    @classmethod
    def load(cls, path, model, tokenizer):
        """Rebuild from a saved directory with the saved configuration (so N blocks stays N blocks)."""
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a HyperDAS checkpoint (no config.json in it).")
        info = json.loads((path / "config.json").read_text())
        config = {**info["config"], "init_from_target": False}   # the weights come from the file
        method = {c.method: c for c in (HyperDAS, DAS)}[info.get("method", "hyperdas")]
        hd = method(model, tokenizer, **config)
        hd.cfg.init_from_target = info["config"]["init_from_target"]
        hd.net.load_state_dict(load_file(str(path / "weights.safetensors"), device=str(hd.device)))
        hd.step = info.get("step", 0)
        return hd

    def load_training_state(self, path, optimizer):
        path = Path(path)
        self.net.load_state_dict(load_file(str(path / "weights.safetensors"), device=str(self.device)))
        meta = json.loads((path / "training.json").read_text())
        tensors = load_file(str(path / "optimizer.safetensors"))
        state = {}
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value.to(self.device) if value.dim() else value
        groups = optimizer.state_dict()["param_groups"]
        for group, saved in zip(groups, meta["groups"]):
            group.update(saved)
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.step, self.history = meta["step"], meta["history"]


# ----------------------------------------------------------------------------------------------------
# The DAS baseline (RAVEL's MDAS setup): one static basis per attribute, at the last entity token.


class DASNetwork(nn.Module):
    def __init__(self, d, k, attributes):
        super().__init__()
        self.attributes = list(attributes)
        self.bases = nn.ModuleList(orthonormal_basis(d, k) for _ in self.attributes)


class DAS(HyperDAS):
    """Same pairs, loss, training and evaluation as HyperDAS; only steps 1-3 differ: the positions are
    fixed (last entity token of base and source, i.e. the last visible token) and the subspace is one
    learned basis per attribute. Unlike the official MDAS it patches the same hidden_states[layer]."""

    method = "das"

    def __init__(self, model, tokenizer, attributes=(), **config):
        self.attributes = list(attributes)
        super().__init__(model, tokenizer, **config)

    def build(self):
        return DASNetwork(self.model.config.hidden_size, self.cfg.feature_dim, self.attributes)

    def plan(self, batch):
        missing = set(batch["concepts"]) - set(self.attributes)
        if missing:
            raise ValueError(f"This DAS has bases for {self.attributes}; got {sorted(missing)}.")
        base, source = batch["base"], batch["source"]
        h_source = hidden_states(self.model, source)[:, :, self.cfg.layer]               # [B, Ts, d]
        last = lambda visible: visible.shape[1] - 1 - visible.flip(1).int().argmax(1)   # last visible index
        B, Ts, Tb = h_source.shape[0], h_source.shape[1], base["input_ids"].shape[1]
        rows, j = torch.arange(B, device=self.device), last(base["visible"])
        weights = torch.zeros(B, Ts + 1, Tb, device=self.device)
        weights[:, Ts] = 1.0                            # keep the base everywhere ...
        weights[rows, Ts, j] = 0.0                      # ... except at its last entity token,
        weights[rows, last(source["visible"]), j] = 1.0  # which takes the source's last entity token
        basis = torch.stack([self.net.bases[self.attributes.index(c)].weight for c in batch["concepts"]])
        return weights, basis, h_source


# ----------------------------------------------------------------------------------------------------
# Command line: python hyperdas.py --domain verb


def preset_for(name):
    """The settings table row for a target model name (None: the offline toy target)."""
    if name is None:
        return "toy"
    lowered = name.lower()
    return "tinyllama" if "tinyllama" in lowered else "llama3-8b" if "llama-3" in lowered else None


def build_parser():
    p = argparse.ArgumentParser(description="Train and evaluate HyperDAS (or the DAS baseline) on a RAVEL domain; "
                                "print the cause / isolate / disentangle table and save the checkpoint.")
    p.add_argument("--domain", default="verb", help="RAVEL domain: city, nobel_prize_winner, occupation, "
                   "physical_object, verb, or all (default: verb)")
    p.add_argument("--model", help="Hugging Face id or local path of the target LM (default: the offline toy "
                   "target trained on the domain's RAVEL facts, built on first use and cached)")
    p.add_argument("--method", choices=("hyperdas", "das"), default="hyperdas",
                   help="hyperdas, or das: one static subspace per attribute at the last entity token")
    p.add_argument("--layer", type=int, help="intervene on hidden_states[layer] (default: from the model's preset)")
    p.add_argument("--feature_dim", type=int, help="subspace dimension k (default: from the preset)")
    p.add_argument("--num_blocks", type=int, help="hypernetwork decoder blocks (default: from the preset)")
    p.add_argument("--epochs", type=int, help="training epochs (default: from the preset)")
    p.add_argument("--batch_size", type=int, help="batch size (default: from the preset)")
    p.add_argument("--lr", type=float, help="hypernetwork learning rate (default: from the preset)")
    p.add_argument("--n_train", type=int, help="RAVEL pairs generated for training, before the model filter "
                   f"(default: {SIZES['train']}, per domain for all)")
    p.add_argument("--n_test", type=int, help="RAVEL pairs generated for testing, before the model filter "
                   f"(default: {SIZES['test']}, per domain for all)")
    p.add_argument("--evaluate", action="store_true", help="only evaluate the checkpoint given by --model_path")
    p.add_argument("--model_path", help="checkpoint directory to evaluate (with --evaluate)")
    p.add_argument("--out", help="output directory for the checkpoint and results.json "
                   "(default: runs/<method>-<domain>-<model>)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and order (default: 0)")
    return p


def print_table(results):
    print(f"\n{results['method']} on {results['domain']} ({results['model']})")
    print(f"{'mode':<12} {'attribute':<20} {'cause':>6} {'isolate':>8} {'disentangle':>12}")
    fmt = lambda x: f"{x:.3f}" if x is not None else "-"
    for mode, s in results["mode"].items():
        for name, row in [*s["per_attribute"].items(), ("(all)", s)]:
            print(f"{mode:<12} {name:<20} {fmt(row['cause']):>6} {fmt(row['isolate']):>8} {fmt(row['disentangle']):>12}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    start = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.evaluate and not args.model_path:
        raise SystemExit("--evaluate needs --model_path CHECKPOINT_DIR (a directory written by a training run).")
    preset = preset_for(args.model)
    if args.model is None:
        from toy_world import toy_target
        model, tokenizer = toy_target(args.domain, device=args.device)   # one target for every --seed
    else:
        model, tokenizer = load_target(args.model, args.device)
    model_name = args.model or f"toy-{args.domain}"
    settings = dict(PRESETS.get(preset) or dict(PRESETS["tinyllama"], layer=len(decoder_layers(model)) // 2))
    settings.update({k: getattr(args, k) for k in ("layer", "feature_dim", "num_blocks", "epochs", "batch_size", "lr")
                     if getattr(args, k) is not None})
    epochs, batch_size = settings.pop("epochs"), settings.pop("batch_size")
    test = ravel_examples(args.domain, "test", model, tokenizer, args.n_test, args.seed)
    out = Path(args.out or f"runs/{args.method}-{args.domain}-{Path(model_name).name}")
    if args.evaluate:
        hd = HyperDAS.load(args.model_path, model, tokenizer)
    else:
        train = ravel_examples(args.domain, "train", model, tokenizer, args.n_train, args.seed)
        if args.method == "das":
            settings.pop("num_blocks")
            hd = DAS(model, tokenizer, attributes=sorted({concept_of(e) for e in train}), seed=args.seed, **settings)
        else:
            hd = HyperDAS(model, tokenizer, seed=args.seed, **settings)
        hd.train(train, epochs=epochs, batch_size=batch_size, out_dir=out / "checkpoint", save_every=500)
    modes = MODES if hd.method == "hyperdas" else ("soft",)   # DAS positions are one-hot already
    results = {"method": hd.method, "domain": args.domain, "model": model_name,
               "mode": {m: hd.evaluate(test, mode=m) for m in modes}}
    results["seconds"] = round(time.time() - start, 1)
    print_table(results)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(results, indent=2)))
    saved = "" if args.evaluate else f" and the checkpoint in {out / 'checkpoint'}"
    print(f"\nsaved {out / 'results.json'}{saved} ({results['seconds']} s)")
    return results


if __name__ == "__main__":
    main()
