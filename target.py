"""The frozen target language model, as HyperDAS meets it: loading it, the one hook placed in it, the
prompt and answer tokenization with what the hypernetwork may see, RAVEL pairs filtered to what the target
knows, the entity names in a prompt, and how each supported architecture lays out its decoder layer
(architecture(), layer_weights()), so that hyperdas.py can copy a layer into a hypernetwork block.

hyperdas.py re-exports every name here; nothing here imports hyperdas.py.
"""
import contextlib
import inspect
import os
import re
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import ravel_data
from distributed import from_main, is_main

SIZES = {"train": 6000, "test": 2000}   # RAVEL pairs generated per split before the model filter


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


def default_tokenizer(model):
    """The tokenizer saved with the model (from_pretrained records where the model came from)."""
    from transformers import AutoTokenizer
    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"No tokenizer given and none found for the model at {source!r} ({err}); "
                         "pass tokenizer=AutoTokenizer.from_pretrained(...).") from None


def module_at(model, paths):
    """The first of the dotted attribute paths that exists on the model, else None."""
    for path in paths:
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if module is not None:
            return module
    return None


def decoder_layers(model):
    """The target's list of decoder layers (model.model.layers; GPT-2: transformer.h; GPT-NeoX: gpt_neox.layers)."""
    layers = module_at(model, ("model.layers", "transformer.h", "gpt_neox.layers"))
    if isinstance(layers, nn.ModuleList):
        return layers
    raise ValueError(f"Cannot find the decoder layers of {type(model).__name__}: HyperDAS supports {SUPPORTED}.")


def final_norm(model):
    """The norm applied after the last decoder layer."""
    norm = module_at(model, ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"))
    if norm is None:
        raise ValueError(f"Cannot find the final norm of {type(model).__name__}: HyperDAS supports {SUPPORTED}.")
    return norm


def target_positions(model):
    """The learned absolute position table of a target without rotary positions (GPT-2's wpe), else None."""
    return module_at(model, ("transformer.wpe",)) if architecture(model.config)["absolute_positions"] else None


def target_rope(model):
    """The target's rotary frequencies and output scaling, taken from its own rotary module, so that rope
    scaling (Llama-3.1's "llama3", "linear", "yarn") and partial rotary (GPT-NeoX) are what the hypernetwork
    uses too; None for a target with absolute positions. Cross-attention key positions reach tokens x
    (layers + 1), about 1,650 at Llama size, where scaling does matter."""
    if architecture(model.config)["absolute_positions"]:
        return None
    rotary = module_at(model, ("model.rotary_emb", "gpt_neox.rotary_emb"))
    if rotary is None:
        raise ValueError(f"Cannot find the rotary embedding of {type(model).__name__}: HyperDAS supports {SUPPORTED}.")
    if getattr(rotary, "rope_type", "default") in ("dynamic", "longrope"):   # frequencies follow the sequence length
        raise ValueError(f"rope_type {rotary.rope_type!r} changes the target's rotary frequencies with the sequence "
                         "length, which the hypernetwork's memory positions would not follow exactly; HyperDAS supports "
                         "fixed rope types (default, linear, llama3, yarn).")
    return rotary.inv_freq.detach().float().cpu(), float(getattr(rotary, "attention_scaling", 1.0))


def check_layer(model, layer):
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise ValueError(f"layer={layer} is out of range: this model has {n} decoder layers, so the residual "
                         f"stream hidden_states[layer] can be patched for 0 <= layer <= {n - 1}.")


@contextlib.contextmanager
def patch_layer(model, layer, fn):
    """Inside the block, every forward uses fn(h) in place of h = hidden_states[layer]: the input of decoder
    layer `layer`, which is what the residual stream is there on every architecture (for layer 0 that is the
    embeddings after any scaling, Gemma's sqrt(d) included). The hook is removed on exit, also on errors."""
    check_layer(model, layer)

    def hook(module, args, kwargs):
        # A new value, never an in-place edit (that would also change the caller's tensor).
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        return args, dict(kwargs, hidden_states=fn(kwargs["hidden_states"]))

    handle = decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def greedy_continuation(model, inputs, max_new_tokens, eos_token_id, patch=contextlib.nullcontext()):
    """The greedy continuation of one prompt, as token ids: the prompt runs once inside `patch` (an
    intervention such as patch_layer's), and later tokens read the patched prompt through the key/value
    cache. Without a patch it is model.generate's greedy continuation."""
    # transformers 5.2x renamed forward's past_key_values to cache; pass whichever this version takes.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with patch:
        out = model(**inputs, use_cache=True)
    new, position = [], inputs["input_ids"].shape[1]
    while len(new) < max_new_tokens:
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        if token.item() == eos_token_id:
            break
        new.append(token.item())
        if len(new) == max_new_tokens:       # the last token needs no forward of its own
            break
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        out = model(input_ids=token, use_cache=True, **{cache_arg: cache},
                    position_ids=torch.tensor([[position]], device=token.device))
        position += 1
    return new


def answer_separator(prompt):
    """The official space rule: a space before the answer unless the prompt ends in whitespace, " ' or (."""
    return "" if not prompt or prompt[-1].isspace() or prompt[-1] in "\"'(" else " "


def encode(tokenizer, strings):
    return tokenizer(list(strings), add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, prompts, answers, prompt_ids):
    """The ids that follow each prompt's own ids for separator + answer, so the answer is exactly its own
    tokens: the full text's ids after the prompt's when its tokenization starts with them; else (a merge
    across the boundary: byte-level BPE with Llama-3's split regex turns '"' + '-12' into '"-', '12') the
    answer tokenized alone or, for a tokenizer that puts a space before every text (SentencePiece's dummy '▁',
    add_prefix_space) and so before the answer alone too, the answer's tokens after a line break: the first
    of these with which prompt + answer decode to the same text; None when none does."""
    tails = [answer_separator(p) + a for p, a in zip(prompts, answers)]
    full, alone = encode(tokenizer, [p + t for p, t in zip(prompts, tails)]), encode(tokenizer, tails)
    broken = token_offsets(tokenizer, ["\n" + t for t in tails])
    after_break = [[i for i, (start, _) in zip(ids, row) if start >= 1]
                   if all(start >= 1 or end <= 1 for start, end in row) else []   # none may span the break
                   for ids, row in zip(broken["input_ids"], broken["offset_mapping"])]
    out = []
    for p, f, a, b in zip(prompt_ids, full, alone, after_break):
        if f[:len(p)] == p and len(f) > len(p):
            out.append(f[len(p):])
        else:
            out.append(next((c for c in (a, b) if c and tokenizer.decode(p + c) == tokenizer.decode(f)), None))
    return out


def token_offsets(tokenizer, strings):
    """Ids and each token's (start, end) characters in its string; only fast tokenizers know the latter."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer: HyperDAS needs token offsets; load the "
                         "fast one (AutoTokenizer.from_pretrained(..., use_fast=True)).")
    return tokenizer(list(strings), add_special_tokens=False, return_offsets_mapping=True)


def visible_counts(tokenizer, prompts, visible_chars):
    """How many of each prompt's tokens start within its first visible_chars[i] characters. A token that
    straddles the boundary (the entity's end merged with what follows) counts: it carries the entity's end."""
    offsets = token_offsets(tokenizer, prompts)["offset_mapping"]
    return [sum(start < n for start, _ in row) for row, n in zip(offsets, visible_chars)]


def tokenize(tokenizer, prompts, answers=None, visible_chars=None):
    """BOS + prompt [+ separator + answer] for each row, left-padded into one batch.

    BOS is added by hand exactly once (tokenizers that add their own would give two; official bug). The
    answer is exactly its own tokens (answer_ids); a row where that cannot be had is an error here, and
    filter_examples drops (and counts) such rows. `visible` marks the tokens the hypernetwork may read and
    intervene on: BOS and every prompt token that starts within the first visible_chars[i] characters
    (the whole prompt by default). `labels` is -100 except on the answer tokens."""
    prompts = list(prompts)
    ids = encode(tokenizer, prompts)
    tails = [[] for _ in prompts] if answers is None else answer_ids(tokenizer, prompts, list(answers), ids)
    for prompt, answer, tail in zip(prompts, answers or prompts, tails):
        if tail is None:
            raise ValueError(f"The answer {answer!r} after the prompt {prompt[-30:]!r} cannot be tokenized as "
                             "tokens of its own with this tokenizer; filter_examples drops such rows.")
    if visible_chars is None:
        n_visible = [len(p) for p in ids]
    else:
        n_visible = visible_counts(tokenizer, prompts, visible_chars)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rows = [bos + p + t for p, t in zip(ids, tails)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    B, T = len(rows), max(len(r) for r in rows)
    out = dict(input_ids=torch.full((B, T), pad), attention_mask=torch.zeros(B, T, dtype=torch.long),
               visible=torch.zeros(B, T, dtype=torch.bool), labels=torch.full((B, T), -100))
    for i, row in enumerate(rows):
        start = T - len(row)                                           # left padding
        out["input_ids"][i, start:] = torch.tensor(row)
        out["attention_mask"][i, start:] = 1
        out["visible"][i, start:start + len(bos) + n_visible[i]] = True
        answer_start = start + len(bos) + len(ids[i])
        out["labels"][i, answer_start:] = out["input_ids"][i, answer_start:]
    out["position_ids"] = (out["attention_mask"].cumsum(1) - 1).clamp(min=0)   # explicit, since left-padded
    return out


def tokenize_prompt(tokenizer, prompt, entity, role):
    """One prompt for the hypernetwork, visible up to its `role` ("base" or "source") entity, or whole
    when the entity is None."""
    if entity is None:
        return tokenize(tokenizer, [prompt])
    end = entity_end(prompt, entity)
    if end is None:
        raise ValueError(f"{role}_entity={entity!r} does not occur in {prompt!r} as a word of its own.")
    return tokenize(tokenizer, [prompt], visible_chars=[end])


def answer_window(labels):
    """How many last positions' logits cover every row's answer predictions (rows are left-padded, so all
    answers end at the last position): the longest answer + 1. Passed to the model as logits_to_keep."""
    return int((labels != -100).sum(1).max()) + 1


def answer_labels(logits, labels):
    """The labels that logits covering the last k positions predict: labels[:, T-k+1:], [B, k-1]."""
    return labels[:, labels.shape[1] - logits.shape[1] + 1:]


def answer_correct(logits, labels, first_n=None):
    """Teacher-forced exact match per row: argmax at t-1 equals the label at t for every answer token
    (only the first `first_n`). A row with no answer token is a miss, never a hit. logits: [B, k, V]."""
    target = answer_labels(logits, labels)                                # [B, k-1]
    is_answer = target != -100
    if first_n is not None:
        is_answer &= is_answer.cumsum(1) <= first_n
    return ((logits[:, :-1].argmax(-1) == target) | ~is_answer).all(1) & is_answer.any(1)   # [B]


def target_inputs(enc):
    return {k: enc[k] for k in ("input_ids", "attention_mask", "position_ids")}


def first_entity_token(tokenizer, enc, prompts, prefixes, entities):
    """Index, in each left-padded row of `enc` (tokenize()'s batch of `prompts`, which begin with `prefixes`),
    of the token in which the entity that ends each prefix begins: [B]."""
    for prompt, prefix, entity in zip(prompts, prefixes, entities):
        if not (prompt.startswith(prefix) and prefix.endswith(entity)):
            raise ValueError(f"The prompt prefix {prefix[-40:]!r} does not end with its entity {entity!r}.")
    upto = visible_counts(tokenizer, prompts, [len(p) - len(e) + 1 for p, e in zip(prefixes, entities)])
    bos = int(tokenizer.bos_token_id is not None)
    pad = enc["input_ids"].shape[1] - enc["attention_mask"].sum(1)
    return pad + bos + torch.tensor(upto, device=pad.device) - 1


def entity_first_tokens(tokenizer, enc, examples, role):
    """first_entity_token() of RAVEL examples' base (role "base") or counterfactual ("source") prompts."""
    side, entity = ("input_", "entity") if role == "base" else ("counterfactual_input_", "counterfactual_entity")
    prefixes = [x[side + "prefix"] for x in examples]
    prompts = [p + x[side + "suffix"] for p, x in zip(prefixes, examples)]
    return first_entity_token(tokenizer, enc, prompts, prefixes, [x[entity] for x in examples])


def chosen_positions(tokenizer, base, source, weights):
    """(base token, source token, weight) for one pair's every base position whose largest share of the
    selection weights [Ts+1, Tb] is a source token (not keep)."""
    names = lambda enc: tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    base_tokens, source_tokens, w = names(base), names(source), weights.float()
    return [(base_tokens[j], source_tokens[i], round(w[i, j].item(), 3))
            for j, i in enumerate(w.argmax(0).tolist()) if i < len(source_tokens)]


def last_visible(visible):
    """Index of each left-padded row's last visible token (the entity's last token): [B, T] -> [B]."""
    return visible.shape[1] - 1 - visible.flip(1).int().argmax(1)


@torch.no_grad()
def hidden_states(model, enc):
    """All hidden states of one unintervened pass: [B, T, n_layers+1, d]. Index 0 is the embeddings."""
    out = model(**target_inputs(enc), output_hidden_states=True, logits_to_keep=1)
    return torch.stack(out.hidden_states, dim=2)


def filter_examples(examples, model, tokenizer, batch_size=64, progress=True):
    """Keep the examples whose label the target model reproduces, every token, on verify_text (the paper's
    filter), after dropping the rows whose answer cannot be tokenized as tokens of its own (answer_ids).

    One teacher-forced forward pass per batch; each verdict is paired with its own row (HyperDAS ran its
    filter three times because it mapped the short last batch's rows to the wrong examples)."""
    label = ravel_data.label
    separable = lambda prompts, answers: [ids is not None for ids in
                                          answer_ids(tokenizer, prompts, answers, encode(tokenizer, prompts))]
    ok = [True] * len(examples)
    for start in range(0, len(examples), 1024):
        rows = examples[start:start + 1024]
        checks = [separable([e["verify_text"] for e in rows], [label(e) for e in rows])]
        if all("input_prefix" in e for e in rows):   # the training prompt, with its own entity
            checks.append(separable([e["input_prefix"] + e["input_suffix"] for e in rows], [label(e) for e in rows]))
        ok[start:start + len(rows)] = [all(c) for c in zip(*checks)]
    refused = ok.count(False)
    candidates = [e for e, good in zip(examples, ok) if good]
    device = next(model.parameters()).device
    kept = []
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(candidates), batch_size), desc="filter", disable=not progress):
        batch = candidates[start:start + batch_size]
        enc = tokenize(tokenizer, [e["verify_text"] for e in batch], [label(e) for e in batch])
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            logits = model(**target_inputs(enc), logits_to_keep=answer_window(enc["labels"])).logits
        kept += [e for e, good in zip(batch, answer_correct(logits, enc["labels"]).tolist(), strict=True) if good]
    model.train(was_training)
    counts, totals = Counter(e["attribute_type"] for e in kept), Counter(e["attribute_type"] for e in examples)
    print(f"filter: kept {len(kept)} of {len(examples)} examples (causal {counts['causal']} of {totals['causal']}, "
          f"isolate {counts['isolate']} of {totals['isolate']}); {refused} refused because the tokenizer merges "
          "their answer into the prompt", file=sys.stderr)
    return kept


def ravel_examples(domain, split, model, tokenizer, n=None, seed=0, data=None):
    """Generate `n` RAVEL pairs of a domain (default: SIZES, per domain for "all") and keep those whose
    label the unintervened target reproduces (filter_examples). A toy target draws pairs only from the
    entities and attributes it was taught. data: RAVEL's data.tgz or data/ folder (default $RAVEL_DATA)."""
    n = SIZES[split] * (len(ravel_data.DOMAINS) if domain == "all" else 1) if n is None else n
    world = getattr(model.config, "toy_world", None) or {}
    taught = None if domain == "all" else world.get("attributes")   # the all world knows each domain's defaults
    if isinstance(taught, dict):        # the all world asked for one domain: {domain: attributes}
        taught = taught.get(domain)
    pairs = ravel_data.make_examples(domain, split, n, seed, attributes=taught, path=data,
                                     entities=world.get("entities"), isolate_attributes=taught)
    if world.get("position", "last") != "last":
        # The known-position world names each entity by its first token; where a sentence glues letters onto the
        # entity ("%sspor") the first token is another one, so such prompts are not asked about it.
        glued = lambda prompt, prefix: prompt[len(prefix):][:1].isalnum()
        kept = [x for x in pairs if not glued(x["input_prefix"] + x["input_suffix"], x["input_prefix"]) and not
                glued(x["counterfactual_input_prefix"] + x["counterfactual_input_suffix"], x["counterfactual_input_prefix"])]
        if len(kept) < len(pairs) and is_main():
            print(f"known-position world: dropped {len(pairs) - len(kept)} pairs whose prompt glues letters onto "
                  "the entity", file=sys.stderr)
        pairs = kept
    return filter_examples(pairs, model, tokenizer)



def examples_of(data, split, model, tokenizer, seed=0):
    """A list of examples, or a RAVEL domain by name or path ("city", "data/ravel/city"): its pairs, generated
    and filtered for this model (ravel_examples, on the first process); a path's parent is used as RAVEL's data
    if it holds it."""
    if not isinstance(data, (str, os.PathLike)):
        return list(data)
    path = Path(data)
    if path.name not in ravel_data.DOMAINS + ("all",):
        raise ValueError(f"{str(data)!r} names no RAVEL domain: give one of {', '.join(ravel_data.DOMAINS)}, all "
                         "(or a path ending in one, such as data/ravel/city), or a list of examples.")
    folder = None
    if str(path.parent) not in ("", "."):
        with contextlib.suppress(FileNotFoundError, RuntimeError):
            folder = ravel_data.data_dir(path.parent)
    return from_main(lambda: ravel_examples(path.name, split, model, tokenizer, seed=seed, data=folder))

# ----------------------------------------------------------------------------------------------------
# Entity names in a prompt.


def entity_end(prompt, entity):
    """Where the entity's first whole-word mention ends in the prompt (ignoring case), or None."""
    found = re.search(rf"(?<!\w){re.escape(entity)}(?!\w)", prompt, flags=re.IGNORECASE)
    return found.end() if found else None


def whole_words(name, text):
    return entity_end(text, name) is not None


def entity_in(prompt, domains, role):
    """The entity a prompt mentions: the longest entity name of the given RAVEL domains that occurs in the
    prompt as whole words."""
    names = []
    with contextlib.suppress(FileNotFoundError, RuntimeError, ValueError):
        names = [n for d in domains for n in ravel_data.load_domain(d).entities if whole_words(n, prompt)]
    if not names:
        raise ValueError(f"The instruction template needs the {role} entity and no entity of "
                         f"{domains or 'a trained domain'} occurs in {prompt!r}: pass {role}_entity=.")
    return max(names, key=len)


# ----------------------------------------------------------------------------------------------------
# The architectures HyperDAS copies exactly: what each decoder layer computes and how its weights are named.

# How each family names the parts of a decoder layer: target state-dict prefix -> the block's part.
# "qkv" and "gate_up" are fused projections, split by layer_weights().
LLAMA_PARTS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
               **{f"self_attn.{p}_proj": f"attn.{p}_proj" for p in "qkvo"},
               "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",
               **{f"mlp.{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")}}
LAYER_PARTS = {
    "llama": LLAMA_PARTS, "mistral": LLAMA_PARTS, "mixtral": LLAMA_PARTS, "qwen2": LLAMA_PARTS, "qwen3": LLAMA_PARTS,
    "gemma": LLAMA_PARTS,
    "gemma2": {**LLAMA_PARTS, "post_attention_layernorm": "attn_post", "pre_feedforward_layernorm": "mlp_norm",
               "post_feedforward_layernorm": "mlp_post"},
    "olmo2": {**LLAMA_PARTS, "post_attention_layernorm": "attn_post", "post_feedforward_layernorm": "mlp_post"},
    "phi3": {**LLAMA_PARTS, "self_attn.qkv_proj": "qkv", "mlp.gate_up_proj": "gate_up"},
    "gpt2": {"ln_1": "attn_norm", "ln_2": "mlp_norm", "attn.c_attn": "qkv", "attn.c_proj": "attn.o_proj",
             "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"},
    "gpt_neox": {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
                 "attention.query_key_value": "qkv", "attention.dense": "attn.o_proj",
                 "mlp.dense_h_to_4h": "mlp.up_proj", "mlp.dense_4h_to_h": "mlp.down_proj"}}
SUPPORTED = "Llama, Mistral, Mixtral, Qwen2, Qwen3, Gemma, Gemma-2, Phi-3, OLMo-2, GPT-2, GPT-NeoX (Pythia)"


def architecture(config):
    """What a target's decoder layer computes, read from its config: the one description Block is built from."""
    c, t = config, config.model_type
    if t not in LAYER_PARTS:
        raise ValueError(f"HyperDAS does not support the {t!r} architecture ({type(c).__name__}): it supports {SUPPORTED}.")
    d, heads = c.hidden_size, c.num_attention_heads
    biased = getattr(c, "attention_bias", t == "gpt_neox") or t == "gpt2"
    head_dim = getattr(c, "head_dim", None) or d // heads
    scale = head_dim ** -0.5
    if t == "gemma2":
        scale = c.query_pre_attn_scalar ** -0.5
    elif t == "gpt2" and not c.scale_attn_weights:
        scale = 1.0
    return dict(
        type=t, d=d, heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
        d_ff=getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d,
        eps=next(getattr(c, k) for k in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon") if hasattr(c, k)),
        layer_norm=t in ("gpt2", "gpt_neox"),                 # nn.LayerNorm with a bias; else RMSNorm
        norm_offset=1.0 if t in ("gemma", "gemma2") else 0.0,  # Gemma's norms scale by (1 + weight)
        act=c.hidden_activation if t == "gemma2" else c.activation_function if t == "gpt2" else c.hidden_act,
        gated=t not in ("gpt2", "gpt_neox"),                  # act(gate) * up; else act(up)
        qkv_bias=biased or t == "qwen2", o_bias=biased,        # Qwen2: q/k/v biases only
        mlp_bias=t in ("gpt2", "gpt_neox") or getattr(c, "mlp_bias", False),
        qk_norm={"qwen3": "head", "olmo2": "full"}.get(t),    # RMSNorm per head, or over the whole projection
        pre_norm=t != "olmo2", post_norm=t in ("gemma2", "olmo2"),
        parallel=t == "gpt_neox" and c.use_parallel_residual,
        scale=scale, inverse_layer_scale=t == "gpt2" and c.scale_attn_by_inverse_layer_idx,
        softcap=getattr(c, "attn_logit_softcapping", None) if t == "gemma2" else None,
        absolute_positions=t == "gpt2", mixture_of_experts=t == "mixtral")


def layer_weights(layer, arch):
    """A target decoder layer's weights, fp32, under the block's part names: fused q/k/v and gate/up projections
    split, GPT-2's Conv1D weights transposed to nn.Linear's layout, Gemma's (1 + weight) norms folded. A weight
    no block part computes is an error, never silently dropped."""
    parts = LAYER_PARTS[arch["type"]]
    conv = {name for name, m in layer.named_modules() if type(m).__name__ == "Conv1D"}   # x @ W, W: [in, out]
    h, kv, dh = arch["heads"], arch["kv_heads"], arch["head_dim"]
    out = {}
    for key, value in layer.state_dict().items():
        prefix, _, param = key.rpartition(".")
        part = parts.get(prefix)
        if part is None:
            raise ValueError(f"The {arch['type']} layer's weight {key!r} has no counterpart in a hypernetwork block, "
                             "so a copy would ignore it; use init_from_target=False.")
        value = value.detach().float()
        if prefix in conv and param == "weight":
            value = value.T
        if part == "qkv":
            if arch["type"] == "gpt_neox":         # per head: [q_h; k_h; v_h]
                q, k, v = (p.flatten(0, 1) for p in value.unflatten(0, (h, 3, dh)).unbind(1))
            else:
                q, k, v = value.split((h * dh, kv * dh, kv * dh))
            out.update({f"attn.q_proj.{param}": q, f"attn.k_proj.{param}": k, f"attn.v_proj.{param}": v})
        elif part == "gate_up":                    # Phi-3: [gate; up]
            out[f"mlp.gate_proj.{param}"], out[f"mlp.up_proj.{param}"] = value.chunk(2)
        else:
            is_norm = ("norm" in part or "post" in part) and param == "weight"
            out[f"{part}.{param}"] = value + arch["norm_offset"] if is_norm else value
    return out
