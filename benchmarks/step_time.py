"""Time HyperDAS training steps on random-weight targets: examples/s, the step as a multiple of one bare
target forward, and where the time goes.

    OMP_NUM_THREADS=1 python benchmarks/step_time.py              # CPU: toy, tiny, d512 shapes (~1 min)
    python benchmarks/step_time.py --shapes tinyllama llama3-8b   # CUDA (random bf16 weights)
    python benchmarks/step_time.py --shapes llama3-8b --checkpoint_blocks --freeze_embedding

A step is what train_step does, split into its parts: the target's two unintervened passes (base and
source hidden states, no grad), the hypernetwork (steps 1-3), the intervened target forward, the loss,
the backward pass, and clipping + AdamW. "bare" is one no-grad forward of the target on the base batch
(all logits), the cost of simply running the model; step / bare says what the method costs on top.

On CPU: one thread, CPU time (time.process_time), so another process on the machine changes the
numbers less; the shapes' repeats are interleaved, so a slow moment hits every shape alike. Medians.
On CUDA: wall time with synchronisation, bf16 target, bf16 autocast, fp32 hypernetwork.
"""
import argparse
import gc
import os
import platform
import statistics
import time

import torch

import targets
from targets import H

# name: (target config, batch, prompt length, instruction length, blocks; None: hyperdas.settings_for)
TOY = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=4096)                     # toy_world.MODEL, random weights
SHAPES = {
    "toy": (TOY, 16, 20, 10, 2),
    "tiny": (dict(TOY, intermediate_size=512), 32, 25, 10, 2),         # design notes §8's tiny Llama
    "d512": (dict(TOY, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4), 16, 40, 10, 2),              # design notes §8's larger one
    "tinyllama": (targets.MODELS["tinyllama"], 16, 50, 10, None),
    "llama3-8b": (targets.MODELS["llama3-8b"], 16, 50, 10, None),
}
PARTS = ("target: base + source passes", "hypernetwork forward", "target: intervened forward", "loss",
         "backward", "clip + optimizer")


class Run:
    """One shape: its target, HyperDAS, optimizer and batch, and the timings collected so far."""

    def __init__(self, name, device, options, blocks=None, freeze_embedding=False):
        fields, batch, length, instruction, default_blocks = SHAPES[name]
        config = targets.make_config(fields)
        self.settings, _ = H.settings_for(config)
        self.settings["num_blocks"] = blocks or default_blocks or self.settings["num_blocks"]
        dtype = torch.bfloat16 if device == "cuda" else torch.float32   # bf16 on CPU is 20-45x slower
        self.name, self.device, self.config = name, device, config
        self.model = targets.random_target(config, device, dtype)
        self.hd = targets.build_hyperdas(self.model, self.settings, options, device)
        if freeze_embedding and "train_embedding" not in options:
            self.hd.net.encoder.embed.weight.requires_grad_(False)      # the lever by hand, before the optimizer
        self.opt = self.hd.make_optimizer()
        self.examples = targets.synthetic_examples(batch, length, instruction, seed=0)
        self.batch, self.length = batch, length
        self.times = {part: [] for part in PARTS + ("step", "bare")}

    def clock(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def bare(self, record=True):
        batch = self.hd.collate(self.examples)
        start = self.clock()
        with torch.no_grad(), self.hd.autocast():
            self.model(**H.target_inputs(batch["base"]))
        if record:
            self.times["bare"].append(self.clock() - start)

    def step(self, record=True):
        """One training step, timed by part. Mirrors HyperDAS.forward + train_step (checked by check())."""
        hd, cfg, spent = self.hd, self.hd.cfg, {}
        start = step_start = self.clock()

        def lap(part):
            nonlocal start
            now = self.clock()
            spent[part] = spent.get(part, 0.0) + now - start
            start = now
        batch = hd.collate(self.examples)           # tokenizing: counted in the step, in no part
        start = self.clock()
        with hd.autocast():
            base, source = batch["base"], batch["source"]
            base_states, source_states = H.hidden_states(self.model, base), H.hidden_states(self.model, source)
            lap("target: base + source passes")
            weights, basis = hd.net(batch["instruction"], base_states, base["visible"], source_states,
                                    source["visible"])
            lap("hypernetwork forward")
            logits = hd.intervened_logits(base, weights, basis, source_states[:, :, cfg.layer],
                                          H.answer_window(base["labels"]))
            lap("target: intervened forward")
            loss = H.prediction_loss(logits, base["labels"], batch["is_causal"], cfg.causal_weight,
                                     cfg.isolate_weight) + cfg.sparsity_end * H.sparsity_loss(weights)
            lap("loss")
        loss.backward()
        lap("backward")
        torch.nn.utils.clip_grad_norm_(hd.trainable_parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        lap("clip + optimizer")
        if record:
            for part in PARTS:
                self.times[part].append(spent[part])
            self.times["step"].append(self.clock() - step_start)
        return loss.detach()

    def check(self):
        """The timed step computes what HyperDAS.forward computes (same loss before any update)."""
        hd, cfg = self.hd, self.hd.cfg
        with torch.no_grad():
            logits, labels, is_causal, weights = hd.forward(self.examples)
            expected = H.prediction_loss(logits, labels, is_causal, cfg.causal_weight, cfg.isolate_weight) \
                + cfg.sparsity_end * H.sparsity_loss(weights)
        got = self.step(record=False)
        tolerance = 1e-2 if self.device == "cuda" else 1e-4     # bf16: kernels may differ with and without grad
        if not torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance):
            print(f"warning: {self.name}: the timed step's loss {got.item():.5f} differs from HyperDAS.forward's "
                  f"{expected.item():.5f}; this benchmark no longer mirrors hyperdas.py")

    def free(self):
        del self.model, self.hd, self.opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def median(self, part):
        return statistics.median(self.times[part])


def time_repeats(runs, repeats):
    """Each repeat times one bare forward and one step of every run, in turn."""
    for _ in range(repeats):
        for run in runs:
            run.bare()
            run.step()


def machine(device):
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, wall time (synchronised)"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread, CPU time (time.process_time)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--shapes", nargs="+", choices=SHAPES, help="target shapes (default: toy tiny d512 on CPU, "
                   "and tinyllama llama3-8b too with CUDA)")
    p.add_argument("--repeats", type=int, default=6, help="timed steps per shape, interleaved (after 2 warm-up)")
    p.add_argument("--blocks", type=int, help="hypernetwork blocks (default: per shape)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu", help="cpu or cuda")
    p.add_argument("--checkpoint_blocks", action="store_true", help="activation checkpointing of the blocks")
    p.add_argument("--freeze_embedding", action="store_true", help="no gradient for the embedding copy")
    args = p.parse_args()
    shapes = args.shapes or (["toy", "tiny", "d512"] + (["tinyllama", "llama3-8b"] if args.device == "cuda" else []))
    if args.device == "cpu":
        torch.set_num_threads(1)       # with OMP_NUM_THREADS=1 set too, nothing else spawns threads
    options, missing = targets.hyperdas_options(args.checkpoint_blocks, args.freeze_embedding)
    for name in missing:
        print(f"this hyperdas.py has no {name}: " + ("freezing the embedding copy by hand" if name == "train_embedding"
                                                     else "timing without it"))
    print(f"machine: {machine(args.device)}; medians of {args.repeats} interleaved repeats")
    runs = []
    for name in shapes:
        torch.manual_seed(0)
        try:
            run = Run(name, args.device, options, args.blocks, args.freeze_embedding)
            run.check()
            for _ in range(2):                          # warm-up: allocator, kernels, AdamW state
                run.bare(record=False)
                run.step(record=False)
            if args.device == "cuda":                   # one shape at a time on the GPU: time it, free it
                time_repeats([run], args.repeats)
                run.peak = torch.cuda.max_memory_allocated()
                run.free()
            runs.append(run)
        except torch.cuda.OutOfMemoryError:
            print(f"{name}: out of memory (try --checkpoint_blocks --freeze_embedding)")
        run = None
        gc.collect()                                    # an out-of-memory run's tensors go with it
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.device == "cpu":
        time_repeats(runs, args.repeats)
    print(f"\n{'shape':<10} {'d':>5} {'layers':>6} {'batch':>5} {'T':>3} {'blocks':>6} {'step ms':>9} "
          f"{'examples/s':>10} {'bare ms':>8} {'step/bare':>9}")
    for run in runs:
        c, step, bare = run.config, run.median("step"), run.median("bare")
        print(f"{run.name:<10} {c.hidden_size:>5} {c.num_hidden_layers:>6} {run.batch:>5} {run.length:>3} "
              f"{run.settings['num_blocks']:>6} {1000 * step:9.1f} {run.batch / step:10.1f} {1000 * bare:8.2f} "
              f"{step / bare:9.1f}")
    print("\nwhere the time goes, ms (share of the step); other: tokenizing the batch")
    print(f"{'part':<30} " + " ".join(f"{run.name:>16}" for run in runs))
    for part in PARTS + ("other",):
        cells = []
        for run in runs:
            step = run.median("step")
            spent = step - sum(run.median(p) for p in PARTS) if part == "other" else run.median(part)
            cells.append(f"{1000 * spent:8.1f} ({100 * spent / step:4.1f}%)")
        print(f"{part:<30} " + " ".join(f"{c:>16}" for c in cells))
    if args.device == "cuda":
        print("peak GPU memory, GB: " + ", ".join(f"{run.name} {run.peak / 1e9:.1f}" for run in runs))


if __name__ == "__main__":
    main()
