"""Run a post-hoc job on one or many processes with Lightning Fabric (the only Lightning import here).

``Fabric(accelerator, devices=N, num_nodes=M, strategy="ddp")`` starts the processes (gloo on CPU,
NCCL on GPUs); :func:`devinterp.posthoc.runner.run_job` then shares the snapshots out. With
``devices=1, num_nodes=1`` it is the same code path in a single process.

Launching: with ``strategy="ddp"`` Fabric starts the other local processes by re-running the
command line (``python -m devinterp analyze ...``), so from Python code use ``strategy="ddp_spawn"``
(the job must then pickle: factories as ``"package.module:name"`` strings or module-level
callables). On several nodes, run the same command on every node with the usual
``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK`` environment (or under SLURM / torchrun, which
Fabric detects).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

from devinterp.errors import DevinterpError, InvalidInputError, exit_status
from devinterp.posthoc.runner import Job, RunSummary, run_job

__all__ = ["FabricComm", "launch"]


class FabricComm:
    """:class:`devinterp.posthoc.runner.Comm` over a launched ``lightning.fabric.Fabric``."""

    def __init__(self, fabric: Any):
        self.fabric = fabric
        self.global_rank = int(fabric.global_rank)
        self.world_size = int(fabric.world_size)
        self.device = fabric.device

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        return self.fabric.broadcast(obj, src=src)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            self.fabric.barrier()


def _threads_per_process(local_processes: int) -> None:
    """Split the CPU cores between the local processes unless the user chose (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" in os.environ or local_processes <= 1:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))


def _work(fabric: Any, job: Job, log: Callable[[str], None] | None, local_processes: int) -> RunSummary | None:
    comm = FabricComm(fabric)
    if comm.device.type == "cpu":
        _threads_per_process(local_processes)
    try:
        summary = run_job(job, comm, log=log)
    except (DevinterpError, OSError) as exc:
        _end_process_group(comm)  # a clean exit, not "terminate called without an active exception"
        if comm.global_rank != 0:  # rank zero reports the error; the others leave with its status
            raise SystemExit(exit_status(exc)) from None
        raise
    return summary if comm.global_rank == 0 else None


def _end_process_group(comm: FabricComm) -> None:
    """Leave the process group so that every rank can exit normally after an error."""
    if comm.world_size <= 1:
        return
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # exiting anyway
        pass


def launch(job: Job, *, devices: int | str = 1, num_nodes: int = 1, accelerator: str = "cpu",
           strategy: str = "ddp", log: Callable[[str], None] | None = None,
           timeout_s: float = 7 * 24 * 3600) -> RunSummary | None:
    """Run ``job`` on ``devices`` processes per node × ``num_nodes`` nodes.

    Args:
        job: The job (see :class:`devinterp.posthoc.runner.Job`).
        devices: Processes per node (``"auto"``: one per GPU, or 1 on CPU).
        num_nodes: Nodes.
        accelerator: ``"cpu"``, ``"cuda"``, ``"gpu"``, ``"mps"`` or ``"auto"``.
        strategy: ``"ddp"`` (re-runs the command line for the other local processes; what the CLI
            uses) or ``"ddp_spawn"`` (spawns; for Python code). Ignored with one process.
        log: Where rank zero prints status lines (e.g. ``print``); None: quiet.
        timeout_s: Timeout of the collectives (one round waits for its slowest snapshot).

    Returns:
        The :class:`RunSummary` on global rank zero; None on the other ranks (``"ddp_spawn"``
        returns rank zero's summary to the caller).
    """
    if isinstance(devices, bool) or not (devices == "auto" or (isinstance(devices, int) and devices >= 1)):
        raise InvalidInputError(f"devices must be a positive integer or 'auto', got {devices!r}")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise InvalidInputError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    if strategy not in ("ddp", "ddp_spawn"):
        raise InvalidInputError(f"strategy must be 'ddp' or 'ddp_spawn', got {strategy!r}")
    from lightning.fabric import Fabric

    single = devices in (1, "auto") and num_nodes == 1 and (devices == 1 or accelerator == "cpu")
    kwargs: dict[str, Any] = dict(accelerator=accelerator, devices=1 if devices == "auto" and accelerator == "cpu" else devices,
                                  num_nodes=num_nodes)
    if not single:
        from lightning.fabric.strategies import DDPStrategy

        # One round waits for the slowest snapshot of the round (an LLC of a big model can take
        # hours): the collectives must not time out at torch's default 30 minutes.
        kwargs["strategy"] = DDPStrategy(start_method="popen" if strategy == "ddp" else "spawn",
                                         timeout=timedelta(seconds=timeout_s))
    fabric = Fabric(**kwargs)
    local = devices if isinstance(devices, int) else 1
    if single:  # no other process: the job may hold anything (lambdas, tensors...)
        return fabric.launch(_work, job, log, local)
    # Lightning walks launch arguments and results with apply_to_collection, which rejects frozen
    # dataclasses: hand them over pickled.
    out = fabric.launch(_work_pickled, pickle.dumps((job, log, local)))
    return pickle.loads(out) if out is not None else None


def _work_pickled(fabric: Any, payload: bytes) -> bytes | None:
    job, log, local = pickle.loads(payload)
    summary = _work(fabric, job, log, local)
    return pickle.dumps(summary) if summary is not None else None
