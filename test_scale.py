"""Scale (issue 13): micro-batches (grad_accum), checkpointed blocks, a frozen embedding, fused AdamW, and
several processes under torchrun, each checked against the plain single-process step it must equal.

Run as a script, this file is a torchrun worker of test_torchrun_equals_one_process_with_the_whole_batch."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cli
import hyperdas as H
import toy_world
from test_hyperdas import CITIES, example, make_model, make_tokenizer, new_hd

HERE = Path(__file__).resolve().parent
TEMPLATES = ["the city of %s is in", "%s is in", "I visited %s , the city of"]


def continuation(model, tok, prompt, n):
    """The target's own greedy n words after the prompt (never a special token): a label it can reproduce."""
    words = []
    for _ in range(n):
        logits = model(**H.target_inputs(H.tokenize(tok, [" ".join([prompt, *words])]))).logits[0, -1]
        words.append(tok.convert_ids_to_tokens(3 + logits[3:].argmax().item()))
    return " ".join(words)


def varied(model, tok, n):
    """n examples whose answers are 1 to 3 tokens, causal and isolate, on prompts of three lengths (a
    micro-batch's own mean then differs from its share of the whole batch's, as on RAVEL), labelled with
    the target's own continuations (so some rows score, and equal scores say something)."""
    rows = []
    for i in range(n):
        isolate, words, template = i % 3 == 2, 1 + i % 3, TEMPLATES[i % 3]
        base, source = CITIES[i % 8], CITIES[(3 * i + 1) % 8]
        rows.append(example(base, source, continuation(model, tok, template % base, words),
                            continuation(model, tok, template % source, words), kind="isolate" if isolate else "causal",
                            attribute="Continent" if isolate else "Country", base_template=template))
    return rows


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model()


def sgd(hd):
    """The optimizer of the exact comparisons: SGD's step is linear in the gradient, so equal weights mean
    equal gradients. AdamW divides each gradient by its own running size: that hides a gradient off by a
    constant factor, and turns the float noise of gradients that are exactly zero in theory (rotations of
    the basis within its own span, which the loss cannot see) into steps of ~0.2 lr that differ between
    two summation orders (measured after 3 AdamW steps of 16 vs 4 x 4: the basis' parameters differ by 5e-4,
    the projection it defines and every other weight by up to 9e-6)."""
    return torch.optim.SGD(hd.trainable_parameters(), lr=0.1, momentum=0.9)


def assert_same_weights(a, b, atol=1e-5):
    for (name, x), y in zip(a.items(), b.values(), strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def assert_same_history(a, b):
    """The records of two runs: the same losses and, because AdamW would hide a gradient off by a constant
    factor, the same gradient norms."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("loss", "prediction", "sparsity", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key, x[key], y[key])


# --------------------------------------------------------------------------------------------------
# Micro-batches


def test_grad_accum_takes_the_step_of_the_whole_batch(model, tok, monkeypatch):
    monkeypatch.setattr(H.HyperDAS, "make_optimizer", sgd)
    rows = varied(model, tok, 22)         # steps of 16 and 6 examples: micro-batches of 4 x 4, then 1, 2, 1, 2
    whole, parts = new_hd(model, tok), new_hd(model, tok)
    whole.train(rows, epochs=2, batch_size=16, progress=False)
    parts.train(rows, epochs=2, batch_size=16, grad_accum=4, progress=False)
    assert [r["sparsity_weight"] > 0 for r in whole.history] == [False, False, True, True]   # both losses count
    assert_same_history(whole.history, parts.history)
    assert_same_weights(whole.net.state_dict(), parts.net.state_dict())
    with pytest.raises(ValueError, match="grad_accum=3 equal micro-batches") as err:
        new_hd(model, tok).train(rows, epochs=1, batch_size=16, grad_accum=3, progress=False)
    assert "\n" not in str(err.value)


def test_split_cuts_contiguous_parts_that_differ_by_at_most_one():
    assert H.split(list(range(7)), 3) == [[0, 1], [2, 3], [4, 5, 6]]
    assert H.split([1], 2) == [[], [1]] and H.split([], 2) == [[], []]


# --------------------------------------------------------------------------------------------------
# Memory: checkpointed blocks, a frozen embedding, fused AdamW


def loss_and_gradients(hd, rows):
    """Forward and backward of one batch; returns the loss, every gradient, and how often blocks ran."""
    runs = []
    hooks = [m.register_forward_pre_hook(lambda *_: runs.append(1)) for m in hd.net.modules() if isinstance(m, H.Block)]
    logits, labels, is_causal, weights = hd.forward(rows)
    loss = H.prediction_loss(logits, labels, is_causal, 3.5, 0.5) + 0.7 * H.sparsity_loss(weights)
    loss.backward()
    for hook in hooks:
        hook.remove()
    return loss.item(), {n: p.grad for n, p in hd.net.named_parameters() if p.grad is not None}, len(runs)


def test_checkpoint_blocks_recompute_with_the_same_loss_and_gradients(model, tok):
    rows = varied(model, tok, 6)
    loss, grads, runs = loss_and_gradients(new_hd(model, tok), rows)
    hd = new_hd(model, tok, checkpoint_blocks=True)
    loss_c, grads_c, runs_c = loss_and_gradients(hd, rows)
    assert (runs, runs_c) == (2, 4)            # each of the 2 blocks runs again during backward
    assert loss_c == pytest.approx(loss, abs=1e-6) and grads.keys() == grads_c.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    runs = []
    hooks = [m.register_forward_pre_hook(lambda *_: runs.append(1)) for m in hd.net.modules() if isinstance(m, H.Block)]
    hd.correct(rows)                           # no gradients: nothing to recompute
    assert len(runs) == 2
    for hook in hooks:
        hook.remove()


def test_a_frozen_embedding_stays_the_targets_and_stays_out_of_the_optimizer(model, tok, tmp_path):
    def embedding(hd):
        return next(m for m in hd.net.modules() if isinstance(m, torch.nn.Embedding)).weight
    rows = varied(model, tok, 4)
    for train in (False, True):
        hd = new_hd(model, tok, train_embedding=train)
        before = {n: p.detach().clone() for n, p in hd.net.named_parameters()}
        in_optimizer = any(p is embedding(hd) for g in hd.make_optimizer().param_groups for p in g["params"])
        assert embedding(hd).requires_grad == in_optimizer == train
        hd.train(rows, epochs=1, batch_size=4, progress=False)
        changed = {n for n, p in hd.net.named_parameters() if not torch.equal(p, before[n])}
        name = next(n for n, p in hd.net.named_parameters() if p is embedding(hd))
        assert changed == set(before) - ({name} if not train else set())
        if not train:
            assert torch.equal(embedding(hd), model.get_input_embeddings().weight)     # still the target's
    hd = new_hd(model, tok, train_embedding=False)
    hd.save(tmp_path / "ckpt")
    assert not embedding(H.HyperDAS.load(tmp_path / "ckpt", model, tok)).requires_grad


def test_adamw_is_fused_exactly_when_every_parameter_is_on_cuda(model, tok):
    assert not new_hd(model, tok).make_optimizer().defaults["fused"]
    if torch.cuda.is_available():
        assert new_hd(make_model().cuda(), tok).make_optimizer().defaults["fused"] is True


# --------------------------------------------------------------------------------------------------
# Several processes: the command line under torchrun


ARGV = ["--domain", "city", "--epochs", "1", "--batch_size", "4", "--save_every", "1"]


def tiny_world(patch, n):
    """The command line on the tiny target and n pairs (patch = monkeypatch.setattr, or setattr in a worker).
    At batch 4, 9 pairs make steps of 4, 4 and 1 example: one process's share of the last is empty; 11 pairs
    end with a step of 3: one process has one micro-batch there, the other two."""
    rows = varied(make_model(), make_tokenizer(), n)
    patch(toy_world, "toy_target", lambda domain, device=None, arch="llama", position="last": (make_model(), make_tokenizer()))
    patch(H, "ravel_examples", lambda domain, split, *a, **k: list(rows))
    patch(cli, "ravel_ready", lambda: None)
    patch(H.HyperDAS, "make_optimizer", sgd)          # its momentum is resumed from the checkpoint


def worker(out):
    """One torchrun process: train on 9 pairs with 2 micro-batches per process, interrupted in step 2 and
    resumed; check that a sharded evaluation returns each row's verdict in order; train on 11 pairs."""
    torch.set_num_threads(1)
    tiny_world(setattr, 9)
    with H.processes("cpu"):
        argv = ARGV + ["--out", str(out / "9"), "--grad_accum", "2"]
        forward, calls = H.HyperDAS.forward, []

        def interrupted(self, *args, **kwargs):
            calls.append(torch.is_grad_enabled())
            if calls.count(True) == 3:      # the first micro-batch of step 2, on every process
                raise KeyboardInterrupt
            return forward(self, *args, **kwargs)
        H.HyperDAS.forward = interrupted
        with pytest.raises(SystemExit):
            cli.main(argv)
        H.HyperDAS.forward = forward
        cli.main(argv)
        hd = H.HyperDAS.load(out / "9" / "checkpoint", make_model(), make_tokenizer())
        probe = [example(c, CITIES[(i + 1) % 8]) for i, c in enumerate(CITIES + ["Oslo"])]
        predicted = make_tokenizer().convert_ids_to_tokens(hd.forward(probe)[0][:, -2].argmax(-1).tolist())
        hit = [1, 4, 6, 7]                  # rows of both processes' slices get their own prediction as label
        probe = [dict(e, counterfactual_target=predicted[i] if i in hit else "<unk>") for i, e in enumerate(probe)]
        got = hd.correct(probe, batch_size=2)
        if H.is_main():
            (out / "correct.json").write_text(json.dumps({"got": got, "expected": [i in hit for i in range(9)]}))
        tiny_world(setattr, 11)
        cli.main(ARGV + ["--out", str(out / "11"), "--grad_accum", "2"])


def test_torchrun_equals_one_process_with_the_whole_batch(tmp_path, monkeypatch):
    """2 processes x 2 micro-batches give the weights, history and scores of one process with the whole batch
    of 4; a run interrupted there resumes; only rank 0 prints and writes; evaluation is gathered in order."""
    single = {}
    for n in (9, 11):
        tiny_world(monkeypatch.setattr, n)
        single[n] = cli.main(ARGV + ["--out", str(tmp_path / "one" / str(n))])
    start = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "test_scale.py"), str(tmp_path / "two")], env=env, capture_output=True,
                          text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    print(f"torchrun: {time.time() - start:.1f} s")
    assert log.count("resuming") == 1 and log.count("saved ") == 2 and log.count("interrupted") == 1, log[-4000:]
    for n in (9, 11):
        run = lambda where: tmp_path / where / str(n)
        history = lambda where: json.loads((run(where) / "checkpoint" / "training.json").read_text())["history"]
        assert [r["step"] for r in history("two")] == [1, 2, 3]
        assert_same_history(history("one"), history("two"))
        assert_same_weights(load_file(run("one") / "checkpoint" / "weights.safetensors"),
                            load_file(run("two") / "checkpoint" / "weights.safetensors"))
        assert json.loads((run("two") / "results.json").read_text())["mode"] == single[n]["mode"]
    verdicts = json.loads((tmp_path / "two" / "correct.json").read_text())
    assert verdicts["got"] == verdicts["expected"]


def test_the_command_line_refuses_a_batch_that_does_not_split_before_any_work(monkeypatch, tmp_path):
    def expensive(*args, **kwargs):
        raise AssertionError("expensive work started before the bad input was refused")
    for module, name in ((toy_world, "toy_target"), (H, "ravel_examples"), (cli, "ravel_ready")):
        monkeypatch.setattr(module, name, expensive)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--batch_size", "16", "--grad_accum", "3", "--out", str(tmp_path)])
    message = str(exit_info.value.code)
    assert message.startswith("error: batch_size 16 does not split into grad_accum=3") and "\n" not in message


def test_a_batch_that_does_not_split_over_the_processes_is_refused_in_one_line(monkeypatch):
    import distributed
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    with pytest.raises(ValueError, match="does not split over 2 processes") as err:
        H.check_batch(5)
    with pytest.raises(ValueError, match="each process's 3 examples do not split into grad_accum=2"):
        H.check_batch(6, 2)
    H.check_batch(8, 2)
    assert "\n" not in str(err.value)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
