"""Tests for ravel_data.py. Real-data tests read RAVEL's data.tgz from $RAVEL_DATA (or ../shared)."""
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ravel_data as R
import target

# Entities per domain after dropping the two all-empty Nobel laureates (928 in the raw file).
ENTITY_COUNTS = {"city": 3552, "nobel_prize_winner": 926, "occupation": 799, "physical_object": 563, "verb": 986}
# Attribute templates per attribute (RAVEL's file counts, minus the 31 UTC-offset Timezone templates).
TEMPLATE_COUNTS = {
    "city": {"Country": 46, "Continent": 43, "Latitude": 42, "Longitude": 25, "Language": 44, "Timezone": 42},
    "nobel_prize_winner": {"Field": 64, "Award Year": 66, "Birth Year": 68, "Country of Birth": 67, "Gender": 36},
    "occupation": {"Duty": 25, "Industry": 34, "Work Location": 25},
    "physical_object": {"Category": 54, "Color": 37, "Size": 38, "Texture": 36},
    "verb": {"Definition": 89, "Singular": 93, "Past Tense": 87, "Pronunciation": 90},
}


def _ravel_source():
    if os.environ.get("RAVEL_DATA"):          # conftest.py sets it to ../shared/ravel/data.tgz when that exists
        return os.environ["RAVEL_DATA"]
    try:
        return str(R.data_dir())               # the cache that `python ravel_data.py download` fills
    except FileNotFoundError:
        pytest.skip("RAVEL data not available: run `python ravel_data.py download` or set RAVEL_DATA")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The unpacked data/ folder; a data.tgz is unpacked into a throwaway cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        return R.data_dir(_ravel_source())


@pytest.fixture(scope="module")
def generated(folder):
    """(domain, split) -> examples: the default test size, and a smaller train set."""
    return {(d, s): R.make_examples(d, s, R.default_n(d, "test") if s == "test" else 4000, seed=0, path=folder)
            for d in R.DOMAINS for s in ("train", "test")}


def base_template(ex):
    return ex["input_prefix"][:len(ex["input_prefix"]) - len(ex["entity"])] + "%s" + ex["input_suffix"]


def source_template(ex):
    cf = ex["counterfactual_input_prefix"]
    return cf[:len(cf) - len(ex["counterfactual_entity"])] + "%s" + ex["counterfactual_input_suffix"]


# ------------------------------------------------------------------------------------------------
# Reading and cleaning

def test_entity_counts_and_attributes_after_cleaning(folder):
    for d in R.DOMAINS:
        dom = R.load_domain(d, folder)
        assert len(dom.entities) == ENTITY_COUNTS[d], d
        assert sorted(dom.attributes) == sorted(TEMPLATE_COUNTS[d]), d
        assert set(R.DEFAULT_ATTRIBUTES[d]) <= set(dom.attributes)
        assert all(v for values in dom.entities.values() for v in values.values())
    nobel = R.load_domain("nobel_prize_winner", folder).entities
    assert "Michael Houghton" not in nobel and "Satoshi &" not in nobel and "Aage N. Bohr" in nobel


def test_template_cleaning(folder):
    for d in R.DOMAINS:
        dom = R.load_domain(d, folder)
        assert {a: len(ts) for a, ts in dom.templates.items()} == TEMPLATE_COUNTS[d], d
        for t in [t for ts in dom.templates.values() for t in ts] + list(dom.wiki):
            assert t.count("%s") == 1 and t == t.rstrip()
        assert set(dom.template_split) == {t for ts in dom.templates.values() for t in ts}
    city = R.load_domain("city", folder)
    assert "city: %s, longitude:" in city.templates["Longitude"]
    assert not any("UTC" in t for t in city.templates["Timezone"])
    assert "Bangkok: Asia/Bangkok. %s:" in city.templates["Timezone"]
    assert "Gender Bias" not in R.load_domain("occupation", folder).templates
    categories = Counter(v["Category"] for v in R.load_domain("physical_object", folder).entities.values())
    assert categories == {"plant": 213, "non-living thing": 225, "animal": 125}
    wiki = R.load_domain("city", folder).wiki
    assert wiki["Suad Liçi (born 24 March 1974 in %s) is an Albanian football midfielder who last played for"] == "Shkoder"
    assert sum(e is None for e in wiki.values()) == 24


def test_split_at_percent_s_not_at_last_entity_occurrence():
    assert R.fill("word: %s (v.), 3rd person present:", "present") == ("word: present", " (v.), 3rd person present:")
    assert R.fill("frogs lack lungs and %s entirely on their skin", "rely") == (
        "frogs lack lungs and rely", " entirely on their skin")


# ------------------------------------------------------------------------------------------------
# Generated examples

def test_fields_and_prefix_suffix(folder, generated):
    for (d, split), examples in generated.items():
        dom = R.load_domain(d, folder)
        for ex in examples:
            assert tuple(ex) == R.FIELDS
            assert ex["input_prefix"].endswith(ex["entity"])
            assert ex["counterfactual_input_prefix"].endswith(ex["counterfactual_entity"])
            template = base_template(ex)
            assert template in dom.templates[ex["attribute"]]
            assert ex["input_prefix"] + ex["input_suffix"] == template % ex["entity"]
            source = source_template(ex)
            assert source in dom.template_split or dom.wiki[source] == ex["counterfactual_entity"]
            assert ex["edit_instruction"] == f"{ex['entity']} ; {ex['counterfactual_entity']} - {R.concept(ex)}"
            assert ex["domain"] == d


def test_cause_labels(folder, generated):
    for (d, split), examples in generated.items():
        entities = R.load_domain(d, folder).entities
        causal = [ex for ex in examples if ex["attribute_type"] == "causal"]
        assert causal
        for ex in causal:
            attr = R.concept(ex)
            assert ex["attribute"] == attr
            assert ex["counterfactual_target"] == entities[ex["counterfactual_entity"]][attr]
            assert ex["target"] == entities[ex["entity"]][attr] != ex["counterfactual_target"]
            assert ex["verify_text"] == base_template(ex) % ex["counterfactual_entity"]


def test_isolate_labels(folder, generated):
    for (d, split), examples in generated.items():
        entities = R.load_domain(d, folder).entities
        isolate = [ex for ex in examples if ex["attribute_type"] == "isolate"]
        assert isolate
        for ex in isolate:
            attr = ex["attribute"]
            assert attr != R.concept(ex) and R.concept(ex) in R.DEFAULT_ATTRIBUTES[d]
            assert ex["target"] == entities[ex["entity"]][attr]
            assert ex["counterfactual_target"] == entities[ex["counterfactual_entity"]][attr] != ex["target"]
            assert ex["verify_text"] == ex["input_prefix"] + ex["input_suffix"]


def test_train_and_test_templates_are_disjoint(folder, generated):
    for d in R.DOMAINS:
        dom = R.load_domain(d, folder)
        train, test = generated[d, "train"], generated[d, "test"]
        base_train, base_test = {base_template(ex) for ex in train}, {base_template(ex) for ex in test}
        assert {dom.template_split[t] for t in base_train} == {"train"}
        assert {dom.template_split[t] for t in base_test} == {"val", "test"}
        source_train, source_test = {source_template(ex) for ex in train}, {source_template(ex) for ex in test}
        # 15 Nobel attribute templates also sit in the Wikipedia file as null-entity sentences (split
        # "train"); those are never used as Wikipedia sources, so the template split decides.
        split_of = lambda t: dom.template_split.get(t) or dom.wiki_split[t]
        assert {split_of(t) for t in source_train} == {"train"}
        assert {split_of(t) for t in source_test} == {"val", "test"}
        assert not (base_train | source_train) & (base_test | source_test)
        # Entities are pooled: the test set uses entities from all three of RAVEL's entity splits.
        assert {dom.entity_split[ex["entity"]] for ex in test} == {"train", "val", "test"}


def test_sources_mix_every_attribute_and_wikipedia(folder, generated):
    verb = R.load_domain("verb", folder)
    kinds = Counter("wikipedia" if source_template(ex) in verb.wiki else
                    next(a for a, ts in verb.templates.items() if source_template(ex) in ts)
                    for ex in generated["verb", "test"])
    assert set(kinds) == {"Definition", "Past Tense", "Pronunciation", "Singular", "wikipedia"}
    assert min(kinds.values()) > 0.1 * sum(kinds.values())


def test_sizes_follow_the_plan(folder):
    city = R.make_examples("city", "train", 1200, seed=3, path=folder)
    groups = Counter((ex["attribute_type"], R.concept(ex), ex["attribute"]) for ex in city)
    assert len(groups) == 6 + 6 * 5
    assert all(c == 100 for (kind, _, _), c in groups.items() if kind == "causal")   # 1200 // (2 * 6)
    assert all(c == 20 for (kind, _, _), c in groups.items() if kind == "isolate")   # 1200 // (2 * 6 * 5)
    verb = Counter((ex["attribute_type"], R.concept(ex), ex["attribute"])
                   for ex in R.make_examples("verb", "test", 1000, path=folder))
    assert verb == {("causal", "Past Tense", "Past Tense"): 250, ("causal", "Singular", "Singular"): 250,
                    ("isolate", "Past Tense", "Singular"): 250, ("isolate", "Singular", "Past Tense"): 250}
    one = Counter((ex["attribute_type"], ex["attribute"])
                  for ex in R.make_examples("occupation", "test", 400, attributes=["Duty"], path=folder))
    assert one == {("causal", "Duty"): 200, ("isolate", "Industry"): 100, ("isolate", "Work Location"): 100}


def test_isolate_attributes_restrict_what_isolates_ask(folder):
    taught = ["Country", "Continent"]       # e.g. all a small target model knows
    rows = R.make_examples("city", "test", 800, attributes=taught, isolate_attributes=taught, path=folder)
    groups = Counter((ex["attribute_type"], R.concept(ex), ex["attribute"]) for ex in rows)
    assert groups == {("causal", "Country", "Country"): 200, ("causal", "Continent", "Continent"): 200,
                      ("isolate", "Country", "Continent"): 200, ("isolate", "Continent", "Country"): 200}
    alone = R.make_examples("city", "test", 800, attributes=["Country"], isolate_attributes=["Country"], path=folder)
    assert Counter(ex["attribute_type"] for ex in alone) == {"causal": 400}      # nothing else to isolate
    with pytest.raises(ValueError, match="Unknown attribute"):
        R.make_examples("city", "test", 80, isolate_attributes=["Capital"], path=folder)
    with pytest.raises(ValueError, match="domain='all'"):
        R.make_examples("all", "test", 80, isolate_attributes=["Country"], path=folder)


def test_default_size_is_hyperdas_per_attribute_size(folder):
    rows = R.make_examples("occupation", "test", path=folder)
    assert Counter(ex["attribute_type"] for ex in rows) == {"causal": 6000, "isolate": 6000}   # 3 x 4000
    assert len(R.make_examples("verb", "test", attributes=["Past Tense"], path=folder)) == 4000


def test_all_domains_concatenates(folder):
    mixed = R.make_examples("all", "test", 500, seed=1, path=folder)
    assert mixed == [ex for d in R.DOMAINS for ex in R.make_examples(d, "test", 100, seed=1, path=folder)]
    assert [d for d in dict.fromkeys(ex["domain"] for ex in mixed)] == list(R.DOMAINS)


def test_deterministic_under_seed(folder):
    a = R.make_examples("nobel_prize_winner", "train", 600, seed=7, path=folder)
    assert a == R.make_examples("nobel_prize_winner", "train", 600, seed=7, path=folder)
    assert a != R.make_examples("nobel_prize_winner", "train", 600, seed=8, path=folder)
    test = R.make_examples("nobel_prize_winner", "test", 600, seed=7, path=folder)
    pairs = lambda rows: [(ex["entity"], ex["counterfactual_entity"]) for ex in rows]
    assert len(set(pairs(a)) & set(pairs(test))) < 10   # HyperDAS's train and test shared pair sequences


# ------------------------------------------------------------------------------------------------
# Per-domain merge

def test_merge_isolates(folder):
    rows = R.make_examples("occupation", "test", 600, path=folder)   # 100 cause per X, 50 per (X, Y)
    keep_causal = {"Duty": 100, "Industry": 60, "Work Location": 40}
    seen = Counter()
    subset = []
    for ex in rows:
        if ex["attribute_type"] == "causal":
            seen[ex["attribute"]] += 1
            if seen[ex["attribute"]] > keep_causal[ex["attribute"]]:
                continue
        subset.append(ex)
    merged = R.merge_isolates(subset, seed=0)
    causal = [ex for ex in merged if ex["attribute_type"] == "causal"]
    assert causal == [ex for ex in subset if ex["attribute_type"] == "causal"]
    groups = Counter((R.concept(ex), ex["attribute"]) for ex in merged if ex["attribute_type"] == "isolate")
    assert len(groups) == 6 and set(groups.values()) == {20}    # 100 // 5, downsampled from 50
    ids = {id(ex) for ex in subset}
    assert all(id(ex) in ids for ex in merged)

    big = [ex for ex in rows if ex["attribute_type"] == "isolate"] + [
        ex for ex in R.make_examples("occupation", "test", 3000, seed=5, path=folder)
        if ex["attribute_type"] == "causal" and ex["attribute"] == "Duty"][:400]
    up = R.merge_isolates(big, seed=0)
    groups = Counter((R.concept(ex), ex["attribute"]) for ex in up if ex["attribute_type"] == "isolate")
    assert set(groups.values()) == {80}                          # 400 // 5, upsampled from 50
    assert {id(ex) for ex in up if ex["attribute_type"] == "isolate"} == {
        id(ex) for ex in big if ex["attribute_type"] == "isolate"}   # every original row kept
    assert R.merge_isolates(big, seed=0) == up


# ------------------------------------------------------------------------------------------------
# Model-based filter, with a model whose answers we choose

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "color", "of", "the", "red", "blue", "dark"] + [f"e{i}" for i in range(10)]
# Row i: (kind, label the row is scored on, the model's answer for e_i). The other label field gets a
# wrong value, so scoring the wrong field flips the verdict. "dark" is always followed by "red".
ROWS = [("causal", "red", "red"), ("isolate", "red", "blue"), ("causal", "dark red", "dark"),
        ("isolate", "blue", "blue"), ("causal", "dark blue", "dark"), ("isolate", "red", "red"),
        ("causal", "blue", "red"), ("isolate", "red", "blue"), ("causal", "red", "red"),
        ("isolate", "blue", "red")]
RIGHT = [0, 2, 3, 5, 8]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


class BigramModel(torch.nn.Module):
    """Predicts the next token from the current one alone, through a fixed table."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", torch.tensor([table.get(w, 0) for w in range(len(WORDS))]))
        self.unused = torch.nn.Parameter(torch.zeros(1))   # gives the model a device

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0):
        logits = torch.nn.functional.one_hot(self.table[input_ids], len(WORDS)).float()   # [B, T, V]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def filter_rows():
    idx = {w: i for i, w in enumerate(WORDS)}
    table = {idx["dark"]: idx["red"]}
    examples = []
    for i, (kind, answer, belief) in enumerate(ROWS):
        table[idx[f"e{i}"]] = idx[belief]
        wrong = "blue" if answer == "red" else "red"
        examples.append({"verify_text": ("the color of " if i % 3 else "") + f"e{i}", "attribute_type": kind,
                         "counterfactual_target": answer if kind == "causal" else wrong,
                         "target": answer if kind == "isolate" else wrong, "row": i})
    return examples, BigramModel(table)


@pytest.mark.parametrize("batch_size", [4, 3, 1, 64])
def test_filter_keeps_exactly_the_rows_the_model_gets_right(batch_size, capsys):
    examples, model = filter_rows()
    import hyperdas as H
    kept = H.filter_examples(examples, model, tiny_tokenizer(), batch_size=batch_size, progress=False)
    # With batch_size 4 the last batch holds rows 8 (right) and 9 (wrong); indexing it as
    # batch_id * len(batch) + i would keep row 4 (wrong) instead of row 8.
    assert [ex["row"] for ex in kept] == RIGHT
    assert "kept 5 of 10" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Command line

def test_cli_stats_and_sample(folder, capsys):
    R.main(["stats", "--domain", "all", "--data", str(folder)])
    out = capsys.readouterr().out
    for d, n in ENTITY_COUNTS.items():
        assert f"{d}: {n} entities" in out
    assert "train examples at n=120000 (20000 per target attribute, before filtering): 60000 cause + 60000 isolate" in out
    R.main(["sample", "--domain", "verb", "-n", "5", "--split", "test", "--json", "--data", str(folder)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    for line in lines:
        ex = json.loads(line)
        assert tuple(ex) == R.FIELDS and ex["domain"] == "verb"
        assert ex["attribute"] in ("Past Tense", "Singular")


# ------------------------------------------------------------------------------------------------
# Bad input

def test_unknown_domain_and_attribute(folder):
    with pytest.raises(ValueError, match="valid domains: city, nobel_prize_winner, occupation, physical_object, verb"):
        R.load_domain("cities", folder)
    with pytest.raises(ValueError, match="valid domains: .*verb, all"):
        R.make_examples("cities", "train", 10, path=folder)
    with pytest.raises(ValueError, match="valid attributes: Duty, Industry, Work Location"):
        R.make_examples("occupation", "train", 10, attributes=["Gender Bias"], path=folder)
    with pytest.raises(ValueError, match="valid splits: train, test"):
        R.make_examples("city", "val", 10, path=folder)
    with pytest.raises(SystemExit, match="valid attributes: Continent, Country"):
        R.main(["sample", "--domain", "city", "--attributes", "Capital", "--data", str(folder)])


def fake_tgz(path):
    data = b'{"x": {"Country": "Nowhere"}}'
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("data/ravel_city_entity_attributes.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_wrong_checksum_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="sha256 .*expected b148f0de.*by hand"):
        R.data_dir(fake_tgz(tmp_path / "data.tgz"))
    assert not (tmp_path / "cache").exists()


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("RAVEL_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="python ravel_data.py download.*RAVEL_DATA"):
        R.data_dir(tmp_path / "missing" / "data.tgz")
    with pytest.raises(FileNotFoundError, match="python ravel_data.py download"):
        R.load_domain("city")                       # nothing in the cache either


def test_download_failures_leave_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.delenv("RAVEL_DATA", raising=False)
    monkeypatch.setattr(R, "URL", (tmp_path / "nowhere.tgz").as_uri())
    with pytest.raises(RuntimeError, match="Could not download.*by hand"):
        R.download(tmp_path / "a")
    assert list((tmp_path / "a").iterdir()) == []

    monkeypatch.setattr(R, "URL", fake_tgz(tmp_path / "fake.tgz").as_uri())
    with pytest.raises(RuntimeError, match="sha256"):
        R.download(tmp_path / "b")
    assert list((tmp_path / "b").iterdir()) == []

    class Broken(io.BytesIO):                     # the connection drops after 1 kB
        def read(self, size=-1):
            if self.tell() >= 1024:
                raise ConnectionResetError("connection reset")
            return super().read(1024)
    monkeypatch.setattr(R.urllib.request, "urlopen", lambda url, timeout: Broken(b"x" * 4096))
    with pytest.raises(RuntimeError, match="Could not download.*connection reset"):
        R.download(tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []


def test_download_and_data_dir_resolution(tmp_path, monkeypatch):
    source = Path(_ravel_source()).resolve()
    if not source.is_file():
        pytest.skip("RAVEL_DATA is a folder; the download test needs the data.tgz file")
    monkeypatch.delenv("RAVEL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(R, "URL", source.as_uri())
    folder = R.download(tmp_path / "dest")
    assert folder == tmp_path / "dest" / "data" and (tmp_path / "dest" / "data.tgz").is_file()
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["data", "data.tgz"]
    assert len(list(folder.glob("*.json"))) == 25
    assert R.data_dir(tmp_path / "dest") == folder           # a folder holding data/
    monkeypatch.setenv("RAVEL_DATA", str(folder))
    assert R.data_dir() == folder                             # $RAVEL_DATA as the data/ folder
    monkeypatch.setenv("RAVEL_DATA", str(source))
    assert R.data_dir() == tmp_path / "cache" / "hyperdas" / "ravel" / "data"   # a .tgz: unpacked in the cache
    assert R.data_dir(folder) == folder                       # the argument comes first


def test_make_examples_restricted_to_given_entities(folder):
    few = ["run", "walk", "go", "be", "have", "sing"]
    rows = R.make_examples("verb", "train", 200, seed=1, path=folder, entities=few)
    assert len(rows) == 200 and all(r["entity"] in few and r["counterfactual_entity"] in few for r in rows)
    with pytest.raises(ValueError, match="need at least 2"):
        R.make_examples("verb", "train", 10, path=folder, entities=["run", "Vienna"])


def test_ravel_examples_asks_a_toy_target_only_what_it_was_taught(folder, monkeypatch):
    import hyperdas as H
    monkeypatch.setenv("RAVEL_DATA", str(folder))
    monkeypatch.setattr(target, "filter_examples", lambda pairs, model, tokenizer: pairs)    # no model needed here
    cities = sorted(R.load_domain("city", folder).entities)[:60]
    toy = SimpleNamespace(config=SimpleNamespace(toy_world={"entities": cities, "attributes": ["Country", "Continent"]}))
    rows = H.ravel_examples("city", "test", toy, tokenizer=None, n=400)
    assert Counter((ex["attribute_type"], R.concept(ex), ex["attribute"]) for ex in rows) == {
        ("causal", "Country", "Country"): 100, ("causal", "Continent", "Continent"): 100,
        ("isolate", "Country", "Continent"): 100, ("isolate", "Continent", "Country"): 100}
    assert {ex["entity"] for ex in rows} | {ex["counterfactual_entity"] for ex in rows} <= set(cities)
