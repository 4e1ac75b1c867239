"""What the benchmarks share: published target shapes, random-weight targets, a word tokenizer, synthetic
examples of given lengths, and which of the optional speed / memory features this hyperdas.py has.

Nothing is downloaded: the configurations below are the published config.json files of the models
(the fields that set shapes), written out as dicts; weights are random.
"""
import dataclasses
import inspect
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hyperdas as H  # noqa: E402

LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000,
                 eos_token_id=128001)
MODELS = {
    "llama3-8b": LLAMA3_8B,                                   # meta-llama/Meta-Llama-3-8B
    "llama3.1-8b": dict(LLAMA3_8B, max_position_embeddings=131072, eos_token_id=[128001, 128008, 128009],
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),   # meta-llama/Llama-3.1-8B
    "gemma2-2b": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                      max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096,
                      query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, bos_token_id=2,
                      eos_token_id=1, pad_token_id=0),                                  # google/gemma-2-2b
    "tinyllama": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2),                                  # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True, use_sliding_window=False, bos_token_id=151643,
                         eos_token_id=151643),                                          # Qwen/Qwen2.5-0.5B
}


def make_config(fields):
    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def read_config(path):
    """A local config.json (or the folder holding one), read without weights."""
    path = Path(path).expanduser()
    fields = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    fields = fields.get("text_config", fields) if "model_type" not in fields else fields
    return make_config({k: v for k, v in fields.items() if k not in ("architectures", "transformers_version")})


def meta_target(config):
    """The target on the meta device: shapes and parameter counts, no memory. Its rotary module is rebuilt
    on the CPU (a few KB), since HyperNetwork reads the target's rotary frequencies, and so is a scaled
    embedding's scale (Gemma), which it reads as a number."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    rotary = H.module_at(model, ("model.rotary_emb",))
    if rotary is not None:
        with torch.device("cpu"):
            model.model.rotary_emb = type(rotary)(config=config)
    embed = model.get_input_embeddings()
    if isinstance(getattr(embed, "embed_scale", None), torch.Tensor) and embed.embed_scale.is_meta:
        embed.embed_scale = torch.tensor(config.hidden_size ** 0.5)   # Gemma's sqrt(d), read as a number
    return model


def random_target(config, device, dtype, seed=0):
    """A frozen target with random weights, built directly on `device` in `dtype`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return H.freeze(model)


# ----------------------------------------------------------------------------------------------------
# Synthetic inputs: one token per word, so prompt lengths are exact.


WORDS = 400


def word_tokenizer():
    """A fast word-level tokenizer (ids 0-2 special, then ';', '-', 'Country', and w0 ... w399)."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", ";", "-", "Country"]
                                        + [f"w{i}" for i in range(WORDS)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def synthetic_examples(n, length, instruction_length, seed=0):
    """n RAVEL-shaped examples whose base and source rows are `length` tokens with BOS (the base's
    includes a 2-token answer) and whose instruction is `instruction_length` tokens; half cause, half
    isolate. Every fourth row is a token shorter, so batches are padded (and masked) as real ones are."""
    g = torch.Generator().manual_seed(seed)
    words = lambda k: " ".join(f"w{i}" for i in torch.randint(WORDS, (k,), generator=g).tolist())
    entity_words = max(1, (instruction_length - 4) // 2)          # BOS e ; e' - Country
    out = []
    for i in range(n):
        t = length - (i % 4 == 3)
        entity, source_entity = words(entity_words), words(max(1, instruction_length - 4 - entity_words))
        out.append(dict(input_prefix=words(max(0, t - 5 - entity_words)) + " " + entity,
                        input_suffix=" w1 w2", counterfactual_input_prefix=words(max(1, t - 3)),
                        counterfactual_input_suffix=" w3 w4", entity=entity, counterfactual_entity=source_entity,
                        edit_instruction=f"{entity} ; {source_entity} - Country", target="w5 w6",
                        counterfactual_target="w7 w8", attribute_type="causal" if i % 2 == 0 else "isolate",
                        domain="city", attribute="Country", verify_text=""))
    return out


# ----------------------------------------------------------------------------------------------------
# Optional features of hyperdas.py, which others are adding: the benchmarks run with or without them.


def code_features():
    """Which memory levers this hyperdas.py has, read from its source: grouped_kv, K/V kept per KV head (the
    query groups folded into the query axis, no repeat_interleave of K/V per query head); one_cast, Block.cross
    casting the normed memory to the autocast dtype once (not k_proj and v_proj each); fused AdamW on CUDA;
    the checkpoint_blocks and train_embedding options; gradient accumulation."""
    fields = {f.name for f in dataclasses.fields(H.HyperDASConfig)}
    source = lambda obj: inspect.getsource(obj) if obj is not None else ""
    cli = (Path(H.__file__).parent / "cli.py")
    cli_text = cli.read_text() if cli.exists() else ""
    return dict(grouped_kv="repeat_interleave" not in source(H.Attention.forward),
                one_cast="get_autocast_dtype" in source(getattr(H.Block, "cross", None)),
                fused_adamw="fused" in source(H.HyperDAS.make_optimizer),
                checkpoint_blocks="checkpoint_blocks" in fields,
                train_embedding="train_embedding" in fields,
                grad_accum="grad_accum" in source(H.train_loop) + cli_text)


def hyperdas_options(checkpoint_blocks=False, freeze_embedding=False):
    """HyperDASConfig keyword arguments for the levers this hyperdas.py has, and the names of those it lacks."""
    features, options, missing = code_features(), {}, []
    for wanted, name, value in ((checkpoint_blocks, "checkpoint_blocks", True),
                                (freeze_embedding, "train_embedding", False)):
        if wanted and features[name]:
            options[name] = value
        elif wanted:
            missing.append(name)
    return options, missing


def build_hyperdas(model, settings, options, device):
    """HyperDAS around `model`, its hypernetwork built directly on `device` (no fp32 CPU copy first)."""
    keys = {f.name for f in dataclasses.fields(H.HyperDASConfig)}
    with torch.device(device):
        return H.HyperDAS(model, word_tokenizer(), **{k: v for k, v in settings.items() if k in keys}, **options)


# ----------------------------------------------------------------------------------------------------
# hyperdas.py's command line on a random target and synthetic pairs, for a quick run of the whole command
# (benchmarks/gpu_check.sh runs it under torchrun):
#
#   torchrun --standalone --nproc_per_node 1 benchmarks/targets.py --epochs 1 --n_train 64 --n_test 32 --out DIR
#
# Every flag of cli.py works; only the data are stand-ins: the toy target is a random Llama of the toy's
# shape (toy_world.MODEL, fp32, this file's word tokenizer) and RAVEL's filtered pairs are synthetic_examples
# (a random target reproduces no RAVEL answer, so the filter would keep none). Nothing is built, read or
# downloaded. The scores mean nothing; that the run trains, evaluates and saves, under torchrun too, does.


def synthetic_world(length=20, instruction_length=10):
    """Patch cli / toy_world / hyperdas so that the command line runs on the stand-ins above."""
    import cli
    import toy_world
    config = make_config(dict(model_type="llama", vocab_size=toy_world.VOCAB_SIZE, **toy_world.MODEL))

    def toy_target(domain, device=None, arch="llama", **_):
        if arch != "llama":
            raise ValueError("the synthetic world has a Llama-shaped target only")
        return random_target(config, device or "cpu", torch.float32), word_tokenizer()

    def ravel_examples(domain, split, model, tokenizer, n=None, seed=0, data=None):
        n = n or H.SIZES[split]
        return synthetic_examples(n, length, instruction_length, seed=seed + (split == "test"))
    toy_world.toy_target = toy_target
    H.ravel_examples = ravel_examples
    cli.ravel_ready = lambda: None
    return cli


if __name__ == "__main__":
    sys.exit(0 if synthetic_world().main(sys.argv[1:]) else 1)
