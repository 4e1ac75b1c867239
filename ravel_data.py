"""RAVEL for HyperDAS: fetch the benchmark, clean it, and build cause/isolate examples.

RAVEL (Huang et al., 2024) lists entities of five types with ground-truth attribute values, prompt
templates that ask for each attribute, and Wikipedia sentences that mention the entities. HyperDAS
(Sun et al., ICLR 2025) turns these into interchange-intervention pairs:

    base   "city: Qaminis, country:"                  (asks the base entity's Country)
    source "[{"city": "Boston", "country": "..."       (any prompt that mentions the source entity)
    instruction "Qaminis ; Boston - Country"

A *cause* example checks the intervened attribute: after swapping the Country of Boston into
Qaminis the model should answer "United States". An *isolate* example asks the base prompt for a
different attribute (say Continent) under the same instruction: the answer must stay "Africa".

Labels are RAVEL's ground-truth strings; hyperdas.filter_examples then keeps only the examples the
target model already answers correctly without intervention, as HyperDAS did. This file imports
nothing from the project.

    python ravel_data.py download                 # fetch and verify RAVEL's data.tgz
    python ravel_data.py stats --domain all       # entity, attribute, template and split counts
    python ravel_data.py sample --domain verb -n 5 --split test --json
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

DOMAINS = ("city", "nobel_prize_winner", "occupation", "physical_object", "verb")
FIELDS = (
    "input_prefix", "input_suffix", "counterfactual_input_prefix", "counterfactual_input_suffix",
    "edit_instruction", "entity", "counterfactual_entity", "target", "counterfactual_target",
    "attribute_type", "domain", "attribute", "verify_text",
)

URL = "https://github.com/explanare/ravel/raw/main/data.tgz"
SHA256 = "b148f0ded1979cb0e17e301cfda41cb120517a109d3c758cc768e376946d96bc"
MANUAL = (f"To fetch it by hand: download {URL} (e.g. `curl -L -o data.tgz {URL}`), check that "
          f"`sha256sum data.tgz` prints {SHA256}, then set RAVEL_DATA=/path/to/data.tgz.")

# The target attributes HyperDAS reports per domain (its main table: 6 + 5 + 3 + 4 + 2).
DEFAULT_ATTRIBUTES = {
    "city": ["Continent", "Country", "Language", "Latitude", "Longitude", "Timezone"],
    "nobel_prize_winner": ["Award Year", "Birth Year", "Country of Birth", "Field", "Gender"],
    "occupation": ["Duty", "Industry", "Work Location"],
    "physical_object": ["Category", "Color", "Size", "Texture"],
    # Verb Definition (free-text glosses) and Pronunciation (IPA) are almost never reproduced token for
    # token, so the exact-match filter left HyperDAS with only Past Tense and Singular, as cause and as isolate.
    "verb": ["Past Tense", "Singular"],
}
# HyperDAS's per-attribute sets were generated with n = 20000 (train) and 4000 (test) per target attribute.
DEFAULT_N_PER_ATTRIBUTE = {"train": 20000, "test": 4000}


# ------------------------------------------------------------------------------------------------
# 1. Getting the data: data.tgz -> checksum -> an unpacked data/ folder in a cache
# ------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where the unpacked data lives by default: $XDG_CACHE_HOME/hyperdas/ravel (or ~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hyperdas" / "ravel"


def _is_data_folder(path: Path) -> bool:
    return all((path / f"ravel_{d}_entity_attributes.json").is_file() for d in DOMAINS)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(tgz: Path) -> None:
    got = _sha256(tgz)
    if got != SHA256:
        raise RuntimeError(f"{tgz} is not RAVEL's data.tgz: its sha256 is {got}, expected {SHA256}. {MANUAL}")


def _unpack(tgz: Path, root: Path) -> Path:
    """Verify `tgz` and unpack it to root/data. A half-finished unpack is never visible: we extract
    into a temporary folder next to the target and rename it into place in one step."""
    _verify(tgz)
    target = root / "data"
    if _is_data_folder(target):
        return target
    if target.exists():
        raise RuntimeError(f"{target} exists but is not a complete RAVEL data folder; "
                           f"remove it or unpack somewhere else.")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        try:
            os.replace(tmp / "data", target)
        except OSError:
            if not _is_data_folder(target):  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def download(dest=None) -> Path:
    """Fetch RAVEL's data.tgz, verify its sha256 and unpack it; return the data/ folder.

    Destination: `dest`, else $RAVEL_DATA (a folder; if it names a local data.tgz, that file is used
    instead of the network), else the cache. The download goes to a temporary file that is renamed
    to data.tgz only once its checksum is right, so an interrupted or corrupt download leaves nothing.
    """
    env = os.environ.get("RAVEL_DATA")
    if dest is None and env and Path(env).expanduser().is_file():
        return _unpack(Path(env).expanduser(), cache_dir())
    root = Path(dest or env or cache_dir()).expanduser()
    if _is_data_folder(root / "data"):
        return root / "data"
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".data.tgz-", dir=root)
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(URL, timeout=60) as response:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as err:
            raise RuntimeError(f"Could not download {URL}: {err}. {MANUAL}") from err
        _verify(tmp)
        os.replace(tmp, root / "data.tgz")
    finally:
        tmp.unlink(missing_ok=True)
    return _unpack(root / "data.tgz", root)


def data_dir(path=None) -> Path:
    """The unpacked data/ folder. Looks at `path`, then $RAVEL_DATA, then the cache; each may be a
    data/ folder, a folder holding data/ or data.tgz, or a data.tgz (verified, unpacked into the cache)."""
    where = Path(path or os.environ.get("RAVEL_DATA") or cache_dir()).expanduser()
    if where.is_file():
        return _unpack(where, cache_dir())
    for candidate in (where, where / "data"):
        if _is_data_folder(candidate):
            return candidate
    if (where / "data.tgz").is_file():
        return _unpack(where / "data.tgz", cache_dir())
    raise FileNotFoundError(
        f"RAVEL data not found at {where}. Run `python ravel_data.py download`, or set RAVEL_DATA "
        f"to RAVEL's data.tgz or to its unpacked data/ folder. {MANUAL}")


# ------------------------------------------------------------------------------------------------
# 2. Reading and cleaning a domain
# ------------------------------------------------------------------------------------------------

@dataclass
class Domain:
    """One RAVEL entity type, cleaned the way HyperDAS's copy of the data was cleaned."""
    name: str
    entities: dict[str, dict[str, str]]      # entity -> {attribute: value}
    attributes: list[str]                    # attributes with ground-truth values
    templates: dict[str, list[str]]          # attribute -> prompt templates, each with one %s
    template_split: dict[str, str]           # template -> "train" / "val" / "test"
    wiki: dict[str, str | None]              # Wikipedia sentence with one %s -> its entity (None: any)
    wiki_split: dict[str, str]               # Wikipedia sentence -> "train" / "val" / "test"
    entity_split: dict[str, str] = field(default_factory=dict)  # RAVEL's entity split (HyperDAS pools all)


def _check_domain(domain, allow_all=False):
    valid = DOMAINS + (("all",) if allow_all else ())
    if domain not in valid:
        raise ValueError(f"Unknown RAVEL domain {domain!r}; valid domains: {', '.join(valid)}.")


def load_domain(domain, path=None) -> Domain:
    """Read and clean one domain (cached per domain and data folder; treat the result as read-only)."""
    _check_domain(domain)
    return _load_domain(domain, str(data_dir(path)))


@lru_cache(maxsize=None)
def _load_domain(domain, folder):
    def read(name):
        with open(Path(folder) / name, encoding="utf-8") as f:
            return json.load(f)

    entities = read(f"ravel_{domain}_entity_attributes.json")
    prompts = read(f"ravel_{domain}_attribute_to_prompts.json")
    prompt_split = read(f"ravel_{domain}_prompt_to_split.json")
    wiki = read(f"wikipedia_{domain}_entity_prompts.json")
    entity_split = read(f"ravel_{domain}_entity_to_split.json")

    # Two Nobel laureates ("Michael Houghton", "Satoshi &") have every value empty; an empty label
    # would count as trivially correct, so drop any entity with an empty value.
    entities = {e: values for e, values in entities.items() if all(v.strip() for v in values.values())}
    # physical_object Category spells one class two ways (185 "non-living thing", 40 "non-living things").
    entities = {e: {a: "non-living thing" if v == "non-living things" else v for a, v in values.items()}
                for e, values in entities.items()}
    attributes = list(dict.fromkeys(a for values in entities.values() for a in values))
    # Four city templates end in a space, so the answer's own leading space would be doubled; strip
    # trailing whitespace everywhere (HyperDAS's copy has those four stripped).
    templates = {a: [t.rstrip() for t in ts] for a, ts in prompts.items()}
    template_split = {t.rstrip(): s for t, s in prompt_split.items()}
    wiki_split = {t.rstrip(): v["split"] for t, v in wiki.items()}
    wiki = {t.rstrip(): v["entity"] for t, v in wiki.items()}
    # occupation "Gender Bias" has templates but no entity has a value for it: nothing to label.
    templates = {a: ts for a, ts in templates.items() if a in attributes}
    # Ground-truth timezones are IANA names (Europe/Paris); the 31 UTC-offset templates ask for
    # something else, and HyperDAS's copy had removed them.
    templates = {a: [t for t in ts if not (a == "Timezone" and "UTC" in t)] for a, ts in templates.items()}

    template_split = {t: template_split[t] for ts in templates.values() for t in ts}
    entity_split = {e: entity_split[e] for e in entities}
    return Domain(domain, entities, attributes, templates, template_split, wiki, wiki_split, entity_split)


# ------------------------------------------------------------------------------------------------
# 3. Cause and isolate examples (HyperDAS's generator)
# ------------------------------------------------------------------------------------------------

def concept(example) -> str:
    """The intervened attribute: the text after the last " - " of the instruction. For isolate rows
    it differs from example["attribute"], which is the attribute the base prompt asks for."""
    return example["edit_instruction"].rsplit(" - ", 1)[1]


def fill(template, entity):
    """Split `template % entity` into a prefix that ends with the entity and the rest."""
    # Split at the template's %s. HyperDAS split at the last occurrence of the entity string, which
    # goes wrong when it occurs again later (entity "rely" in "... lack lungs and %s entirely ...").
    at = template.index("%s")
    return template[:at] + entity, template[at + 2:]


def _check_attributes(dom, attributes):
    unknown = [a for a in attributes if a not in dom.attributes]
    if unknown or not attributes:
        raise ValueError(f"Unknown attribute(s) {unknown} for RAVEL domain {dom.name!r}; "
                         f"valid attributes: {', '.join(dom.attributes)}.")
    for a in attributes:
        if len({values[a] for values in dom.entities.values()}) < 2:
            raise ValueError(f"{dom.name} attribute {a!r} has a single value; no pair of entities differs on it.")
    if dom.name == "verb" and {"Definition", "Pronunciation"} & set(attributes):
        warnings.warn("verb Definition/Pronunciation labels are long free text or IPA: "
                      "an exact-match model filter will drop nearly all of these examples.")
    return list(attributes)


def _split_pools(dom, split):
    """Templates per attribute and Wikipedia sentences per entity, for one side of the template split.
    HyperDAS splits by template only: "train" = RAVEL's train templates, "test" = val + test ones."""
    keep = {"train"} if split == "train" else {"val", "test"}
    templates = {a: [t for t in ts if dom.template_split[t] in keep] for a, ts in dom.templates.items()}
    wiki = defaultdict(list)
    for sentence, entity in dom.wiki.items():
        # Sentences whose entity is null are never used, as in HyperDAS.
        if entity in dom.entities and dom.wiki_split[sentence] in keep:
            wiki[entity].append(sentence)
    return {a: ts for a, ts in templates.items() if ts}, wiki


def _example(dom, kind, attribute, intervened, base, source, base_template, source_template):
    """One row with the 13 official fields. `attribute` is what the base prompt asks for."""
    prefix, suffix = fill(base_template, base)
    cf_prefix, cf_suffix = fill(source_template, source)
    # Cause rows are checked on the source entity's answer to the base prompt, isolate rows on the base's.
    verify_prefix, verify_suffix = fill(base_template, source if kind == "causal" else base)
    return {
        "input_prefix": prefix, "input_suffix": suffix,
        "counterfactual_input_prefix": cf_prefix, "counterfactual_input_suffix": cf_suffix,
        "edit_instruction": f"{base} ; {source} - {intervened}",
        "entity": base, "counterfactual_entity": source,
        "target": dom.entities[base][attribute], "counterfactual_target": dom.entities[source][attribute],
        "attribute_type": kind, "domain": dom.name, "attribute": attribute,
        "verify_text": verify_prefix + verify_suffix,
    }


def _draw(rng, dom, names, templates, wiki, kind, attribute, intervened):
    """Sample one example whose base and source entities differ on `attribute`."""
    base, source = rng.choice(names), rng.choice(names)
    while dom.entities[base][attribute] == dom.entities[source][attribute]:
        base, source = rng.choice(names), rng.choice(names)
    # The source prompt: a template of any attribute, or a Wikipedia sentence about the source entity.
    source_kind = rng.choice(list(templates) + (["wikipedia"] if wiki.get(source) else []))
    source_template = rng.choice(wiki[source] if source_kind == "wikipedia" else templates[source_kind])
    base_template = rng.choice(templates[attribute])
    return _example(dom, kind, attribute, intervened, base, source, base_template, source_template)


def make_examples(domain, split, n=None, seed=0, attributes=None, path=None, entities=None,
                  isolate_attributes=None) -> list[dict]:
    """Generate about n cause and isolate examples (before any model filtering), as HyperDAS did.

    The budget is split like HyperDAS's generator: each of the T target attributes X in `attributes`
    (default DEFAULT_ATTRIBUTES[domain]) gets n // T, half spent on cause rows for X and half on
    isolate rows, shared equally by the m attributes Y other than X in `isolate_attributes` (default
    DEFAULT_ATTRIBUTES[domain]; pass the ones a model knows). That is n // (2T) cause rows per X and
    n // (2Tm) isolate rows per (X, Y); see plan(). With one target this is the recipe
    of a HyperDAS per-attribute file. n=None uses HyperDAS's sizes, default_n(): 20000 (train) or
    4000 (test) per target attribute. domain="all" concatenates the five domains, n // 5 each.

    split: "train" uses RAVEL's train templates, "test" its val + test templates; entities are pooled
    across RAVEL's entity splits, so only templates are disjoint. `entities` restricts the pool (e.g. to
    the ones a small target model was taught): a list of names, or {domain: names}. The same seed gives
    the same list.
    """
    _check_domain(domain, allow_all=True)
    if split not in ("train", "test"):
        raise ValueError(f"Unknown split {split!r}; valid splits: train, test.")
    if domain == "all":
        if attributes is not None or isolate_attributes is not None:
            raise ValueError("attributes cannot be chosen with domain='all'; each domain uses its defaults.")
        share = None if n is None else n // len(DOMAINS)
        return [ex for d in DOMAINS for ex in make_examples(d, split, share, seed, None, path, entities)]
    if isinstance(entities, dict):
        entities = entities.get(domain, ())
    dom = load_domain(domain, path)
    targets = _check_attributes(dom, DEFAULT_ATTRIBUTES[domain] if attributes is None else attributes)
    if isolate_attributes:
        _check_attributes(dom, isolate_attributes)
    n = default_n(domain, split, targets) if n is None else n
    templates, wiki = _split_pools(dom, split)
    allowed = None if entities is None else set(entities)
    names = [e for e in dom.entities if allowed is None or e in allowed]
    if len(names) < 2:
        raise ValueError(f"Only {len(names)} of the given entities are {domain} entities; need at least 2.")
    # HyperDAS reseeded 42 for every call, so its train and test sets drew the same entity pairs;
    # mixing the domain and split into the seed keeps them independent.
    rng = random.Random(f"{domain}/{split}/{seed}")

    examples = []
    for kind, attribute, intervened, count in plan(domain, n, targets, isolate_attributes):
        examples += [_draw(rng, dom, names, templates, wiki, kind, attribute, intervened) for _ in range(count)]
    return examples


def plan(domain, n, targets, isolates=None):
    """How make_examples spends n: (kind, checked attribute, intervened attribute, count) tuples.
    Isolate rows check the attributes in `isolates` (default DEFAULT_ATTRIBUTES[domain])."""
    rows = []
    for target in targets:
        rows.append(("causal", target, target, n // (2 * len(targets))))
        others = [a for a in (DEFAULT_ATTRIBUTES[domain] if isolates is None else isolates) if a != target]
        rows += [("isolate", other, target, n // (2 * len(targets) * len(others))) for other in others]
    return rows


def default_n(domain, split, attributes=None) -> int:
    """The budget HyperDAS used: 20000 (train) or 4000 (test) per target attribute."""
    _check_domain(domain)
    return DEFAULT_N_PER_ATTRIBUTE[split] * len(attributes or DEFAULT_ATTRIBUTES[domain])


# ------------------------------------------------------------------------------------------------
# 4. Per-domain merge: keep every cause row, resample isolates per (target, isolate attribute)
# ------------------------------------------------------------------------------------------------

def merge_isolates(examples, seed=0) -> list[dict]:
    """HyperDAS's per-domain sets: all cause rows, and for each (intervened X, checked Y) pair the
    Y-isolate rows of X resampled to max_X(#cause rows of X) // 5 (upsampled when short).
    Apply after filtering, as HyperDAS did; works per domain when several are mixed."""
    rng = random.Random(seed)
    merged = []
    for domain in dict.fromkeys(ex["domain"] for ex in examples):
        rows = [ex for ex in examples if ex["domain"] == domain]
        causal = [ex for ex in rows if ex["attribute_type"] == "causal"]
        size = max(Counter(ex["attribute"] for ex in causal).values(), default=0) // 5
        groups = defaultdict(list)
        for ex in rows:
            if ex["attribute_type"] == "isolate":
                groups[concept(ex), ex["attribute"]].append(ex)
        merged += causal
        for group in groups.values():
            if len(group) >= size:
                merged += rng.sample(group, size)
            else:  # keep every row once, then draw the shortfall with replacement
                merged += group + rng.choices(group, k=size - len(group))
    return merged


# ------------------------------------------------------------------------------------------------
# 5. Labels (the model-based filter that keeps what the target already gets right is
#    hyperdas.filter_examples: it needs the model, and this file knows none)
# ------------------------------------------------------------------------------------------------

def label(example) -> str:
    """The answer an example is scored on: the source's value (cause) or the base's (isolate)."""
    return example["counterfactual_target"] if example["attribute_type"] == "causal" else example["target"]


# ------------------------------------------------------------------------------------------------
# 6. Command line
# ------------------------------------------------------------------------------------------------

def _print_stats(domain, path):
    dom = load_domain(domain, path)
    splits = Counter(dom.entity_split.values())
    print(f"{domain}: {len(dom.entities)} entities (RAVEL split train/val/test "
          f"{splits['train']}/{splits['val']}/{splits['test']}; pooled by HyperDAS)")
    print(f"  {'attribute':<18}{'values':>7}{'templates':>10}{'train':>7}{'val':>5}{'test':>6}")
    for a in dom.attributes:
        s = Counter(dom.template_split[t] for t in dom.templates[a])
        n_values = len({v[a] for v in dom.entities.values()})
        print(f"  {a:<18}{n_values:>7}{len(dom.templates[a]):>10}{s['train']:>7}{s['val']:>5}{s['test']:>6}")
    wiki = Counter(dom.wiki_split.values())
    nulls = sum(e is None for e in dom.wiki.values())
    print(f"  wikipedia sentences: {len(dom.wiki)} (train/val/test {wiki['train']}/{wiki['val']}/"
          f"{wiki['test']}; {nulls} without entity, unused)")
    for split in ("train", "test"):
        n = default_n(domain, split)
        counts = Counter()
        for kind, _, _, count in plan(domain, n, DEFAULT_ATTRIBUTES[domain]):
            counts[kind] += count
        print(f"  {split} examples at n={n} ({DEFAULT_N_PER_ATTRIBUTE[split]} per target attribute, "
              f"before filtering): {counts['causal']} cause + {counts['isolate']} isolate")


def _print_example(ex):
    print(f"[{ex['attribute_type']}] {ex['domain']} / {ex['attribute']}   instruction: {ex['edit_instruction']!r}")
    print(f"  base:   {ex['input_prefix']!r} + {ex['input_suffix']!r}")
    print(f"  source: {ex['counterfactual_input_prefix']!r} + {ex['counterfactual_input_suffix']!r}")
    print(f"  label:  {label(ex)!r}   (base {ex['target']!r}, source {ex['counterfactual_target']!r})")
    print(f"  verify: {ex['verify_text']!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download", help="fetch RAVEL's data.tgz, verify its checksum, unpack it")
    p.add_argument("--dest", help="folder to unpack into (default: $RAVEL_DATA or the user cache)")
    for name, text in (("stats", "print entity, attribute, template and split counts"),
                       ("sample", "print generated cause/isolate examples")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--domain", required=True, choices=DOMAINS + ("all",), help="RAVEL entity type")
        p.add_argument("--data", help="data.tgz or unpacked data/ folder (default: $RAVEL_DATA, then the cache)")
    p.add_argument("-n", type=int, default=5, help="number of examples to print")
    p.add_argument("--split", default="train", choices=("train", "test"),
                   help="train templates, or val+test templates")
    p.add_argument("--seed", type=int, default=0, help="random seed for generation and the printed subset")
    p.add_argument("--attributes", nargs="+", help="target attributes (default: the domain's defaults)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    try:
        _run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        sys.exit(f"error: {err}")


def _run(args):
    if args.command == "download":
        print(download(args.dest))
    elif args.command == "stats":
        for domain in DOMAINS if args.domain == "all" else (args.domain,):
            _print_stats(domain, args.data)
    else:
        # Generate enough for every (attribute, cause/isolate) group to hold n rows, then pick n at
        # random: city, the largest plan, spends n // (2 * 6 * 5) on each isolate group.
        budget = 60 * len(DOMAINS) * max(args.n, 1)
        pool = make_examples(args.domain, args.split, budget, args.seed, args.attributes, args.data)
        for ex in random.Random(args.seed).sample(pool, min(args.n, len(pool))):
            print(json.dumps(ex, ensure_ascii=False)) if args.json else _print_example(ex)


if __name__ == "__main__":
    main()
