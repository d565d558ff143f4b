"""The run's view of torch.distributed: process group, device, mesh, reductions, checkpoints.

One code path for one process and for torchrun: without torchrun's environment the world is a
single rank and every collective is skipped; checkpoints go through DCP (torch.distributed.
checkpoint) either way, so a checkpoint written by any (dp, tp) layout loads into any other.
The parallelism itself (tensor parallel plan, FSDP2) is applied from outside the model by
`lavin_fast.parallel`.

Checkpoint folder (`step-N/`):
    dcp/                   trainable parameters and optimizer state, DCP format (sharded by rank)
    extra.pt               scheduler state, step, every rank's RNG state (rank 0 writes it)
    adapters.safetensors   the adapters as one file, the same as a single-process run's
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh

from lavin_fast import parallel
from lavin_fast.checkpoints.adapters import save_adapter_state
from lavin_fast.io import atomic_write
from lavin_fast.run_folder import RunFolderError, RunLock


@dataclass
class Session:
    """Where this process sits: rank, device, mesh; and the few collective steps training takes."""

    cfg: object
    rank: int
    world: int
    device: torch.device
    mesh: DeviceMesh | None
    lock: RunLock | None = None        # rank 0's lock on the run folder

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.mesh["dp"].size() if self.mesh is not None else 1

    @property
    def tp_size(self) -> int:
        return self.mesh["tp"].size() if self.mesh is not None else 1

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    # ---- model -------------------------------------------------------------------------------

    def tensor_parallel_plan(self) -> Callable[[nn.Module], None] | None:
        """What `load_lavin(parallelize=...)` applies before loading: the TP plan over
        mesh["tp"], or None with one tensor-parallel rank."""
        if self.tp_size == 1:
            return None
        return functools.partial(parallel.apply_tensor_parallel, tp_mesh=self.mesh["tp"],
                                 sequence_parallel=self.cfg.sequence_parallel)

    def data_parallel(self, model: nn.Module) -> nn.Module:
        """FSDP2 over mesh["dp"] for the trainable parameters (nothing with one data-parallel rank)."""
        if self.dp_size > 1:
            parallel.apply_data_parallel(model, self.mesh["dp"])
        return model

    def autocast(self):
        """bf16/fp16 autocast on CUDA when the backbone is in that dtype; nothing on CPU."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.dtype, torch.bfloat16)
        return torch.autocast("cuda", dtype=dtype, enabled=self.cfg.dtype != "fp32")

    # ---- collectives ---------------------------------------------------------------------------

    def all_reduce_sum(self, value):
        """Sum over all ranks (of the data-parallel group: tensor-parallel ranks hold equal
        copies). int/float in, same type out; a tensor in, a tensor out."""
        if self.mesh is None or self.dp_size == 1:
            return value
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        dist.all_reduce(tensor, group=self.mesh["dp"].get_group())
        if isinstance(value, torch.Tensor):
            return tensor.to(value.dtype)
        return type(value)(tensor.item())

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order (all ranks get the list)."""
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ---- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> None:
        model_state, optim_state = get_state_dict(model, optimizer,
                                                  options=StateDictOptions(ignore_frozen_params=True))
        with self._quiet_dcp():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / "dcp"))
        self.export_adapters(model, folder / "adapters.safetensors")
        if self.is_main:
            atomic_write(folder / "extra.pt", lambda tmp: torch.save(extra, tmp))
        self.barrier()

    def load_checkpoint(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        model_state, optim_state = get_state_dict(model, optimizer,
                                                  options=StateDictOptions(ignore_frozen_params=True))
        state = {"model": model_state, "optim": optim_state}
        with self._quiet_dcp():
            try:
                dcp.load(state, checkpoint_id=str(folder / "dcp"))
            except CheckpointException as error:   # a BaseException: the ranks' tracebacks in one text
                raise RuntimeError(f"cannot read {folder / 'dcp'}: {str(error).strip().splitlines()[-1]}") from None
        # strict=False only lets the frozen weights stay out: dcp.load has already failed on any
        # trainable key or optimizer state the checkpoint lacks.
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        return torch.load(folder / "extra.pt", weights_only=True)

    @contextlib.contextmanager
    def _quiet_dcp(self):
        """DCP warns that it runs without a process group: in a single process that is the plan."""
        with warnings.catch_warnings():
            if self.world == 1:
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield

    def export_adapters(self, model: nn.Module, path: Path) -> None:
        """The trainable parameters gathered whole and written by rank 0 as one safetensors file."""
        full = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        if self.is_main:
            save_adapter_state(full, model.config, path)
        self.barrier()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def start(cfg, claim: Callable[[object], tuple[object, object]],
          prepare: Callable[[object], object]) -> Session:
    """Join torchrun's process group (if any), pick the device, build the (dp, tp) mesh, and
    let rank 0 `claim(cfg)` the run folder (returning the config and the held lock) and write
    what the run needs before the others `prepare(cfg)`, which only finds it. The trainer
    passes both: this module sits beneath it and never imports it. A refusal of rank 0 (a
    ValueError: the folder is another run's, or locked, ...) is raised by every rank."""
    rank, world = parallel.init_distributed()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    mesh = parallel.build_mesh(cfg.dp, cfg.tp)
    lock, refusal = None, None
    if rank == 0:
        try:
            cfg, lock = claim(cfg)
        except ValueError as error:
            refusal = error
    if world > 1:
        verdict = [None if refusal is None else str(refusal)]
        dist.broadcast_object_list(verdict, src=0)     # also the barrier before the others read
        if verdict[0] is not None:
            dist.destroy_process_group()
            raise refusal if rank == 0 else RunFolderError(verdict[0])
        if rank != 0:
            cfg = prepare(cfg)   # rank 0 wrote everything: this only finds it
    elif refusal is not None:
        raise refusal
    return Session(cfg=cfg, rank=rank, world=world, device=device, mesh=mesh, lock=lock)
