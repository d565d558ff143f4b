"""Run under torchrun by tests/test_parallel.py: one forward + backward of a tiny LaVIN on a fixed
batch, parallelized from outside with lavin_fast.parallel, results written for the test to judge.

    torchrun --standalone --nproc_per_node N tests/parallel_worker.py OUT DP TP SEQUENCE_PARALLEL PACKED

Every rank builds the same random model (same seed) and takes its data-parallel share of the
same global batch (PACKED=1: its rows concatenated into one packed row); the loss is the mean over the global batch's answer tokens, as the trainer
computes it. Rank 0 writes OUT/result.pt: the loss, the full gradients of every trainable
parameter, the names of the trainable parameters, and how the frozen and trainable parameters
ended up distributed.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lavin_fast import parallel
from lavin_fast.collate import Batch
from lavin_fast.models.lavin import LaVIN, LaVINConfig


def global_batch() -> Batch:
    gen = torch.Generator().manual_seed(1)
    batch, length = 4, 24
    tokens = torch.randint(3, 500, (batch, length), generator=gen)
    has_image = torch.tensor([True, False, True, False])
    images = torch.randn(2, 3, 56, 56, generator=gen)
    targets = torch.where(torch.rand(batch, length, generator=gen) < 0.4, tokens.roll(-1, 1), -100)
    targets[:, -1] = -100
    return Batch(tokens, targets, has_image, images, image_start=5)


def share(batch: Batch, rank: int, ranks: int) -> Batch:
    """Rows [rank * B / ranks, ...) of the batch, with their images."""
    per = batch.tokens.shape[0] // ranks
    rows = slice(rank * per, (rank + 1) * per)
    first_image = int(batch.has_image[:rows.start].sum())
    images = int(batch.has_image[rows].sum())
    return Batch(batch.tokens[rows], batch.targets[rows], batch.has_image[rows],
                 batch.images[first_image:first_image + images] if images else None, batch.image_start)


def pack(batch: Batch) -> Batch:
    """The batch's rows (no pads in global_batch) as the samples of one packed row."""
    rows, length = batch.tokens.shape
    return Batch(batch.tokens.reshape(1, -1), batch.targets.reshape(1, -1), batch.has_image, batch.images,
                 batch.image_start, lengths=[[length] * rows])


def build_model() -> LaVIN:
    torch.manual_seed(0)
    model = LaVIN(LaVINConfig.from_preset("tiny", adapter_dropout=0.0))
    with torch.no_grad():   # non-zero up-projections, so that every adapter gradient is non-trivial
        for name, param in model.named_parameters():
            if ".conv_B." in name or ".conv_D." in name:
                param.normal_(0, 0.1)
    return model


def main(out: str, dp: int, tp: int, sequence_parallel: bool, packed: bool) -> None:
    rank, _ = parallel.init_distributed()
    mesh = parallel.build_mesh(dp, tp)
    model = build_model()
    batch = global_batch()
    total_tokens = batch.answer_tokens
    if mesh is not None:
        batch = share(batch, mesh["dp"].get_local_rank(), mesh["dp"].size())
        if tp > 1:
            parallel.apply_tensor_parallel(model, mesh["tp"], sequence_parallel)
        if dp > 1:
            parallel.apply_data_parallel(model, mesh["dp"])
    if packed:
        batch = pack(batch)
    loss = model.loss(batch) * batch.answer_tokens / total_tokens
    loss.backward()
    summed = loss.detach().clone()
    if mesh is not None and dp > 1:
        dist.all_reduce(summed, group=mesh["dp"].get_group())
    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for name, p in model.named_parameters() if p.requires_grad}
    placements = {name: (str(p.device_mesh.mesh_dim_names), str(p.placements)) if isinstance(p, DTensor) else None
                  for name, p in model.named_parameters()}
    if rank == 0:
        torch.save({"loss": summed, "grads": grads, "trainable": sorted(grads), "placements": placements},
                   f"{out}/result.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1")
