"""Every supported architecture, on a tiny random config built in-process: the hook, the intervention, the
copied blocks, training both ways, save/load and generation through the KV cache."""
import math

import pytest
import torch
import transformers as T

import hyperdas as H
from test_hyperdas import CITIES, WORDS, example, keep_only, make_tokenizer

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2,
            tie_word_embeddings=False)
GPT = dict(vocab_size=len(WORDS) + 3, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
# Each config switches on what its family has that a plain Llama has not, at values that make mistakes show:
# head_dim != hidden/heads, a query scalar != head_dim, soft-capping that bites, per-layer score scaling.
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**TINY),
    "llama_biased": lambda: T.LlamaConfig(**TINY, attention_bias=True, mlp_bias=True),
    "mistral": lambda: T.MistralConfig(**TINY),
    "qwen2": lambda: T.Qwen2Config(**TINY),
    "qwen3": lambda: T.Qwen3Config(**TINY, head_dim=8),
    "gemma": lambda: T.GemmaConfig(**TINY, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**TINY, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=0.5,
                                     final_logit_softcapping=None),
    "phi3": lambda: T.Phi3Config(**TINY),
    "phi3_partial_rotary": lambda: T.Phi3Config(**TINY, rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                                             partial_rotary_factor=0.5)),
    "olmo2": lambda: T.Olmo2Config(**TINY),
    "mixtral": lambda: T.MixtralConfig(**TINY, num_local_experts=2, num_experts_per_tok=1),
    "gpt2": lambda: T.GPT2Config(**GPT, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                 scale_attn_by_inverse_layer_idx=True),
    "gpt2_unscaled": lambda: T.GPT2Config(**GPT, n_embd=32, n_layer=3, n_head=4, n_positions=64, scale_attn_weights=False),
    "pythia": lambda: T.GPTNeoXConfig(**GPT, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4),                       # parallel residual, 1/4 rotary
    "neox_sequential": lambda: T.GPTNeoXConfig(**GPT, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=4, use_parallel_residual=False),
    "neox_unbiased": lambda: T.GPTNeoXConfig(**GPT, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, attention_bias=False),
}
COPYABLE = [name for name in CONFIGS if name != "mixtral"]
_models = {}


def target(name):
    """A frozen tiny model whose norm weights and biases are random too (HF starts them at 1 / 0, where a
    missing or swapped norm or bias would go unnoticed), with a peaked LM head (answers follow the state)."""
    if name not in _models:
        torch.manual_seed(0)
        config = CONFIGS[name]()
        config._attn_implementation = "eager"
        model = T.AutoModelForCausalLM.from_config(config)
        for key, p in model.named_parameters():
            if p.dim() == 1:     # norm weights by 30%, biases as large as the weights are
                p.data += (0.3 if "norm" in key or ".ln_" in key else 0.02) * torch.randn_like(p)
        model.lm_head.weight.data *= 10
        _models[name] = H.freeze(model)
    return _models[name]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def new_hd(model, tok, **kw):
    return H.HyperDAS(model, tok, **{"layer": 2, "feature_dim": 8, "num_blocks": 2, "lr": 2e-3, **kw})


def prompts(tok):
    return H.tokenize(tok, ["the city of Vienna is in", "I love Paris ,"])


@pytest.mark.parametrize("name", CONFIGS)
def test_the_hook_sees_hidden_states_at_every_layer_and_identity_is_bit_identical(name, tok):
    model, enc = target(name), prompts(tok)
    out = model(**H.target_inputs(enc), output_hidden_states=True)
    for layer in range(model.config.num_hidden_layers):
        seen = []
        with H.patch_layer(model, layer, lambda h: seen.append(h) or h):
            logits = model(**H.target_inputs(enc)).logits
        assert torch.equal(seen[0], out.hidden_states[layer]) and torch.equal(logits, out.logits)
    scale = math.sqrt(model.config.hidden_size) if name.startswith("gemma") else 1.0   # Gemma: sqrt(d) in stream 0
    embedded = model.get_input_embeddings().weight[enc["input_ids"]]
    if name.startswith("gpt2"):
        embedded = embedded + model.transformer.wpe.weight[enc["position_ids"]]
    torch.testing.assert_close(out.hidden_states[0], embedded * scale, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_keep_only_selection_leaves_the_logits_bit_identical(name, tok):
    model = target(name)
    hd, enc = new_hd(model, tok, init_from_target=name != "mixtral"), prompts(tok)
    batch = hd.collate([example("Vienna", "Paris"), example("Tokyo", "Rome", "Japan", "Italy")])
    weights, basis, h_source = hd.plan(batch)
    plain = model(**H.target_inputs(batch["base"])).logits
    assert torch.equal(hd.intervened_logits(batch["base"], keep_only(weights), basis, h_source), plain)


@pytest.mark.parametrize("name", CONFIGS)
def test_one_hot_full_rank_interchange_equals_manual_activation_patching(name, tok):
    model = target(name)
    hd = new_hd(model, tok, init_from_target=name != "mixtral")
    L, d = hd.cfg.layer, model.config.hidden_size
    base, source = H.tokenize(tok, ["the city of Vienna is in"]), H.tokenize(tok, ["I love Paris"])
    h_source = model(**H.target_inputs(source), output_hidden_states=True).hidden_states[L]
    i, j = 3, 4                                   # "Paris" in the source, "Vienna" in the base
    Ts, Tb = h_source.shape[1], base["input_ids"].shape[1]
    A = torch.zeros(1, Ts + 1, Tb)
    A[0, Ts], A[0, Ts, j], A[0, i, j] = 1, 0, 1
    torch.manual_seed(3)
    for W in (torch.eye(d)[None], torch.linalg.qr(torch.randn(1, d, 5)).Q):
        def manual(module, args, out):            # on the output of layer L-1, tuple or tensor
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[:, j] = h[:, j] + (h_source[:, i] - h[:, j]) @ W[0] @ W[0].T
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        handle = H.decoder_layers(model)[L - 1].register_forward_hook(manual)
        expected = model(**H.target_inputs(base)).logits
        handle.remove()
        torch.testing.assert_close(hd.intervened_logits(base, A, W, h_source), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", COPYABLE)
def test_a_copied_block_without_cross_attention_computes_the_target_layer(name, tok):
    """Block i without its two memories is target layer i (1e-5, fp32), at positions far from 0 as the memory
    keys are; the encoder's embedding is hidden_states[0] and its final norm is the target's."""
    model = target(name)
    torch.manual_seed(1)
    ids, pos = torch.randint(3, 40, (2, 9)), torch.arange(9)[None].expand(2, 9) + 40
    hs = model(input_ids=ids, position_ids=pos, output_hidden_states=True).hidden_states
    net = H.HyperNetwork(model, H.HyperDASConfig(layer=1, feature_dim=4, num_blocks=2))
    enc = net.encoder
    rope = None if enc.rope is None else enc.rope(pos)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None].expand(2, 9, 9)
    for i, block in enumerate(enc.blocks):
        torch.testing.assert_close(block(hs[i], rope, causal), hs[i + 1], atol=1e-5, rtol=1e-5)
    embedded = enc.embed(ids) * enc.embed_scale + (0 if enc.positions is None else enc.positions(pos))
    torch.testing.assert_close(embedded, hs[0], atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 5, model.config.hidden_size)
    torch.testing.assert_close(enc.norm(x), H.final_norm(model)(x), atol=1e-5, rtol=1e-5)
    # What the encoder's first block reads is the instruction's hidden_states[0] in the target.
    instruction, seen = H.tokenize(tok, ["Vienna ; Paris - Country"]), []
    memory = H.memory(torch.stack(hs, 2)[:1], torch.ones(1, 9, dtype=torch.bool))
    handle = enc.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    enc(instruction, memory, memory)
    handle.remove()
    expected = model(**H.target_inputs(instruction), output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)


def test_a_mixture_of_experts_copy_is_refused_in_one_line_naming_the_alternative(tok):
    with pytest.raises(ValueError, match="mixture-of-experts.*init_from_target=False") as err:
        H.HyperNetwork(target("mixtral"), H.HyperDASConfig(layer=1, feature_dim=4, num_blocks=2))
    assert "\n" not in str(err.value)


def test_a_layer_weight_without_a_place_in_the_block_is_an_error_not_dropped():
    model = target("llama")
    layer = H.decoder_layers(model)[0]
    layer.register_buffer("extra_scale", torch.ones(3))          # a weight the block would not compute
    try:
        with pytest.raises(ValueError, match="extra_scale.*init_from_target=False"):
            H.HyperNetwork(model, H.HyperDASConfig(layer=1, feature_dim=4, num_blocks=1))
    finally:
        del layer.extra_scale
    arch = H.architecture(model.config)
    block = H.Block(dict(arch, qkv_bias=True))                   # a block part the layer has no weight for
    with pytest.raises(ValueError, match="q_proj.bias"):
        block.copy_from(layer, arch)


def test_an_unknown_architecture_is_refused_in_one_line():
    with pytest.raises(ValueError, match="'opt'.*supports Llama"):
        H.architecture(T.OPTConfig())


def learnable_examples(model, tok):
    """Prompts that end at the entity, labelled with the target's own answers: the cause label (the answer
    to "the city of <source>") is then exactly what a full patch of the entity's state gives, so it can be
    learned on any random model (an entity earlier in the prompt barely moves a random model's answer)."""
    answer = lambda city: tok.convert_ids_to_tokens(
        model(**H.target_inputs(H.tokenize(tok, [f"the city of {city}"]))).logits[0, -1].argmax().item())
    return [example(base, source, answer(base), answer(source), base_template="the city of %s",
                    source_template="the city of %s")
            for base, source in zip(CITIES, CITIES[3:] + CITIES[:3])]


@pytest.mark.parametrize("init", [True, False], ids=["copied", "random"])
@pytest.mark.parametrize("name", CONFIGS)
def test_a_few_training_steps_reduce_the_loss(name, init, tok):
    model = target(name)
    if init and name == "mixtral":
        pytest.skip("refused above")
    examples = learnable_examples(model, tok)
    hd = new_hd(model, tok, init_from_target=init, lr=5e-3)
    history = hd.train(examples, epochs=12, batch_size=8, progress=False)
    first, last = history[0]["prediction"], sum(h["prediction"] for h in history[-2:]) / 2
    assert last < 0.9 * first, (first, last)


@pytest.mark.parametrize("name", CONFIGS)
def test_save_load_round_trip_and_generation_through_the_cache(name, tok, tmp_path):
    model = target(name)
    hd = new_hd(model, tok, init_from_target=name != "mixtral")
    examples = [example("Vienna", "Paris"), example("Tokyo", "Rome", "Japan", "Italy")]
    hd.train(examples, epochs=1, batch_size=2, progress=False)
    hd.save(tmp_path / "ckpt")
    loaded = H.HyperDAS.load(tmp_path / "ckpt", model, tok)
    assert torch.equal(loaded.forward(examples)[0], hd.forward(examples)[0])
    # intervene() decodes through the KV cache; its first token is the intervened forward's greedy token.
    text = hd.intervene("the city of Vienna is in", "I love Paris", "Country", "Vienna", "Paris", max_new_tokens=4)
    batch = hd.batch(H.tokenize(tok, ["the city of Vienna is in"], visible_chars=[len("the city of Vienna")]),
                     H.tokenize(tok, ["I love Paris"]), H.tokenize(tok, ["Vienna ; Paris - Country"]), ["Country"])
    weights, basis, h_source = hd.plan(batch)
    first = hd.intervened_logits(batch["base"], weights, basis, h_source)[0, -1].argmax().item()
    assert (text.split() or [""])[0] == ("" if first == tok.eos_token_id else tok.convert_ids_to_tokens(first))


def test_rope_types_whose_frequencies_follow_the_sequence_length_are_refused():
    config = T.LlamaConfig(**TINY, rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0))
    model = T.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        H.HyperNetwork(model, H.HyperDASConfig(layer=1, feature_dim=4, num_blocks=1))
