"""The body of the 2-process FSDP2 (``fully_shard``) tests: run by torch.multiprocessing on CPU with gloo.

Lightning's FSDP strategies refuse CPU, so the callbacks' hooks are driven here by a minimal stand-in for the
Trainer (the attributes the hooks read, and collectives through torch.distributed), exactly in Lightning's order.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lightning_accel import MagnitudePruning, QuantizationAwareTraining, compute_masks
from lightning_accel.quantization.fake_quant import symmetric_weight_scale
from tests.helpers import TinyModule


class _Strategy:
    """The two collectives the callbacks use, over the default process group."""

    def broadcast(self, value, src=0):
        holder = [value]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def reduce(self, tensor, reduce_op="max"):
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if reduce_op == "max" else dist.ReduceOp.SUM)
        return tensor


def _trainer(rank: int, optimizer, total_steps: int) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=0,
        is_global_zero=rank == 0,
        world_size=2,
        estimated_stepping_batches=total_steps,
        optimizers=[optimizer],
        strategy=_Strategy(),
        log_every_n_steps=10**6,
        checkpoint_callbacks=[],
        fast_dev_run=False,
        callbacks=[],
    )


def _shard(module: TinyModule) -> None:
    mesh = init_device_mesh("cpu", (2,))
    for layer in (module.net.conv, module.net.fc1, module.net.fc2):
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)


def _full(module) -> dict[str, torch.Tensor]:
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in module.named_parameters()
    }


def run(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks, as FSDP expects
        results = {"pruning": _prune(rank), "qat": _quantize(rank)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _batches(rank: int, steps: int):
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as a DistributedSampler gives
    return [
        (torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 4, (8,), generator=generator))
        for _ in range(steps)
    ]


def _prune(rank: int) -> dict:
    module = TinyModule()
    module.log = lambda *args, **kwargs: None
    pruning = MagnitudePruning(0.75, start_step=0, end_step=4, every_n_steps=2)
    steps = 6
    pruning.setup(None, module, "fit")  # before sharding: Lightning calls setup before the strategy wraps
    _shard(module)
    sharded = {name: isinstance(p, DTensor) for name, p in module.named_parameters()}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    trainer = _trainer(rank, optimizer, steps)
    pruning.on_train_start(trainer, module)
    independent = []
    for step, (x, y) in enumerate(_batches(rank, steps)):
        trainer.global_step = step
        params = dict(module.named_parameters())
        before = {name: params[name].full_tensor() for name in ("net.conv.weight", "net.fc1.weight", "net.fc2.weight")}
        previous = pruning.masks
        pruning.on_train_batch_start(trainer, module, (x, y), step)
        if any(not torch.equal(previous[name], mask) for name, mask in pruning.masks.items()):
            # What the new masks must be: the global threshold over the full tensors, recomputed independently.
            expected = compute_masks(before, pruning.sparsity_at(step), scope=pruning.scope, previous=previous)
            independent.append((step, expected, pruning.masks))
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(module.named_parameters())
    local_zeros_match = all(
        not (params[name].to_local()[~torch.chunk(mask, 2, dim=0)[rank]] != 0).any()
        and params[name].to_local().shape == torch.chunk(mask, 2, dim=0)[rank].shape
        for name, mask in pruning.masks.items()
    )
    return {
        "sharded": sharded,
        "full": _full(module),
        "masks": pruning.masks,
        "metrics": dict(pruning._metrics),
        "local_zeros_match": local_zeros_match,
        "independent_equal": all(
            all(torch.equal(expected[n], got[n]) for n in got) for _, expected, got in independent
        ),
        "due_steps": [step for step, _, _ in independent],
    }


def _quantize(rank: int) -> dict:
    module = TinyModule()
    module.log = lambda *args, **kwargs: None
    qat = QuantizationAwareTraining(start_step=0)
    trainer = _trainer(rank, None, 4)
    qat.setup(trainer, module, "fit")  # prepares the fake-quant modules before sharding
    _shard(module)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    trainer.optimizers = [optimizer]
    qat._resolve_steps(trainer)
    for step, (x, y) in enumerate(_batches(rank, 3)):
        trainer.global_step = step
        qat.on_train_batch_start(trainer, module, (x, y), step)
        F.cross_entropy(module(x), y).backward()
        qat.on_train_batch_end(trainer, module, None, (x, y), step)
        optimizer.step()
        optimizer.zero_grad()
    # The weight scales seen in forward: FSDP unshards the weight for forward, so they cover the full weight.
    full = _full(module)
    x, _ = _batches(rank, 1)[0]
    module(x)  # one more forward (observing) to compare its scale with the current full weight
    fc1 = module.net.fc1
    expected_scale = symmetric_weight_scale(full["net.fc1.weight"], fc1.weight_quant.qmax)
    return {
        "fc1_scale": fc1.weight_quant.scale.clone(),
        "fc1_scale_matches_full_weight": torch.allclose(fc1.weight_quant.scale, expected_scale),
        "ranges": {name: (q.scale.clone(), q.zero_point.clone()) for name, q in qat._quantizers.items()},
        "calibrated": all(q.calibrated for q in qat._quantizers.values()),
    }
