"""The command line: python hyperdas.py --domain verb (hyperdas.py hands its __main__ to this file).

The flags are read, and bad ones refused in one line, before torch is imported; then every check that
needs no model weights and no pairs (preflight) runs before any expensive work. Imports run one way:
this file uses the method (hyperdas) and the offline toy target (toy_world); neither uses it.
"""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import ravel_data

H = None   # hyperdas, imported by main() once the flags are read

SIZES = {"train": 6000, "test": 2000}   # mirrors target.SIZES, for --help without importing torch


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (its usage message runs to a dozen)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least(minimum, kind=int):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"{text} must be at least {minimum}")
        return value
    return parse


def positive(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def interval(text):
    """'500' (steps) or '90s', '10m', '1h' (wall time) -> {'steps': 500} or {'seconds': 600.0}."""
    unit = {"s": 1, "m": 60, "h": 3600}.get(str(text)[-1:])
    number = at_least(1, float)(str(text)[:-1]) if unit else at_least(1)(text)
    return {"seconds": number * unit} if unit else {"steps": number}


def build_parser():
    p = OneLineParser(description="Train and evaluate HyperDAS (or the DAS baseline) on a RAVEL domain; "
                      "print the cause / isolate / disentangle table and save the checkpoint.")
    p.add_argument("--domain", default="verb", choices=ravel_data.DOMAINS + ("all",),
                   help="RAVEL domain: city, nobel_prize_winner, occupation, physical_object, verb, or all (default: verb)")
    p.add_argument("--model", help="Hugging Face id or local path of the target LM (default: the offline toy "
                   "target trained on the domain's RAVEL facts, built on first use and cached)")
    p.add_argument("--arch", choices=("llama", "gpt2"),
                   help="architecture of the offline toy target: llama (default) or gpt2 (not with --model)")
    p.add_argument("--toy_position", choices=("last", "first"),
                   help="where the toy target reads its facts from: the entity's last token (default) or, in the "
                   "known-position world, its first (not with --model)")
    p.add_argument("--method", choices=("hyperdas", "das"),
                   help="hyperdas (default), or das: one static subspace per attribute at the last entity token")
    p.add_argument("--das_position", choices=("last", "first"),
                   help="with --method das: intervene at the entity's last token (default) or its first")
    p.add_argument("--layer", type=at_least(0), help="intervene on hidden_states[layer] (default: from the model's settings)")
    p.add_argument("--feature_dim", type=at_least(1), help="subspace dimension k (default: from the model's settings)")
    p.add_argument("--num_blocks", type=at_least(1), help="hypernetwork decoder blocks (default: from the model's settings)")
    p.add_argument("--epochs", type=at_least(1), help="training epochs (default: from the model's settings)")
    p.add_argument("--batch_size", type=at_least(1), help="batch size (default: from the model's settings); under "
                   "torchrun the global batch, split over the processes")
    p.add_argument("--grad_accum", type=at_least(1), default=1, help="micro-batches per optimizer step, gradients "
                   "summed: the same step in 1/K of the activation memory (batch_size must divide; default: 1)")
    p.add_argument("--checkpoint_blocks", action="store_true", help="recompute each hypernetwork block's "
                   "activations during backward instead of keeping them (less memory, ~1/3 more block compute)")
    p.add_argument("--freeze_embedding", action="store_true", help="keep the hypernetwork's embedding copy fixed "
                   "(no gradient, no AdamW moments: 525 M parameters at Llama-3-8B)")
    p.add_argument("--lr", type=positive, help="hypernetwork learning rate (default: from the model's settings)")
    p.add_argument("--n_train", type=at_least(1), help="RAVEL pairs generated for training, before the model "
                   f"filter (default: {SIZES['train']}, per domain for all)")
    p.add_argument("--n_test", type=at_least(1), help="RAVEL pairs generated for testing, before the model filter "
                   f"(default: {SIZES['test']}, per domain for all)")
    p.add_argument("--save_every", type=interval, default=interval("5m"),
                   help="checkpoint interval: steps (500) or wall time (90s, 10m, 1h); also at the end and on "
                   "Ctrl-C or SIGTERM (default: 5m)")
    p.add_argument("--evaluate", action="store_true", help="only evaluate the checkpoint given by --model_path")
    p.add_argument("--model_path", help="checkpoint directory to evaluate (with --evaluate)")
    p.add_argument("--out", help="output directory for the checkpoint and results.json "
                   "(default: runs/<method>-<domain>-<model>)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, help="seed for data, initialisation and order (default: 0)")
    p.add_argument("--seeds", type=seed_list, help="several seeds, e.g. 0,1,2: one run each (into --out with "
                   "-seed<N> appended), then cause / isolate / disentangle as mean +- std over them")
    p.add_argument("--sparsity_schedule", choices=("official", "paper", "off"), help="official: after the warm-up, "
                   "linspace(0.15, --sparsity_end) from step 0 (a jump to 0.825 at 1.5); paper: rising from 0 to --sparsity_end; off: no sparsity "
                   "loss (default: from the model's settings: paper for the toy target, official otherwise)")
    p.add_argument("--sparsity_end", type=non_negative, help="the weight the sparsity schedule ends at (default: "
                   "from the model's settings: 0.5 for the toy target, measured on every toy world; 1.5, the paper's "
                   "and the official code's, otherwise)")
    p.add_argument("--lr_schedule", choices=("constant", "warmup_cosine"), help="constant (official; the default "
                   "for real models), or warmup_cosine (the toy target's): 5%% linear warm-up, then cosine decay to "
                   "10%% of the rate")
    return p


def non_negative(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:            # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def seed_list(text):
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, such as 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a seed")
    return seeds


def main(argv=None):
    global H
    args = build_parser().parse_args(argv)
    if args.seeds and (args.seed is not None or args.evaluate):
        build_parser().error("--seeds runs one training per seed: drop --seed" +
                             (" and --evaluate" if args.evaluate else ""))
    import hyperdas as H     # torch loads here, after --help and any bad flag were answered
    try:
        with H.processes(args.device) as device:     # under torchrun: join the others, take this rank's GPU
            args.device = device
            return run(args) if not args.seeds else over_seeds(args)
    except (ValueError, FileNotFoundError) as err:   # bad input: one line, no traceback (once under torchrun)
        raise SystemExit(f"error: {err}" if first_process() else 1) from None
    except KeyboardInterrupt as err:                 # a loop that saved says how to resume
        if first_process():
            print(f"interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        raise SystemExit(130) from None


def over_seeds(args):
    """One run per seed, each in its own output folder (so each resumes on its own), then the spread."""
    base = args.out or default_out(args)
    runs = []
    for seed in args.seeds:
        runs.append(run(argparse.Namespace(**{**vars(args), "seed": seed, "seeds": None, "out": f"{base}-seed{seed}"})))
    summary = dict(method=runs[0]["method"], domain=args.domain, model=runs[0]["model"], seeds=args.seeds,
                   mode={m: spread([r["mode"][m] for r in runs]) for m in runs[0]["mode"]},
                   seconds=[r["seconds"] for r in runs])
    if H.is_main():
        print(f"\n{summary['method']} on {args.domain} ({summary['model']}), seeds {args.seeds}: mean +- std "
              "(macro, the paper's number)")
        print(f"{'mode':12} {'cause':>15} {'isolate':>15} {'disentangle':>15}")
        for mode, s in summary["mode"].items():
            print(f"{mode:12} " + " ".join(f"{s[k]['mean']:>8.3f} +- {s[k]['std']:.3f}"
                                           for k in ("cause", "isolate", "disentangle")))
        H.atomic_write(Path(f"{base}-seeds.json"), lambda p: p.write_text(json.dumps(summary, indent=2)))
        print(f"saved {base}-seeds.json")
    return summary


def spread(scores):
    """Mean and sample standard deviation of each top-level score over runs."""
    import statistics
    return {k: {"mean": statistics.fmean(s[k] for s in scores),
                "std": statistics.stdev(s[k] for s in scores) if len(scores) > 1 else 0.0}
            for k in ("cause", "isolate", "disentangle")}


def model_label(args):
    tags = [t for t in (args.arch, args.toy_position) if t not in (None, "llama", "last")]
    return args.model or "-".join([f"toy-{args.domain}", *tags])


def default_out(args, method=None):
    method = method or args.method or "hyperdas"
    at = f"-at-{args.das_position}" if method == "das" and args.das_position not in (None, "last") else ""
    return f"runs/{method}{at}-{args.domain}-{Path(model_label(args)).name}"


def first_process():
    """Rank 0 of torchrun's processes, or the only process (read from the environment: the process group
    is gone by the time an error reaches main)."""
    return os.environ.get("RANK", "0") == "0"


def model_source(args):
    """--model as from_pretrained should get it: an existing local folder expanded (~), else the id as given."""
    path = Path(args.model).expanduser()
    if path.exists():
        return str(path)
    if args.model.startswith(("/", ".", "~")):
        raise ValueError(f"--model {args.model}: no such folder; give a local model folder or a Hugging Face id.")
    return args.model


def target_config(args):
    """The target's configuration, read without loading weights: the toy target's from toy_world.MODEL."""
    if args.model is None:
        import toy_world
        return argparse.Namespace(toy_world=True, num_hidden_layers=toy_world.MODEL["num_hidden_layers"],
                                  hidden_size=toy_world.MODEL["hidden_size"])
    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging
    source = model_source(args)
    verbosity = hf_logging.get_verbosity(), hub_logging.get_verbosity()
    hf_logging.set_verbosity_error()            # one line of ours, not the hub's retry warnings
    hub_logging.set_verbosity_error()
    try:
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True)   # cached: no network
        except (OSError, ValueError):
            print(f"--model {args.model} is not in the local cache; looking it up on the Hugging Face hub ...",
                  file=sys.stderr)
            config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0]
        raise ValueError(f"--model {args.model}: cannot load its configuration ({reason}). Give a local model "
                         "folder, or a Hugging Face id that exists (and is cached when offline).") from None
    finally:
        hf_logging.set_verbosity(verbosity[0])
        hub_logging.set_verbosity(verbosity[1])
    config = getattr(config, "text_config", None) or config     # multimodal models keep the LM's config inside
    if not all(hasattr(config, k) for k in ("num_hidden_layers", "hidden_size")):
        raise ValueError(f"--model {args.model}: its configuration ({type(config).__name__}) gives no "
                         "num_hidden_layers / hidden_size; HyperDAS needs a decoder-only language model.")
    return config


def toy_options(args):
    return dict(arch=args.arch or "llama", position=args.toy_position or "last")


def target_name(args):
    """What a checkpoint records as its target: the toy target's cache folder name, or the model given."""
    if args.model is None:
        import toy_world
        return toy_world.target_folder(args.domain, **toy_options(args)).name
    return model_source(args)


def ravel_ready():
    """RAVEL's data, or one line: found where RAVEL_DATA or the cache says, else fetched (a RAVEL_DATA that
    names a .tgz file that is not there is a mistake, not a place to download to)."""
    named = os.environ.get("RAVEL_DATA")
    if named and named.endswith((".tgz", ".tar.gz")) and not Path(named).expanduser().is_file():
        raise ValueError(f"RAVEL_DATA={named}: no such file; point it at RAVEL's data.tgz or unset it to fetch RAVEL.")
    try:
        try:
            return ravel_data.data_dir()
        except FileNotFoundError:
            print(f"RAVEL data not found; fetching it ({ravel_data.URL}) ...", file=sys.stderr)
            return ravel_data.download()
    except (RuntimeError, OSError) as err:
        raise ValueError(str(err).strip().splitlines()[0]) from None


def planned_run(settings, method, seed):
    """The parts of train_loop's run record known before the pairs: method, configuration, schedule."""
    keys = {f.name for f in fields(H.HyperDASConfig)} - ({"num_blocks"} if method == "das" else set())
    config = asdict(H.HyperDASConfig(**{k: v for k, v in settings.items() if k in keys}, seed=seed))
    return json.loads(json.dumps(dict(method=method, config=config, epochs=settings["epochs"],
                                      batch_size=settings["batch_size"])))


def preflight(args):
    """Every check that needs no model weights and no pairs, so bad input is refused in one line before any
    expensive work: the flags against each other, the target's configuration and the checkpoint's, an
    earlier run in the output folder, the device, the RAVEL data (fetched if missing) and the output folder.
    Returns what run() needs."""
    if args.evaluate and not args.model_path:
        raise ValueError("--evaluate needs --model_path CHECKPOINT_DIR (a directory written by a training run).")
    if args.model_path and not args.evaluate:
        raise ValueError("--model_path is read only with --evaluate; add --evaluate, or drop --model_path to train.")
    if args.device == "cuda" and not H.torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu.")
    if args.arch and args.model:
        raise ValueError("--arch chooses the toy target's architecture; with --model the model's own is used: drop --arch.")
    if args.sparsity_end is not None and args.sparsity_schedule == "off":
        raise ValueError("--sparsity_end sets the sparsity weight, which --sparsity_schedule off never uses: drop one.")
    if args.toy_position and args.model:
        raise ValueError("--toy_position chooses a toy target; with --model there is none: drop --toy_position.")
    if args.toy_position == "first" and args.domain != "city":
        raise ValueError(f"--toy_position first: the known-position world needs multi-token entity names, which "
                         f"city has and {args.domain} does not: use --domain city.")
    config = target_config(args)
    if args.model:
        H.architecture(config)          # an architecture HyperDAS cannot copy exactly: refused now, not after loading
    settings, why = H.settings_for(config)
    flags = {k: getattr(args, k) for k in ("layer", "feature_dim", "num_blocks", "epochs", "batch_size", "lr",
                                            "sparsity_schedule", "sparsity_end", "lr_schedule",
                                            "das_position")
             if getattr(args, k) is not None}
    seed = 0 if args.seed is None else args.seed
    if args.evaluate:
        path = H.checkpoint_path(args.model_path)
        if not H.is_checkpoint(path):
            raise ValueError(f"--model_path {args.model_path} is not a HyperDAS checkpoint (no config.json of ours).")
        info = H.read_json(path / "config.json")
        with contextlib.suppress(FileNotFoundError):   # a damaged weights file: one line now, not after loading
            from safetensors import safe_open
            try:
                with safe_open(str(path / "weights.safetensors"), "pt"):
                    pass
            except H.SafetensorError as err:
                raise ValueError(f"{path / 'weights.safetensors'} is damaged ({err}); train again.") from None
        saved = dict(info["config"], method=info["method"])
        args.das_position = args.das_position or saved.get("das_position")    # names the default --out
        for key, value in dict(flags, method=args.method).items():
            if key in saved and value is not None and value != saved[key]:
                raise ValueError(f"--{key} {value} contradicts the checkpoint's {key} {saved[key]}; drop the flag.")
        domains = info.get("domains") or []
        if domains and (set(domains) != set(ravel_data.DOMAINS) if args.domain == "all" else args.domain not in domains):
            raise ValueError(f"the checkpoint was trained on {', '.join(domains)}, not {args.domain}: "
                             f"pass --domain {'all' if len(domains) > 1 else domains[0]}.")
        if info.get("target") and Path(info["target"]).name != Path(target_name(args)).name:
            raise ValueError(f"the checkpoint was trained on the target {info['target']}, not {target_name(args)}: "
                             "pass the same --model (or, for a toy target, the same --domain, --arch and --toy_position).")
        settings = {k: saved[k] for k in ("layer", "feature_dim", "num_blocks", "lr")}
        why = f"the checkpoint's, {args.model_path}"
    settings.update(flags)
    if not args.evaluate:
        settings.update(checkpoint_blocks=args.checkpoint_blocks, train_embedding=not args.freeze_embedding)
        H.check_batch(settings["batch_size"], args.grad_accum)
    n, d = config.num_hidden_layers, config.hidden_size
    if not settings["layer"] < n:
        raise ValueError(f"--layer {settings['layer']} is out of range: this model has {n} decoder layers, so "
                         f"hidden_states[layer] can be patched for 0 <= layer <= {n - 1}.")
    if settings["feature_dim"] > d:
        raise ValueError(f"--feature_dim {settings['feature_dim']} exceeds the hidden size {d}.")
    method = args.method or (saved["method"] if args.evaluate else "hyperdas")
    if args.das_position not in (None, "last") and method != "das":
        raise ValueError("--das_position places DAS's fixed intervention; HyperDAS chooses its own: add --method das.")
    if method == "hyperdas" and settings["num_blocks"] > n:
        raise ValueError(f"--num_blocks {settings['num_blocks']} exceeds the target's {n} layers to copy from.")
    model_name = model_label(args)
    out = Path(args.out or default_out(args, method))
    earlier = H.checkpoint_path(out / "checkpoint") / "training.json"
    if not args.evaluate and earlier.exists():      # a rerun must be the same run (its data is checked later)
        saved_run = H.with_defaults(H.read_json(earlier).get("run"), asdict(H.HyperDASConfig())) or {}
        planned = planned_run(settings, method, seed)
        diff = H.differences({k: saved_run.get(k) for k in planned}, planned)
        if diff:
            raise ValueError(f"{out / 'checkpoint'} holds a different run ({'; '.join(diff)}): repeat its flags to "
                             f"resume it, or start fresh with another --out (or delete {out / 'checkpoint'}).")
    ravel_ready()
    H.writable(out, "the output")
    return dict(settings=settings, why=why, method=method, model_name=model_name, out=out, seed=seed)


def run(args):
    """Under torchrun every process runs this: rank 0 first fetches and builds what the others then read
    from its caches, computes the pairs for all, and alone prints and writes."""
    start = time.time()
    with H.main_first():
        plan = preflight(args)
        seed = plan["seed"]
        random.seed(seed)
        H.torch.manual_seed(seed)
        if args.model is None:
            import toy_world      # one target for every --seed
            model, tokenizer = toy_world.toy_target(args.domain, device=args.device, **toy_options(args))
        else:
            try:
                model, tokenizer = H.load_target(model_source(args), args.device)
            except OSError as err:
                raise ValueError(f"--model {args.model}: cannot load it ({str(err).strip().splitlines()[0]}).") from None
    settings, out = plan["settings"], plan["out"]
    if H.is_main():
        print(f"settings ({plan['why']}; flags override): " + ", ".join(f"{k} {v}" for k, v in settings.items()),
              file=sys.stderr)
        if model.config.hidden_size >= 4096 and not (settings.get("checkpoint_blocks") and
                                                     settings.get("train_embedding") is False):
            print("memory: at this size the default needs about 74 GB of GPU memory (Llama-3-8B, batch 16); "
                  "--checkpoint_blocks --freeze_embedding bring it to about 63 GB (benchmarks/memory.py)",
                  file=sys.stderr)
    test = H.from_main(lambda: H.ravel_examples(args.domain, "test", model, tokenizer, args.n_test, seed))
    if args.evaluate:
        hd = H.HyperDAS.load(args.model_path, model, tokenizer)
    else:
        epochs, batch_size = settings.pop("epochs"), settings.pop("batch_size")
        train = H.from_main(lambda: H.ravel_examples(args.domain, "train", model, tokenizer, args.n_train, seed))
        if plan["method"] == "das":
            settings.pop("num_blocks")
            hd = H.DAS(model, tokenizer, attributes=sorted({ravel_data.concept(e) for e in train}), seed=seed, **settings)
        else:
            hd = H.HyperDAS(model, tokenizer, seed=seed, **settings)
        hd.train(train, epochs=epochs, batch_size=batch_size, out_dir=out / "checkpoint", save_every=args.save_every,
                 grad_accum=args.grad_accum)
    modes = H.MODES if hd.method == "hyperdas" else ("soft",)   # DAS positions are one-hot already
    results = {"method": hd.method, "domain": args.domain, "model": plan["model_name"],
               "mode": {m: hd.evaluate(test, mode=m) for m in modes}}
    results["averages"] = ("cause, isolate, disentangle: macro over attributes, then domains (the paper's number); "
                           "pooled: over examples")
    results["seconds"] = round(time.time() - start, 1)
    if H.is_main():
        H.print_table(results)
        H.atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(results, indent=2)))
        saved = "" if args.evaluate else f" and the checkpoint in {out / 'checkpoint'}"
        print(f"\nsaved {out / 'results.json'}{saved} ({results['seconds']} s)")
    return results
