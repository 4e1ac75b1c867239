"""Tokenization with real tokenizers' habits: byte-level BPEs (GPT-2, Llama 3) and SentencePiece-style BPEs
(Llama 2 / TinyLlama, Gemma), each trained here in milliseconds on RAVEL-like text, never downloaded."""
import json

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import hyperdas as H

CITIES = ["Vienna", "Lima", "Oslo", "Buenos Aires", "St. Louis", "Washington, D.C.", "New York"]
# (template, answer) pairs in RAVEL's shapes, JSON-like ones included: the answer after '"' has no separator.
FACTS = [('{"city": "%s", "country": "', "United States"), ('city: %s, "lat": "', "-12"),
         ("%s is a city in the country of", "France"), ("The timezone of %s is", "America/New_York"),
         ("%s, lon:", "-77"), ('{"city": "%s", "continent": "', "North America")]
CORPUS = [t % c + H.answer_separator(t % c) + a for t, a in FACTS for c in CITIES] * 4   # no 'ö' in it


def byte_level_bpe(style):
    """GPT-2 ("gpt2": its split regex; add_prefix_space=True, as RoBERTa-style setups use it; offsets trimmed
    of spaces; <|endoftext|> is BOS, EOS and padding) or Llama 3 ("llama3": its split regex; BOS added by the
    post-processor; no pad token). Both keep a run of punctuation in one pre-token, so '"' + '-12' -> 'Ġ"-'."""
    bpe = Tokenizer(models.BPE())
    if style == "gpt2":
        bos, eos, pad = "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    else:
        bos, eos, pad = "<|begin_of_text|>", "<|end_of_text|>", None
        split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=sorted({bos, eos}),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    trim = processors.ByteLevel(trim_offsets=style == "gpt2")
    bpe.post_processor = trim if style == "gpt2" else processors.Sequence(
        [trim, processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bpe.token_to_id(bos))])])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad,
                                   padding_side="left")


def sentencepiece(style):
    """A SentencePiece-style BPE with byte fallback: spaces become '▁'. Llama 2 puts a '▁' dummy prefix
    before the text ("llama2": a Metaspace pre-tokenizer, as transformers converts it today; "llama2-legacy": a
    Prepend normalizer, as TinyLlama's tokenizer.json has it); Gemma ("gemma") puts none. The post-processor
    adds BOS; a character never seen in training ('ö') becomes byte tokens <0xC3> <0xB6>."""
    bos, eos, pad = ("<bos>", "<eos>", "<pad>") if style == "gemma" else ("<s>", "</s>", None)
    # SentencePiece learns its pieces within words, each word starting with '▁'.
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace()
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300,
                                                            special_tokens=["<unk>", bos, eos] + [pad] * bool(pad)))
    learned = json.loads(learner.to_str())["model"]
    vocab = {**learned["vocab"], **{f"<0x{b:02X}>": len(learned["vocab"]) + b for b in range(256)}}
    sp = Tokenizer(models.BPE(vocab, [tuple(m) for m in learned["merges"]], unk_token="<unk>", byte_fallback=True,
                              fuse_unk=True))
    if style == "llama2":
        sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    else:
        prefix = [normalizers.Prepend("▁")] if style == "llama2-legacy" else []
        sp.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if style.startswith("llama2") else []   # the dummy prefix goes again
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    sp.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=sp, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                   pad_token=pad, padding_side="left")


STYLES = {"gpt2": byte_level_bpe, "llama3": byte_level_bpe, "llama2": sentencepiece,
          "llama2-legacy": sentencepiece, "gemma": sentencepiece}


@pytest.fixture(scope="module", params=list(STYLES))
def tok(request):
    return STYLES[request.param](request.param)


def rows(enc):
    """Each row's attended ids and labels, padding dropped."""
    keep = enc["attention_mask"].bool()
    return [(enc["input_ids"][i][keep[i]].tolist(), enc["labels"][i][keep[i]].tolist()) for i in range(len(keep))]


def added_text(tok, head, tail):
    """The text that the ids `tail` add after the ids `head`. (Decoding `tail` alone would not do: Llama's
    decoder strips the first space of what it decodes, taking it for the dummy prefix.)"""
    before, after = tok.decode(head), tok.decode(head + tail)
    assert after.startswith(before)
    return after[len(before):]


def covers(tok, ids, text):
    """Whether the ids' text starts with `text` (GPT-2's add_prefix_space puts a space before it)."""
    return tok.decode(ids).lstrip().startswith(text)


def example(base, source, template, answer, source_template="I love %s"):
    """A causal example with the official fields: base `template % base`, source `source_template % source`."""
    b, s = template.split("%s"), source_template.split("%s")
    return dict(input_prefix=b[0] + base, input_suffix=b[1], counterfactual_input_prefix=s[0] + source,
                counterfactual_input_suffix=s[1], edit_instruction=f"{base} ; {source} - Country", entity=base,
                counterfactual_entity=source, target="France", counterfactual_target=answer,
                attribute_type="causal", domain="city", attribute="Country", verify_text=template % source)


def test_bos_exactly_once_at_the_start_of_each_row(tok):
    prompts = ["Oslo is a city in the country of", 'city: Lima, "lat": "', "Vienna"]
    adds_bos = tok.bos_token != tok.eos_token              # all but GPT-2 add their own BOS by default
    assert tok(prompts[0])["input_ids"].count(tok.bos_token_id) == adds_bos
    for ids, _ in rows(H.tokenize(tok, prompts, ["France", "-12", "Austria"])):
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_answers_are_exactly_their_own_tokens(tok):
    """The prompt part is the prompt's own ids and the labels are the answer's tokens, nothing else: also
    after '"', where every tokenizer here merges '"' + '-12' ('Ġ"-', '▁"-12') and SentencePiece '"' + 'North'
    ('▁"North'), for multi-word answers, and for an answer with byte-fallback tokens ('Malmö')."""
    facts = FACTS + [("%s is near", "Malmö")]
    prompts, answers = zip(*[(t % c, a) for t, a in facts for c in ("Lima", "Buenos Aires", "Malmö")])
    merged = [p for p, a in zip(prompts, answers) if
              (ids := H.encode(tok, [p])[0]) != H.encode(tok, [p + H.answer_separator(p) + a])[0][:len(ids)]]
    assert 'city: Lima, "lat": "' in merged                 # the naive split would be wrong here
    for (ids, labels), p, a in zip(rows(H.tokenize(tok, prompts, answers)), prompts, answers):
        n = sum(label != -100 for label in labels)
        assert labels == [-100] * (len(ids) - n) + ids[len(ids) - n:]      # the labels are the last n tokens
        assert ids[1:len(ids) - n] == H.encode(tok, [p])[0]
        assert added_text(tok, ids[1:len(ids) - n], ids[len(ids) - n:]) == H.answer_separator(p) + a


def test_visible_ends_exactly_at_the_entitys_last_token(tok):
    """Base and source rows of collate: the visible tokens are BOS and the shortest run of prompt tokens whose
    text covers the entity; the last may run on past it ('▁D.C.",', '.",') or be the last byte of an 'ö'."""
    entities = ["Lima", "Buenos Aires", "Washington, D.C.", "Malmö", "St. Louis"]
    # each template of FACTS but the last is a base template, the one after it the source template
    examples = [example(base, source, t, a, source_template=s) for (t, a), (s, _) in zip(FACTS, FACTS[1:])
                for base, source in zip(entities, entities[1:] + entities[:1])]
    batch = H.collate(examples, tok, "{base} ; {source} - {attribute}")
    ran_on, multi_token = 0, 0
    for role, prefix in (("base", "input_prefix"), ("source", "counterfactual_input_prefix")):
        enc = batch[role]
        for (ids, _), visible, keep, x in zip(rows(enc), enc["visible"], enc["attention_mask"].bool(), examples):
            visible = visible[keep].tolist()
            k = sum(visible)
            assert visible == [True] * k + [False] * (len(ids) - k) and ids[0] == tok.bos_token_id
            assert covers(tok, ids[1:k], x[prefix]) and not covers(tok, ids[1:k - 1], x[prefix])
            ran_on += len(tok.decode(ids[1:k]).lstrip()) > len(x[prefix])
            entity = x["entity" if role == "base" else "counterfactual_entity"]
            multi_token += covers(tok, ids[1:k - 1], x[prefix][:-len(entity)] + entity[:1])
    for ids, _ in rows(batch["instruction"]):
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ran_on and multi_token          # both cases occur with every tokenizer
