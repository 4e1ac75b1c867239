"""Time one HyperDAS training step on a random-weight Llama of a named shape, split into its parts.

    python benchmarks/step_time.py --shape toy            # CPU-sized
    python benchmarks/step_time.py --shape tinyllama      # GPU recommended
    python benchmarks/step_time.py --shape llama3-8b --batch_size 16 --num_blocks 8   # 80 GB GPU

Parts: the two unintervened target passes (base and source hidden states), the hypernetwork
(steps 1-3), the intervened target forward, the backward pass, and the optimizer step.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hyperdas as H  # noqa: E402

SHAPES = {   # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (64, 128, 4, 4, 2, 512),
    "toy": (128, 512, 4, 4, 2, 4096),
    "tinyllama": (2048, 5632, 22, 32, 4, 32000),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
}


class WordTokenizer:
    """Enough of a tokenizer for timing: one id per whitespace-separated word."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[3 + hash(w) % 400 for w in t.split()] for t in texts]}


def example(i, words):
    base = " ".join(f"w{i}{j}" for j in range(words))
    return dict(input_prefix=base, input_suffix=" is in", counterfactual_input_prefix="I love " + base,
                counterfactual_input_suffix=" .", edit_instruction=f"a{i} ; b{i} - Country", entity=f"a{i}",
                counterfactual_entity=f"b{i}", target="x y", counterfactual_target="y z",
                attribute_type="causal" if i % 2 else "isolate", domain="city", attribute="Country", verify_text="")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="toy", help="target model shape (random weights)")
    p.add_argument("--batch_size", type=int, default=32, help="examples per step")
    p.add_argument("--words", type=int, default=16, help="words per prompt (~tokens)")
    p.add_argument("--num_blocks", type=int, default=2, help="hypernetwork blocks")
    p.add_argument("--feature_dim", type=int, default=16, help="subspace dimension")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = p.parse_args()
    d, ff, layers, heads, kv, vocab = SHAPES[args.shape]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=d, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).to(dtype)
    hd = H.HyperDAS(model, WordTokenizer(), layer=layers // 2, feature_dim=args.feature_dim,
                    num_blocks=args.num_blocks)
    opt = hd.make_optimizer()
    batch_examples = [example(i, args.words) for i in range(args.batch_size)]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    parts = {k: 0.0 for k in ("target passes (no grad)", "hypernetwork forward", "intervened forward",
                              "backward", "optimizer step")}

    def timed(name, fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        parts[name] += time.perf_counter() - t
        return out

    for step in range(args.steps + 2):
        if step == 2:
            parts = dict.fromkeys(parts, 0.0)
        batch = hd.collate(batch_examples)
        with hd.autocast():
            base_states = timed("target passes (no grad)", lambda: (H.hidden_states(model, batch["base"]),
                                                                     H.hidden_states(model, batch["source"])))
            weights, basis = timed("hypernetwork forward", lambda: hd.net(
                batch["instruction"], base_states[0], batch["base"]["visible"], base_states[1],
                batch["source"]["visible"]))
            h_source = base_states[1][:, :, hd.cfg.layer]
            keep = int((batch["base"]["labels"] != -100).sum(1).max()) + 1
            logits = timed("intervened forward", lambda: hd.intervened_logits(batch["base"], weights, basis,
                                                                              h_source, keep))
            loss = H.prediction_loss(logits, batch["base"]["labels"], batch["is_causal"], 3.5, 0.5) + \
                H.sparsity_loss(weights)
        timed("backward", loss.backward)
        timed("optimizer step", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
    total = sum(parts.values())
    print(f"shape={args.shape} device={args.device} dtype={dtype} batch={args.batch_size} "
          f"tokens/prompt={batch['base']['input_ids'].shape[1]} blocks={args.num_blocks} threads={torch.get_num_threads()}")
    for name, seconds in parts.items():
        print(f"  {name:<26} {1000 * seconds / args.steps:8.1f} ms  ({100 * seconds / total:4.1f}%)")
    print(f"  {'total':<26} {1000 * total / args.steps:8.1f} ms per step")
    if args.device == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
