"""HyperDAS: a transformer hypernetwork that finds and patches concepts in a frozen language model.

Sun et al., "HyperDAS: Towards Automating Mechanistic Interpretability with Hypernetworks", ICLR 2025.

Given a concept ("the country of a city"), a base prompt ("Vienna is in") and a counterfactual prompt
("I love Paris"), the hypernetwork reads both prompts' hidden states and, as in the paper's Figure 1,
  (1) encodes the concept instruction while cross-attending to the two prompts,
  (2) chooses which source token positions to write into which base token positions,
  (3) builds an orthonormal subspace of the residual stream for the concept, and
  (4) performs an interchange intervention there: base states take the source's values inside the
      subspace and keep their own outside it.
It is trained so the model's answer changes exactly as the counterfactual says (cause) and nothing
else changes (isolate). The file follows that order: configuration, the hypernetwork's building blocks,
steps 1-4, loss, scores, batches, checkpoints, the training loop, the `HyperDAS` class, the DAS baseline.
What is not the method lives beside it and is re-exported here: the frozen target (loading, the hook,
tokenization, RAVEL pairs, each architecture's layer layout) in target.py, several processes in
distributed.py, files and interrupts in files.py; the command line is cli.py. Importing it has no side
effects.
"""
import contextlib
import json
import math
import string
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

if __name__ == "__main__":   # the command line (cli.py) reads its flags before torch is imported: seconds
    import cli
    cli.main()
    sys.exit()

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError  # noqa: F401  (cli.py reads it here)
from tqdm.auto import tqdm

import ravel_data
from distributed import (all_sum, barrier, check_batch, collective_device, data_parallel, from_main, gather,  # noqa: F401
                         is_main, main_first, on_any, processes, split, through, world)
from checkpoints import (checkpoint_info, differences, fingerprint, load_weights, resume,  # noqa: F401
                         save_checkpoint, with_defaults)
from files import (atomic_write, checkpoint_path, deferred_interrupts, is_checkpoint, read_json,  # noqa: F401
                   read_tensors, writable, write_checkpoint)
from target import (LAYER_PARTS, SIZES, SUPPORTED, answer_correct, answer_ids, answer_labels,  # noqa: F401
                    answer_separator, answer_window, architecture, check_layer, chosen_positions,
                    decoder_layers, default_tokenizer, encode, entity_end, entity_first_tokens, entity_in,
                    examples_of, filter_examples, final_norm, first_entity_token, freeze,
                    greedy_continuation, hidden_states, last_visible, layer_weights, load_target, module_at,
                    patch_layer, ravel_examples, target_inputs, target_positions, target_rope, token_offsets,
                    tokenize, tokenize_prompt, visible_counts, whole_words)

# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class HyperDASConfig:
    layer: int = 15                 # intervene on hidden_states[layer], the stream entering decoder layer `layer`
    feature_dim: int = 128          # k: dimension of the concept subspace
    num_blocks: int = 8             # N: hypernetwork decoder blocks
    init_from_target: bool = True   # blocks start as copies of the target's first N layers; False: random blocks
                                    # (the embedding and final norm are copied either way, as in the official code)
    lr: float = 2e-5                # hypernetwork learning rate
    basis_lr: float = 1e-3          # learning rate of the shared orthonormal basis (never weight-decayed)
    weight_decay: float = 0.01
    grad_clip: float = 4.0
    causal_weight: float = 3.5      # loss weight of cause examples (the answer must change)
    isolate_weight: float = 0.5     # loss weight of isolate examples (the answer must not change)
    sparsity_start: float = 0.15    # source-selection sparsity weight: 0 during the warm-up fraction of
    sparsity_end: float = 1.5       # the steps, then the linear ramp start -> end over all steps
    sparsity_warmup: float = 0.5
    sparsity_schedule: str = "official"   # "official": after the warm-up, linspace(start, end) indexed from step 0
                                    # (a jump to 0.825 at 50%); "paper": from 0 rising linearly to end after it;
                                    # "off": no sparsity loss (the ablation)
    lr_schedule: str = "constant"   # "constant" (official), or "warmup_cosine": linear warm-up over the first
                                    # 5% of the steps, then cosine decay to 10% of the rate, for every group
    bidding_threshold: float = 0.1  # a source token must beat max(keep share, threshold) in one-to-one mode
    eval_tokens: int = 3            # exact match is judged on the first 3 answer tokens
    instruction_template: str = "{base} ; {source} - {attribute}"
    das_position: str = "last"      # DAS only: intervene at the entity's "last" token (RAVEL's and MDAS's
                                    # placement) or its "first" (the known-position toy world's true position)
    checkpoint_blocks: bool = False # recompute each block's activations during backward instead of keeping them
                                    # (activation checkpointing: less memory for ~1/3 more block compute)
    train_embedding: bool = True    # False: freeze the hypernetwork's embedding copy (525 M parameters at
                                    # Llama-3-8B), so it needs no gradient and no AdamW moments
    seed: int = 0


# The paper's settings (Llama-3-8B: 32 layers, hidden size 4096), and the offline toy target's. Other
# models get the paper's row scaled to their depth and width (settings_for).
PAPER = dict(layer=15, feature_dim=128, num_blocks=8, lr=2e-5, epochs=3, batch_size=16)
# "toy": lr 1e-3 at batch 16 beat 3e-4 at batch 32 on four of the five toy domains. The paper's sparsity ramp
# and a warm-up + cosine lr let isolation recover where the official schedules left it stalled (city 0.63 ->
# 0.74); the ramp ending at 0.5, not 1.5, costs less cause and beats DAS by 0.05 or more on every toy world and
# seed measured, where 1.5 missed on physical_object and no sparsity loss collapsed city (README, "Results").
TOY = dict(layer=2, feature_dim=16, num_blocks=2, lr=1e-3, epochs=5, batch_size=16,
           sparsity_schedule="paper", sparsity_end=0.5, lr_schedule="warmup_cosine")

MODES = ("soft", "one_to_many", "one_to_one")   # the paper's Soft / One-to-Many / One-to-One


def settings_for(config):
    """(settings, why) for a target's config: the toy preset for a toy target; otherwise the paper's Llama-3-8B
    row scaled by depth and width: layer 15/32 of the depth, k = hidden/32, N = depth/4 blocks (at most 8)."""
    if getattr(config, "toy_world", None):
        return dict(TOY), "the toy target's preset"
    n, d = config.num_hidden_layers, config.hidden_size
    settings = dict(PAPER, layer=round(n * 15 / 32), feature_dim=max(8, d // 32), num_blocks=max(1, min(8, n // 4)))
    why = "the paper's Llama-3-8B row" if settings == PAPER else f"the paper's row scaled to {n} layers x {d} wide"
    return settings, why


# ----------------------------------------------------------------------------------------------------
# The hypernetwork's building blocks. One block class, parametrised by what the target's config says its
# decoder layer computes (target.architecture()), so that block i starts as an exact copy of target layer i on
# every supported family: RMS or layer norms; pre-norm, sandwich (Gemma-2), post-norm (OLMo-2) or parallel
# (GPT-NeoX) residuals; q/k norms; biases; gated or plain MLPs; full, partial or no rotary positions;
# soft-capped attention scores.


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(arch, d=None, present=True):
    if not present:
        return nn.Identity()
    d = d or arch["d"]
    return nn.LayerNorm(d, eps=arch["eps"]) if arch["layer_norm"] else RMSNorm(d, arch["eps"])


class Rotary(nn.Module):
    """cos/sin tables at given positions, from the target's own frequencies and scaling (target_rope)."""

    def __init__(self, inv_freq, scaling=1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = scaling

    def forward(self, pos):
        angle = pos[:, None, :, None].float() * self.inv_freq                 # [B, 1, T, r/2]
        angle = torch.cat((angle, angle), dim=-1)                              # [B, 1, T, r]
        return angle.cos() * self.scaling, angle.sin() * self.scaling


def rotate(x, cos, sin):
    """Rotary position embedding, rotate-half layout, on the first r = cos.shape[-1] dims of each head (all of
    them but for partial rotary, as in GPT-NeoX). x: [B, H, T, dh], cos/sin: [B, 1, T, r]."""
    r = cos.shape[-1]
    xr = x[..., :r].float()
    x1, x2 = xr.chunk(2, dim=-1)
    return torch.cat(((xr * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype), x[..., r:]), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention from x to memory, with rotary positions (rope None: the target has absolute
    positions, already in its hidden states); `mask` [B, Tq, Tk] says who may attend to whom. Self-attention
    is the case memory = x. The g query heads that share a K/V head are stacked along the query axis, so K
    and V are never copied per query head (repeat_interleave would materialise them: 4x at Llama-3-8B)."""

    def __init__(self, arch, index=0):
        super().__init__()
        d, self.h, self.h_kv, self.dh = arch["d"], arch["heads"], arch["kv_heads"], arch["head_dim"]
        self.q_proj = nn.Linear(d, self.h * self.dh, bias=arch["qkv_bias"])
        self.k_proj = nn.Linear(d, self.h_kv * self.dh, bias=arch["qkv_bias"])
        self.v_proj = nn.Linear(d, self.h_kv * self.dh, bias=arch["qkv_bias"])
        self.o_proj = nn.Linear(self.h * self.dh, d, bias=arch["o_bias"])
        self.per_head_norm = arch["qk_norm"] == "head"
        if arch["qk_norm"]:
            self.q_norm = make_norm(arch, self.dh if self.per_head_norm else self.h * self.dh)
            self.k_norm = make_norm(arch, self.dh if self.per_head_norm else self.h_kv * self.dh)
        self.scale = arch["scale"] / (index + 1 if arch["inverse_layer_scale"] else 1)
        self.softcap = arch["softcap"]

    def heads(self, x, n, norm=None):
        """[B, T, n * dh] -> [B, n, T, dh], through this layer's q/k norm (per head or whole) if it has one."""
        if norm is not None and not self.per_head_norm:
            x = norm(x)
        x = x.unflatten(-1, (n, self.dh))
        return (norm(x) if norm is not None and self.per_head_norm else x).transpose(1, 2)

    def forward(self, x, x_rope, memory, memory_rope, mask):
        B, Tq, g = x.shape[0], x.shape[1], self.h // self.h_kv
        q = self.heads(self.q_proj(x), self.h, getattr(self, "q_norm", None))             # [B, H, Tq, dh]
        k = self.heads(self.k_proj(memory), self.h_kv, getattr(self, "k_norm", None))     # [B, Hkv, Tk, dh]
        v = self.heads(self.v_proj(memory), self.h_kv)
        if x_rope is not None:
            q, k = rotate(q, *x_rope), rotate(k, *memory_rope)
        q = q.reshape(B, self.h_kv, g * Tq, self.dh)            # query head h = kv head h // g, as in HF
        mask = mask.repeat(1, g, 1)[:, None]                    # [B, 1, g*Tq, Tk]
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:                                                   # Gemma-2: cap * tanh(score / cap)
            score = torch.tanh((q @ k.transpose(-1, -2)).float() * (self.scale / self.softcap)) * self.softcap
            out = score.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype) @ v
        out = out.reshape(B, self.h, Tq, self.dh).transpose(1, 2)                         # [B, Tq, H, dh]
        return self.o_proj(out.reshape(B, Tq, self.h * self.dh))


class MLP(nn.Module):
    """act(gate(x)) * up(x) -> down (SwiGLU, GeGLU), or act(up(x)) -> down (GPT-2, GPT-NeoX)."""

    def __init__(self, d, d_ff, d_out=None, act="silu", gated=True, bias=False):
        super().__init__()
        from transformers.activations import ACT2FN   # the targets' own activation functions
        self.gate_proj = nn.Linear(d, d_ff, bias=bias) if gated else None
        self.up_proj = nn.Linear(d, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_out or d, bias=bias)
        self.act = ACT2FN[act]

    def forward(self, x):
        up = self.up_proj(x)
        return self.down_proj(self.act(self.gate_proj(x)) * up if self.gate_proj is not None else self.act(up))


class Block(nn.Module):
    """One hypernetwork block (official order): causal self-attention over the instruction,
    cross-attention to the source's hidden states, cross-attention to the base's, then the MLP. Without its
    two memories (source=base=None) it computes exactly the target decoder layer it was copied from."""

    def __init__(self, arch, index=0):
        super().__init__()
        norm = lambda on: make_norm(arch, present=on)
        for role in ("self", "source", "base"):
            setattr(self, f"{role}_norm", norm(arch["pre_norm"]))
            setattr(self, f"{role}_attn", Attention(arch, index))
            setattr(self, f"{role}_post", norm(arch["post_norm"]))
        self.mlp_norm, self.mlp_post = norm(arch["pre_norm"]), norm(arch["post_norm"])
        self.mlp = MLP(arch["d"], arch["d_ff"], act=arch["act"], gated=arch["gated"], bias=arch["mlp_bias"])
        self.parallel = arch["parallel"]

    def forward(self, h, rope, self_mask, source=None, base=None):
        """Each sublayer adds to the stream; it reads the stream as the sublayer before left it, or, in the
        parallel layout (GPT-NeoX), the block's input, as the target layer's attention and MLP both do."""
        start = h
        x = self.self_norm(h)
        h = h + self.self_post(self.self_attn(x, rope, x, rope, self_mask))
        for attn, norm, post, memory in ((self.source_attn, self.source_norm, self.source_post, source),
                                         (self.base_attn, self.base_norm, self.base_post, base)):
            if memory is not None:
                h = h + post(self.cross(attn, norm, start if self.parallel else h, rope, memory))
        return h + self.mlp_post(self.mlp(self.mlp_norm(start if self.parallel else h)))

    @staticmethod
    def cross(attn, norm, h, rope, memory):
        """Cross-attention to memory = (items, rope, mask). The items pass through the same norm as the
        queries, so the copied k/v projections read normed states as the target layer's do (the official code
        fed them unit-length vectors, RMS 1/sqrt(d), with no norm). Under autocast the normed items are cast
        once, not once per projection."""
        items, items_rope, mask = memory
        items = norm(items)
        if torch.is_autocast_enabled(items.device.type):
            items = items.to(torch.get_autocast_dtype(items.device.type))
        return attn(norm(h), rope, items, items_rope, mask)

    def copy_from(self, layer, arch):
        """Start from a target decoder layer; both cross-attentions are independent clones of its
        self-attention (official: storage-aliased on CPU, separated only by .to(cuda)). Every weight of the
        layer lands in the block and every parameter of the block comes from the layer, or this refuses."""
        roles = {"attn_norm": "{}_norm", "attn": "{}_attn", "attn_post": "{}_post"}
        state = {}
        for key, value in layer_weights(layer, arch).items():
            part, rest = key.split(".", 1)
            for role in ("self", "source", "base") if part in roles else ():
                state[f"{roles[part].format(role)}.{rest}"] = value
            if part not in roles:
                state[key] = value
        try:
            result = self.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise ValueError(f"Cannot copy this {arch['type']} layer into a block: {str(err).splitlines()[-1].strip()}") from None
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"Cannot copy this {arch['type']} layer into a block exactly (block parameters without a "
                             f"weight: {result.missing_keys}; layer weights without a place: {result.unexpected_keys}); "
                             "use init_from_target=False.")


# ----------------------------------------------------------------------------------------------------
# Step 1 (§3, Fig. 1 (1)): concept encoding. The instruction runs through N blocks that read both prompts.


def memory(states, visible):
    """What step 1 reads of a prompt: every visible token at every layer, flattened token-major to
    [B, T*(n_layers+1), d], with rotary positions numbering the visible items from 0 and their mask."""
    B, T, L1, d = states.shape
    items = states.reshape(B, T * L1, d)
    seen = visible[:, :, None].expand(B, T, L1).reshape(B, T * L1)
    return items, (seen.cumsum(1) - 1).clamp(min=0), seen


class ConceptEncoder(nn.Module):
    """Instruction tokens -> embedding -> N blocks (cross-attending to source and base) -> final norm.
    rope: a Rotary, or None for a target with learned absolute positions (GPT-2), whose position table the
    encoder then has too; embed_scale: what the target multiplies its embeddings by (Gemma: sqrt(d))."""

    def __init__(self, arch, vocab_size, num_blocks, rope, max_positions=None, embed_scale=1.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, arch["d"])   # the hypernetwork's own trainable copy
        self.positions = nn.Embedding(max_positions, arch["d"]) if rope is None else None
        self.embed_scale = embed_scale
        self.blocks = nn.ModuleList(Block(arch, i) for i in range(num_blocks))
        self.norm = make_norm(arch)
        self.rope = rope

    def forward(self, instruction, base, source):
        """instruction: tokenize() output [B, n]; base, source: memory() triples. -> [B, n, d]."""
        ids, mask = instruction["input_ids"], instruction["attention_mask"].bool()
        n = ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        # Always causal, padded or not (the official mask vanished for unpadded batches); every row
        # may see itself, so left-pad rows stay finite.
        self_mask = (causal & mask[:, None, :]) | torch.eye(n, dtype=torch.bool, device=ids.device)
        rope = (lambda pos: None) if self.rope is None else self.rope
        cross = lambda items, pos, seen: (items, rope(pos), seen[:, None, :].expand(-1, n, -1))
        source, base = cross(*source), cross(*base)
        h = self.embed(ids) * self.embed_scale                                         # [B, n, d]
        if self.positions is not None:
            h = h + self.positions(instruction["position_ids"])
        rope = rope(instruction["position_ids"])
        for block in self.blocks:
            h = run_block(block, h, rope, self_mask, source, base)
        return self.norm(h)


# ----------------------------------------------------------------------------------------------------
# Step 2 (§3, Fig. 1 (2)): pairwise token-position selection.


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
            nn.init.normal_(w, std=0.02)    # the init the official head actually ran with (its uniform_ was overwritten)

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
# Step 3 (§3, Fig. 1 (3)): the concept's orthonormal subspace ("ReflectSelect").


def orthonormal_basis(d, k):
    """A learnable d x k matrix with orthonormal columns: orthogonally initialised (the official code
    started from uninitialised memory) and kept orthonormal by torch's parametrization. Never decay it."""
    layer = nn.Linear(k, d, bias=False)                                               # weight: [d, k]
    nn.init.orthogonal_(layer.weight)
    return nn.utils.parametrizations.orthogonal(layer)


def basis_weight(basis):
    """The basis matrix [d, k], computed in fp32 with autocast off: under bf16 autocast the parametrization's
    matmul would run in bf16 and |W^T W - I| reach 4e-3 at d = 4096."""
    with torch.autocast(basis.parametrizations.weight.original.device.type, enabled=False):
        return basis.weight


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
        v = self.mlp(self.norm(instruction))                                          # [B, d]
        with torch.autocast(instruction.device.type, enabled=False):                 # fp32 (basis_weight)
            return reflect(basis_weight(self.basis), F.normalize(v.float(), dim=-1))  # [B, d, k]


# ----------------------------------------------------------------------------------------------------
# Step 4 (§3, Fig. 1 (4)): the interchange intervention.


def interchange(h_base, h_source, weights, basis):
    """h_b,j + W W^T (sum_i A_ij h_s,i + A_keep,j h_b,j - h_b,j) for every base position j.
    h_base [B, Tb, d], h_source [B, Ts, d], weights A [B, Ts+1, Tb], basis W [B, d, k] -> [B, Tb, d].
    Computed in fp32 whatever the model's dtype (a bf16 projection drifts from orthonormal)."""
    with torch.autocast(h_base.device.type, enabled=False):
        hb, W, A = h_base.float(), basis.float(), weights.float()
        mix = torch.einsum("bij,bid->bjd", A[:, :-1], h_source.float()) + A[:, -1, :, None] * hb  # [B, Tb, d]
        return (hb + ((mix - hb) @ W) @ W.transpose(1, 2)).to(h_base.dtype)                      # [B, Tb, d]


# ----------------------------------------------------------------------------------------------------
# The whole hypernetwork: steps 1-3 from one unintervened pass of each prompt.


class HyperNetwork(nn.Module):
    """Instruction + both prompts' hidden states -> selection weights (step 2) and concept basis (step 3)."""

    def __init__(self, target, cfg):
        super().__init__()
        arch, d = architecture(target.config), target.config.hidden_size
        if cfg.init_from_target and arch["mixture_of_experts"]:
            raise ValueError(f"init_from_target=True cannot copy {arch['type']}'s mixture-of-experts layers into dense "
                             "blocks; pass init_from_target=False (random blocks of the target's shape).")
        if cfg.init_from_target and cfg.num_blocks > len(decoder_layers(target)):
            raise ValueError(f"num_blocks={cfg.num_blocks} exceeds the target's {len(decoder_layers(target))} "
                             "layers to copy from; use fewer blocks or init_from_target=False.")
        self.layer = cfg.layer
        embed, positions, rope = target.get_input_embeddings(), target_positions(target), target_rope(target)
        self.encoder = ConceptEncoder(arch, target.config.vocab_size, cfg.num_blocks,
                                      None if rope is None else Rotary(*rope),
                                      None if positions is None else positions.num_embeddings,
                                      float(getattr(embed, "embed_scale", 1.0)))
        self.selector = TokenSelector(d, d)
        self.subspace = SubspaceHead(d, cfg.feature_dim, arch["d_ff"], arch["eps"])
        # The embedding (and GPT-2's position table) and the final norm start as the target's in both modes
        # (the official code kept them pretrained also "from scratch"); init_from_target copies the first N
        # decoder layers as well.
        self.encoder.embed.weight.data.copy_(embed.weight.detach().float())
        if positions is not None:
            self.encoder.positions.weight.data.copy_(positions.weight.detach().float())
        for name, value in final_norm(target).state_dict().items():
            offset = arch["norm_offset"] if name == "weight" else 0.0
            getattr(self.encoder.norm, name).data.copy_(value.detach().float() + offset)
        if cfg.init_from_target:
            for block, layer in zip(self.encoder.blocks, decoder_layers(target)):
                block.copy_from(layer, arch)

    def forward(self, instruction, base_states, base_visible, source_states, source_visible):
        """instruction: tokenize() output [B, n]; *_states: [B, T, n_layers+1, d] from hidden_states()."""
        h = self.encoder(instruction, memory(base_states, base_visible), memory(source_states, source_visible))
        last = h[:, -1]                         # [B, d]: the last instruction token (left padding)
        unit = lambda states: F.normalize(states[:, :, self.layer].float(), dim=-1)  # layer-L states
        weights = self.selector(last, unit(base_states), base_visible, unit(source_states), source_visible)
        return weights, self.subspace(last)     # [B, Ts+1, Tb], [B, d, k]


# ----------------------------------------------------------------------------------------------------
# Loss and schedule (§3 training objective; official: causal 3.5, isolate 0.5; sparsity off for half the
# steps, then a ramp).


def prediction_loss(logits, labels, is_causal, causal_weight, isolate_weight, n_tokens=None):
    """Teacher-forced cross-entropy on all answer tokens, each example weighted by its kind, averaged
    over answer tokens: this batch's, or the n_tokens of the whole batch this one is a part of (train_step).
    logits cover the last k positions: [B, k, V]."""
    target = answer_labels(logits, labels)                                          # [B, k-1]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100, reduction="none")
    weight = torch.where(is_causal, causal_weight, isolate_weight)[:, None] * (target != -100)
    return (ce * weight).sum() / (answer_tokens(labels) if n_tokens is None else n_tokens)


def answer_tokens(labels):
    """How many answer tokens a batch's labels hold (the same however its rows are batched or padded)."""
    return (labels != -100).sum()


def sparsity_loss(weights, n_examples=None):
    """Penalise source tokens whose total weight over base positions exceeds 1, averaged over this batch's
    examples (or the n_examples of the whole batch). The official loss adds the whole row sum; relu(sum - 1)
    has the same gradient and no jump at 1."""
    per_example = F.relu(weights[:, :-1].sum(-1) - 1).sum(-1)                       # [B]
    return per_example.sum() / (len(per_example) if n_examples is None else n_examples)


SCHEDULES = {"sparsity_schedule": ("official", "paper", "off"), "lr_schedule": ("constant", "warmup_cosine")}


def sparsity_weight(step, total, cfg):
    """The sparsity loss's weight at a step: 0 for the warm-up fraction of the steps, then a ramp. The official
    code indexes its ramp linspace(0.15, 1.5) from step 0, so the weight jumps to 0.825 at the warm-up's end;
    the paper's text has it rise linearly from 0 to 1.5 starting there ("paper"). "off": always 0 (ablation)."""
    warm = int(cfg.sparsity_warmup * total)
    if step < warm or cfg.sparsity_schedule == "off":
        return 0.0
    if cfg.sparsity_schedule == "paper":
        return cfg.sparsity_end * (step - warm) / max(1, total - warm)
    return cfg.sparsity_start + (cfg.sparsity_end - cfg.sparsity_start) * step / total


def lr_factor(step, total, cfg):
    """The learning-rate multiplier at a step: 1 ("constant", official), or "warmup_cosine"."""
    if cfg.lr_schedule == "constant":
        return 1.0
    warm = max(1, round(0.05 * total))
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


# ----------------------------------------------------------------------------------------------------
# Scores: cause, isolate, and disentangle = their mean.


def scores(examples, correct):
    """Accuracy of cause and isolate rows and disentangle = their mean. The top level is the paper's
    number, a macro average: per attribute, then over a domain's attributes, then over domains.
    "pooled" averages over examples instead; "per_attribute" has each intervened attribute's own."""
    mean = lambda xs: sum(xs) / len(xs) if xs else None

    def triple(cause, isolate, n):
        return {"cause": cause, "isolate": isolate,
                "disentangle": mean([x for x in (cause, isolate) if x is not None]), "n": n}

    def summary(rows):
        return triple(mean([c for e, c in rows if e["attribute_type"] == "causal"]),
                      mean([c for e, c in rows if e["attribute_type"] != "causal"]), len(rows))

    rows = list(zip(examples, (bool(c) for c in correct)))
    groups = {}
    for e, c in rows:
        groups.setdefault((e.get("domain", ""), ravel_data.concept(e)), []).append((e, c))
    by_domain = {}
    for (domain, _), r in groups.items():
        by_domain.setdefault(domain, []).append(summary(r))
    macro = lambda key: mean([x for x in (mean([s[key] for s in ss if s[key] is not None]) for ss in by_domain.values())
                              if x is not None])
    per_attribute = {}
    for e, c in sorted(rows, key=lambda row: ravel_data.concept(row[0])):
        per_attribute.setdefault(ravel_data.concept(e), []).append((e, c))
    return {**triple(macro("cause"), macro("isolate"), len(rows)), "pooled": summary(rows),
            "per_attribute": {a: summary(r) for a, r in per_attribute.items()}}


# ----------------------------------------------------------------------------------------------------
# Examples -> batches: the base prompt with its answer, the source prompt, and the instruction.


def instruction_text(template, base, source, attribute):
    values = dict(base=base, source=source, attribute=attribute)
    missing = sorted(n for n in template_fields(template) if values.get(n) is None)
    if missing:
        raise ValueError(f"The instruction template {template!r} needs {missing}: pass base_entity= and "
                         "source_entity= (or use a template without them).")
    return template.format(**values)


def template_fields(template):
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def collate(examples, tokenizer, template):
    """Examples with the official fields -> tokenized base (with its answer), source and instruction."""
    e = examples
    # The hypernetwork sees BOS + prefix (which ends with the entity); suffix and answer stay hidden.
    base = tokenize(tokenizer, [x["input_prefix"] + x["input_suffix"] for x in e], [ravel_data.label(x) for x in e],
                    [len(x["input_prefix"]) for x in e])
    source = tokenize(tokenizer, [x["counterfactual_input_prefix"] + x["counterfactual_input_suffix"] for x in e],
                      visible_chars=[len(x["counterfactual_input_prefix"]) for x in e])
    concepts = [ravel_data.concept(x) for x in e]
    instruction = tokenize(tokenizer, [instruction_text(template, x["entity"], x["counterfactual_entity"], c)
                                       for x, c in zip(e, concepts)])
    return dict(base=base, source=source, instruction=instruction, concepts=concepts,
                is_causal=torch.tensor([x["attribute_type"] == "causal" for x in e]))


def attribute_named(concept, attributes):
    """The trained attribute a concept names: itself, or the longest of `attributes` whose name it contains
    as whole words, ignoring case ("the country of a city" -> "Country"). Untrained: the concept itself."""
    if not attributes or concept in attributes:
        return concept
    named = [a for a in attributes if whole_words(a, concept)]
    if not named:
        raise ValueError(f"The concept {concept!r} names none of the trained attributes: {', '.join(attributes)}.")
    return max(named, key=len)


# ----------------------------------------------------------------------------------------------------
# Checkpoints (written and read by checkpoints.py): a HyperDAS or DAS rebuilt from one.


def load_checkpoint(path, model, tokenizer=None):
    """A HyperDAS or DAS rebuilt with its saved configuration (so N blocks stays N) and weights."""
    path = checkpoint_path(path)
    info = checkpoint_info(path, {f.name for f in fields(HyperDASConfig)})
    method = {c.method: c for c in (HyperDAS, DAS)}[info["method"]]
    config = {**info["config"], "init_from_target": False}   # the weights come from the file
    hd = method(model, tokenizer, attributes=info.get("attributes", ()), **config)
    hd.cfg.init_from_target = info["config"]["init_from_target"]
    hd.domains, hd.step = info.get("domains", []), info.get("step", 0)
    load_weights(hd, path)
    return hd


# ----------------------------------------------------------------------------------------------------
# The training loop (§3): AdamW on the prediction and sparsity losses, with checkpoints and resume.


def train_loop(hd, examples, epochs, batch_size, eval_data=None, eval_every=0, out_dir=None, save_every=0,
               progress=True, grad_accum=1):
    """Train hd.net for `epochs` over `examples` (a fresh order each epoch, seeded), each step on batch_size
    examples in grad_accum micro-batches (train_step). With out_dir, save every `save_every` (steps, or
    {"seconds": s} of wall time), at the end, and on Ctrl-C or SIGTERM, which then stop the run after its
    current step; a saved run is resumed if it is this one, else refused. Under torchrun batch_size is the
    global batch, split over the processes."""
    check_batch(batch_size, grad_accum)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = epochs * steps_per_epoch
    run = json.loads(json.dumps(dict(method=hd.method, config=asdict(hd.cfg), attributes=hd.attributes,
                                     epochs=epochs, batch_size=batch_size, examples=len(examples),
                                     data=fingerprint(examples))))
    every = save_every if isinstance(save_every, dict) else {"steps": save_every} if save_every else {}
    opt = hd.make_optimizer()
    hd.step, hd.history = 0, []          # a new run, also for a loaded HyperDAS, unless this one resumes
    with main_first():                   # checkpoint_path may take back a half-switched save: once
        saved = out_dir and (checkpoint_path(out_dir) / "training.json").exists()
    if saved:
        resume(hd, out_dir, opt, run)
        if is_main():
            print(f"resuming {out_dir} at step {hd.step} of {total}", file=sys.stderr)
    ddp = data_parallel(hd)
    hd.net.train()
    last_save = time.time()
    bar = tqdm(range(hd.step, total), initial=hd.step, total=total, disable=not progress or not is_main(),
               desc="train")
    with deferred_interrupts() if out_dir else contextlib.nullcontext([]) as stop:
        for step in bar:
            epoch, i = divmod(step, steps_per_epoch)
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(hd.cfg.seed + epoch))
            for group in opt.param_groups:          # stateless, so a resumed run continues the schedule
                group["lr"] = group.setdefault("base_lr", group["lr"]) * lr_factor(step, total, hd.cfg)
            record = train_step(hd, [examples[j] for j in order[i * batch_size:(i + 1) * batch_size]], opt,
                                sparsity_weight(step, total, hd.cfg), grad_accum, ddp)
            record["lr"] = opt.param_groups[-1]["lr"]
            hd.step = step + 1
            record = dict(step=hd.step, **record)
            if eval_data is not None and eval_every and hd.step % eval_every == 0:   # never at step 0
                record["eval"] = hd.evaluate(eval_data, progress=False)
                hd.net.train()
            hd.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            due = hd.step % every.get("steps", 0) == 0 if "steps" in every else \
                time.time() - last_save >= every.get("seconds", math.inf)
            due, stopping = on_any(due, bool(stop))
            if out_dir and (due or hd.step == total or stopping):
                save_checkpoint(hd, out_dir, opt, run)
                last_save = time.time()
            if stopping:
                bar.close()
                raise KeyboardInterrupt(f"stopped at step {hd.step} of {total} and saved {out_dir}; "
                                        "run the same command again to resume")
    hd.net.eval()
    return hd.history


def run_block(block, *inputs):
    """block(*inputs). With checkpoint_blocks (HyperDAS.build sets block.checkpointed) and gradients on, the
    block's activations, above all its normed k/v of both prompts' every-layer states, are not kept for
    backward but recomputed there from the inputs: the memory of one block instead of N."""
    if getattr(block, "checkpointed", False) and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


def train_step(hd, examples, optimizer, w_sparse, grad_accum=1, ddp=None):
    """One optimisation step on a batch: L = prediction + w_sparse * sparsity, gradient clipping, AdamW.

    This process computes its share of the batch (all of it, or its rank's slice under torchrun) in
    grad_accum micro-batches, each backward before the next forward, so that only one micro-batch's
    activations are alive at a time. Both losses are means over the whole batch (prediction over its
    answer tokens, sparsity over its examples), so each micro-batch's sums are divided by the whole batch's
    counts: the gradients summed over micro-batches and processes are those of one pass over the batch."""
    rank, n = world()
    share = split(examples, n)[rank]
    # A process whose slice of an epoch's short last batch is empty must still take part in DDP's gradient
    # sum: it runs one example with weight 0.
    weight = 1.0 if share else 0.0
    batches = [hd.collate(part) for part in split(share or examples[:1], grad_accum) if part]
    n_tokens = all_sum(weight * sum(answer_tokens(b["base"]["labels"]) for b in batches))
    sums = 0
    for j, batch in enumerate(batches):
        with through(hd, ddp, sync=j == len(batches) - 1):
            logits, labels, is_causal, weights = hd.forward(batch)
            prediction = weight * prediction_loss(logits, labels, is_causal, hd.cfg.causal_weight,
                                                  hd.cfg.isolate_weight, n_tokens)
            sparse = weight * sparsity_loss(weights, len(examples))
            (n * (prediction + w_sparse * sparse)).backward()     # x n: DDP averages, a sum is wanted
            # What the step's batch gets right, per kind (the training curve of cause and isolate).
            hit = answer_correct(logits.detach(), labels, hd.cfg.eval_tokens).float()
            counts = torch.stack(((hit * is_causal).sum(), is_causal.sum(), (hit * ~is_causal).sum(), (~is_causal).sum()))
        sums = sums + torch.cat((torch.stack((prediction, sparse)).detach(), weight * counts))
    prediction, sparse, cause_hits, causes, isolate_hits, isolates = all_sum(sums).tolist()
    grad_norm = torch.nn.utils.clip_grad_norm_(hd.trainable_parameters(), hd.cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(loss=prediction + w_sparse * sparse, prediction=prediction, sparsity=sparse,
                sparsity_weight=w_sparse, grad_norm=grad_norm.item(),
                cause=cause_hits / causes if causes else None, isolate=isolate_hits / isolates if isolates else None)


# ----------------------------------------------------------------------------------------------------
# The HyperDAS a user holds: the frozen target, the hypernetwork, and the method's steps on a batch.


class HyperDAS:
    """A trainable HyperDAS around a frozen causal LM (the hypernetwork is `self.net`).

    hd = HyperDAS(model=model, layer=15, feature_dim=128)      # tokenizer: the model's own by default
    hd.train(dataset_path="data/ravel/city", epochs=5, batch_size=32)      # or a list of examples
    hd.evaluate(test_examples, mode="soft")
    hd.intervene(base_prompt="Vienna is in", counterfactual_prompt="I love Paris", concept="the country of a city")"""

    method = "hyperdas"

    def __init__(self, model, tokenizer=None, attributes=(), **config):
        unknown = set(config) - {f.name for f in fields(HyperDASConfig)}
        if unknown:
            raise TypeError(f"Unknown HyperDAS option(s) {sorted(unknown)}; see HyperDASConfig.")
        self.cfg = HyperDASConfig(**config)
        for name, choices in {**SCHEDULES, "das_position": ("last", "first")}.items():
            if getattr(self.cfg, name) not in choices:
                raise ValueError(f"{name}={getattr(self.cfg, name)!r}: choose one of {', '.join(choices)}.")
        self.model = freeze(model)
        self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer(model)
        self.device = next(model.parameters()).device
        check_layer(model, self.cfg.layer)
        d = model.config.hidden_size
        if not 1 <= self.cfg.feature_dim <= d:
            raise ValueError(f"feature_dim={self.cfg.feature_dim} must be between 1 and the hidden size {d}.")
        if self.cfg.num_blocks < 1:
            raise ValueError(f"num_blocks={self.cfg.num_blocks} must be at least 1.")
        self.attributes = sorted(attributes)     # the concepts it knows (set by training; DAS: one basis each)
        self.domains = []                        # the RAVEL domains it was trained on (to find entities)
        torch.manual_seed(self.cfg.seed)
        self.net = self.build().to(self.device)  # fp32 master weights, also for a bf16 target
        self.step, self.history = 0, []

    def build(self):
        net = HyperNetwork(self.model, self.cfg)
        for module in net.modules():
            if isinstance(module, Block):              # read by run_block
                module.checkpointed = self.cfg.checkpoint_blocks
            if isinstance(module, nn.Embedding):       # the instruction's embedding, copied from the target
                module.weight.requires_grad_(self.cfg.train_embedding)
        return net

    # -- the method on a batch: steps 1-4 -------------------------------------------------------------

    def collate(self, examples):
        batch = collate(examples, self.tokenizer, self.cfg.instruction_template)
        return self.batch(batch["base"], batch["source"], batch["instruction"], batch["concepts"], batch["is_causal"])

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
        """examples: a list of examples, or the batch collate() made of them."""
        batch = examples if isinstance(examples, dict) else self.collate(examples)
        with self.autocast():
            weights, basis, h_source = self.plan(batch)
            weights = harden(weights, mode, self.cfg.bidding_threshold)
            logits = self.intervened_logits(batch["base"], weights, basis, h_source, answer_window(batch["base"]["labels"]))
        return logits, batch["base"]["labels"], batch["is_causal"], weights

    def autocast(self):
        # bf16 matmuls on GPU with fp32 master weights; plain fp32 on CPU, where bf16 is 20-45x slower.
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    # -- training and evaluation ------------------------------------------------------------------------

    def trainable_parameters(self):
        return [p for p in self.net.parameters() if p.requires_grad]

    def make_optimizer(self):
        # Every orthogonally parametrised basis: its Householder diagonal is read through .int(), so any
        # weight decay would shrink it to 0 and silently delete basis columns.
        basis = {id(p) for name, p in self.net.named_parameters() if "parametrizations." in name}
        params = self.trainable_parameters()
        groups = [dict(params=[p for p in params if id(p) in basis], lr=self.cfg.basis_lr, weight_decay=0.0),
                  dict(params=[p for p in params if id(p) not in basis], lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)]
        cuda = bool(params) and all(p.is_cuda for p in params)     # fused: one kernel for all parameters
        return torch.optim.AdamW([g for g in groups if g["params"]], fused=True if cuda else None)

    def examples(self, data, split):
        """A list of examples, or a RAVEL domain by name or path: its pairs for this model (target.examples_of)."""
        return examples_of(data, split, self.model, self.tokenizer, self.cfg.seed)

    def train(self, data=None, epochs=5, batch_size=32, eval_data=None, eval_every=0, out_dir=None, save_every=0,
              progress=True, dataset_path=None, grad_accum=1):
        """Train on examples or a RAVEL domain (`data` or `dataset_path`, see examples()); see train_loop."""
        if data is None and dataset_path is None:
            raise ValueError("No training data: pass a list of examples or dataset_path='city' (a RAVEL domain).")
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs={epochs} and batch_size={batch_size} must both be at least 1.")
        examples = self.examples(data if data is not None else dataset_path, "train")
        if not examples:
            raise ValueError("No training examples: check the data (and the model filter, if used).")
        if self.method == "hyperdas":
            self.attributes = sorted(set(self.attributes) | {ravel_data.concept(e) for e in examples})
        self.domains = sorted(set(self.domains) | {e["domain"] for e in examples if e.get("domain")})
        return train_loop(self, examples, epochs, batch_size, eval_data, eval_every, out_dir, save_every, progress,
                          grad_accum)

    @torch.no_grad()
    def evaluate(self, data, mode="soft", batch_size=32, progress=True):
        """Teacher-forced exact match of the first `eval_tokens` answer tokens under the intervention:
        scores() of the test examples (the paper's macro average at the top level)."""
        examples = self.examples(data, "test")
        return scores(examples, self.correct(examples, mode, batch_size, progress))

    @torch.no_grad()
    def correct(self, examples, mode="soft", batch_size=32, progress=False):
        """Per example: does the intervened model produce its label? In input order, so a short last
        batch cannot be mapped to the wrong rows (an official evaluation bug). Under torchrun each process
        judges its slice (batch_size at a time) and every process gets the whole list back."""
        check_mode(mode)
        self.net.eval()
        rank, n = world()
        mine, result = split(examples, n)[rank], []
        for i in tqdm(range(0, len(mine), batch_size), disable=not progress or rank > 0, desc=f"eval {mode}"):
            logits, labels, _, _ = self.forward(mine[i:i + batch_size], mode)
            result += answer_correct(logits, labels, self.cfg.eval_tokens).tolist()
        return gather(result)

    # -- using a trained HyperDAS -------------------------------------------------------------------

    @torch.no_grad()
    def intervene(self, base_prompt, counterfactual_prompt, concept, base_entity=None, source_entity=None,
                  max_new_tokens=8, mode="soft", return_positions=False):
        """Greedy continuation of base_prompt with `concept` (attribute_named) taken from counterfactual_prompt.
        The hypernetwork sees each prompt up to its entity; entities the instruction template needs but that
        are not given are found with entity_in(). With return_positions, also the (base token, source token,
        weight) pairs it chose: every base position whose largest share is a source token."""
        for name, prompt in (("base_prompt", base_prompt), ("counterfactual_prompt", counterfactual_prompt)):
            if not prompt or not prompt.strip():
                raise ValueError(f"{name} is empty: give the text to intervene on.")
        attribute = attribute_named(concept, self.attributes)
        needed = template_fields(self.cfg.instruction_template)
        if "base" in needed and base_entity is None:
            base_entity = entity_in(base_prompt, self.domains, "base")
        if "source" in needed and source_entity is None:
            source_entity = entity_in(counterfactual_prompt, self.domains, "source")
        tok = self.tokenizer
        instruction = instruction_text(self.cfg.instruction_template, base_entity, source_entity, attribute)
        batch = self.batch(tokenize_prompt(tok, base_prompt, base_entity, "base"),
                           tokenize_prompt(tok, counterfactual_prompt, source_entity, "source"),
                           tokenize(tok, [instruction]), [attribute])
        self.net.eval()
        base = batch["base"]
        with self.autocast():
            weights, basis, h_source = self.plan(batch)
            weights = harden(weights, mode, self.cfg.bidding_threshold)
            new = greedy_continuation(self.model, target_inputs(base), max_new_tokens, tok.eos_token_id,
                                      patch_layer(self.model, self.cfg.layer,
                                                  lambda h: interchange(h, h_source, weights, basis)))
        text = tok.decode(new)
        if not return_positions:
            return text
        return text, chosen_positions(tok, base, batch["source"], weights[0])

    def save(self, path):
        """Write weights and configuration to the directory `path` (replaced as a whole)."""
        save_checkpoint(self, path)

    @classmethod
    def load(cls, path, model, tokenizer=None):
        """A HyperDAS or DAS, as it was saved (load_checkpoint)."""
        return load_checkpoint(path, model, tokenizer)


# ----------------------------------------------------------------------------------------------------
# The DAS baseline (RAVEL's MDAS setup): one static basis per attribute, at the last entity token.


class DASNetwork(nn.Module):
    def __init__(self, d, k, attributes):
        super().__init__()
        self.attributes = list(attributes)
        self.bases = nn.ModuleList(orthonormal_basis(d, k) for _ in self.attributes)

    def forward(self, concepts):
        """The basis of each example's concept: [B, d, k]."""
        return torch.stack([basis_weight(self.bases[self.attributes.index(c)]) for c in concepts])


class DAS(HyperDAS):
    """Same pairs, loss, training and evaluation as HyperDAS; only steps 1-3 differ: the positions are
    fixed (last entity token of base and source, i.e. the last visible token; with das_position="first", the
    entity's first token) and the subspace is one learned basis per attribute. Unlike the official MDAS it
    patches the same hidden_states[layer]."""

    method = "das"

    def __init__(self, model, tokenizer=None, attributes=(), **config):
        if not attributes:
            raise ValueError("DAS needs its attributes (one basis each): DAS(model, tokenizer, attributes=[...]).")
        super().__init__(model, tokenizer, attributes, **config)

    def build(self):
        return DASNetwork(self.model.config.hidden_size, self.cfg.feature_dim, self.attributes)

    def intervene(self, *args, **kwargs):
        if self.cfg.das_position != "last":
            raise ValueError("intervene() places DAS at the entity's last token, and this DAS was trained at its first: "
                             "score it on examples instead (evaluate / correct).")
        return super().intervene(*args, **kwargs)

    def collate(self, examples):
        batch = super().collate(examples)
        if self.cfg.das_position == "first":      # where each entity's first token is: [B] per prompt
            for key in ("base", "source"):
                batch[f"{key}_at"] = entity_first_tokens(self.tokenizer, batch[key], examples, key).to(self.device)
        return batch

    def plan(self, batch):
        missing = set(batch["concepts"]) - set(self.attributes)
        if missing:
            raise ValueError(f"This DAS has bases for {self.attributes}; got {sorted(missing)}.")
        base, source = batch["base"], batch["source"]
        h_source = hidden_states(self.model, source)[:, :, self.cfg.layer]               # [B, Ts, d]
        B, Ts, Tb = h_source.shape[0], h_source.shape[1], base["input_ids"].shape[1]
        rows = torch.arange(B, device=self.device)
        j = batch.get("base_at", last_visible(base["visible"]))          # the entity's last (or first) token
        i = batch.get("source_at", last_visible(source["visible"]))
        weights = torch.zeros(B, Ts + 1, Tb, device=self.device)
        weights[:, Ts] = 1.0                                    # keep the base everywhere ...
        weights[rows, Ts, j] = 0.0                              # ... except at its entity token,
        weights[rows, i, j] = 1.0                               # which takes the source's same entity token
        return weights, self.net(batch["concepts"]), h_source     # through forward, which DDP sees (torchrun)


# ----------------------------------------------------------------------------------------------------
# The results table (the command line, cli.py, prints it; so does the tutorial)


def print_table(results):
    print(f"\n{results['method']} on {results['domain']} ({results['model']})")
    print(f"{'mode':<12} {'attribute':<20} {'cause':>6} {'isolate':>8} {'disentangle':>12}")
    fmt = lambda x: f"{x:.3f}" if x is not None else "-"
    for mode, s in results["mode"].items():
        for name, row in [*s["per_attribute"].items(), ("(macro: paper)", s), ("(pooled)", s["pooled"])]:
            print(f"{mode:<12} {name:<20} {fmt(row['cause']):>6} {fmt(row['isolate']):>8} {fmt(row['disentangle']):>12}")

