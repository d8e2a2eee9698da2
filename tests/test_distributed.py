"""Data-parallel training in the engine: N processes (gloo on CPU, started by torchrun's launcher API)
end with the parameters one process reaches on the same global batches."""

from __future__ import annotations

import uuid

import pytest
import torch
from torch import nn
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.utils.data import TensorDataset

from strata.models.distributed import GlobalBatchSampler
from strata.models.engine import Engine, OptimizerConfig, TrainConfig, TrainingHooks
from tests.conftest import free_port


class LastBlockProbe(nn.Module, TrainingHooks):
    """The tiny ViT with a linear head and its last block (``part``: all of it, or its MLP) trainable."""

    def __init__(self, classes: int, part: str = "block"):
        from strata.models.backbones import build_backbone

        super().__init__()
        self.backbone = build_backbone("tiny")
        self.head = nn.Linear(self.backbone.embed_dim, classes)
        block = self.backbone.blocks[-1]
        self.trainable = [*(block if part == "block" else block.mlp).parameters(), *self.head.parameters()]
        for param in self.trainable:
            param.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.trainable

    def training_loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(self.backbone(inputs)), labels)


def train_probe(samples: int, batch_size: int, optimizer: str, part: str) -> dict[str, torch.Tensor]:
    """One process's training: the same data, model and seed everywhere; only the process group differs."""
    from strata.models.distributed import init_distributed
    from strata.models.engine import seed_everything

    init_distributed()
    torch.set_num_threads(1)
    seed_everything(0)
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.rand(samples, 3, 32, 32, generator=generator), torch.randint(0, 4, (samples,), generator=generator)
    )
    probe = LastBlockProbe(classes=4, part=part)
    config = TrainConfig(epochs=2, batch_size=batch_size, optimizer=OptimizerConfig(name=optimizer, lr=1e-3))
    Engine("cpu", seed=3, show_progress=False).fit(probe, data, config)
    return {name: param.detach().clone() for name, param in probe.named_parameters() if param.requires_grad}


def launch(processes: int, *args) -> dict[int, dict[str, torch.Tensor]]:
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    return elastic_launch(config, train_probe)(*args)


# Adam trains the MLP only: the attention's key bias has an exactly zero gradient (softmax ignores a shift
# shared by all keys), so its computed gradient is summation noise that Adam's normalisation turns into
# full-size steps whatever the processes do; SGD shows the whole block, attention included, agrees.
@pytest.mark.parametrize(
    ("samples", "batch_size", "optimizer", "part"),
    [(20, 7, "sgd", "block"), (24, 8, "adam", "mlp")],
    ids=["uneven-shares-sgd-block", "even-shares-adam-mlp"],
)
def test_two_gloo_processes_reach_the_parameters_of_one(samples, batch_size, optimizer, part):
    (single,) = launch(1, samples, batch_size, optimizer, part).values()
    parallel = launch(2, samples, batch_size, optimizer, part)
    start = LastBlockProbe(classes=4).state_dict()
    for name, value in single.items():
        assert not torch.equal(value, start[name]), f"{name} did not train"
        assert torch.equal(parallel[0][name], parallel[1][name]), f"the processes disagree on {name}"
        torch.testing.assert_close(parallel[0][name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_global_batches_are_split_into_shares_that_cover_them_exactly():
    for size, batch, processes, drop_last in [(20, 7, 2, False), (20, 8, 3, True), (9, 4, 2, False), (5, 5, 1, False)]:
        shares = [
            GlobalBatchSampler(size, batch, seed=5, rank=r, world_size=processes, drop_last=drop_last)
            for r in range(processes)
        ]
        whole = GlobalBatchSampler(size, batch, seed=5, drop_last=drop_last or size % batch < processes)
        for epoch in (0, 1):
            for sampler in (*shares, whole):
                sampler.set_epoch(epoch)
            per_rank = [s.local_batches() for s in shares]
            assert len({len(b) for b in per_rank}) == 1, "every process must take the same number of steps"
            merged = [sorted(sum((b[step] for b in per_rank), [])) for step in range(len(per_rank[0]))]
            assert merged == [sorted(b) for b in whole.local_batches()]
    assert GlobalBatchSampler(10, 4, seed=5).local_batches() != GlobalBatchSampler(10, 4, seed=6).local_batches()
