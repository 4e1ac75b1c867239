"""Files and interrupts for hyperdas.py and toy_world.py: checkpoint folders replaced as a whole, a written
file never half there, a folder checked writable before the work, and Ctrl-C deferred to the end of a step.
It imports nothing from the project."""
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file


def atomic_write(path, write):
    tmp = Path(f"{path}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_checkpoint(path, files, mine=None):
    """Write {name: writer(path)} as the directory `path`, replacing the one there as a whole: the files
    go to path.new, then two renames swap it in; a crash between them leaves path.old, which
    checkpoint_path() takes back. A reader never sees a mixed or half-written checkpoint. A non-empty
    folder is replaced only if `mine(path)` (default is_checkpoint) says this project wrote it."""
    path = Path(path)
    new, old = path.with_name(path.name + ".new"), path.with_name(path.name + ".old")
    if path.is_dir() and any(path.iterdir()) and not (mine or is_checkpoint)(path):
        raise ValueError(f"{path} exists and is not a HyperDAS checkpoint; choose a new or empty directory.")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    for name, write in files.items():
        write(new / name)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def is_checkpoint(path):
    """A directory this project wrote: its config.json names a method (a model folder's config.json does not)."""
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((Path(path) / "config.json").read_text())
        return isinstance(info, dict) and info.get("method") in ("hyperdas", "das") and "config" in info
    return False


def checkpoint_path(path):
    """The checkpoint directory to read, after taking back path.old if a save was cut between its renames."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)
    return path


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is damaged ({err}); delete the checkpoint and train again.") from None


def read_tensors(path, device="cpu"):
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is damaged or unreadable ({err}); delete the checkpoint and train again.") from None


@contextlib.contextmanager
def deferred_interrupts():
    """Inside the block, a first Ctrl-C (SIGINT) or SIGTERM only sets a flag (the list yielded), so that a
    loop can finish its step, save and stop cleanly instead of dying half-way through an optimizer step; a
    second one stops at once. A no-op outside the main thread, where signal handlers cannot be set."""
    caught = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum, frame):
        if caught:
            raise KeyboardInterrupt("stopped at once by a second signal; the last save stands")
        caught.append(signum)
        print("\nstopping after this step (again to stop at once) ...", file=sys.stderr)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def writable(folder, what):
    """Make sure `folder` can be created and written before any work that would end by writing there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write {what} at {folder} ({err.strerror or err}); choose another folder.") from None
    return folder
