"""Tests of hyperdas.py on tiny random Llama models (grouped-query attention) built in-process."""
import argparse
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import hyperdas as H
import target

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
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks() == 0
    with pytest.raises(RuntimeError, match="boom"):
        with H.patch_layer(model, 2, lambda h: h * 0):
            raise RuntimeError("boom")
    assert hooks() == 0
    assert torch.equal(model(**H.target_inputs(enc)).logits, plain)


def test_patch_layer_replaces_hidden_states_at_that_layer(model, tok):
    """fn sees hidden_states[L] and decoder layer L receives fn's result; layers below are untouched."""
    enc = H.tokenize(tok, ["the city of Vienna is in"])
    clean = model(**H.target_inputs(enc), output_hidden_states=True).hidden_states
    for layer in (0, 2):
        seen, received = [], []
        with H.patch_layer(model, layer, lambda h: seen.append(h) or h + 1.0):
            handle = model.model.layers[layer].register_forward_pre_hook(lambda m, a: received.append(a[0]))
            patched = model(**H.target_inputs(enc), output_hidden_states=True).hidden_states
            handle.remove()
        torch.testing.assert_close(seen[0], clean[layer], atol=0, rtol=0)
        torch.testing.assert_close(received[0], clean[layer] + 1.0, atol=0, rtol=0)
        assert all(torch.equal(patched[i], clean[i]) for i in range(layer))
        assert not torch.allclose(patched[layer + 1], clean[layer + 1])


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


def test_the_ablation_heads_are_ours_and_the_official_one_switch_by_switch():
    """benchmarks/head_ablation.py: with no switch its head is TokenSelector; all switches on, it is the official
    head (without its pair rotary) computed by hand, head by head; every variant can choose where to write."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
    from head_ablation import AblatedSelector
    F = torch.nn.functional
    torch.manual_seed(4)
    instruction, h_base, h_source = torch.randn(2, 16), torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    base_visible, source_visible = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    base_visible[1, :2], source_visible[1, 0] = False, False          # a padded example
    inputs = (instruction, h_base, base_visible, h_source, source_visible)
    ours = H.TokenSelector(16, 16)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.5)
    switches = dict(ours={}, keep=dict(keep="base"), four=dict(heads=4), linear=dict(joint=False, keep="base"),
                    official=dict(joint=False, keep="base", heads=4))
    heads = {}
    for name, switch in switches.items():
        heads[name] = AblatedSelector(16, 16, **switch)
        heads[name].load_state_dict(ours.state_dict(), strict=False)
        torch.nn.init.normal_(heads[name].null_key.weight, std=0.5)
    A = {name: head(*inputs) for name, head in heads.items()}
    assert torch.allclose(A["ours"], ours(*inputs), atol=1e-6)
    for name, weights in A.items():                 # each can write at some base positions and not at others
        keep = weights[0, -1]
        assert keep.max() - keep.min() > 1e-2, name
        assert torch.allclose(weights.sum(1), torch.ones(2, 5)), name
        assert weights[1, :-1, :2].abs().sum() == 0 and weights[1, 0].abs().sum() == 0, name
    # The official head by hand: 4 heads of 4 dimensions, pair key W_s h_s + W_b h_b, keep key W_k h_b.
    head = heads["official"]
    q = head.query(instruction).view(2, 4, 4)
    pair = (head.source_key(h_source)[:, :, None] + head.base_key(h_base)[:, None]).view(2, 4, 5, 4, 4)
    null = head.null_key(h_base).view(2, 5, 4, 4)
    logits = torch.cat((torch.einsum("bijhc,bhc->bijh", pair, q), torch.einsum("bjhc,bhc->bjh", null, q)[:, None]), 1)
    logits = logits.div(4 ** 0.5).mean(-1)                          # [B, Ts+1, Tb]: mean over heads of q_h.k_h/sqrt(4)
    allowed = torch.cat((source_visible, torch.ones(2, 1, dtype=torch.bool)), 1)[:, :, None] & base_visible[:, None]
    allowed[:, -1] = True
    assert torch.allclose(A["official"], logits.masked_fill(~allowed, float("-inf")).softmax(1), atol=1e-6)
    # Without silu, a linear key's score is f(j) + g(i): every base position ranks the source tokens alike.
    over_source = A["linear"][0, :-1] / A["linear"][0, :-1].sum(0)
    assert torch.allclose(over_source, over_source[:, :1].expand_as(over_source), atol=1e-6)
    # Keep from the base state with silu pairs: keep logit minus a source logit is q.W_k h_b - q.silu(pair), / sqrt(P).
    head, q = heads["keep"], heads["keep"].query(instruction)
    pair = F.silu(head.source_key(h_source)[:, :, None] + head.base_key(h_base)[:, None])
    gap = (torch.einsum("bjp,bp->bj", head.null_key(h_base), q) - torch.einsum("bjp,bp->bj", pair[:, 1], q)) / 4
    assert torch.allclose((A["keep"][0, -1].log() - A["keep"][0, 1].log()), gap[0], atol=1e-4)
    # Four heads: every logit difference is half of one query's (sqrt(4)).
    log_ours, log_four = A["ours"][0].log(), A["four"][0].log()
    assert torch.allclose(log_four[1:] - log_four[:1], (log_ours[1:] - log_ours[:1]) / 2, atol=1e-4)
    with pytest.raises(ValueError, match="same column"):
        AblatedSelector(16, 16, joint=False)


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


def test_the_papers_sparsity_schedule_rises_from_zero_after_the_warm_up():
    cfg = H.HyperDASConfig(sparsity_schedule="paper")
    values = [H.sparsity_weight(t, 10, cfg) for t in range(10)]
    assert values[:5] == [0.0] * 5 and values[5:] == pytest.approx([1.5 * (t - 5) / 5 for t in range(5, 10)])
    off = H.HyperDASConfig(sparsity_schedule="off")
    assert [H.sparsity_weight(t, 10, off) for t in range(10)] == [0.0] * 10


def test_the_toy_preset_uses_the_schedules_the_toy_measurements_chose():
    assert (H.TOY["sparsity_schedule"], H.TOY["sparsity_end"], H.TOY["lr_schedule"]) == ("paper", 0.5, "warmup_cosine")
    assert not {"sparsity_schedule", "sparsity_end"} & set(H.PAPER)      # real models keep the official schedules
    assert H.HyperDASConfig().sparsity_end == 1.5


def test_the_learning_rate_schedule_warms_up_decays_and_is_what_training_uses(model, tok):
    cfg = H.HyperDASConfig(lr_schedule="warmup_cosine")
    assert [H.lr_factor(t, 40, H.HyperDASConfig()) for t in (0, 20, 39)] == [1.0] * 3      # official: constant
    factors = [H.lr_factor(t, 40, cfg) for t in range(40)]
    assert factors[:2] == pytest.approx([0.5, 1.0]) and factors[2] == pytest.approx(1.0)   # 2 warm-up steps
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[-1] == pytest.approx(0.1, abs=0.01)
    hd = new_hd(model, tok, lr_schedule="warmup_cosine")
    history = hd.train(EXAMPLES, epochs=10, batch_size=2, progress=False)              # 20 steps
    assert [r["lr"] for r in history] == pytest.approx([1e-3 * H.lr_factor(t, 20, hd.cfg) for t in range(20)])
    for name, value in (("sparsity_schedule", "linear"), ("lr_schedule", "cosine")):
        with pytest.raises(ValueError, match=f"{name}='{value}': choose one of"):
            new_hd(model, tok, **{name: value})


def test_sparsity_loss_manual():
    A = torch.tensor([[[0.9, 0.8, 0.0], [0.1, 0.1, 0.5], [0.0, 0.1, 0.5]]])   # source 0 sums to 1.7
    assert H.sparsity_loss(A).item() == pytest.approx(0.7)


def test_each_step_records_what_its_batch_gets_right_per_kind(tok):
    """history's cause / isolate: the share of the step's cause and isolate pairs answered right, judged as
    evaluation judges them, before the step's update (the training curves behind the README's diagnosis)."""
    model = make_model()
    model.lm_head.weight.data *= 10       # peaked, so that some answers are right and some wrong
    causes = learnable_examples(model, tok)
    rows = causes[:4] + [dict(x, attribute_type="isolate") for x in causes[4:6]]
    hd = new_hd(model, tok)
    hit = hd.correct(rows)
    assert sum(hit[:4]) / 4 != sum(hit[4:]) / 2, hit            # so that a swap of the two would show
    record = hd.train(rows, epochs=1, batch_size=len(rows), progress=False)[0]
    kinds = [r["attribute_type"] == "causal" for r in rows]
    assert record["cause"] == sum(h for h, c in zip(hit, kinds) if c) / sum(kinds)
    assert record["isolate"] == sum(h for h, c in zip(hit, kinds) if not c) / (len(rows) - sum(kinds))
    accumulated = new_hd(model, tok).train(rows, epochs=1, batch_size=len(rows), grad_accum=2, progress=False)[0]
    assert (accumulated["cause"], accumulated["isolate"]) == (record["cause"], record["isolate"])


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
    # The positions it reports are the argmax of each base column of the weights, when a source token wins.
    _, chosen = hd.intervene("the city of Vienna is in", "I love Paris", "Country", "Vienna", "Paris",
                             max_new_tokens=1, return_positions=True)
    names = lambda enc: tok.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    w, Ts = weights[0], batch["source"]["input_ids"].shape[1]
    manual = [(names(batch["base"])[j], names(batch["source"])[int(w[:, j].argmax())], round(w[:, j].max().item(), 3))
              for j in range(w.shape[1]) if int(w[:, j].argmax()) < Ts]
    assert chosen == manual and manual


def test_greedy_continuation_without_a_patch_is_generate_with_one_forward_per_token(model, tok):
    """The key/value cache and the positions of intervene()'s decoding: unpatched, they give what
    model.generate gives greedily, and the last token costs no forward."""
    enc = H.tokenize(tok, ["the city of Vienna is in"])
    inputs = H.target_inputs(enc)
    positions = []            # the position_ids of each forward
    record = lambda module, args, kwargs: positions.append(kwargs["position_ids"].tolist())
    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        ours = H.greedy_continuation(model, inputs, 6, eos_token_id=None)
    finally:
        handle.remove()
    theirs = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                            pad_token_id=tok.pad_token_id)[0, inputs["input_ids"].shape[1]:].tolist()
    T = inputs["input_ids"].shape[1]
    assert ours == theirs and len(ours) == 6
    # 6 tokens, 6 forwards: the prompt, then each new token at its own place
    assert positions == [inputs["position_ids"].tolist()] + [[[T + i]] for i in range(5)]


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


def test_das_at_the_first_entity_token_of_multi_token_entities(model, tok):
    """das_position="first" (the known-position world's true position): base and source each at the token where
    their entity begins, in every row of a left-padded batch; "last" stays at the entity's last token."""
    rows = [example("Oslo Vienna", "Paris Rome"),
            example("Tokyo", "Lima Madrid Berlin", source_template="( %s ) was born"),
            example("Rome Lima", "Oslo", base_template="%s is in")]
    for position, pick in (("first", 0), ("last", -1)):
        das = H.DAS(model, tok, attributes=["Country"], layer=2, feature_dim=8, das_position=position)
        batch = das.collate(rows)
        weights = das.plan(batch)[0]
        for r, row in enumerate(rows):
            ids = {side: batch[side]["input_ids"][r].tolist() for side in ("base", "source")}
            j = ids["base"].index(tok.convert_tokens_to_ids(row["entity"].split()[pick]))
            i = ids["source"].index(tok.convert_tokens_to_ids(row["counterfactual_entity"].split()[pick]))
            assert weights[r, :-1].nonzero().tolist() == [[i, j]], (position, r)
            assert weights[r, -1, j] == 0 and weights[r, -1].sum() == weights.shape[2] - 1
    with pytest.raises(ValueError, match="das_position"):
        H.DAS(model, tok, attributes=["Country"], das_position="middle")


def test_das_patches_the_same_hidden_states_as_manual_patching(model, tok):
    """Official bug 7: MDAS patched one block later than HyperDAS at the same nominal layer. Our DAS with a
    full-rank basis is exactly activation patching of hidden_states[L] at the last entity tokens."""
    d = model.config.hidden_size
    for L in (1, 2):
        das = H.DAS(model, tok, attributes=["Country"], layer=L, feature_dim=d)
        row = EXAMPLES[0]                                  # "the city of Vienna is in" <- "I love Paris"
        base = H.tokenize(tok, [row["input_prefix"] + row["input_suffix"]], [row["counterfactual_target"]])
        source = H.tokenize(tok, [row["counterfactual_input_prefix"]])
        h_source = model(**H.target_inputs(source), output_hidden_states=True).hidden_states[L][:, -1]  # "Paris"
        j = base["input_ids"][0].tolist().index(tok.convert_tokens_to_ids("Vienna"))

        def manual(module, args, out):
            out = out.clone()
            out[:, j] = h_source
            return out
        handle = model.model.layers[L - 1].register_forward_hook(manual)
        expected = model(**H.target_inputs(base)).logits[:, -2:]
        handle.remove()
        torch.testing.assert_close(das.forward([row])[0], expected, atol=1e-4, rtol=1e-4)


def test_cli_has_help_everywhere_and_no_type_bool():
    import cli
    parser = cli.build_parser()
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
    isolate_rows = [e for e in test if e["attribute_type"] != "causal"]
    hd = H.HyperDAS(model, tok, layer=2, feature_dim=16, num_blocks=2, lr=1e-3)
    hd.train(train, epochs=5, batch_size=32, progress=False)      # 250 steps
    learned = hd.evaluate(test, progress=False)

    # Controls on the same rows: no intervention at all, the learned subspace at random positions, and the
    # whole entity vector patched (what DAS's position with a full-rank subspace does).
    generator = torch.Generator().manual_seed(0)

    def control(choose, rows, full_vector=False):
        def plan(batch):
            weights, basis, h_source = hd.plan(batch)
            if full_vector:
                basis = torch.eye(basis.shape[1]).expand_as(torch.empty(basis.shape[0], basis.shape[1], basis.shape[1]))
            return choose(weights, batch), basis, h_source
        ctrl = copy.copy(hd)
        ctrl.plan = plan
        return ctrl.evaluate(rows, progress=False)
    none = control(lambda weights, batch: keep_only(weights), cause_rows)["cause"]
    rand = control(lambda weights, batch: random_one_hot(weights, batch, generator), cause_rows)["cause"]
    whole = control(lambda weights, batch: entity_to_entity(weights, batch), isolate_rows + cause_rows, full_vector=True)
    assert none < 0.05                 # cause labels are the source's value, never the base's
    assert learned["cause"] > 0.6 and learned["cause"] > max(none, rand) + 0.4, (learned, none, rand)
    # Patching the whole entity vector moves every attribute: it causes, but it cannot isolate.
    assert whole["cause"] > 0.8 and whole["isolate"] < 0.2, whole
    assert learned["isolate"] > whole["isolate"] + 0.4, (learned, whole)


def entity_to_entity(weights, batch):
    """The source's last entity token written into the base's last entity token, nothing else."""
    out = keep_only(weights)
    rows = torch.arange(weights.shape[0])
    j, i = H.last_visible(batch["base"]["visible"]), H.last_visible(batch["source"]["visible"])
    out[rows, -1, j], out[rows, i, j] = 0, 1
    return out


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


# --------------------------------------------------------------------------------------------------
# Hardening: the hypernetwork really starts as a copy of the target


def scaled_rope_model(seed=0, layers=3):
    """A tiny Llama with Llama-3.1's rope scaling and random (not all-ones) norm weights, so that a swapped
    or missing norm and a wrong rotary table all change the output."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=64))
    model = LlamaForCausalLM(cfg)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = 1 + 0.5 * torch.randn_like(p)
    return H.freeze(model)


def test_copied_block_without_cross_attention_equals_the_target_layer():
    """The paper's hypernetwork starts as a copy of the target: block i without its two memories computes
    target layer i exactly, rope scaling included (positions offset to where the memory's keys live)."""
    model = scaled_rope_model()
    torch.manual_seed(1)
    ids, pos = torch.randint(3, 40, (2, 9)), torch.arange(9)[None].expand(2, 9) + 1500
    hs = model(input_ids=ids, position_ids=pos, output_hidden_states=True).hidden_states
    net = H.HyperNetwork(model, H.HyperDASConfig(layer=1, feature_dim=4, num_blocks=2))
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None].expand(2, 9, 9)
    for i, block in enumerate(net.encoder.blocks):
        torch.testing.assert_close(block(hs[i], net.encoder.rope(pos), causal), hs[i + 1], atol=1e-6, rtol=1e-6)
    assert torch.equal(net.encoder.embed.weight, model.model.embed_tokens.weight)
    assert torch.equal(net.encoder.norm.weight, model.model.norm.weight)       # not ones


def test_cross_attention_reads_its_memory_as_the_target_layer_reads_its_input():
    """Official bug 10: unit-length memory into pretrained k/v projections with no norm. Here a copied
    cross-attention reading a prompt's own states is exactly the target layer's self-attention."""
    model = scaled_rope_model()
    ids, pos = torch.randint(3, 40, (1, 7), generator=torch.Generator().manual_seed(2)), torch.arange(7)[None]
    captured = []
    handle = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, out: captured.append(out[0]))
    hs = model(input_ids=ids, position_ids=pos, output_hidden_states=True).hidden_states
    handle.remove()
    net = H.HyperNetwork(model, H.HyperDASConfig(layer=1, feature_dim=4, num_blocks=1))
    block, rope = net.encoder.blocks[0], net.encoder.rope(pos)
    causal = torch.ones(1, 7, 7, dtype=torch.bool).tril()
    for attn, norm in ((block.source_attn, block.source_norm), (block.base_attn, block.base_norm)):
        got = H.Block.cross(attn, norm, hs[0], rope, (hs[0], rope, causal))
        torch.testing.assert_close(got, captured[0], atol=1e-6, rtol=1e-6)


def test_cross_attention_copies_are_independent():
    """Official bug 9: the three attentions aliased one storage on CPU. Here each is its own clone."""
    model = scaled_rope_model()
    block = H.HyperNetwork(model, H.HyperDASConfig(layer=1, feature_dim=4, num_blocks=1)).encoder.blocks[0]
    attns = (block.self_attn, block.source_attn, block.base_attn)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        weights = [getattr(a, name).weight for a in attns]
        target = getattr(model.model.layers[0].self_attn, name).weight
        assert len({w.data_ptr() for w in weights} | {target.data_ptr()}) == 4
        assert all(torch.equal(w, target) for w in weights)
    block.source_attn.q_proj.weight.data += 1
    assert torch.equal(block.self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_init_from_target_false_means_random_blocks_but_the_targets_embedding_and_norm(model, tok):
    hd = new_hd(model, tok, init_from_target=False)
    enc, layer = hd.net.encoder, model.model.layers[0]
    assert not torch.equal(enc.blocks[0].self_attn.q_proj.weight, layer.self_attn.q_proj.weight)
    assert torch.equal(enc.embed.weight, model.model.embed_tokens.weight)
    assert torch.equal(enc.norm.weight, model.model.norm.weight)


def test_selection_head_starts_at_the_init_the_official_head_ran_with(model, tok):
    """Official bug 4: the head's uniform_(0, 1) was overwritten by N(0, 0.02); we use N(0, 0.02) on purpose."""
    sel = new_hd(model, tok).net.selector
    for w in (sel.query.weight, sel.base_key.weight, sel.source_key.weight):
        assert abs(w.std().item() - 0.02) < 0.004 and abs(w.mean().item()) < 0.004


# --------------------------------------------------------------------------------------------------
# Hardening: tokenization with real tokenizers' habits


def llama3_style_bpe():
    """A byte-level BPE with Llama-3's split regex, trained here: runs of punctuation stay one pre-token,
    so '"' + '-12' merges into 'Ġ"-', '12'."""
    from tokenizers import Regex, decoders, trainers
    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    corpus = [f'city: {c}, "lat": "-{n}", "lon": "{n}"' for c in CITIES for n in range(10, 40)] * 3
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   padding_side="left")


def test_answers_are_exactly_their_own_tokens_with_a_merging_bpe():
    tok = llama3_style_bpe()
    prompt, answer = 'city: Lima, "lat": "', "-12"
    whole = tok.convert_ids_to_tokens(tok(prompt + answer, add_special_tokens=False)["input_ids"])
    assert 'Ġ"-' in whole                              # the merge happens: the naive split would be wrong
    enc = H.tokenize(tok, [prompt, "city: Oslo is"], [answer, "cold"], visible_chars=[len("city: Lima"), 4])
    for row, (p, a) in enumerate(((prompt, answer), ("city: Oslo is", " cold"))):
        ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
        labels = enc["labels"][row][enc["labels"][row] != -100].tolist()
        assert tok.decode(labels) == a and tok.decode(ids[1:len(ids) - len(labels)]) == p
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    visible = enc["input_ids"][0][enc["visible"][0]].tolist()
    assert tok.decode(visible[1:]) == "city: Lima"          # ends at the entity's last token


def test_a_row_without_answer_tokens_is_a_miss_never_a_hit():
    labels = torch.tensor([[-100, -100, -100], [-100, -100, 4]])
    logits = torch.zeros(2, 3, 6)
    logits[1, 1, 4] = 1
    assert H.answer_correct(logits, labels).tolist() == [False, True]
    assert H.answer_correct(logits, labels, first_n=3).tolist() == [False, True]


def test_visibility_ends_at_the_token_that_carries_the_entitys_end():
    """Every token that starts within the visible characters is visible, also when the suffix re-splits the
    entity's last tokens: with merges cd > bc > ab, "abc" is [a, bc] but "abcdx" is [ab, cd, x]."""
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "a", "b", "c", "d", "x", "cd", "bc", "ab"])}
    bpe = Tokenizer(models.BPE(vocab, [("c", "d"), ("b", "c"), ("a", "b")]))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    enc = H.tokenize(tok, ["abcdx", "abcdx", "abc"], visible_chars=[3, 2, 3])
    visible = [tok.convert_ids_to_tokens(enc["input_ids"][i][enc["visible"][i]].tolist()) for i in range(3)]
    assert visible == [["<s>", "ab", "cd"], ["<s>", "ab"], ["<s>", "a", "bc"]]


def test_empty_source_suffix_keeps_the_whole_source_visible():
    """Official bug 1: with a no-auto-BOS tokenizer an empty source suffix hid the whole source."""
    for auto_bos in (False, True):
        tok = make_tokenizer(auto_bos)
        hd = new_hd(make_model(), tok)
        batch = hd.collate(EXAMPLES[:1])                         # source "I love Paris": suffix ""
        assert EXAMPLES[0]["counterfactual_input_suffix"] == ""
        assert torch.equal(batch["source"]["visible"], batch["source"]["attention_mask"].bool())


# --------------------------------------------------------------------------------------------------
# Hardening: precision, resources, evaluation


def test_bases_stay_fp32_orthonormal_under_bf16_autocast(model, tok):
    hd = new_hd(model, tok)
    das = H.DAS(model, tok, attributes=["Country", "Continent"], layer=2, feature_dim=8)
    for method in (hd, das):
        batch = method.collate(EXAMPLES)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, basis, _ = method.plan(batch)
        assert basis.dtype == torch.float32
        eye = torch.eye(basis.shape[-1]).expand(len(EXAMPLES), -1, -1)
        assert (basis.transpose(1, 2) @ basis - eye).abs().max() < 1e-5


def test_no_dense_d_by_d_or_pair_concatenation_and_no_extra_model(model, tok, monkeypatch):
    """Official resource note 14: three target-sized models at construction, [B, d, d] reflections and
    [B, Ts, Tb, 2d] pair features. None of those here."""
    import transformers
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    built, init = [], transformers.PreTrainedModel.__init__
    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k)))
    hd = new_hd(model, tok)
    assert built == []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes.update(tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
            return out
    shapes = set()
    batch = hd.collate(EXAMPLES)
    B, d = len(EXAMPLES), model.config.hidden_size
    Ts, Tb = batch["source"]["input_ids"].shape[1], batch["base"]["input_ids"].shape[1]
    with Shapes():
        hd.forward(EXAMPLES)
    assert (B, Ts + 1, Tb, d) in shapes                                        # the recorder sees the pair tensor
    assert not {(B, d, d), (B, Ts, Tb, 2 * d), (B, Ts, Tb, d)} & shapes


def test_evaluation_judges_the_first_eval_tokens_and_never_runs_at_step_0(model, tok):
    """Official bug 11: inference.py judged all answer tokens where training judged 3, and evaluation ran at
    step 0. Here eval_tokens holds everywhere, and evaluation during training starts after a step."""
    hd = new_hd(model, tok)
    words = ["Austria", "France", "Italy", "Japan"]
    for t in range(3):          # teacher forcing: the prediction at answer position t depends on labels < t
        row = example("Vienna", "Paris", cf_target=" ".join(words))
        logits, labels, _, _ = hd.forward([row])
        predicted = logits[0, :-1].argmax(-1)[H.answer_labels(logits, labels)[0] != -100]
        words[t] = tok.convert_ids_to_tokens(predicted[t].item())
    words[3] = next(w for w in CITIES if w != tok.convert_ids_to_tokens(predicted[3].item()))
    row = example("Vienna", "Paris", cf_target=" ".join(words))
    assert hd.correct([row]) == [True]
    hd.cfg.eval_tokens = 4
    assert hd.correct([row]) == [False]
    hd.cfg.eval_tokens = 3
    calls = []
    evaluate = hd.evaluate
    hd.evaluate = lambda *a, **k: (calls.append(hd.step), evaluate(*a, **k))[1]
    hd.train(EXAMPLES, epochs=2, batch_size=2, eval_data=EXAMPLES, eval_every=2, progress=False)
    assert calls == [2, 4] and [("eval" in r) for r in hd.history] == [False, True, False, True]


def test_the_training_loop_uses_the_cause_and_isolate_weights(model, tok):
    hd = new_hd(model, tok, lr=0.0, basis_lr=0.0)
    logits, labels, is_causal, _ = hd.forward(EXAMPLES)
    assert is_causal.tolist() == [True, True, False, True]
    expected = H.prediction_loss(logits, labels, is_causal, 3.5, 0.5).item()
    swapped = H.prediction_loss(logits, labels, is_causal, 0.5, 3.5).item()
    hd.train(EXAMPLES, epochs=1, batch_size=4, progress=False)
    assert hd.history[0]["prediction"] == pytest.approx(expected, rel=1e-5) and abs(expected - swapped) > 1e-3


def test_scores_macro_average_per_attribute_then_domain_is_the_papers_number():
    rows = [example("Vienna", "Paris")] * 3 + [example("Oslo", "Lima", concept="Continent", attribute="Continent"),
                                               example("Oslo", "Lima", kind="isolate", attribute="Continent")]
    s = H.scores(rows, [True, True, True, False, True])
    assert s["pooled"]["cause"] == pytest.approx(3 / 4)
    assert s["cause"] == pytest.approx((1.0 + 0.0) / 2) and s["isolate"] == 1.0 and s["disentangle"] == 0.75
    other = dict(example("Rome", "Oslo", concept="Continent", attribute="Continent"), domain="verb")
    s2 = H.scores(rows + [other], [True, True, True, False, True, True])
    assert s2["cause"] == pytest.approx(((1.0 + 0.0) / 2 + 1.0) / 2)        # city's mean, then verb's, averaged


# --------------------------------------------------------------------------------------------------
# Hardening: checkpoints and resume


def test_das_checkpoint_loads_back(model, tok, tmp_path):
    das = H.DAS(model, tok, attributes=["Country", "Continent"], layer=2, feature_dim=8)
    das.train(EXAMPLES, epochs=1, batch_size=2, progress=False)
    das.save(tmp_path / "das")
    loaded = H.HyperDAS.load(tmp_path / "das", model, tok)
    assert isinstance(loaded, H.DAS) and loaded.attributes == das.attributes
    assert torch.equal(loaded.forward(EXAMPLES)[0], das.forward(EXAMPLES)[0])


def test_command_line_round_trip_for_both_methods(model, tok, tmp_path, monkeypatch):
    import cli
    import toy_world
    monkeypatch.setattr(toy_world, "toy_target", lambda domain, device=None, arch="llama", position="last": (model, tok))
    monkeypatch.setattr(H, "ravel_examples", lambda domain, split, *a, **k: EXAMPLES)
    for method in ("hyperdas", "das"):
        out = tmp_path / method
        trained = cli.main(["--domain", "city", "--method", method, "--epochs", "1", "--out", str(out)])
        again = cli.main(["--evaluate", "--model_path", str(out / "checkpoint"), "--domain", "city",
                        "--out", str(tmp_path / f"{method}-eval")])
        assert again["method"] == method and again["mode"] == trained["mode"]


def test_resume_refuses_a_different_run_in_one_line(model, tok, tmp_path):
    new_hd(model, tok).train(EXAMPLES, epochs=1, batch_size=2, out_dir=tmp_path / "ckpt", progress=False)
    for change, expected in ((dict(batch_size=4), "batch_size: 2 -> 4"), (dict(epochs=2), "epochs: 1 -> 2"),
                             (dict(data=EXAMPLES[:3]), "examples: 4 -> 3")):
        args = dict(dict(data=EXAMPLES, epochs=1, batch_size=2), **change)
        with pytest.raises(ValueError, match="holds a different run") as err:
            new_hd(model, tok).train(out_dir=tmp_path / "ckpt", progress=False, **args)
        assert expected in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="config.lr: 0.001 -> 0.0005"):
        new_hd(model, tok, lr=5e-4).train(EXAMPLES, epochs=1, batch_size=2, out_dir=tmp_path / "ckpt", progress=False)


def test_checkpoint_directory_switches_as_a_whole(model, tok, tmp_path, monkeypatch):
    hd = new_hd(model, tok)
    hd.save(tmp_path / "ckpt")
    first = (tmp_path / "ckpt" / "weights.safetensors").read_bytes()
    hd.net.encoder.norm.weight.data += 1

    def crash(path):
        raise OSError("disk full")
    with pytest.raises(OSError):          # a crash while writing leaves the old checkpoint untouched
        H.write_checkpoint(tmp_path / "ckpt", {"weights.safetensors": lambda p: p.write_bytes(b"x"), "config.json": crash})
    assert (tmp_path / "ckpt" / "weights.safetensors").read_bytes() == first
    replace, calls = os.replace, []

    def cut_after_first_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        replace(src, dst)
    monkeypatch.setattr(os, "replace", cut_after_first_rename)
    with pytest.raises(KeyboardInterrupt):   # cut between the two renames: only ckpt.old exists
        hd.save(tmp_path / "ckpt")
    monkeypatch.setattr(os, "replace", replace)
    assert not (tmp_path / "ckpt").exists()
    loaded = H.HyperDAS.load(tmp_path / "ckpt", model, tok)     # takes ckpt.old back: the complete old one
    assert (tmp_path / "ckpt" / "weights.safetensors").read_bytes() == first and loaded.step == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a HyperDAS checkpoint"):
        hd.save(tmp_path / "mine")


# --------------------------------------------------------------------------------------------------
# Hardening: settings, intervene, the seed's Quick Start


def test_settings_follow_depth_and_width_with_the_papers_row_for_llama3_8b():
    from types import SimpleNamespace
    config = lambda n, d, **extra: SimpleNamespace(num_hidden_layers=n, hidden_size=d, **extra)
    settings, why = H.settings_for(config(32, 4096))
    assert settings == H.PAPER and "paper" in why
    settings, _ = H.settings_for(config(16, 2048))                    # Llama-3.2-1B: not the 8B row
    assert (settings["layer"], settings["feature_dim"], settings["num_blocks"]) == (8, 64, 4)
    settings, _ = H.settings_for(config(22, 2048))                    # TinyLlama
    assert (settings["layer"], settings["feature_dim"], settings["num_blocks"]) == (10, 64, 5)
    assert H.settings_for(config(4, 128, toy_world={"domain": "verb"}))[0] == H.TOY


def test_intervene_uses_the_current_cache_argument_and_refuses_bad_prompts(model, tok, monkeypatch):
    import warnings
    import transformers.utils.generic as generic
    said = []                 # transformers says "past_key_values ... deprecated" through its logger, once
    if hasattr(generic, "logger"):
        monkeypatch.setattr(generic.logger, "warning_once", lambda message, *a, **k: said.append(message))
    hd = new_hd(model, tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hd.intervene("the city of Vienna is in", "I love Paris", "Country", "Vienna", "Paris", max_new_tokens=3)
    assert not [m for m in said if "deprecated" in m], said
    with pytest.raises(ValueError, match="does not occur"):
        hd.intervene("the city of Vienna is in", "I love Paris", "Country", "Rome", "Paris")
    with pytest.raises(ValueError, match="empty"):
        hd.intervene("", "I love Paris", "Country", "Vienna", "Paris")


def test_the_seed_quick_start_runs_as_written(toy_cache, monkeypatch):
    """The paper README's snippet: no tokenizer, dataset_path, and a natural-language concept."""
    toy_world = pytest.importorskip("toy_world")
    from transformers import AutoModelForCausalLM
    try:
        toy_world.toy_target("verb", n_entities=40, steps=150, cache_dir=toy_cache, progress=False)
    except FileNotFoundError as err:
        pytest.skip(f"RAVEL data not available: {err}")
    folder = next(p for p in toy_cache.iterdir() if p.name.startswith("verb-"))
    monkeypatch.setattr(target, "SIZES", {"train": 240, "test": 80})
    model = AutoModelForCausalLM.from_pretrained(folder)
    hyperdas = H.HyperDAS(model=model, layer=2, feature_dim=8, num_blocks=1)
    hyperdas.train(dataset_path="data/ravel/verb", epochs=1, batch_size=32)
    assert hyperdas.attributes == ["Past Tense", "Singular"] and hyperdas.domains == ["verb"]
    text = hyperdas.intervene(base_prompt="The past tense of walk is", counterfactual_prompt="The past tense of run is",
                              concept="the past tense of a verb")
    assert isinstance(text, str)
    assert H.entity_in("The past tense of walk is", hyperdas.domains, "base") == "walk"
    with pytest.raises(ValueError, match="names none of the trained attributes: Past Tense, Singular"):
        hyperdas.intervene("The past tense of walk is", "The past tense of run is", concept="the colour of a verb")
    with pytest.raises(ValueError, match="pass base_entity="):
        hyperdas.intervene("Nothing here", "The past tense of run is", concept="Past Tense")
    with pytest.raises(ValueError, match="names no RAVEL domain"):
        hyperdas.train(dataset_path="data/ravel/planets", epochs=1)


def test_saving_never_replaces_a_folder_it_did_not_write(model, tok, tmp_path):
    model.save_pretrained(tmp_path / "my-llama")                      # a model folder has a config.json too
    before = sorted(p.name for p in (tmp_path / "my-llama").iterdir())
    with pytest.raises(ValueError, match="not a HyperDAS checkpoint"):
        new_hd(model, tok).save(tmp_path / "my-llama")
    assert sorted(p.name for p in (tmp_path / "my-llama").iterdir()) == before
    with pytest.raises(ValueError, match="not a HyperDAS or DAS checkpoint"):
        H.HyperDAS.load(tmp_path / "my-llama", model, tok)
    hd = new_hd(model, tok)
    hd.save(str(tmp_path / "ckpt") + "/")                             # a trailing slash names the same folder
    assert H.checkpoint_path(str(tmp_path / "ckpt") + "/") == tmp_path / "ckpt"
    assert not (tmp_path / "ckpt.old").exists() and (tmp_path / "ckpt" / "config.json").exists()


def test_a_loaded_hyperdas_trains_a_new_run_from_step_0(model, tok, tmp_path):
    hd = new_hd(model, tok)
    hd.train(EXAMPLES, epochs=1, batch_size=2, progress=False)
    hd.save(tmp_path / "ckpt")
    loaded = H.HyperDAS.load(tmp_path / "ckpt", model, tok)
    assert loaded.step == 2
    assert [r["step"] for r in loaded.train(EXAMPLES, epochs=1, batch_size=2, progress=False)] == [1, 2]


def test_intervene_sees_the_prompt_up_to_the_entitys_own_mention(model, tok):
    """The entity is located as a word of its own, not inside a longer word ("Paris" in "Parisians")."""
    assert H.entity_end("Parisians love Paris", "Paris") == len("Parisians love Paris")
    assert H.entity_end("vienna is in", "Vienna") == len("vienna")
    assert H.entity_end("Parisians love it", "Paris") is None
