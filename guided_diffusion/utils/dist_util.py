"""Process-group setup for one process, ``torchrun`` (single or multi node) and ``mpiexec -n N``.

Everything here also works without a process group (plain ``python script.py``): the world then has
size 1, collectives are no-ops and ``all_gather_object`` returns ``[obj]``.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

# Environment variables that MPI launchers set for every rank (MPICH/Hydra, Open MPI, PMIx, MVAPICH).
_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_MPI_LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")

_state: dict[str, Any] = {"rank": 0, "world_size": 1, "local_rank": 0, "device": None, "launcher": None}


def launcher() -> str:
    """How this process was started: "torchrun", "mpi" or "single" (inspects the environment only)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    if any(v in os.environ for v in _MPI_RANK_VARS):
        return "mpi"
    return "single"


def setup_dist(backend: str | None = None, timeout_minutes: float = 30.0) -> None:
    """Initialise the process group if this process is one of several; idempotent.

    Args:
        backend: "nccl" or "gloo"; None picks nccl when CUDA has a device for every local rank, else gloo.
        timeout_minutes: collective time-out (a rank waiting longer fails instead of hanging forever).
    """
    if _state["launcher"] is not None:
        return
    kind = launcher()
    if kind == "torchrun":
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    elif kind == "mpi":
        rank, world, local_rank, local_world = _setup_mpi_env()
    else:
        rank, world, local_rank, local_world = 0, 1, 0, 1
    _state.update(rank=rank, world_size=world, local_rank=local_rank, launcher=kind)

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        n_dev = torch.cuda.device_count()
        device = torch.device("cuda", local_rank % n_dev)
        torch.cuda.set_device(device)
    else:
        n_dev = 0
        device = torch.device("cpu")
    _state["device"] = device

    if world > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if use_cuda and local_world <= n_dev else "gloo"
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **kwargs,
        )


def _setup_mpi_env() -> tuple[int, int, int, int]:
    """Read rank/size from MPI, agree on MASTER_ADDR/PORT (chosen by rank 0) and export torchrun's vars."""
    from mpi4py import MPI  # imported only under an MPI launcher

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    host = socket.gethostname()
    hosts = comm.allgather(host)
    local_rank = next((int(os.environ[v]) for v in _MPI_LOCAL_RANK_VARS if v in os.environ), None)
    if local_rank is None:
        local_rank = sum(1 for h in hosts[:rank] if h == host)
    local_world = sum(1 for h in hosts if h == host)
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or (
            "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(socket.getfqdn())
        )
        port = os.environ.get("MASTER_PORT") or str(find_free_port())
        endpoint = (addr, port)
    else:
        endpoint = None
    addr, port = comm.bcast(endpoint, root=0)
    os.environ.update(
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_world),
    )
    return rank, world, local_rank, local_world


def find_free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return int(s.getsockname()[1])


def is_distributed() -> bool:
    """True when a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def dev() -> torch.device:
    """The device this rank should use: cuda:LOCAL_RANK when CUDA exists, else cpu."""
    if _state["device"] is None:
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
            return torch.device("cuda", local)
        return torch.device("cpu")
    return _state["device"]


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(_state["rank"])


def get_local_rank() -> int:
    """Rank within this node."""
    return int(_state["local_rank"])


def get_world_size() -> int:
    """Number of ranks (1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_main_process() -> bool:
    """True on global rank 0."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; no-op without a process group."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[dev().index])
        else:
            dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Picklable ``obj`` from every rank, ordered by rank (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (``obj`` itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sync_params(params: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values of ``params`` (tensors on ``dev()``) to every rank."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data if isinstance(p, torch.nn.Parameter) else p, src=0)


def cleanup(wait: bool = True) -> None:
    """Barrier (unless ``wait`` is False: a rank leaving on an error must not wait for the others), then
    destroy the process group (if any) and forget the setup."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            barrier()
        dist.destroy_process_group()
    _state.update(rank=0, world_size=1, local_rank=0, device=None, launcher=None)
