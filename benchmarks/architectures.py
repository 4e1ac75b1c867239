"""The supported-models table, measured: for each architecture's tiny random config (the ones
test_architectures.py builds), how far a copied block is from the target layer, whether a keep-only
selection leaves the logits bit-identical, how far a one-hot full-rank interchange is from manual activation
patching, and the loss before and after a few training steps with init_from_target both ways.

    python benchmarks/architectures.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hyperdas as H  # noqa: E402
import test_architectures as A  # noqa: E402


def copy_error(model):
    torch.manual_seed(1)
    ids, pos = torch.randint(3, 40, (2, 9)), torch.arange(9)[None].expand(2, 9) + 40
    hs = model(input_ids=ids, position_ids=pos, output_hidden_states=True).hidden_states
    try:
        net = H.HyperNetwork(model, H.HyperDASConfig(layer=1, feature_dim=4, num_blocks=2))
    except ValueError as err:
        return f"refused: {err}"
    rope = None if net.encoder.rope is None else net.encoder.rope(pos)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None].expand(2, 9, 9)
    return f"{max((b(hs[i], rope, causal) - hs[i + 1]).abs().max().item() for i, b in enumerate(net.encoder.blocks)):.1e}"


def patching_error(model, tok, hd):
    L, d = hd.cfg.layer, model.config.hidden_size
    base, source = H.tokenize(tok, ["the city of Vienna is in"]), H.tokenize(tok, ["I love Paris"])
    h_source = model(**H.target_inputs(source), output_hidden_states=True).hidden_states[L]
    A_ = torch.zeros(1, h_source.shape[1] + 1, base["input_ids"].shape[1])
    A_[0, -1], A_[0, -1, 4], A_[0, 3, 4] = 1, 0, 1
    with H.patch_layer(model, L, lambda h: h.index_put((torch.tensor([0]), torch.tensor([4])), h_source[:, 3])):
        expected = model(**H.target_inputs(base)).logits
    return (hd.intervened_logits(base, A_, torch.eye(d)[None], h_source) - expected).abs().max().item()


def main():
    tok = A.make_tokenizer()
    print("| config | model type | copied block vs layer (max abs) | keep-only logits | one-hot full-rank vs manual "
          "patch | loss, copied blocks | loss, random blocks |")
    print("|---|---|---|---|---|---|---|")
    for name in A.CONFIGS:
        model = A.target(name)
        copyable = name != "mixtral"
        hd = A.new_hd(model, tok, init_from_target=copyable)
        batch = hd.collate([A.example("Vienna", "Paris"), A.example("Tokyo", "Rome", "Japan", "Italy")])
        weights, basis, h_source = hd.plan(batch)
        same = torch.equal(hd.intervened_logits(batch["base"], A.keep_only(weights), basis, h_source),
                           model(**H.target_inputs(batch["base"])).logits)
        losses = []
        for init in (True, False):
            if init and not copyable:
                losses.append("refused")
                continue
            history = A.new_hd(model, tok, init_from_target=init, lr=5e-3).train(
                A.learnable_examples(model, tok), epochs=12, batch_size=8, progress=False)
            losses.append(f"{history[0]['prediction']:.2f} -> {history[-1]['prediction']:.2f}")
        print(f"| {name} | {model.config.model_type} | {copy_error(model)} | {'bit-identical' if same else 'DIFFERENT'} "
              f"| {patching_error(model, tok, hd):.1e} | {losses[0]} | {losses[1]} |")


if __name__ == "__main__":
    main()
