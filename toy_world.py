"""A toy world: a small Llama trained from scratch to know the RAVEL facts of one domain.

No pretrained weights can be downloaded here, yet HyperDAS needs a target model that *knows* facts
for its interventions to mean anything. So we train one in a few CPU minutes:

    tokenizer  a byte-level BPE (4,096 tokens) trained on the text below
    model      LlamaForCausalLM, hidden 128, 4 layers, 4 query heads sharing 2 key/value heads (GQA)
    facts      BOS + template % entity + separator + value, for every attribute template of the
               target attributes (all template splits: this is the model's knowledge), with the loss
               on the answer tokens only
    plain text Wikipedia sentences filled with their entity, and the templates of the domain's other
               attributes (verb Definition, Pronunciation) filled with an entity, with the loss on every
               token: HyperDAS reads these as source prompts, so they must be in distribution too

The text format is exactly the one hyperdas.tokenize builds (BOS added once, the official space rule,
left padding), so what the model learned is what HyperDAS and the RAVEL filter will ask it.

    model, tokenizer = toy_target("verb")        # ~3.5 min on 2 CPU cores the first time, then cached
    python toy_world.py --domain verb             # build or reuse it and print what it knows
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import ravel_data
from hyperdas import answer_correct, answer_separator, tokenize

# Bump when anything below changes what a given set of arguments trains; it is part of the cache key.
RECIPE_VERSION = 1

# The model: design notes §3 found hidden 256 slower per step and no faster to learn, so stay at 128.
MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)
VOCAB_SIZE = 4096
SPECIAL_TOKENS = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>")

# Training: each step sees FACT_BATCH facts and TEXT_BATCH plain-text rows, in two forwards so the short
# fact prompts are not padded to the length of Wikipedia sentences.
FACT_BATCH, TEXT_BATCH = 64, 8
LR, WARMUP, WEIGHT_DECAY = 3e-3, 100, 0.01
# Training steps per domain: verb knows 99.6% of its seen pairs after 1,000 steps, city (350 x 6 facts)
# about 96% after 1,500. The other three were sized like city, not measured.
DEFAULT_STEPS = {"city": 1500, "nobel_prize_winner": 1500, "occupation": 1500, "physical_object": 1500,
                 "verb": 1000}

# Entities per domain. A toy world with about 2,000-2,500 (entity, attribute) facts trains to high accuracy
# in DEFAULT_STEPS; verb (986 x 2), occupation (799 x 3) and physical_object (563 x 4) fit whole, city
# (3,552 x 6) and nobel (926 x 5) are cut to a random subset of that size.
DEFAULT_ENTITIES = {"city": 350, "nobel_prize_winner": 450, "occupation": None, "physical_object": None,
                    "verb": None}

# Templates per attribute kept out of training, only to measure whether the model's knowledge transfers
# to prompts it has never seen (HyperDAS's test templates are new to HyperDAS, not to the target). A few of
# ~90 per attribute: enough for the estimate, cheap in what the target knows.
HELD_OUT_TEMPLATES = 3
EVAL_ROWS = 1000


def cache_root(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get("HYPERDAS_CACHE") or Path.home() / ".cache" / "hyperdas" / "toy")


# ----------------------------------------------------------------------------------------------------
# The world: which entities, which templates train, which are held out, and the text rendered from them.


class World:
    """The facts and texts of one toy world, drawn deterministically from a RAVEL domain and a seed."""

    def __init__(self, dom, attributes, n_entities, seed):
        rng = random.Random(f"world/{dom.name}/{seed}")
        names = sorted(dom.entities)
        if n_entities is not None:
            if not 2 <= n_entities <= len(names):
                raise ValueError(f"n_entities={n_entities} must be between 2 and the {len(names)} "
                                 f"entities of {dom.name}.")
            names = sorted(rng.sample(names, n_entities))
        self.domain, self.entities, self.attributes = dom.name, names, list(attributes)
        self.values = {e: dom.entities[e] for e in names}
        self.train_templates, self.held_out = {}, {}
        for a in self.attributes:
            ts = list(dom.templates[a])
            held = set(rng.sample(ts, min(HELD_OUT_TEMPLATES, len(ts) - 1)))
            self.held_out[a] = [t for t in ts if t in held]
            self.train_templates[a] = [t for t in ts if t not in held]
        # Plain text: every Wikipedia sentence (with its own entity when it is in this world, else any
        # entity) and every template of an attribute the model is not taught.
        known = set(names)
        self.wiki = [(t, e if e in known else None) for t, e in dom.wiki.items()]
        self.other_templates = [t for a, ts in dom.templates.items() if a not in self.attributes for t in ts]

    def fact(self, rng, templates=None):
        """(prompt, answer) for a random entity, attribute and template."""
        templates = templates or self.train_templates
        entity, attribute = rng.choice(self.entities), rng.choice(self.attributes)
        return rng.choice(templates[attribute]) % entity, self.values[entity][attribute]

    def text(self, rng):
        """One plain-text row: a Wikipedia sentence or another attribute's prompt, filled with an entity."""
        if self.other_templates and rng.random() < 0.5:
            return rng.choice(self.other_templates) % rng.choice(self.entities)
        template, entity = rng.choice(self.wiki)
        return template % (entity or rng.choice(self.entities))

    def eval_rows(self, templates, n, seed):
        """Up to n distinct (prompt, answer) pairs over `templates` (all of them when there are fewer)."""
        pairs = [(t, e, a) for a in self.attributes for t in templates[a] for e in self.entities]
        pairs = random.Random(f"eval/{seed}").sample(pairs, min(n, len(pairs)))
        return [(t % e, self.values[e][a]) for t, e, a in pairs]


def render(prompt, answer):
    return prompt + answer_separator(prompt) + answer


# ----------------------------------------------------------------------------------------------------
# Tokenizer and model.


def train_tokenizer(texts):
    """A byte-level BPE trained on the world's own text, wrapped for transformers. It never adds BOS
    itself (hyperdas.tokenize adds it once) and pads on the left like every batch in this project."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, padding_side="left", **SPECIAL_TOKENS)


def new_model(tokenizer, seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------------------------------
# Training.


def inputs(enc):
    return {k: enc[k] for k in ("input_ids", "attention_mask", "position_ids")}


def answer_logits(model, enc):
    """Logits of the positions that predict an answer token. Rows are left-padded, so every answer ends
    at the last position: the LM head runs on the last (longest answer + 1) positions only."""
    keep = int((enc["labels"] != -100).sum(1).max()) + 1
    return model(**inputs(enc), logits_to_keep=keep).logits                       # [B, keep, V]


def fact_loss(model, enc):
    """Cross-entropy on the answer tokens only: the prompt is given, the fact is what is learned."""
    logits = answer_logits(model, enc)
    target = enc["labels"][:, enc["labels"].shape[1] - logits.shape[1] + 1:]      # [B, keep-1]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)


def text_loss(model, enc):
    """Language-model loss on every real token after BOS."""
    logits = model(**inputs(enc)).logits                                          # [B, T, V]
    target = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, :-1] == 0, -100)  # BOS is never a target
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)


def learning_rate(step, steps):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(model, tokenizer, world, steps, seed, progress=True):
    rng = random.Random(f"train/{seed}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=WEIGHT_DECAY), dict(params=no_decay, weight_decay=0.0)],
                            lr=LR, betas=(0.9, 0.95))
    model.train()
    bar = tqdm(range(steps), desc=f"toy {world.domain}", disable=not progress)
    for step in bar:
        facts = [world.fact(rng) for _ in range(FACT_BATCH)]
        texts = [world.text(rng) for _ in range(TEXT_BATCH)]
        loss_facts = fact_loss(model, tokenize(tokenizer, *zip(*facts)))
        loss_text = text_loss(model, tokenize(tokenizer, texts))
        loss = loss_facts + 0.5 * loss_text
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(facts=f"{loss_facts.item():.3f}", text=f"{loss_text.item():.2f}")
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, tokenizer, rows, batch_size=128):
    """Teacher-forced accuracy over (prompt, answer) rows: the first answer token, and every answer token."""
    first = full = 0
    for i in range(0, len(rows), batch_size):
        enc = tokenize(tokenizer, *zip(*rows[i:i + batch_size]))
        logits = answer_logits(model, enc)
        first += answer_correct(logits, enc["labels"], first_n=1).sum().item()
        full += answer_correct(logits, enc["labels"]).sum().item()
    return {"first_token": first / len(rows), "full_answer": full / len(rows), "n": len(rows)}


def report(world, model, tokenizer, seed):
    return {"seen": accuracy(model, tokenizer, world.eval_rows(world.train_templates, EVAL_ROWS, seed)),
            "held_out": accuracy(model, tokenizer, world.eval_rows(world.held_out, EVAL_ROWS, seed))}


def describe(info):
    fmt = lambda r: f"first token {r['first_token']:.1%}, full answer {r['full_answer']:.1%} (n={r['n']})"
    return (f"toy {info['domain']} target: {len(info['entities'])} entities x {info['attributes']}, "
            f"{info['steps']} steps ({info['train_seconds']:.0f} s)\n"
            f"  seen (entity, template) pairs: {fmt(info['accuracy']['seen'])}\n"
            f"  held-out templates:            {fmt(info['accuracy']['held_out'])}")


# ----------------------------------------------------------------------------------------------------
# The entry point: build once, cache on disk, reuse.


@contextlib.contextmanager
def quiet_saving(quiet):
    """Hide transformers' "Writing model shards" bar when the caller asked for no progress output."""
    from transformers.utils import logging
    was_enabled = logging.is_progress_bar_enabled()
    if quiet:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            logging.enable_progress_bar()


def toy_target(domain, attributes=None, n_entities=None, steps=None, seed=0, cache_dir=None, data=None,
               progress=True):
    """A small LlamaForCausalLM and its tokenizer that know the RAVEL facts of `domain`.

    attributes: the attributes taught as facts (default ravel_data.DEFAULT_ATTRIBUTES[domain]).
    n_entities: use a random subset of this many entities (default DEFAULT_ENTITIES[domain]; None there
    means all). steps: training steps (default 1,000 for verb, 1,500 otherwise). data: the RAVEL data (see ravel_data).
    The result is saved under cache_dir ($HYPERDAS_CACHE, else ~/.cache/hyperdas/toy) in a folder keyed
    by every argument that changes it, and loaded from there on the next call. The model is on CPU in
    eval mode; `model.config.toy_world` records its entities, held-out templates and measured accuracy.
    """
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    if domain not in ravel_data.DOMAINS:
        raise ValueError(f"Unknown RAVEL domain {domain!r}; valid domains: {', '.join(ravel_data.DOMAINS)}.")
    dom = ravel_data.load_domain(domain, data)
    attributes = list(ravel_data.DEFAULT_ATTRIBUTES[domain] if attributes is None else attributes)
    unknown = [a for a in attributes if a not in dom.attributes]
    if unknown or not attributes:
        raise ValueError(f"Unknown attribute(s) {unknown} for {domain}; valid: {', '.join(dom.attributes)}.")
    n_entities = DEFAULT_ENTITIES[domain] if n_entities is None else n_entities
    if n_entities is not None and n_entities >= len(dom.entities):
        n_entities = None   # "all of them": the same world, so the same cache entry
    steps = DEFAULT_STEPS[domain] if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1.")

    key = dict(recipe=RECIPE_VERSION, domain=domain, attributes=attributes, n_entities=n_entities,
               steps=steps, seed=seed)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root(cache_dir) / f"{domain}-{digest}"
    if (folder / "config.json").exists():
        model = LlamaForCausalLM.from_pretrained(folder).eval()
        return model, PreTrainedTokenizerFast.from_pretrained(folder)

    start = time.time()
    world = World(dom, attributes, n_entities, seed)
    # The tokenizer learns from the same mix of text the model trains on.
    rng = random.Random(f"tokenizer/{seed}")
    corpus = [render(*world.fact(rng)) for _ in range(20000)] + [world.text(rng) for _ in range(5000)]
    tokenizer = train_tokenizer(corpus)
    model = train(new_model(tokenizer, seed), tokenizer, world, steps, seed, progress)
    info = dict(key, entities=world.entities, held_out_templates=world.held_out,
                train_seconds=time.time() - start, accuracy=report(world, model, tokenizer, seed))
    model.config.toy_world = info    # saved with the config, so a cached model still knows its world
    if progress:
        print(describe(info))

    # Write everything to a temporary folder and rename it into place, so a half-written model is never
    # found; if another process finished the same world first, keep theirs.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        with quiet_saving(not progress):
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def main():
    parser = argparse.ArgumentParser(description="Build (or reuse) the toy target model for a RAVEL domain "
                                                 "and print how well it knows its facts.")
    parser.add_argument("--domain", default="verb", choices=ravel_data.DOMAINS, help="RAVEL entity type")
    parser.add_argument("--attributes", nargs="+", default=None,
                        help="attributes taught as facts (default: the domain's HyperDAS attributes)")
    parser.add_argument("--n-entities", type=int, default=None,
                        help="use a random subset of this many entities (default: per-domain size)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1000 for verb, 1500 otherwise)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world, tokenizer and weights")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default $HYPERDAS_CACHE or ~/.cache/hyperdas/toy)")
    parser.add_argument("--data", default=None, help="RAVEL data.tgz or data/ folder (default $RAVEL_DATA)")
    args = parser.parse_args()
    model, tokenizer = toy_target(args.domain, args.attributes, args.n_entities, args.steps, args.seed,
                                  args.cache_dir, args.data)
    print(describe(model.config.toy_world))
    print(f"{model.num_parameters():,} parameters, vocabulary {len(tokenizer):,}")


if __name__ == "__main__":
    main()
