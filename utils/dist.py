"""torchrun / DistributedDataParallel helpers: a no-op in a plain single-process run.

``torchrun --nproc_per_node=N main.py ...`` sets RANK, LOCAL_RANK and WORLD_SIZE;
we read them as pytorch/examples' imagenet and nanoGPT do, and use NCCL on CUDA, gloo
on the CPU (https://pytorch.org/docs/stable/distributed.html#which-backend-to-use).
"""
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Only this process prints bars and writes files."""
        return self.rank == 0


def from_env() -> Dist:
    """This process's place, from the variables torchrun sets (a single process without them)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), world_size)


def init(info: Dist, device: torch.device) -> torch.device:
    """Join the process group under torchrun; returns the device, with this process's GPU."""
    if not info.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def cleanup(wait: bool = False) -> None:
    """Leave the process group; ``wait``: first wait for every process to get here.

    After training, rank 0 still writes the galleries while the others are done; a
    process that tore its gloo group down that early was seen to abort at exit (once
    in 17 CI runs), so a run that succeeded leaves together.
    """
    if wait and active():
        dist.barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the processes, in place; unchanged when there is only one."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over the processes, in place; unchanged when there is only one."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics).

    Each process updates its own running statistics in its last forward pass; after
    this, all evaluate the model that rank 0 saves.
    """
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def digest(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers, bit for bit."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather_digests(model: torch.nn.Module) -> list:
    """Every process's ``digest(model)``, in rank order."""
    mine = digest(model)
    if not active():
        return [mine]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def check_replicas(model: torch.nn.Module) -> tuple:
    """(all equal, a line for summary.txt): DDP keeps replicas equal by construction; check it, bit for bit.

    The line is empty in a single process.
    """
    if not active():
        return True, ""
    digests = gather_digests(model)
    same = len(set(digests)) == 1
    return same, (f"DDP: the {len(digests)} processes' weights and buffers are "
                  f"{'identical' if same else 'DIFFERENT'} (sha256 {', '.join(d[:12] for d in digests)})\n")
