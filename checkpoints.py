"""HyperDAS checkpoints: weights, configuration and (to resume) optimizer moments, step, history and the
run's definition, in a folder of safetensors and JSON files replaced as a whole (files.write_checkpoint). A
run resumes only if it is the same run. hyperdas.py re-exports these; nothing here imports hyperdas.py.
"""
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from distributed import barrier, is_main
from files import checkpoint_path, is_checkpoint, read_json, read_tensors, write_checkpoint


def save_checkpoint(hd, path, optimizer=None, run=None):
    """Weights and configuration, and with an optimizer everything needed to resume: its moments, the step,
    the history and what defines the run. Under torchrun every process calls it: rank 0 writes while the
    others wait (a save called on rank 0 alone would wait for them forever)."""
    if is_main():
        state = {k: v.detach().contiguous().cpu() for k, v in hd.net.state_dict().items()}
        info = {"method": hd.method, "config": asdict(hd.cfg), "attributes": hd.attributes, "domains": hd.domains,
                "target": getattr(hd.model, "name_or_path", ""), "step": hd.step}
        files = {"weights.safetensors": lambda p: save_file(state, str(p)),
                 "config.json": lambda p: p.write_text(json.dumps(info, indent=2))}
        if optimizer is not None:
            tensors = {f"{idx}.{k}": torch.as_tensor(v).contiguous().cpu()
                       for idx, st in optimizer.state_dict()["state"].items() for k, v in st.items()}
            meta = {"step": hd.step, "history": hd.history, "run": run}
            files["optimizer.safetensors"] = lambda p: save_file(tensors, str(p))
            files["training.json"] = lambda p: p.write_text(json.dumps(meta))
        write_checkpoint(path, files)
    barrier()


def checkpoint_info(path, known_options):
    """A checkpoint folder's config.json, or one line on why the folder is not a checkpoint this version reads."""
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a HyperDAS checkpoint (no config.json in it).")
    info = read_json(path / "config.json")
    if not is_checkpoint(path) or set(info["config"]) - known_options:
        raise ValueError(f"{path / 'config.json'} is not a HyperDAS or DAS checkpoint's configuration "
                         "(a model folder, or a checkpoint of another version).")
    return info


def load_weights(hd, path):
    file = Path(path) / "weights.safetensors"
    try:
        hd.net.load_state_dict(read_tensors(file, hd.device))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise ValueError(f"{file} does not fit this model and configuration ({first}).") from None


def fingerprint(examples):
    """A short hash of the training examples, so a resumed run is known to see the same data."""
    return hashlib.sha256(json.dumps(examples, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(saved, now, prefix=""):
    """'key: saved -> now' for every leaf where two JSON-like dicts differ."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}" if key != "data" else f"{prefix}data: other examples")
    return out


def with_defaults(run, defaults):
    """A saved run record whose config lacks options added since (e.g. das_position) gets their `defaults`,
    which is what that run used."""
    if not run or "config" not in run:
        return run
    return dict(run, config={**defaults, **run["config"]})


def resume(hd, path, optimizer, run):
    """Continue the run saved at path: the same settings, schedule and data, or a one-line refusal."""
    path = checkpoint_path(path)
    meta = read_json(path / "training.json")
    saved = with_defaults(meta.get("run"), asdict(type(hd.cfg)()))
    if saved != run:
        diff = "; ".join(differences(saved or {}, run)) or "an older checkpoint format"
        raise ValueError(f"{path} holds a different run ({diff}): repeat its settings and data to resume it, "
                         f"or start fresh in another output directory (or delete {path}).")
    load_weights(hd, path)
    state = {}
    for key, value in read_tensors(path / "optimizer.safetensors").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value.to(hd.device) if value.dim() else value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    hd.step, hd.history = meta["step"], meta["history"]
