"""Several processes for hyperdas.py (torchrun); it imports nothing from the project.

`torchrun --nproc_per_node N hyperdas.py ...` trains one hypernetwork in DistributedDataParallel; the frozen
target is replicated on every GPU and never wrapped. Every process sees the same global batches and
computes its own slice of each; DDP averages the gradients and train_step scales them back to a sum, so N
processes give the weights of one process with the whole batch. Evaluation is split the same way and
gathered. Rank 0 alone prints, shows progress and writes. DDP rather than FSDP, because the whole
hypernetwork fits one GPU: the memory plan (benchmarks/memory.py) puts Llama-3-8B's run at 74 GB, 63 GB
with checkpoint_blocks and a frozen embedding. In one process every function here is a no-op.
"""
import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

def world():
    """(this process's rank, the number of processes): (0, 1) without torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    return world()[0] == 0


@contextlib.contextmanager
def processes(device=None):
    """Inside the block, a process started by torchrun (even alone: one GPU runs the same DDP path) joins
    the process group (NCCL on CUDA, gloo on CPU) and yields its device, cuda:LOCAL_RANK on CUDA. Otherwise
    (or when the group is already joined) it yields `device` as given."""
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if not torchrun or dist.is_initialized():
        yield device
        return
    cuda = str(device or "cuda").startswith("cuda") and torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # A long timeout: the others wait while rank 0 builds the toy target or filters the pairs (main_first).
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2), device_id=device if cuda else None)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def split(items, n):
    """items cut into n contiguous parts whose sizes differ by at most one: rank r takes part r."""
    return [items[i * len(items) // n:(i + 1) * len(items) // n] for i in range(n)]


def collective_device():
    """Where tensors for a collective must be: this GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(tensor):
    """The sum over all processes of a tensor (on the collective's device; the tensor itself in one process)."""
    if world()[1] == 1:
        return tensor
    total = tensor.to(collective_device(), copy=True)
    dist.all_reduce(total)
    return total


def on_any(*flags):
    """Each flag, true if it is true on any process: every process must take the same decision (to save, to
    stop after a signal), or one would wait forever for the others at its next collective."""
    if world()[1] == 1:
        return flags
    return [bool(f) for f in all_sum(torch.tensor([int(f) for f in flags])).tolist()]


def gather(values):
    """Every process's list, concatenated in rank order (with split(), the original order)."""
    if world()[1] == 1:
        return values
    parts = [None] * world()[1]
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def from_main(make):
    """make() run on rank 0 alone and its result sent to every process, e.g. the filtered pairs: every
    process then trains on exactly the same examples."""
    if world()[1] == 1:
        return make()
    box = [make() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    if world()[1] > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first while the others wait, then they run it: rank 0 fetches or builds what
    the others then find in its cache (RAVEL's data, the toy target, a downloaded model)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:          # also when rank 0 fails: the others then meet the same error instead of waiting
        if is_main():
            barrier()


def data_parallel(hd):
    """hd.net in DistributedDataParallel under torchrun (None in one process). Building it sends rank 0's
    weights to all. The gradients live in DDP's communication buckets, not in a second copy (12.7 GB at
    Llama-3-8B). A DAS batch uses only its concepts' bases, hence find_unused_parameters there."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return DistributedDataParallel(hd.net, device_ids=[hd.device.index] if hd.device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, find_unused_parameters=hd.method == "das")


@contextlib.contextmanager
def through(hd, ddp, sync=True):
    """Inside the block, hd.net's forward runs through the DDP wrapper (DDP averages the gradients of a
    forward made through it, at its backward; without sync they only accumulate here, for a micro-batch
    before the last). Everywhere else hd.net stays the plain module, so saving and evaluation see no wrapper."""
    if ddp is None:
        yield
        return
    net, hd.net = hd.net, ddp
    try:
        with contextlib.nullcontext() if sync else ddp.no_sync():
            yield
    finally:
        hd.net = net


def check_batch(batch_size, grad_accum=1):
    """One line if a global batch does not split evenly over the processes and then into micro-batches."""
    n = world()[1]
    if grad_accum < 1:
        raise ValueError(f"grad_accum={grad_accum} must be at least 1.")
    if n > 1 and batch_size % n:
        raise ValueError(f"batch_size {batch_size} does not split over {n} processes: give a multiple of {n} "
                         f"(each process takes batch_size / {n} examples of every batch).")
    if batch_size // n % grad_accum:
        share = f"each process's {batch_size // n} examples do" if n > 1 else f"batch_size {batch_size} does"
        raise ValueError(f"{share} not split into grad_accum={grad_accum} equal micro-batches: give a "
                         f"batch_size that is a multiple of {n * grad_accum}.")
