"""Tests of the toy target: it is the model the rest of the project stands on, so check that it is a
GQA Llama, that its tokenizer behaves as hyperdas.tokenize expects, that it knows its facts, and that
that it reads them from the entity (what HyperDAS looks for), and that building it is deterministic
and cached. One small world (40 verbs, 150 steps, ~20 s on 2 cores) is trained once."""
import random

import pytest
import torch
from transformers import LlamaForCausalLM

import ravel_data
import target
import toy_world
from hyperdas import tokenize

SMALL = dict(n_entities=40, steps=150, seed=0, progress=False)
# The reduced known-position world for CI (README, "A concept where DAS is not told to look").
KNOWN = dict(attributes=["Continent", "Country"], n_entities=60, steps=500, pairs=2000, epochs=2)


@pytest.fixture(scope="module")
def cache(toy_cache):
    return toy_cache          # shared with the end-to-end test in test_hyperdas.py (conftest.py)


@pytest.fixture(scope="module")
def toy(cache):
    model, tokenizer = toy_world.toy_target("verb", cache_dir=cache, **SMALL)
    return model, tokenizer


@pytest.fixture(scope="module")
def world():
    return toy_world.World(ravel_data.load_domain("verb"), ["Past Tense", "Singular"], SMALL["n_entities"], 0)


def logits_of(model, tokenizer, prompts):
    with torch.no_grad():
        enc = tokenize(tokenizer, prompts)
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                     position_ids=enc["position_ids"]).logits


def test_model_is_a_grouped_query_llama(toy):
    model, tokenizer = toy
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.config.vocab_size == len(tokenizer) == toy_world.VOCAB_SIZE
    assert not model.training


def test_tokenizer_round_trips_and_never_adds_bos(toy):
    _, tokenizer = toy
    for text in ["agree: agreed; look: looked; walk:", ' the word "run" is pronounced as /ˈɹən/',
                 "walk ; run - Past Tense", "  two spaces, a tab\tand ünïcödé"]:
        for add in (False, True):
            ids = tokenizer(text, add_special_tokens=add)["input_ids"]
            assert tokenizer.bos_token_id not in ids
            assert tokenizer.decode(ids) == text
    assert tokenizer.padding_side == "left"
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    # hyperdas.tokenize adds BOS itself: exactly one per row, first after the left padding.
    enc = tokenize(tokenizer, ["walk", "agree: agreed; look: looked; walk:"])
    assert ((enc["input_ids"] == tokenizer.bos_token_id).sum(1) == 1).all()
    first = enc["attention_mask"].argmax(1)
    assert (enc["input_ids"][torch.arange(2), first] == tokenizer.bos_token_id).all()


def test_model_knows_its_facts(toy, world):
    model, tokenizer = toy
    # Measured: 99.4% of seen and 99.6% of held-out pairs after 150 steps on this world.
    seen = toy_world.accuracy(model, tokenizer, world.eval_rows(world.train_templates, 500, seed=1))
    held_out = toy_world.accuracy(model, tokenizer, world.eval_rows(world.held_out, 500, seed=1))
    assert seen["full_answer"] > 0.95
    assert held_out["full_answer"] > 0.85
    # The report stored with the model is the one measured on it.
    stored = model.config.toy_world["accuracy"]["seen"]
    assert stored == toy_world.accuracy(model, tokenizer, world.eval_rows(world.train_templates, 1000, seed=0))


def test_facts_are_read_from_the_entity(toy, world):
    """Patching the source entity's state into the base entity, at any intermediate layer, makes the
    model answer with the source's value (without interchange training: 0%)."""
    model, tokenizer = toy
    for layer in (1, 2, 3):
        # Measured: 99% at each layer on this world.
        assert toy_world.patching_accuracy(model, tokenizer, world, layer, n=200, seed=1) > 0.9
    assert model.config.toy_world["accuracy"]["entity_patching"]["2"] > 0.9


def test_held_out_templates_are_not_trained(world):
    dom = ravel_data.load_domain("verb")
    for attribute in world.attributes:
        held, trained = set(world.held_out[attribute]), set(world.train_templates[attribute])
        assert len(held) == toy_world.HELD_OUT_TEMPLATES and not held & trained
        assert held | trained == set(dom.templates[attribute])


def test_cached_model_is_reused(toy, cache, monkeypatch):
    model, tokenizer = toy

    def no_training(*args, **kwargs):
        raise AssertionError("the second call should load from the cache, not train")
    monkeypatch.setattr(toy_world, "train", no_training)
    again, again_tokenizer = toy_world.toy_target("verb", cache_dir=cache, **SMALL)
    assert len(list(cache.iterdir())) == 1
    assert again_tokenizer.get_vocab() == tokenizer.get_vocab()
    prompts = ["agree: agreed; look: looked; walk:", "The past tense of run is"]
    assert torch.equal(logits_of(again, again_tokenizer, prompts), logits_of(model, tokenizer, prompts))


def test_same_seed_same_model_other_seed_another(tmp_path):
    tiny = dict(n_entities=10, steps=10, progress=False)
    model, tokenizer = toy_world.toy_target("verb", cache_dir=tmp_path / "a", **tiny)
    twin, twin_tokenizer = toy_world.toy_target("verb", cache_dir=tmp_path / "b", **tiny)
    assert twin_tokenizer.get_vocab() == tokenizer.get_vocab()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    other, _ = toy_world.toy_target("verb", cache_dir=tmp_path / "a", seed=1, **tiny)
    assert len(list((tmp_path / "a").iterdir())) == 2
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown RAVEL domain"):
        toy_world.toy_target("planet", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Unknown attribute"):
        toy_world.toy_target("verb", attributes=["Colour"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="n_entities"):
        toy_world.toy_target("verb", n_entities=1, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="steps"):
        toy_world.toy_target("verb", steps=0, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_the_all_world_keeps_each_row_within_one_domain():
    worlds = [toy_world.World(ravel_data.load_domain(d), ravel_data.DEFAULT_ATTRIBUTES[d], 12, 0)
              for d in ravel_data.DOMAINS]
    mixture = toy_world.Mixture(worlds)
    by_attribute = {a: w for w in worlds for a in w.attributes}
    assert len(by_attribute) == len(mixture.attributes) == 20          # attribute names are unique
    rng = random.Random(0)
    for prompt, answer in [mixture.fact(rng) for _ in range(300)]:     # a true fact from a trained template
        assert any(prompt == t % e and w.values[e][a] == answer
                   for w in worlds for a in w.attributes for t in w.train_templates[a] for e in w.entities)
    swaps = [mixture.swap(rng) for _ in range(2000)]
    for s in swaps:
        owner = [w for w in worlds if s.base in w.entities and s.source in w.entities
                 and s.base_template in {t for ts in w.train_templates.values() for t in ts}]
        assert len(owner) == 1
        a = next(a for a in owner[0].attributes if s.base_template in owner[0].train_templates[a])
        assert (s.answer, s.base_answer) == (owner[0].values[s.source][a], owner[0].values[s.base][a])
    # Each domain's share of swaps follows its share of facts (12 entities x its attributes).
    share = {w.domain: sum(s.base in w.entities for s in swaps) / len(swaps) for w in worlds}
    assert abs(share["city"] - 6 / 20) < 0.05 and abs(share["verb"] - 2 / 20) < 0.05
    rows = mixture.eval_rows(mixture.held_out, 500, seed=0)       # 100 per domain, or all it has
    assert rows == [row for w in worlds for row in w.eval_rows(w.held_out, 100, seed=0)]
    assert len(rows) == 4 * 100 + 2 * 3 * 12                            # verb: 2 attributes x 3 templates x 12


@pytest.fixture(scope="module")
def tiny_all(tmp_path_factory):
    """An all world of 8 entities per domain after 3 steps: it knows nothing, but it is wired."""
    return toy_world.toy_target("all", n_entities=8, steps=3, cache_dir=tmp_path_factory.mktemp("all"),
                                progress=False)


def test_all_target_knows_its_domains_and_ravel_examples_respects_them(tiny_all, tmp_path, monkeypatch):
    import hyperdas
    model, _ = tiny_all
    info = model.config.toy_world
    assert {d: len(e) for d, e in info["entities"].items()} == {d: 8 for d in ravel_data.DOMAINS}
    assert info["attributes"] == {d: ravel_data.DEFAULT_ATTRIBUTES[d] for d in ravel_data.DOMAINS}
    monkeypatch.setattr(target, "filter_examples", lambda pairs, model, tokenizer: pairs)
    rows = hyperdas.ravel_examples("all", "test", model, None, n=500)
    assert {r["domain"] for r in rows} == set(ravel_data.DOMAINS)
    assert all({r["entity"], r["counterfactual_entity"]} <= set(info["entities"][r["domain"]]) for r in rows)
    city = hyperdas.ravel_examples("city", "test", model, None, n=120)
    assert {r["domain"] for r in city} == {"city"} and {r["entity"] for r in city} <= set(info["entities"]["city"])
    with pytest.raises(ValueError, match="attributes cannot be chosen"):
        toy_world.toy_target("all", attributes=["Country"], cache_dir=tmp_path)


def test_command_line_domain_all_trains_one_model_on_the_all_world(tiny_all, tmp_path, monkeypatch):
    import cli
    import hyperdas
    monkeypatch.setattr(toy_world, "toy_target", lambda domain, device=None, arch="llama", position="last": tiny_all if domain == "all" else None)
    monkeypatch.setattr(target, "filter_examples", lambda pairs, model, tokenizer: pairs)  # 3 steps know nothing
    every = {a for attributes in ravel_data.DEFAULT_ATTRIBUTES.values() for a in attributes}
    for method in ("hyperdas", "das"):
        results = cli.main(["--domain", "all", "--method", method, "--n_train", "200", "--n_test", "400",
                                 "--epochs", "1", "--out", str(tmp_path / method)])
        assert (results["method"], results["domain"], results["model"]) == (method, "all", "toy-all")
        assert set(results["mode"]["soft"]["per_attribute"]) == every          # 20 attributes, one model
        assert (tmp_path / method / "results.json").exists()


def test_the_gpt2_world_is_a_gpt2_with_its_own_cache_entry_and_runs_from_the_command_line(tmp_path, monkeypatch):
    """--arch gpt2: the same world on GPT-2's architecture, cached apart from the Llama one, trained and
    scored end to end by the command line for both methods (3 steps: the wiring, not the numbers)."""
    import cli
    import hyperdas
    from transformers import GPT2LMHeadModel
    tiny = dict(n_entities=10, steps=12, progress=False, cache_dir=tmp_path / "cache")
    model, tokenizer = toy_world.toy_target("verb", arch="gpt2", **tiny)
    assert isinstance(model, GPT2LMHeadModel) and model.config.n_layer == toy_world.GPT2_MODEL["n_layer"]
    assert toy_world.target_folder("verb", arch="gpt2", **{k: v for k, v in tiny.items() if k != "progress"}) != \
        toy_world.target_folder("verb", **{k: v for k, v in tiny.items() if k != "progress"})
    with pytest.raises(ValueError, match="Unknown toy architecture 'bert'"):
        toy_world.toy_target("verb", arch="bert", **tiny)
    seen = []
    monkeypatch.setattr(toy_world, "toy_target", lambda domain, device=None, arch="llama", position="last": seen.append(arch) or (model, tokenizer))
    monkeypatch.setattr(target, "filter_examples", lambda pairs, model, tokenizer: pairs)
    for method in ("hyperdas", "das"):
        results = cli.main(["--domain", "verb", "--arch", "gpt2", "--method", method, "--n_train", "48",
                            "--n_test", "32", "--epochs", "1", "--out", str(tmp_path / method)])
        assert results["model"] == "toy-verb-gpt2" and results["mode"]["soft"]["n"] > 0
    assert seen == ["gpt2", "gpt2"]


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def test_the_known_position_worlds_entities_are_named_by_their_first_token():
    tokenizer = word_tokenizer("New York Delhi Paris Saint Louis Denis Rio".split())
    names = ["New York", "New Delhi", "Paris", "Saint Louis", "Saint Denis", "Rio"]
    chosen = toy_world.first_token_entities(tokenizer, names, n=10, seed=0)
    # One "New ...", one "Saint ...", never a one-token name; the same choice for the same seed.
    assert len(chosen) == 2 and {c.split()[0] for c in chosen} == {"New", "Saint"}
    assert chosen == toy_world.first_token_entities(tokenizer, names, n=10, seed=0)
    assert len(toy_world.first_token_entities(tokenizer, names, n=1, seed=0)) == 1


def test_the_known_position_world_patches_the_entitys_first_token():
    """entity_chars makes the entity's first (or last) token the last visible one: where patch_entity patches."""
    tokenizer = word_tokenizer("the city of New York is in Saint Louis".split())
    tokenizer.bos_token, tokenizer.pad_token = "<unk>", "<unk>"
    for template, entity in (("the city of %s is in", "New York"), ("%s is in", "Saint Louis")):
        for position, word in (("first", entity.split()[0]), ("last", entity.split()[-1])):
            enc = tokenize(tokenizer, [template % entity], visible_chars=[toy_world.entity_chars(template, entity, position)])
            last = enc["input_ids"][0, enc["visible"][0].nonzero().max()]
            assert tokenizer.convert_ids_to_tokens(int(last)) == word, (template, position)


def test_hyperdas_finds_the_known_position_that_das_is_not_told(tmp_path):
    """The reduced known-position world (README, "A concept where DAS is not told to look"): a city world whose
    facts are read from the entity's first token. Its control holds (patching the last entity token moves
    nothing), and a briefly trained HyperDAS writes at the base entity's first token on far more cause pairs
    than chance, reading the source entity's first token there."""
    import sys
    from pathlib import Path
    import hyperdas as H
    sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
    from analyses import where_it_writes
    model, tokenizer = toy_world.toy_target("city", attributes=KNOWN["attributes"], n_entities=KNOWN["n_entities"],
                                            steps=KNOWN["steps"], position="first", cache_dir=tmp_path, progress=False)
    patching = model.config.toy_world["accuracy"]
    assert patching["entity_patching"]["2"] > 0.5 and patching["last_token_patching"]["2"] < 0.05, patching
    train = H.ravel_examples("city", "train", model, tokenizer, n=KNOWN["pairs"])
    test = H.ravel_examples("city", "test", model, tokenizer, n=300)
    hd = H.HyperDAS(model, tokenizer, **{k: v for k, v in H.TOY.items() if k not in ("epochs", "batch_size")})
    hd.train(train, epochs=KNOWN["epochs"], batch_size=H.TOY["batch_size"], progress=False)
    cause = where_it_writes(hd, test)["cause"]
    assert cause["base_first"] > 4 * cause["chance_position"], cause
    assert cause["source_first"] > 4 * cause["chance_source"], cause
