"""The paper's analyses on the offline toy world, one command each. Every run is the command line's own
(`hyperdas.py --domain ... --out benchmarks/runs/<analysis>/<run>`), so a sweep that is stopped resumes
where it stopped and a finished run is read back, not trained again. Each analysis prints a table, and
writes it with a plot to benchmarks/results/<analysis>.{md,png}.

    python benchmarks/analyses.py layers   --domain verb --epochs 2   # HyperDAS and DAS at every layer
    python benchmarks/analyses.py writes   --domain verb --epochs 2   # where HyperDAS writes, per layer
    python benchmarks/analyses.py dims     --domain verb --epochs 2   # subspace dimension k = 1 .. 64
    python benchmarks/analyses.py sparsity --domain verb --epochs 2   # the sparsity loss on and off
    python benchmarks/analyses.py known_position                      # the known-position world (city)

"Where HyperDAS writes": for each test pair, the base position whose state the intervention changes most
(the largest 1 - keep weight among the visible tokens) and the source position it reads there most (the
largest selection weight in that column), in soft mode. A pair counts for "entity" when that base position
is one of the base entity's tokens; chance is the entity's share of the visible tokens.
"""
import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import cli  # noqa: E402
import hyperdas as H  # noqa: E402

RUNS, RESULTS = HERE / "runs", HERE / "results"


def train(analysis, name, flags):
    """One command-line run into benchmarks/runs/<analysis>/<name>; read back when it has finished."""
    out = RUNS / analysis / name
    recorded = out / "flags.json"
    if recorded.exists() and json.loads(recorded.read_text()) != flags:
        raise SystemExit(f"error: {out} holds a run with other flags ({' '.join(json.loads(recorded.read_text()))}); "
                         "delete it to run this one")
    if (out / "results.json").exists() and recorded.exists():
        return json.loads((out / "results.json").read_text()), out
    print(f"\n== {analysis}: {name}: hyperdas.py {' '.join(flags)}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(flags))
    return cli.main([*flags, "--out", str(out)]), out


def disentangle(results, mode="soft"):
    return results["mode"][mode]["disentangle"]


@torch.no_grad()
def where_it_writes(hd, examples, batch_size=64):
    """Per kind of pair (cause, isolate): how often the base position HyperDAS changes most is an entity token,
    the entity's first token or its last, how often the source position it reads there is the source entity's
    first or last token, the chance of each, and the mean share of that position's state replaced."""
    tally = {}
    for i in range(0, len(examples), batch_size):
        part = examples[i:i + batch_size]
        batch = hd.collate(part)
        with hd.autocast():                          # steps 1-3 only: the choice, without the intervened forward
            weights = hd.plan(batch)[0].float()                              # [B, Ts + 1, Tb], soft
        base, source = batch["base"], batch["source"]
        rows = torch.arange(len(part), device=weights.device)
        changed = (1 - weights[:, -1]).masked_fill(~base["visible"], -1)      # [B, Tb]
        j = changed.argmax(1)
        column = weights[rows, :-1, j].masked_fill(~source["visible"], -1)
        read = column.argmax(1)
        # argmax takes the first of equal values: count the pairs where it had to choose, so a tie cannot pass
        # for a choice of the first entity token.
        tied = ((changed == changed.max(1, keepdim=True).values).sum(1) > 1) | \
               ((column == column.max(1, keepdim=True).values).sum(1) > 1)
        spans = {}
        for key in ("base", "source"):
            first = H.entity_first_tokens(hd.tokenizer, batch[key], part, key).to(weights.device)
            spans[key] = first, H.last_visible(batch[key]["visible"])
        (b_first, b_last), (s_first, s_last) = spans["base"], spans["source"]
        n_base, n_source = base["visible"].sum(1).float(), source["visible"].sum(1).float()
        columns = dict(
            base_entity=((j >= b_first) & (j <= b_last)).float(), base_first=(j == b_first).float(),
            base_last=(j == b_last).float(), source_first=(read == s_first).float(), source_last=(read == s_last).float(),
            both_first=((j == b_first) & (read == s_first)).float(),
            chance_entity=(b_last - b_first + 1).float() / n_base, chance_position=1 / n_base,
            chance_source=1 / n_source, replaced=changed[rows, j], ties=tied.float())
        for k, kind in enumerate(x["attribute_type"] for x in part):
            row = tally.setdefault("cause" if kind == "causal" else "isolate", {c: [] for c in columns})
            for c, v in columns.items():
                row[c].append(v[k].item())
    return {kind: {c: sum(v) / len(v) for c, v in row.items()} | {"n": len(row["replaced"])}
            for kind, row in tally.items()}


def examples_for(out, args_flags):
    """The trained run's test pairs (the same command's, so the same filter) and its HyperDAS."""
    parser = cli.build_parser()
    args = parser.parse_args(args_flags)
    import toy_world
    model, tokenizer = toy_world.toy_target(args.domain, progress=False, **cli.toy_options(args))
    test = H.ravel_examples(args.domain, "test", model, tokenizer, args.n_test, args.seed or 0)
    return H.HyperDAS.load(out / "checkpoint", model, tokenizer), test


def save(name, table, figure, data):
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(table + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    if figure is not None:
        figure.savefig(RESULTS / f"{name}.png", dpi=120, bbox_inches="tight")
    print(table)
    print(f"\nwrote {RESULTS / name}.md, .json" + (", .png" if figure is not None else ""))


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot(xlabel, ylabel, series, title, logx=False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({x for xs, _ in series.values() for x in xs}))
    ax.set_xticklabels([str(x) for x in sorted({x for xs, _ in series.values() for x in xs})])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def common(args, sparsity=True):
    flags = ["--domain", args.domain, "--seed", str(args.seed)]
    if args.epochs:
        flags += ["--epochs", str(args.epochs)]
    if sparsity:        # always named, so a run cached under another default is refused, never reused
        flags += ["--sparsity_end", str(H.TOY["sparsity_end"] if args.sparsity_end is None else args.sparsity_end)]
    return flags


def layers(args):
    import toy_world
    rows, data, series = [], {}, {"HyperDAS": ([], []), "DAS": ([], [])}
    for layer in range(toy_world.MODEL["num_hidden_layers"]):
        hd, _ = train("layers", f"hyperdas-{args.domain}-L{layer}", [*common(args), "--layer", str(layer)])
        das, _ = train("layers", f"das-{args.domain}-L{layer}", [*common(args), "--layer", str(layer), "--method", "das"])
        data[layer] = dict(hyperdas=hd["mode"]["soft"], das=das["mode"]["soft"],
                           seconds=dict(hyperdas=hd["seconds"], das=das["seconds"]))
        rows.append([layer, *(f"{hd['mode']['soft'][k]:.3f}" for k in ("cause", "isolate", "disentangle")),
                     *(f"{das['mode']['soft'][k]:.3f}" for k in ("cause", "isolate", "disentangle"))])
        for label, r in (("HyperDAS", hd), ("DAS", das)):
            series[label][0].append(layer)
            series[label][1].append(disentangle(r))
    table = markdown(["layer", "HyperDAS cause", "isolate", "disentangle", "DAS cause", "isolate", "disentangle"], rows)
    save(f"layers-{args.domain}", table, plot("hidden_states[layer]", "soft disentangle (macro)", series,
                                              f"layer sweep, toy {args.domain}"), data)


def writes(args):
    import toy_world
    rows, data, series = [], {}, {"cause": ([], []), "isolate": ([], [])}
    for layer in range(toy_world.MODEL["num_hidden_layers"]):
        flags = [*common(args), "--layer", str(layer)]
        _, out = train("layers", f"hyperdas-{args.domain}-L{layer}", flags)
        hd, test = examples_for(out, flags)
        w = data[layer] = where_it_writes(hd, test)
        for kind in ("cause", "isolate"):
            r = w[kind]
            rows.append([layer, kind, r["n"], f"{r['base_entity']:.2f}", f"{r['chance_entity']:.2f}",
                         f"{r['base_last']:.2f}", f"{r['source_last']:.2f}", f"{r['replaced']:.2f}"])
            series[kind][0].append(layer)
            series[kind][1].append(r["base_entity"])
    table = markdown(["layer", "pairs", "n", "writes at the entity", "chance", "at its last token",
                      "reads the source's last entity token", "share replaced"], rows)
    save(f"writes-{args.domain}", table, plot("hidden_states[layer]", "share of pairs writing at the entity", series,
                                              f"where HyperDAS writes, toy {args.domain}"), data)


def dims(args):
    rows, data, series = [], {}, {"HyperDAS": ([], [])}
    for k in args.dims:
        r, _ = train("dims", f"hyperdas-{args.domain}-k{k}", [*common(args), "--feature_dim", str(k)])
        data[k] = dict(r["mode"]["soft"], seconds=r["seconds"])
        rows.append([k, *(f"{r['mode']['soft'][c]:.3f}" for c in ("cause", "isolate", "disentangle"))])
        series["HyperDAS"][0].append(k)
        series["HyperDAS"][1].append(disentangle(r))
    table = markdown(["k (of 128)", "cause", "isolate", "disentangle"], rows)
    save(f"dims-{args.domain}", table, plot("subspace dimension k", "soft disentangle (macro)", series,
                                            f"subspace dimension, toy {args.domain}", logx=True), data)


def sparsity(args):
    rows, data = [], {}
    for schedule in ("official", "paper", "off"):
        r, _ = train("sparsity", f"hyperdas-{args.domain}-{schedule}",
                     [*common(args, sparsity=schedule != "off"), "--sparsity_schedule", schedule])
        data[schedule] = {m: r["mode"][m] for m in H.MODES} | {"seconds": r["seconds"]}
        rows.append([schedule, *(f"{r['mode'][m]['disentangle']:.3f}" for m in H.MODES),
                     f"{r['mode']['soft']['cause']:.3f}", f"{r['mode']['soft']['isolate']:.3f}"])
    table = markdown(["sparsity loss", "soft", "one-to-many", "one-to-one", "soft cause", "soft isolate"], rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    width = 0.25
    for i, schedule in enumerate(data):
        ax.bar([m + (i - 1) * width for m in range(len(H.MODES))], [data[schedule][m]["disentangle"] for m in H.MODES],
               width, label=schedule)
    ax.set_xticks(range(len(H.MODES)), H.MODES)
    ax.set_ylabel("disentangle (macro)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"sparsity loss, toy {args.domain}", fontsize=10)
    ax.legend(fontsize=8)
    save(f"sparsity-{args.domain}", table, fig, data)


def known_position(args):
    """HyperDAS, DAS at the entity's last token (RAVEL's placement) and DAS at the true position (its first
    token), on the toy city world whose facts are read from the entity's first token."""
    base = [*common(args), "--toy_position", "first"]
    runs = {"HyperDAS": train("known_position", "hyperdas", base),
            "DAS at the last entity token": train("known_position", "das-last", [*base, "--method", "das"]),
            "DAS at the true position (first token)": train("known_position", "das-first",
                                                            [*base, "--method", "das", "--das_position", "first"])}
    rows = [[name, *(f"{r['mode']['soft'][c]:.3f}" for c in ("cause", "isolate", "disentangle")), f"{r['seconds']:.0f}"]
            for name, (r, _) in runs.items()]
    hd, test = examples_for(runs["HyperDAS"][1], base)
    w = where_it_writes(hd, test)
    c = w["cause"]
    table = (markdown(["method (soft)", "cause", "isolate", "disentangle", "seconds"], rows) + "\n\n" +
             markdown(["HyperDAS on cause pairs (n=%d)" % c["n"], "share", "chance"],
                      [["writes at the base entity's first token (the true position)", f"{c['base_first']:.3f}",
                        f"{c['chance_position']:.3f}"],
                       ["writes at its last token", f"{c['base_last']:.3f}", f"{c['chance_position']:.3f}"],
                       ["reads the source entity's first token there", f"{c['source_first']:.3f}",
                        f"{c['chance_source']:.3f}"],
                       ["both true (base and source first tokens)", f"{c['both_first']:.3f}",
                        f"{c['chance_position'] * c['chance_source']:.4f}"],
                       ["pairs where two positions tied for the largest weight", f"{c['ties']:.3f}", ""]]))
    save("known_position", table, None, dict(runs={n: r for n, (r, _) in runs.items()}, where_it_writes=w))


def main():
    p = argparse.ArgumentParser(description="The paper's analyses on the toy world (see the module docstring).")
    p.add_argument("analysis", choices=("layers", "writes", "dims", "sparsity", "known_position"))
    p.add_argument("--domain", default="verb", help="the toy world (known_position: always city)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per run (default: the toy preset's 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsity_end", type=cli.non_negative, default=None,
                   help="the weight the sparsity ramp ends at (default: the toy preset's; the README's analyses ran at 1.5)")
    p.add_argument("--dims", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    args = p.parse_args()
    if args.analysis == "known_position":
        args.domain = "city"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    globals()[args.analysis](args)


if __name__ == "__main__":
    main()
