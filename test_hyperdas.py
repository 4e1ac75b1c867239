"""Tests of hyperdas.py on tiny random Llama models (grouped-query attention) built in-process."""
import argparse
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import hyperdas as H

torch.set_num_threads(min(2, torch.get_num_threads()))

WORDS = ("Vienna Paris Rome Tokyo Berlin Madrid Lima Oslo Austria France Italy Japan Germany Spain Peru Norway "
         "Europe Asia America is in I love the city of visited ; - Country Continent : , \" ( ) was born").split()
CITIES = ["Vienna", "Paris", "Rome", "Tokyo", "Berlin", "Madrid", "Lima", "Oslo"]


def make_tokenizer(auto_bos=False):
    """A word-level tokenizer: decode/encode round-trips exactly, so labels can be chosen by token."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if auto_bos:   # like the Llama-3 tokenizer: adds BOS by itself
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def make_model(seed=0, layers=4, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return H.freeze(LlamaForCausalLM(cfg).to(dtype))


def example(base, source, target="Austria", cf_target="France", kind="causal", attribute="Country",
            concept="Country", base_template="the city of %s is in", source_template="I love %s"):
    b, s = base_template.split("%s"), source_template.split("%s")
    return dict(input_prefix=b[0] + base, input_suffix=b[1], counterfactual_input_prefix=s[0] + source,
                counterfactual_input_suffix=s[1], edit_instruction=f"{base} ; {source} - {concept}", entity=base,
                counterfactual_entity=source, target=target, counterfactual_target=cf_target, attribute_type=kind,
                domain="city", attribute=attribute, verify_text=base_template % source)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model()


def new_hd(model, tok, **kw):
    return H.HyperDAS(model, tok, **{"layer": 2, "feature_dim": 8, "num_blocks": 2, "lr": 1e-3, **kw})


EXAMPLES = [example("Vienna", "Paris"),
            example("Tokyo", "Rome", "Japan", "Italy", source_template="I visited %s ,"),
            example("Oslo", "Lima", "Europe", "America", kind="isolate", attribute="Continent",
                    base_template="%s is in"),
            example("Madrid", "Berlin", "Spain", "Germany", source_template="( %s )")]

# --------------------------------------------------------------------------------------------------
# Step 4: interchange, reflect, patch_layer


def test_interchange_one_hot_full_rank_copies_source_exactly():
    torch.manual_seed(0)
    B, Tb, Ts, d = 2, 5, 4, 6
    hb, hs = torch.randn(B, Tb, d), torch.randn(B, Ts, d)
    A = torch.zeros(B, Ts + 1, Tb)
    A[:, Ts] = 1
    A[:, Ts, 3], A[:, 1, 3] = 0, 1            # base position 3 takes source position 1
    W = torch.linalg.qr(torch.randn(B, d, d)).Q   # full rank: the subspace is everything
    out = H.interchange(hb, hs, A, W)
    torch.testing.assert_close(out[:, 3], hs[:, 1], atol=1e-5, rtol=0)
    assert torch.equal(out[:, [0, 1, 2, 4]], hb[:, [0, 1, 2, 4]])   # keep=1 rows are exactly unchanged


def test_interchange_change_lies_in_basis_span_and_matches_formula():
    torch.manual_seed(1)
    B, Tb, Ts, d, k = 3, 6, 5, 16, 3
    hb, hs = torch.randn(B, Tb, d), torch.randn(B, Ts, d)
    A = torch.randn(B, Ts + 1, Tb).softmax(1)
    W = torch.linalg.qr(torch.randn(B, d, k)).Q
    out = H.interchange(hb, hs, A, W)
    change = out - hb
    outside = change - change @ W @ W.transpose(1, 2)
    assert outside.abs().max() < 1e-5
    manual = torch.stack([torch.stack([hb[b, j] + W[b] @ W[b].T @ (sum(A[b, i, j] * hs[b, i] for i in range(Ts))
                                                                   + A[b, Ts, j] * hb[b, j] - hb[b, j])
                                       for j in range(Tb)]) for b in range(B)])
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)


def test_reflect_is_householder_and_keeps_columns_orthonormal():
    torch.manual_seed(2)
    d, k, B = 12, 4, 3
    R = torch.linalg.qr(torch.randn(d, k)).Q
    v = torch.nn.functional.normalize(torch.randn(B, d), dim=-1)
    W = H.reflect(R, v)
    dense = torch.stack([(torch.eye(d) - 2 * torch.outer(v[b], v[b])) @ R for b in range(B)])
    torch.testing.assert_close(W, dense, atol=1e-6, rtol=0)
    torch.testing.assert_close(W.transpose(1, 2) @ W, torch.eye(k).expand(B, k, k), atol=1e-5, rtol=0)


def test_patch_layer_identity_is_bit_identical_and_removed(model, tok):
    enc = H.tokenize(tok, ["the city of Vienna is in", "I love Paris"])
    plain = model(**H.target_inputs(enc)).logits
    for layer in (0, 2, 3):
        with H.patch_layer(model, layer, lambda h: h):
            assert torch.equal(model(**H.target_inputs(enc)).logits, plain)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with H.patch_layer(model, 2, lambda h: h * 0):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(model(**H.target_inputs(enc)).logits, plain)


def test_patch_layer_replaces_hidden_states_at_that_layer(model, tok):
    enc = H.tokenize(tok, ["the city of Vienna is in"])
    with H.patch_layer(model, 2, lambda h: h + 1.0):
        patched = model(**H.target_inputs(enc), output_hidden_states=True).hidden_states
    clean = model(**H.target_inputs(enc), output_hidden_states=True).hidden_states
    torch.testing.assert_close(patched[2], clean[2] + 1.0)
    assert torch.equal(patched[1], clean[1]) and not torch.allclose(patched[3], clean[3])


def test_intervened_forward_equals_manual_activation_patching(model, tok):
    """The method's intervention (one-hot selection) equals a hand-written hook on layers[L-1]."""
    hd = new_hd(model, tok)
    L, d = hd.cfg.layer, model.config.hidden_size
    base, source = H.tokenize(tok, ["the city of Vienna is in"]), H.tokenize(tok, ["I love Paris"])
    h_source = model(**H.target_inputs(source), output_hidden_states=True).hidden_states[L]
    i, j = 3, 4                                   # "Paris" in the source, "Vienna" in the base
    Ts, Tb = h_source.shape[1], base["input_ids"].shape[1]
    A = torch.zeros(1, Ts + 1, Tb)
    A[0, Ts], A[0, Ts, j], A[0, i, j] = 1, 0, 1
    torch.manual_seed(3)
    for W in (torch.eye(d)[None], torch.linalg.qr(torch.randn(1, d, 5)).Q):
        def manual(module, args, out):
            out = out.clone()
            out[:, j] = out[:, j] + (h_source[:, i] - out[:, j]) @ W[0] @ W[0].T
            return out
        handle = model.model.layers[L - 1].register_forward_hook(manual)
        expected = model(**H.target_inputs(base)).logits
        handle.remove()
        got = hd.intervened_logits(base, A, W, h_source)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Tokenization and target access


def test_tokenize_adds_bos_once_pads_left_and_marks_labels_and_visibility():
    for auto_bos in (False, True):   # the official collate gave two BOS with a BOS-adding tokenizer
        tok = make_tokenizer(auto_bos)
        enc = H.tokenize(tok, ["the city of Vienna is in", "Rome is in"], ["Austria", "Italy"],
                         visible_chars=[len("the city of Vienna"), len("Rome")])
        ids = enc["input_ids"]
        assert ids[0].tolist() == [1] + tok.convert_tokens_to_ids("the city of Vienna is in Austria".split())
        assert ids[1, :3].tolist() == [2, 2, 2] and ids[1, 3] == 1 and (ids == 1).sum() == 2
        assert enc["attention_mask"][1].tolist() == [0, 0, 0] + [1] * 5
        assert enc["position_ids"][1, 3:].tolist() == [0, 1, 2, 3, 4]
        # the last visible token is the entity's last token, never a suffix token (official off-by-one)
        assert enc["visible"][0].tolist() == [True] * 5 + [False] * 3
        assert tok.convert_ids_to_tokens(ids[1][enc["visible"][1]].tolist()) == ["<s>", "Rome"]
        assert enc["labels"][0].tolist() == [-100] * 7 + [tok.convert_tokens_to_ids("Austria")]


def test_answer_separator_space_rule():
    assert [H.answer_separator(p) for p in ("is in", 'city": "', "is ", "(", "it'")] == [" ", "", "", "", ""]


def test_answer_correct_first_n_and_partial_logits():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, -100, -100, 5, 6]])
    logits = torch.zeros(2, 5, 10)
    for b, t, tok_id in ((0, 1, 5), (0, 2, 6), (0, 3, 9), (1, 2, 5), (1, 3, 6)):
        logits[b, t, tok_id] = 1
    assert H.answer_correct(logits, labels).tolist() == [False, True]
    assert H.answer_correct(logits, labels, first_n=2).tolist() == [True, True]
    assert H.answer_correct(logits[:, -4:], labels, first_n=2).tolist() == [True, True]


def test_decoder_layers_clear_error():
    with pytest.raises(ValueError, match="Cannot find the decoder layers"):
        H.decoder_layers(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------------
# Step 2: the selection head and inference modes


def test_selection_masks_and_columns_sum_to_one(model, tok):
    hd = new_hd(model, tok)
    logits, labels, _, weights = hd.forward(EXAMPLES[:1])                 # batch size 1 (official bug)
    batch = hd.collate(EXAMPLES[:1])
    torch.testing.assert_close(weights.sum(1), torch.ones(1, weights.shape[2]))
    invisible = ~batch["base"]["visible"][0]
    assert torch.equal(weights[0, -1, invisible], torch.ones(int(invisible.sum())))   # keep entirely
    hidden_source = ~batch["source"]["visible"][0]
    assert weights[0, :-1][hidden_source].abs().sum() == 0


def test_pair_scores_are_joint_not_additive():
    """Each base position gets its own distribution over source tokens (design note on the pair key)."""
    torch.manual_seed(4)
    sel = H.TokenSelector(16, 16)
    for p in sel.parameters():
        torch.nn.init.normal_(p, std=0.5)
    A = sel(torch.randn(1, 16), torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool),
            torch.randn(1, 4, 16), torch.ones(1, 4, dtype=torch.bool))
    over_source = A[0, :-1] / A[0, :-1].sum(0)
    assert (over_source[:, 0] - over_source[:, 1]).abs().max() > 1e-2


def test_inference_modes_on_a_hand_made_matrix():
    # rows: 2 source tokens + keep; columns: 3 base positions
    A = torch.tensor([[[0.6, 0.7, 0.0], [0.3, 0.05, 0.2], [0.1, 0.25, 0.8]]])
    assert torch.equal(H.harden(A, "soft"), A)
    many = H.harden(A, "one_to_many")
    assert many[0].argmax(0).tolist() == [0, 0, 2] and torch.equal(many.sum(1), torch.ones(1, 3))
    one = H.harden(A, "one_to_one")           # source 0 bids on column 1 only; source 1 on column 0 (0.3 > 0.1)
    assert one[0].argmax(0).tolist() == [1, 0, 2]
    A2 = A.clone()
    A2[0, 1, 0], A2[0, 2, 0] = 0.05, 0.35     # source 1's best bid (0.2, column 2) loses to keep 0.8
    assert H.harden(A2, "one_to_one")[0].argmax(0).tolist() == [2, 0, 2]
    with pytest.raises(ValueError, match="Unknown mode"):
        H.harden(A, "argmax")


# --------------------------------------------------------------------------------------------------
# The hypernetwork: causality, padding invariance, gradients


def test_instruction_self_attention_is_causal_without_padding(model, tok):
    hd = new_hd(model, tok)
    batch = hd.collate(EXAMPLES[:2])
    states = H.hidden_states(model, batch["base"]), H.hidden_states(model, batch["source"])
    mems = H.memory(states[0], batch["base"]["visible"]), H.memory(states[1], batch["source"]["visible"])
    instr = H.tokenize(tok, ["Vienna ; Paris - Country", "Tokyo ; Rome - Country"])   # equal length: no padding
    assert instr["attention_mask"].all()
    changed = {k: v.clone() for k, v in instr.items()}
    changed["input_ids"][:, -1] = tok.convert_tokens_to_ids("Continent")
    a, b = hd.net.encoder(instr, *mems), hd.net.encoder(changed, *mems)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], atol=0, rtol=0)
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_padding_invariance_alone_vs_in_a_left_padded_batch(model, tok):
    hd = new_hd(model, tok)
    ex = EXAMPLES[2]                  # the shortest prompts: padded on the left inside the batch
    la, _, _, wa = hd.forward([ex])
    lb, _, _, wb = hd.forward(EXAMPLES)
    row = EXAMPLES.index(ex)
    k = la.shape[1]
    torch.testing.assert_close(lb[row, -k:], la[0], atol=2e-5, rtol=1e-5)
    Ts_a, Tb_a = wa.shape[1] - 1, wa.shape[2]
    Ts_b, Tb_b = wb.shape[1] - 1, wb.shape[2]
    sub = torch.cat((wb[row, Ts_b - Ts_a:Ts_b, Tb_b - Tb_a:], wb[row, -1:, Tb_b - Tb_a:]))
    torch.testing.assert_close(sub, wa[0], atol=1e-5, rtol=1e-5)
    assert wb[row, :Ts_b - Ts_a].abs().sum() == 0        # padded source rows get nothing


def test_gradients_reach_every_trainable_part_and_never_the_target(model, tok):
    hd = new_hd(model, tok)
    logits, labels, is_causal, weights = hd.forward(EXAMPLES)
    loss = H.prediction_loss(logits, labels, is_causal, 3.5, 0.5) + H.sparsity_loss(weights)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    for name, p in hd.net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_basis_is_orthonormal_seeded_and_never_decayed(model, tok):
    a, b, c = new_hd(model, tok, seed=1), new_hd(model, tok, seed=1), new_hd(model, tok, seed=2)
    R = a.net.subspace.basis.weight
    torch.testing.assert_close(R.T @ R, torch.eye(8), atol=1e-5, rtol=0)   # not uninitialised memory
    assert torch.equal(R, b.net.subspace.basis.weight) and not torch.allclose(R, c.net.subspace.basis.weight)
    groups = a.make_optimizer().param_groups
    original = a.net.subspace.basis.parametrizations.weight.original
    basis_group = [g for g in groups if any(p is original for p in g["params"])]
    assert len(basis_group) == 1 and basis_group[0]["params"] == [original]
    assert basis_group[0]["weight_decay"] == 0.0 and basis_group[0]["lr"] == a.cfg.basis_lr


def test_bf16_target_keeps_fp32_master_weights(tok):
    model = make_model(dtype=torch.bfloat16)
    hd = new_hd(model, tok)
    before = {n: p.detach().clone() for n, p in hd.net.named_parameters()}
    hd.train(EXAMPLES, epochs=1, batch_size=4, progress=False)
    assert all(p.dtype == torch.float32 for p in hd.net.parameters())
    changed = [n for n, p in hd.net.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


# --------------------------------------------------------------------------------------------------
# Loss, schedule, training


def test_sparsity_schedule_values():
    cfg = H.HyperDASConfig()
    values = [H.sparsity_weight(t, 10, cfg) for t in range(10)]
    assert values[:5] == [0.0] * 5
    expected = [0.15 + 1.35 * t / 10 for t in range(5, 10)]
    assert values[5:] == pytest.approx(expected) and values[5] == pytest.approx(0.825)


def test_sparsity_loss_manual():
    A = torch.tensor([[[0.9, 0.8, 0.0], [0.1, 0.1, 0.5], [0.0, 0.1, 0.5]]])   # source 0 sums to 1.7
    assert H.sparsity_loss(A).item() == pytest.approx(0.7)


def test_prediction_loss_weights_examples():
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[-100, 3, 4], [-100, -100, 2]])
    ce = lambda b, t, y: -logits[b, t].log_softmax(-1)[y]
    manual = (3.5 * (ce(0, 0, 3) + ce(0, 1, 4)) + 0.5 * ce(1, 1, 2)) / 3
    got = H.prediction_loss(logits, labels, torch.tensor([True, False]), 3.5, 0.5)
    torch.testing.assert_close(got, manual)


def learnable_examples(model, tok):
    """Labels the target itself gives: cause = its answer with the source entity in the base prompt."""
    def answer(prompt):
        enc = H.tokenize(tok, [prompt])
        return tok.convert_ids_to_tokens(model(**H.target_inputs(enc)).logits[0, -1].argmax().item())
    out = []
    for i, base in enumerate(CITIES):
        source = CITIES[(i + 3) % len(CITIES)]
        out.append(example(base, source, answer(f"the city of {base} is in"), answer(f"the city of {source} is in")))
    return out


def test_training_reduces_the_loss_and_learns_the_cause(tok):
    model = make_model()
    model.lm_head.weight.data *= 10       # a peaked random model, so answers depend on the hidden state
    examples = learnable_examples(model, tok)
    hd = new_hd(model, tok, lr=2e-3)
    before = hd.evaluate(examples, progress=False)["cause"]
    history = hd.train(examples, epochs=40, batch_size=8, progress=False)
    first, last = history[0]["prediction"], sum(h["prediction"] for h in history[-5:]) / 5
    assert last < 0.6 * first, (first, last)                          # measured: 8.0 -> 3.4
    assert hd.evaluate(examples, progress=False)["cause"] == 1.0 > before


def test_evaluation_maps_every_row_correctly_with_a_short_last_batch(model, tok):
    hd = new_hd(model, tok)
    probe = [example(c, CITIES[(i + 1) % 8]) for i, c in enumerate(CITIES)][:7]
    logits, _, _, _ = hd.forward(probe)
    predicted = tok.convert_ids_to_tokens(logits[:, -2].argmax(-1).tolist())   # first answer token
    # rows 1, 4, 6 get the intervened model's own prediction as label: exactly those are correct
    rows = [dict(e, counterfactual_target=predicted[i] if i in (1, 4, 6) else "<unk>") for i, e in enumerate(probe)]
    assert hd.correct(rows, batch_size=3) == [i in (1, 4, 6) for i in range(7)]
    assert hd.correct(rows, batch_size=1) == hd.correct(rows, batch_size=7)
    assert hd.evaluate(rows, batch_size=3, progress=False)["cause"] == pytest.approx(3 / 7)


def test_scores_per_attribute_use_the_intervened_attribute():
    rows = [example("Vienna", "Paris"), example("Oslo", "Lima", kind="isolate", attribute="Continent"),
            example("Rome", "Oslo", concept="Continent", attribute="Continent")]
    s = H.scores(rows, [True, False, True])
    assert s["cause"] == 1.0 and s["isolate"] == 0.0 and s["disentangle"] == 0.5
    assert s["per_attribute"]["Country"] == {"cause": 1.0, "isolate": 0.0, "disentangle": 0.5, "n": 2}
    assert s["per_attribute"]["Continent"]["disentangle"] == 1.0     # no isolate rows: cause alone


# --------------------------------------------------------------------------------------------------
# Saving, loading, resuming, the user API


def test_save_load_round_trip_keeps_block_count_and_outputs(model, tok, tmp_path):
    hd = new_hd(model, tok, num_blocks=3)
    hd.train(EXAMPLES, epochs=1, batch_size=2, progress=False)
    hd.save(tmp_path / "ckpt")
    loaded = H.HyperDAS.load(tmp_path / "ckpt", model, tok)            # no num_blocks given (official bug)
    assert len(loaded.net.encoder.blocks) == 3 and loaded.cfg == hd.cfg
    assert torch.equal(loaded.forward(EXAMPLES)[0], hd.forward(EXAMPLES)[0])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "weights.safetensors"]


def test_interrupted_training_resumes_to_the_same_weights(model, tok, tmp_path):
    full = new_hd(model, tok)
    full.train(EXAMPLES, epochs=3, batch_size=2, progress=False)
    first, calls, forward = new_hd(model, tok), [], H.HyperDAS.forward

    def interrupted(self, *args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return forward(self, *args, **kw)
    first.forward = interrupted.__get__(first)
    with pytest.raises(KeyboardInterrupt):
        first.train(EXAMPLES, epochs=3, batch_size=2, out_dir=tmp_path / "ckpt", save_every=2, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]       # no .new or .old left behind
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "optimizer.safetensors", "training.json",
                                                                  "weights.safetensors"]
    resumed = new_hd(model, tok)
    resumed.train(EXAMPLES, epochs=3, batch_size=2, out_dir=tmp_path / "ckpt", progress=False)
    assert resumed.step == 6 and [h["step"] for h in resumed.history] == list(range(1, 7))
    for (n, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_intervene_returns_text_and_positions(model, tok):
    hd = new_hd(model, tok)
    text, chosen = hd.intervene("the city of Vienna is in", "I love Paris", "Country", base_entity="Vienna",
                                source_entity="Paris", max_new_tokens=3, return_positions=True)
    assert isinstance(text, str) and len(text.split()) <= 3
    assert all(b in tok.get_vocab() and s in tok.get_vocab() and 0 < w <= 1 for b, s, w in chosen)
    with pytest.raises(ValueError, match="base_entity"):
        hd.intervene("the city of Vienna is in", "I love Paris", "Country")
    hd2 = new_hd(model, tok, instruction_template="the {attribute} of a city")
    assert isinstance(hd2.intervene("the city of Vienna is in", "I love Paris", "Country"), str)


def test_intervene_greedy_token_equals_the_intervened_forward(model, tok):
    hd = new_hd(model, tok)
    text = hd.intervene("the city of Vienna is in", "I love Paris", "Country", "Vienna", "Paris", max_new_tokens=1)
    batch = hd.batch(H.tokenize(tok, ["the city of Vienna is in"], visible_chars=[len("the city of Vienna")]),
                     H.tokenize(tok, ["I love Paris"]),
                     H.tokenize(tok, ["Vienna ; Paris - Country"]), ["Country"])
    weights, basis, h_source = hd.plan(batch)
    expected = hd.intervened_logits(batch["base"], weights, basis, h_source)[0, -1].argmax().item()
    assert text == tok.convert_ids_to_tokens(expected)


def test_bad_inputs_raise_clear_errors(model, tok):
    with pytest.raises(ValueError, match="layer=4 is out of range"):
        new_hd(model, tok, layer=4)
    with pytest.raises(ValueError, match="feature_dim=33"):
        new_hd(model, tok, feature_dim=33)
    with pytest.raises(ValueError, match="num_blocks=5"):
        new_hd(model, tok, num_blocks=5)
    with pytest.raises(TypeError, match="Unknown HyperDAS option"):
        new_hd(model, tok, layers=3)
    with pytest.raises(ValueError, match="Unknown mode 'argmax'"):
        new_hd(model, tok).evaluate(EXAMPLES, mode="argmax")
    with pytest.raises(FileNotFoundError, match="not a HyperDAS checkpoint"):
        H.HyperDAS.load("/nonexistent", model, tok)


def test_das_baseline_patches_last_entity_tokens_at_the_same_layer(model, tok):
    das = H.DAS(model, tok, attributes=["Country", "Continent"], layer=2, feature_dim=8)
    batch = das.collate(EXAMPLES[:1])
    weights, basis, h_source = das.plan(batch)
    assert weights[0, :-1].nonzero().tolist() == [[3, 4]]         # source "Paris" -> base "Vienna"
    assert torch.equal(basis[0], das.net.bases[das.attributes.index("Country")].weight)
    basis_group = [g for g in das.make_optimizer().param_groups if g["weight_decay"] == 0.0]
    assert len(basis_group) == 1 and len(basis_group[0]["params"]) == 2 and basis_group[0]["lr"] == das.cfg.basis_lr
    history = das.train(EXAMPLES, epochs=2, batch_size=2, progress=False)
    assert len(history) == 4
    for basis in das.net.bases:            # still orthonormal after training, no collapsed columns
        torch.testing.assert_close(basis.weight.T @ basis.weight, torch.eye(8), atol=1e-5, rtol=0)
    only_country = H.DAS(model, tok, attributes=["Country"], layer=2, feature_dim=8)
    with pytest.raises(ValueError, match="bases for"):
        only_country.plan(only_country.collate([example("Oslo", "Lima", concept="Continent")]))


def test_cli_has_help_everywhere_and_no_type_bool():
    parser = H.build_parser()
    for action in parser._actions:
        assert action.type is not bool, action.dest          # official flags were type=bool
        assert action.help, action.dest
    args = parser.parse_args(["--evaluate", "--model_path", "ckpt", "--layer", "3"])
    assert args.evaluate is True and args.layer == 3 and args.model_path == "ckpt"
    assert parser.parse_args([]).evaluate is False


@pytest.mark.skipif(not os.environ.get("HYPERDAS_TEST_MODEL"),
                    reason="set HYPERDAS_TEST_MODEL to a local model id or path (e.g. TinyLlama) to run")
def test_real_model_opt_in():
    model, tok = H.load_target(os.environ["HYPERDAS_TEST_MODEL"])
    hd = H.HyperDAS(model, tok, layer=len(H.decoder_layers(model)) // 2, feature_dim=16, num_blocks=1)
    text = hd.intervene("Vienna is in", "I love Paris", "Country", base_entity="Vienna", source_entity="Paris",
                        max_new_tokens=3)
    assert isinstance(text, str)
    row = example("Vienna", "Paris")
    assert hd.evaluate([row], progress=False)["n"] == 1


# --------------------------------------------------------------------------------------------------
# End to end: a reduced toy world (40 verbs, Past Tense and Singular), trained here


def test_end_to_end_on_a_reduced_toy_world(toy_cache):
    import copy
    toy_world = pytest.importorskip("toy_world")
    try:      # the same small world as test_toy_world.py, so the session trains it once
        model, tok = toy_world.toy_target("verb", n_entities=40, steps=150, cache_dir=toy_cache, progress=False)
        train = H.ravel_examples("verb", "train", model, tok, n=1600)
        test = H.ravel_examples("verb", "test", model, tok, n=400)
    except FileNotFoundError as err:
        pytest.skip(f"RAVEL data not available: {err}")
    assert len(train) > 1000 and len(test) > 250
    cause_rows = [e for e in test if e["attribute_type"] == "causal"]
    hd = H.HyperDAS(model, tok, layer=2, feature_dim=16, num_blocks=2, lr=1e-3)
    hd.train(train, epochs=5, batch_size=32, progress=False)      # 250 steps; measured cause 0.905
    learned = hd.evaluate(cause_rows, progress=False)["cause"]

    # Controls on the same rows: no intervention at all, and the learned subspace at random positions.
    generator = torch.Generator().manual_seed(0)

    def control(choose):
        def plan(batch):
            weights, basis, h_source = hd.plan(batch)
            return choose(weights, batch), basis, h_source
        ctrl = copy.copy(hd)
        ctrl.plan = plan
        return ctrl.evaluate(cause_rows, progress=False)["cause"]
    none = control(lambda weights, batch: keep_only(weights))
    rand = control(lambda weights, batch: random_one_hot(weights, batch, generator))
    assert none < 0.05                 # cause labels are the source's value, never the base's
    assert learned > 0.6 and learned > max(none, rand) + 0.4, (learned, none, rand)


def keep_only(weights):
    out = torch.zeros_like(weights)
    out[:, -1] = 1
    return out


def random_one_hot(weights, batch, generator):
    """Each row: one random visible source token written into one random visible base token."""
    out = keep_only(weights)
    for b in range(weights.shape[0]):
        src = batch["source"]["visible"][b].nonzero().flatten()
        dst = batch["base"]["visible"][b].nonzero().flatten()
        i = src[torch.randint(len(src), (1,), generator=generator)]
        j = dst[torch.randint(len(dst), (1,), generator=generator)]
        out[b, -1, j], out[b, i, j] = 0, 1
    return out
