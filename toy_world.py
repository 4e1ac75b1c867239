"""A toy world: a small Llama trained from scratch to know the RAVEL facts of one domain (or, as
toy_target("all"), of a subset of every domain at once).

No pretrained weights can be downloaded here, yet HyperDAS needs a target model that *knows* facts
for its interventions to mean anything. So we train one in a few CPU minutes:

    tokenizer  a byte-level BPE (4,096 tokens) trained on the text below
    model      LlamaForCausalLM, hidden 128, 4 layers, 4 query heads sharing 2 key/value heads (GQA);
               or, with arch="gpt2", a GPT2LMHeadModel of the same depth and width (learned absolute
               positions, layer norms with biases, a plain GELU MLP), to show the method is not tied to Llama
    facts      BOS + template % entity + separator + value, for every attribute template of the
               target attributes (all template splits: this is the model's knowledge), with the loss
               on the answer tokens only
    plain text Wikipedia sentences filled with their entity, and the templates of the domain's other
               attributes (verb Definition, Pronunciation) filled with an entity, with the loss on every
               token: HyperDAS reads these as source prompts, so they must be in distribution too
    routing    interchange training at the entity: the answer must follow the source entity's state
               when it is patched into the base entity at a random intermediate layer. Left alone, a
               4-layer model copies the entity token to the last position in its first layer and looks
               facts up there, so patching the entity at any later layer changes nothing (measured: 0 of
               200); large LMs instead enrich the entity's own states with its attributes, and that is
               the structure HyperDAS and DAS look for

The text format is exactly the one hyperdas.tokenize builds (BOS added once, the official space rule,
left padding), so what the model learned is what HyperDAS and the RAVEL filter will ask it.

    model, tokenizer = toy_target("verb")        # ~2.5 min on 2 CPU cores the first time, then cached
    python toy_world.py --domain verb             # build or reuse it and print what it knows
    python toy_world.py --domain all              # one model for all five domains (~20 min)
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import ravel_data
from hyperdas import (answer_correct, answer_labels, answer_separator, answer_window, checkpoint_path,
                      deferred_interrupts, last_visible, patch_layer, target_inputs, tokenize, writable,
                      write_checkpoint)

# Bump when anything below changes what a given set of arguments trains; it is part of the cache key.
RECIPE_VERSION = 2    # 2: answers are exactly their own tokens (hyperdas.answer_ids)

# The model: design notes §3 found hidden 256 slower per step and no faster to learn, so stay at 128.
MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)
# The same world on GPT-2's architecture: 4 layers, hidden 128, 4 heads, its 4x MLP, no dropout (as the Llama).
GPT2_MODEL = dict(n_embd=128, n_layer=4, n_head=4, n_inner=512, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, tie_word_embeddings=False)
ARCHS = ("llama", "gpt2")
# Where the facts are read from: the entity's last token (every RAVEL world: where RAVEL and DAS look), or its
# first token (the known-position world: multi-token entities whose first token alone names them, so DAS at
# the last entity token is looking at the wrong place; see first_token_entities).
POSITIONS = ("last", "first")
VOCAB_SIZE = 4096
SPECIAL_TOKENS = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>")

# Training: each step sees FACT_BATCH facts, TEXT_BATCH plain-text rows and SWAP_BATCH interchange pairs,
# in separate forwards so the short fact prompts are not padded to the length of Wikipedia sentences.
FACT_BATCH, TEXT_BATCH, SWAP_BATCH = 64, 8, 32
LR, WARMUP, WEIGHT_DECAY = 3e-3, 100, 0.01
SAVE_SECONDS = 60    # a build saves its progress this often and on Ctrl-C / SIGTERM, and resumes from it
# Training steps per domain, and the share of seen (entity, template) pairs each default target then gets
# fully right: verb 99.6%, city 99.4%, occupation 98.0%, physical_object 87.4%, nobel 67.3% (years are hard
# for this size), all 99.3%. Build times are in the README.
DEFAULT_STEPS = {"city": 1500, "nobel_prize_winner": 1500, "occupation": 1500, "physical_object": 1500,
                 "verb": 1000, "all": 2500}

# Entities per domain. A toy world with about 2,000-2,500 (entity, attribute) facts trains to high accuracy
# in DEFAULT_STEPS; verb (986 x 2), occupation (799 x 3) and physical_object (563 x 4) fit whole, city
# (3,552 x 6) and nobel (926 x 5) are cut to a random subset of that size.
DEFAULT_ENTITIES = {"city": 350, "nobel_prize_winner": 450, "occupation": None, "physical_object": None,
                    "verb": None}

# The "all" world (one model that knows all five domains, for `hyperdas.py --domain all`): a subset of each
# domain, about 2,500 facts in all, and more steps (DEFAULT_STEPS), as five domains' text is more to learn.
ALL_ENTITIES = {"city": 100, "nobel_prize_winner": 100, "occupation": 150, "physical_object": 120, "verb": 250}

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

    def __init__(self, dom, attributes, n_entities, seed, position="last", names=None):
        rng = random.Random(f"world/{dom.name}/{seed}")
        self.position = position
        if names is not None:             # chosen by the caller (the known-position world)
            names, n_entities = sorted(names), None
        else:
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
        # Source prompts for interchange training: what HyperDAS reads as a source (a template of any
        # attribute, or a Wikipedia sentence about the entity), held-out templates excepted. Sentences that
        # glue letters onto the entity ("%sing") are left out: there the entity has no token of its own.
        self.source_templates = [t for ts in self.train_templates.values() for t in ts] + self.other_templates
        self.wiki_of = {}
        for t, e in dom.wiki.items():
            if e in known and not t[t.index("%s") + 2:][:1].isalnum():
                self.wiki_of.setdefault(e, []).append(t)

    def fact(self, rng):
        """(prompt, answer) for a random entity, attribute and trained template."""
        entity, attribute = rng.choice(self.entities), rng.choice(self.attributes)
        return rng.choice(self.train_templates[attribute]) % entity, self.values[entity][attribute]

    def text(self, rng):
        """One plain-text row: a Wikipedia sentence or another attribute's prompt, filled with an entity."""
        if self.other_templates and rng.random() < 0.5:
            return rng.choice(self.other_templates) % rng.choice(self.entities)
        template, entity = rng.choice(self.wiki)
        return template % (entity or rng.choice(self.entities))

    def swap(self, rng, base_templates=None):
        """An interchange pair: with the source entity's state patched in at the base entity, the base
        template asks an attribute and should be answered with the source entity's value."""
        attribute = rng.choice(self.attributes)
        base, source = rng.sample(self.entities, 2)
        base_template = rng.choice((base_templates or self.train_templates)[attribute])
        wiki = self.wiki_of.get(source)
        source_template = rng.choice(wiki if wiki and rng.random() < 0.25 else self.source_templates)
        return Swap(base_template, base, source_template, source, self.values[source][attribute],
                    self.values[base][attribute])

    def eval_rows(self, templates, n, seed):
        """Up to n distinct (prompt, answer) pairs over `templates` (all of them when there are fewer)."""
        pairs = [(t, e, a) for a in self.attributes for t in templates[a] for e in self.entities]
        pairs = random.Random(f"eval/{seed}").sample(pairs, min(n, len(pairs)))
        return [(t % e, self.values[e][a]) for t, e, a in pairs]


class Swap(NamedTuple):
    base_template: str
    base: str
    source_template: str
    source: str
    answer: str          # the source entity's value: the label once the source state is patched in
    base_answer: str     # the base entity's own value


def first_token_entities(tokenizer, names, n, seed):
    """The known-position world's entities: up to n of `names` (in a seeded random order) that are at least two
    tokens long and whose first token starts no other chosen entity, both as the prompt's first word and after
    a space (byte-level BPE splits a word the same way wherever it stands, so these are all its forms). The
    first token then names the entity, and a model can be taught to read its facts from there alone."""
    order = sorted(names)
    random.Random(f"first-token/{seed}").shuffle(order)
    chosen, used = [], set()
    for name in order:
        firsts = set()
        for text in (name, " " + name):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) < 2:
                break
            firsts.add(ids[0])
        else:
            if not firsts & used:
                chosen.append(name)
                used |= firsts
        if len(chosen) == n:
            break
    return chosen


class Mixture:
    """Several domains' worlds taught to one model: each fact, text and swap comes from one world, drawn
    in proportion to its number of facts. Attribute names differ across RAVEL's domains, so per-attribute
    template tables merge; entity names do not always ("watch" is a verb and an object), so values stay
    with their world."""

    def __init__(self, worlds):
        self.worlds, self.domain, self.position = worlds, "all", "last"
        self.weights = [len(w.entities) * len(w.attributes) for w in worlds]
        self.entities = {w.domain: w.entities for w in worlds}
        self.attributes = [a for w in worlds for a in w.attributes]
        self.train_templates = {a: ts for w in worlds for a, ts in w.train_templates.items()}
        self.held_out = {a: ts for w in worlds for a, ts in w.held_out.items()}

    def pick(self, rng):
        return rng.choices(self.worlds, self.weights)[0]

    def fact(self, rng):
        return self.pick(rng).fact(rng)

    def text(self, rng):
        return self.pick(rng).text(rng)

    def swap(self, rng, base_templates=None):
        return self.pick(rng).swap(rng, base_templates)

    def eval_rows(self, templates, n, seed):
        return [row for w in self.worlds for row in w.eval_rows(templates, n // len(self.worlds), seed)]


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


def new_model(tokenizer, seed, arch="llama"):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**ids, **GPT2_MODEL))
    return LlamaForCausalLM(LlamaConfig(**ids, **MODEL))


# ----------------------------------------------------------------------------------------------------
# Training.


def answer_logits(model, enc):
    """Logits of the positions that predict an answer token. Rows are left-padded, so every answer ends
    at the last position: the LM head runs on the last (longest answer + 1) positions only."""
    return model(**target_inputs(enc), logits_to_keep=answer_window(enc["labels"])).logits   # [B, keep, V]


def answer_loss(logits, labels):
    """Cross-entropy on the answer tokens only (logits of the last `keep` positions): the prompt is
    given, the fact is what is learned."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), answer_labels(logits, labels).flatten(), ignore_index=-100)


def text_loss(model, enc):
    """Language-model loss on every real token after BOS."""
    logits = model(**target_inputs(enc)).logits                                          # [B, T, V]
    target = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, :-1] == 0, -100)  # BOS is never a target
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)


def entity_chars(template, entity, position):
    """How many characters of template % entity reach the entity's last token ("last": up to the entity's
    end) or its first ("first": one character into it), as tokenize's visible_chars: the last visible token
    is then that token."""
    start = template.index("%s")
    return start + (len(entity) if position == "last" else 1)


def patch_entity(model, tokenizer, pairs, layer, position="last"):
    """Answer logits of the base prompts with hidden_states[layer] at the base entity's last (or, with
    position="first", first) token replaced by the source entity's same token, taken from the source prompt
    (full-vector activation patching). The labels are the source entity's values."""
    base = tokenize(tokenizer, [p.base_template % p.base for p in pairs], [p.answer for p in pairs],
                    visible_chars=[entity_chars(p.base_template, p.base, position) for p in pairs])
    source = tokenize(tokenizer, [p.source_template % p.source for p in pairs],
                      visible_chars=[entity_chars(p.source_template, p.source, position) for p in pairs])
    rows = torch.arange(len(pairs))
    states = model(**target_inputs(source), output_hidden_states=True, logits_to_keep=1).hidden_states[layer]
    patch = states[rows, last_visible(source["visible"])]                               # [B, d]
    at = last_visible(base["visible"])
    with patch_layer(model, layer, lambda h: h.index_put((rows, at), patch)):
        return answer_logits(model, base), base["labels"]


def learning_rate(step, steps):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(model, tokenizer, world, steps, seed, progress=True, partial=None):
    """Train the toy target. With `partial` (a folder), progress is saved there every SAVE_SECONDS and on
    Ctrl-C or SIGTERM (which then stop the build after its step), and a build that finds it resumes where it
    stopped, to the same weights as one that was never interrupted. Returns the seconds spent over all runs."""
    rng = random.Random(f"train/{seed}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=WEIGHT_DECAY), dict(params=no_decay, weight_decay=0.0)],
                            lr=LR, betas=(0.9, 0.95))
    start, spent = 0, 0.0
    if partial is not None and (checkpoint_path(partial) / "state.json").exists():
        try:
            start, spent = resume_build(checkpoint_path(partial), model, opt, rng)
            print(f"resuming the toy {world.domain} build at step {start} of {steps} ({partial})", file=sys.stderr)
        except Exception as err:      # a damaged save: say so, and build from the start
            print(f"the saved progress in {partial} is damaged ({str(err).strip().splitlines()[0]}); starting over",
                  file=sys.stderr)
            shutil.rmtree(partial, ignore_errors=True)
            return train(model, tokenizer, world, steps, seed, progress, partial)
    began = last_save = time.time()
    model.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"toy {world.domain}", disable=not progress)
    with deferred_interrupts() if partial is not None else contextlib.nullcontext([]) as stop:
        for step in bar:
            facts = [world.fact(rng) for _ in range(FACT_BATCH)]
            texts = [world.text(rng) for _ in range(TEXT_BATCH)]
            pairs = [world.swap(rng) for _ in range(SWAP_BATCH)]
            facts_enc = tokenize(tokenizer, *zip(*facts))
            loss_facts = answer_loss(answer_logits(model, facts_enc), facts_enc["labels"])
            loss_text = text_loss(model, tokenize(tokenizer, texts))
            # Interchange intervention training (Geiger et al., ICML 2022) at a random intermediate layer: the
            # answer must follow the patched entity state, so facts are read from the entity (module docstring).
            layer = rng.randrange(1, model.config.num_hidden_layers)
            loss_swap = answer_loss(*patch_entity(model, tokenizer, pairs, layer, world.position))
            loss = loss_facts + 0.5 * loss_text + loss_swap
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, steps)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 10 == 0:
                bar.set_postfix(facts=f"{loss_facts.item():.3f}", text=f"{loss_text.item():.2f}",
                                swap=f"{loss_swap.item():.3f}")
            if partial is not None and step + 1 < steps and (stop or time.time() - last_save >= SAVE_SECONDS):
                save_build(partial, model, tokenizer, opt, rng, step + 1, spent + time.time() - began)
                last_save = time.time()
            if stop and step + 1 < steps:     # on the last step, finish instead: the model is then saved whole
                bar.close()
                raise KeyboardInterrupt(f"the toy build stopped at step {step + 1} of {steps} and saved its progress "
                                        f"in {partial}; run the same command again to resume")
    model.eval()
    return spent + time.time() - began


def save_build(folder, model, tokenizer, opt, rng, step, spent):
    """A toy build's progress: weights, tokenizer, optimizer moments, the data stream's random state, the step."""
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    moments = {f"{i}.{k}": torch.as_tensor(v).contiguous() for i, st in opt.state_dict()["state"].items()
               for k, v in st.items()}
    state = dict(step=step, spent=spent, rng=rng.getstate())
    write_checkpoint(folder, {"model.safetensors": lambda p: save_file(weights, str(p)),
                              "optimizer.safetensors": lambda p: save_file(moments, str(p)),
                              "tokenizer.json": lambda p: p.write_text(tokenizer.backend_tokenizer.to_str()),
                              "state.json": lambda p: p.write_text(json.dumps(state))},
                     mine=lambda p: (p / "state.json").exists())


def resume_build(folder, model, opt, rng):
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    moments = {}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        i, name = key.split(".", 1)
        moments.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": moments, "param_groups": opt.state_dict()["param_groups"]})
    state = json.loads((folder / "state.json").read_text())
    version, internal, gauss = state["rng"]
    rng.setstate((version, tuple(internal), gauss))
    return state["step"], state["spent"]


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


@torch.no_grad()
def patching_accuracy(model, tokenizer, world, layer, n=500, seed=0, batch_size=125, position=None):
    """How often patching the source entity's hidden_states[layer] into the base entity (at the world's
    position, or `position`) makes the model give the source's value, on pairs whose values differ (base
    prompts from held-out templates, so neither the prompt nor the patched pair was trained on)."""
    rng = random.Random(f"swap-eval/{seed}")
    pairs = []
    while len(pairs) < n:
        pair = world.swap(rng, world.held_out)
        if pair.answer != pair.base_answer:
            pairs.append(pair)
    correct = 0
    for i in range(0, n, batch_size):
        logits, labels = patch_entity(model, tokenizer, pairs[i:i + batch_size], layer, position or world.position)
        correct += answer_correct(logits, labels).sum().item()
    return correct / n


def report(world, model, tokenizer, seed):
    # JSON keys are strings: the same dict before saving and after loading.
    patching = lambda position: {str(layer): patching_accuracy(model, tokenizer, world, layer, seed=seed,
                                                               position=position)
                                 for layer in range(1, model.config.num_hidden_layers)}
    out = {"seen": accuracy(model, tokenizer, world.eval_rows(world.train_templates, EVAL_ROWS, seed)),
           "held_out": accuracy(model, tokenizer, world.eval_rows(world.held_out, EVAL_ROWS, seed)),
           "entity_patching": patching(world.position)}
    if world.position != "last":     # the control: the entity's last token, where DAS and RAVEL look
        out["last_token_patching"] = patching("last")
    return out


def describe(info):
    fmt = lambda r: f"first token {r['first_token']:.1%}, full answer {r['full_answer']:.1%} (n={r['n']})"
    entities, attributes = info["entities"], info["attributes"]
    if isinstance(entities, dict):      # the "all" world: {domain: ...}
        entities = [e for names in entities.values() for e in names]
        attributes = [a for names in attributes.values() for a in names]
    layers = lambda accs: ", ".join(f"L={layer} {acc:.1%}" for layer, acc in accs.items())
    position = info.get("position", "last")
    text = (f"toy {info['domain']} target: {len(entities)} entities x {attributes}, "
            f"{info['steps']} steps ({info['train_seconds']:.0f} s)\n"
            f"  seen (entity, template) pairs: {fmt(info['accuracy']['seen'])}\n"
            f"  held-out templates:            {fmt(info['accuracy']['held_out'])}\n"
            f"  patching the entity's {position} token's hidden_states[L] moves the answer: "
            f"{layers(info['accuracy']['entity_patching'])}")
    if "last_token_patching" in info["accuracy"]:
        text += f"\n  patching its last token instead: {layers(info['accuracy']['last_token_patching'])}"
    return text


# ----------------------------------------------------------------------------------------------------
# The entry point: build once, cache on disk, reuse.


@contextlib.contextmanager
def quiet_transformers(quiet):
    """Hide transformers' loading and saving bars when the caller asked for no progress output."""
    from transformers.utils import logging
    was_enabled = logging.is_progress_bar_enabled()
    if quiet:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            logging.enable_progress_bar()


def entity_count(dom, n):
    """None ("all of them") when n covers the domain: the same world, so the same cache entry."""
    return None if n is not None and n >= len(dom.entities) else n


def world_spec(domain, attributes=None, n_entities=None, steps=None, seed=0, cache_dir=None, data=None, arch="llama",
               position="last"):
    """toy_target's arguments resolved and checked: (cache folder, cache key, RAVEL domain(s))."""
    if arch not in ARCHS:
        raise ValueError(f"Unknown toy architecture {arch!r}; choose {' or '.join(ARCHS)}.")
    if position not in POSITIONS:
        raise ValueError(f"Unknown fact position {position!r}; choose {' or '.join(POSITIONS)}.")
    if position != "last" and domain == "all":
        raise ValueError("The known-position world (position='first') is built from one domain, not 'all'.")
    if domain == "all":
        if attributes is not None:
            raise ValueError("attributes cannot be chosen for the 'all' world: it is taught each domain's defaults.")
        doms = [ravel_data.load_domain(d, data) for d in ravel_data.DOMAINS]
        attributes = {d.name: list(ravel_data.DEFAULT_ATTRIBUTES[d.name]) for d in doms}
        n_entities = {d.name: entity_count(d, ALL_ENTITIES[d.name] if n_entities is None else n_entities)
                      for d in doms}
    elif domain in ravel_data.DOMAINS:
        dom = ravel_data.load_domain(domain, data)
        attributes = list(ravel_data.DEFAULT_ATTRIBUTES[domain] if attributes is None else attributes)
        unknown = [a for a in attributes if a not in dom.attributes]
        if unknown or not attributes:
            raise ValueError(f"Unknown attribute(s) {unknown} for {domain}; valid: {', '.join(dom.attributes)}.")
        if position == "last":
            n_entities = entity_count(dom, DEFAULT_ENTITIES[domain] if n_entities is None else n_entities)
    else:
        raise ValueError(f"Unknown RAVEL domain {domain!r}; valid domains: {', '.join(ravel_data.DOMAINS)}, all.")
    steps = DEFAULT_STEPS[domain] if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1.")

    if position != "last":      # an upper bound on the entities: first_token_entities decides how many qualify
        if n_entities is not None and n_entities < 2:
            raise ValueError(f"n_entities={n_entities} must be at least 2.")
        n_entities = min(n_entities or DEFAULT_ENTITIES[domain] or len(dom.entities), len(dom.entities))
    # Keys of the Llama, last-token worlds are as before, so their cached targets stay valid.
    key = dict(recipe=RECIPE_VERSION, domain=domain, attributes=attributes, n_entities=n_entities,
               steps=steps, seed=seed, **({} if arch == "llama" else {"arch": arch}),
               **({} if position == "last" else {"position": position}))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    tags = "".join(f"{tag}-" for tag in (arch, position) if tag not in ("llama", "last"))
    folder = cache_root(cache_dir) / f"{domain}-{tags}{digest}"
    return folder, key, doms if domain == "all" else dom


def target_folder(domain, **kwargs):
    """Where toy_target(domain, **kwargs) keeps its model (whether built yet or not)."""
    return world_spec(domain, **kwargs)[0]


def toy_target(domain, attributes=None, n_entities=None, steps=None, seed=0, cache_dir=None, data=None,
               progress=True, device=None, arch="llama", position="last"):
    """A small LlamaForCausalLM (arch="gpt2": GPT2LMHeadModel) and its tokenizer that know the RAVEL facts of `domain` ("all": of all five
    domains at once, ALL_ENTITIES of each, with n_entities, when given, the size of every domain's subset).

    attributes: the attributes taught as facts (default ravel_data.DEFAULT_ATTRIBUTES[domain]).
    n_entities: use a random subset of this many entities (default DEFAULT_ENTITIES[domain]; None there
    means all). steps: training steps (default DEFAULT_STEPS[domain]). data: the RAVEL data (ravel_data).
    position="first": the known-position world, whose facts are read from the entity's first token, not its
    last (up to n_entities multi-token entities whose first token names them; first_token_entities).
    The result is saved under cache_dir ($HYPERDAS_CACHE, else ~/.cache/hyperdas/toy) in a folder keyed
    by every argument that changes it, and loaded from there on the next call. Training always runs on
    CPU (so the cached model does not depend on the machine); the model is returned on `device` (default
    CPU) in eval mode. `model.config.toy_world` records its entities, held-out templates and accuracy.
    With progress, a bar shows training and the accuracy report is printed (also when loaded).
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    folder, key, doms = world_spec(domain, attributes, n_entities, steps, seed, cache_dir, data, arch, position)
    if (folder / "config.json").exists():
        try:
            with quiet_transformers(not progress):
                model = AutoModelForCausalLM.from_pretrained(folder).eval()
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        except Exception as err:      # whatever a damaged file raises (tokenizers raises a bare Exception)
            print(f"the cached toy target in {folder} is damaged ({str(err).strip().splitlines()[0]}); "
                  "rebuilding it", file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            if progress:
                print(f"{describe(model.config.toy_world)}\n  (cached in {folder})")
            return model.to(device or "cpu"), tokenizer

    writable(folder.parent, "the toy-model cache (set HYPERDAS_CACHE to move it)")
    with build_lock(folder):
        return build(folder, key, domain, doms, seed, progress, device)


@contextlib.contextmanager
def build_lock(folder):
    """One build of a world at a time: a second process building the same world would share its .partial
    folder. A lock left by a process that no longer runs is taken over."""
    lock = folder.with_name(folder.name + ".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text() or 0)
            os.kill(pid, 0)                                  # raises if that process is gone
            alive = pid > 0 and pid != os.getpid()
        except (ValueError, OSError):
            alive = False
        if alive:
            raise ValueError(f"another process (pid {pid}) is building this toy target ({lock}); wait for it to "
                             "finish, then run again.") from None
        lock.unlink(missing_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def build(folder, key, domain, doms, seed, progress, device):
    from transformers import PreTrainedTokenizerFast
    attributes, n_entities, steps, dom = key["attributes"], key["n_entities"], key["steps"], doms
    position = key.get("position", "last")
    if domain == "all":
        world = Mixture([World(d, attributes[d.name], n_entities[d.name], seed) for d in doms])
    else:   # the known-position world's tokenizer learns from the whole domain, so that most names split
        world = World(dom, attributes, None if position != "last" else n_entities, seed)
    partial = folder.with_name(folder.name + ".partial")
    if (checkpoint_path(partial) / "tokenizer.json").exists():     # a build that was interrupted: its tokenizer
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(checkpoint_path(partial) / "tokenizer.json"),
                                            padding_side="left", **SPECIAL_TOKENS)
    else:   # the tokenizer learns from the same mix of text the model trains on
        rng = random.Random(f"tokenizer/{seed}")
        corpus = [render(*world.fact(rng)) for _ in range(20000)] + [world.text(rng) for _ in range(5000)]
        tokenizer = train_tokenizer(corpus)
    if position != "last":
        names = first_token_entities(tokenizer, world.entities, n_entities, seed)
        if len(names) < 2:
            raise ValueError(f"Only {len(names)} {domain} entities are several tokens long with a first token of "
                             "their own; the known-position world needs a domain with multi-token names (city).")
        world = World(dom, attributes, None, seed, position, names)
    model = new_model(tokenizer, seed, key.get("arch", "llama"))
    spent = train(model, tokenizer, world, steps, seed, progress, partial)
    info = dict(key, position=position, entities=world.entities, held_out_templates=world.held_out,
                train_seconds=spent, accuracy=report(world, model, tokenizer, seed))
    model.config.toy_world = info    # saved with the config, so a cached model still knows its world
    model.config._name_or_path = str(folder)    # as if loaded from the cache: checkpoints record their target
    if progress:
        print(describe(info))

    # Write everything to a temporary folder and rename it into place, so a half-written model is never
    # found; if another process finished the same world first, keep theirs.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        with quiet_transformers(not progress):
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)
    return model.to(device or "cpu"), tokenizer


def main():
    parser = argparse.ArgumentParser(description="Build (or reuse) the toy target model for a RAVEL domain "
                                                 "and print how well it knows its facts.")
    parser.add_argument("--domain", default="verb", choices=(*ravel_data.DOMAINS, "all"),
                        help="RAVEL entity type, or all: one model that knows all five")
    parser.add_argument("--attributes", nargs="+", default=None,
                        help="attributes taught as facts (default: the domain's HyperDAS attributes)")
    parser.add_argument("--n_entities", type=int, default=None,
                        help="use a random subset of this many entities (default: per-domain size)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: DEFAULT_STEPS, 1000 for verb, 2500 for all, 1500 otherwise)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world, tokenizer and weights")
    parser.add_argument("--arch", default="llama", choices=ARCHS, help="the target's architecture (default: llama)")
    parser.add_argument("--position", default="last", choices=POSITIONS,
                        help="where the facts are read from: the entity's last token (default), or its first "
                             "(the known-position world, multi-token entities only)")
    parser.add_argument("--cache_dir", default=None,
                        help="cache folder (default: $HYPERDAS_CACHE, else ~/.cache/hyperdas/toy)")
    parser.add_argument("--data", default=None, help="RAVEL data.tgz or data/ folder (default $RAVEL_DATA)")
    args = parser.parse_args()
    model, tokenizer = toy_target(args.domain, args.attributes, args.n_entities, args.steps, args.seed,
                                  args.cache_dir, args.data, arch=args.arch, position=args.position)
    print(f"{model.num_parameters():,} parameters, vocabulary {len(tokenizer):,}")


if __name__ == "__main__":
    main()
