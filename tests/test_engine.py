"""The shared training loop: schedules, hooks, determinism."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from strata.models.engine import Engine, OptimizerConfig, TrainConfig, TrainingHooks, schedule_factor


def test_cosine_schedule_matches_torch():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=0.0)
    expected = []
    for _ in range(5):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [0.1 * schedule_factor("cosine", e, 5, 0.1, 0.0) for e in range(5)] == pytest.approx(expected)


def test_coda_cosine_has_the_released_off_by_one():
    factors = [schedule_factor("coda_cosine", e, 20, 1e-3, 0) for e in range(20)]
    assert factors[0] == factors[1] == 1.0
    assert factors[2] == pytest.approx(math.cos(99 * math.pi / (200 * 19)))
    assert [round(f, 3) for f in factors[16:]] == [0.336, 0.258, 0.178, 0.097]


def test_constant_schedule():
    assert {schedule_factor("constant", e, 7, 1.0, 0.0) for e in range(7)} == {1.0}


class CountingHooks(nn.Module, TrainingHooks):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.epochs_started, self.steps = [], 0

    def trainable_parameters(self):
        return list(self.parameters())

    def training_loss(self, inputs, labels):
        return nn.functional.cross_entropy(self.layer(inputs), labels)

    def on_epoch_start(self, epoch):
        self.epochs_started.append(epoch)

    def on_optimizer_step(self):
        self.steps += 1


def _data():
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(20, 4, generator=generator), torch.randint(0, 3, (20,), generator=generator))


def test_fit_calls_hooks_and_reports_epochs(engine):
    hooks = CountingHooks()
    reports = []
    engine.on_epoch_end = reports.append
    config = TrainConfig(
        epochs=3, batch_size=8, drop_last=True, optimizer=OptimizerConfig(name="adam", lr=0.01, schedule="constant")
    )
    losses = engine.fit(hooks, _data(), config)
    assert hooks.epochs_started == [0, 1, 2]
    assert hooks.steps == 3 * 2  # 20 samples, batch 8, drop_last
    assert len(losses) == 3 and [r.epoch for r in reports] == [0, 1, 2]
    assert not hooks.training  # left in eval mode


def test_fit_is_deterministic_under_a_seed():
    def run():
        torch.manual_seed(0)
        hooks = CountingHooks()
        Engine("cpu", seed=4, show_progress=False).fit(hooks, _data(), TrainConfig(epochs=2, batch_size=5))
        return hooks.layer.weight.detach().clone()

    torch.testing.assert_close(run(), run())


def test_extract_runs_once_per_sample_without_grad(engine):
    calls = []

    def fn(x):
        calls.append(len(x))
        assert not torch.is_grad_enabled()
        return x * 2

    out, labels = engine.extract(fn, _data(), batch_size=6)
    assert sum(calls) == 20 and out.shape == (20, 4) and labels.shape == (20,)
    with pytest.raises(ValueError, match="empty"):
        engine.extract(fn, TensorDataset(torch.zeros(0, 4), torch.zeros(0)), batch_size=6)
