"""TemporalEnsemble: EMA math on a hand-computed run, LR-aware interval, BN modes, checkpoint state."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from frep_lightning.ensemble import TemporalEnsemble, ema_tau
from helpers import quiet_trainer


class Climb(pl.LightningModule):
    """One scalar w with loss -w: plain SGD moves w by +lr per step, so every value is known."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.history: list[float] = []

    def training_step(self, batch, batch_idx):
        return -self.w * torch.ones(())

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.history.append(float(self.w.detach()))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, [2], 0.1)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)


def fit(module: pl.LightningModule, callbacks: list, epochs: int, tmp_path) -> pl.Trainer:
    trainer = quiet_trainer(tmp_path, callbacks, accelerator="auto", max_epochs=epochs)
    trainer.fit(module)
    return trainer


def test_tau_schedule() -> None:
    assert ema_tau(0, 0.999, 10) == 0.0  # first update copies the live model
    assert ema_tau(10, 0.999, 10) == 0.5
    assert ema_tau(10**6, 0.999, 10) == 0.999


def test_hand_computed_three_updates_with_lr_drop(tmp_path) -> None:
    # lr 1.0 for epochs 0-1 and 0.1 from epoch 2; 2 steps per epoch; w after step t:
    #   t: 1    2    3    4    5    6    7    8
    #   w: 1.0  2.0  3.0  4.0  4.1  4.2  4.3  4.4
    # every_n_steps=2, factor 2 -> interval 4 once the LR drop is seen (t=5); tau0=0.9, c=1:
    #   t=2: n=0, tau=0        -> W_TE = 2.0
    #   t=4: n=1, tau=1/2      -> W_TE = 0.5*2.0 + 0.5*4.0 = 3.0
    #   t=6: skipped (6 % 4 != 0; it would be an update without the interval change)
    #   t=8: n=2, tau=2/3      -> W_TE = (2/3)*3.0 + (1/3)*4.4 = 3.4666...
    module = Climb()
    ens = TemporalEnsemble(tau0=0.9, c=1.0, every_n_steps=2, interval_factor=2)
    fit(module, [ens], epochs=4, tmp_path=tmp_path)
    assert module.history == pytest.approx([1.0, 2.0, 3.0, 4.0, 4.1, 4.2, 4.3, 4.4])
    assert ens.n_updates == 3
    assert ens.interval == 4
    assert ens.last_tau == pytest.approx(2 / 3)
    expected = (2 / 3) * 3.0 + (1 / 3) * 4.4
    assert float(ens._average_model.module.w.detach()) == pytest.approx(expected, abs=1e-6)
    # the ensemble, not the live weight (4.4), is what the module holds after training
    assert float(module.w.detach()) == pytest.approx(expected, abs=1e-6)


def test_without_lr_drop_interval_stays(tmp_path) -> None:
    module = Climb()
    ens = TemporalEnsemble(tau0=0.9, c=1.0, every_n_steps=2, interval_factor=2, lr_drop_ratio=0.01)
    fit(module, [ens], epochs=4, tmp_path=tmp_path)
    assert ens.interval == 2 and ens.n_updates == 4


def test_no_update_keeps_live_model_with_warning(tmp_path) -> None:
    module = Climb()
    ens = TemporalEnsemble(every_n_steps=100)
    with pytest.warns(UserWarning, match="no update"):
        fit(module, [ens], epochs=1, tmp_path=tmp_path)
    assert float(module.w.detach()) == pytest.approx(2.0)


class BNNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g) * 3 + 1
        return DataLoader(TensorDataset(x, torch.randint(0, 2, (64,), generator=g)), batch_size=16)


def test_bn_recompute_gives_statistics_of_the_ensemble_weights(tmp_path) -> None:
    module = BNNet()
    ens = TemporalEnsemble(every_n_steps=2, bn="recompute", bn_batches=4)
    fit(module, [ens], epochs=2, tmp_path=tmp_path)
    avg = ens._average_model.module
    # reference: cumulative BN statistics of the ensemble's own first layer over the 4 batches
    with torch.no_grad():
        x = torch.cat([b[0] for b in module.train_dataloader()])
        h = avg.net[0](x)
    bn = avg.net[1]
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)
    # update_bn-style estimate: mean of per-batch unbiased variances
    per_batch = torch.stack([h[i : i + 16].var(0, unbiased=True) for i in range(0, 64, 16)]).mean(0)
    assert torch.allclose(bn.running_var, per_batch, atol=1e-5)
    assert torch.equal(module.net[1].running_mean, bn.running_mean)  # copied to the module at the end


def test_bn_copy_mode_copies_live_buffers(tmp_path) -> None:
    module = BNNet()
    ens = TemporalEnsemble(every_n_steps=4, bn="copy")  # 4 steps/epoch: last update at the last step
    fit(module, [ens], epochs=1, tmp_path=tmp_path)
    live_mean = module.net[1].running_mean.clone()
    assert torch.equal(ens._average_model.module.net[1].running_mean, live_mean)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"tau0": 1.0}, "ensemble.tau0"),
        ({"tau0": 0.0}, "ensemble.tau0"),
        ({"c": 0}, "ensemble.c"),
        ({"every_n_steps": 0}, "ensemble.every_n_steps"),
        ({"bn": "freeze"}, "ensemble.bn"),
        ({"validate_live": "yes"}, "ensemble.validate_live"),
    ],
)
def test_arguments_are_validated(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        TemporalEnsemble(**kwargs)


@pytest.mark.parametrize("kind", ["hadamard", "channel"])
def test_product_average_is_ema_of_merged_weight(kind: str) -> None:
    """average=product: the ensemble's merged weight is the EMA of the live merged weights,
    which differs from averaging the factors (mean of products != product of means)."""
    from torch.optim.swa_utils import AveragedModel

    from frep_lightning.reparam import factors, reparameterize_

    torch.manual_seed(0)
    live = reparameterize_(nn.Sequential(nn.Linear(4, 3)), kind=kind, seed=0)
    results = {}
    for mode in ("factors", "product"):
        cb = TemporalEnsemble(tau0=0.9, c=1.0, average=mode)
        cb._average_model = AveragedModel(live, use_buffers=False)
        snapshots = []
        torch.manual_seed(1)
        for _ in range(3):  # three updates: tau = 0, 0.5, 2/3
            with torch.no_grad():
                for f in factors(live[0]):
                    f.add_(torch.randn_like(f) * 0.3)
            snapshots.append(live[0].weight.detach().clone())
            cb.update(live)
        results[mode] = cb._average_model.module[0].weight.detach().clone()
        if mode == "product":
            w0, w1, w2 = snapshots
            expected = (w0 * 0.5 + w1 * 0.5) * (2 / 3) + w2 * (1 / 3)  # tau 0, then 1/2, then 2/3
            torch.testing.assert_close(results[mode], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(results["factors"], results["product"], atol=1e-4)


def test_average_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="ensemble.average"):
        TemporalEnsemble(average="weights")


class Climb3(Climb):
    """Climb with three steps per epoch."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(3, 1)), batch_size=1)


def test_update_due_at_the_last_step_before_an_lr_drop_happens(tmp_path) -> None:
    # 3 steps per epoch, LR drop at epoch 2 (Lightning steps the scheduler after step 6, before the
    # batch-end hooks); f_e = 3 until then, 30 after. The update due at t=6 uses f_e = 3: it happens.
    module = Climb3()
    ens = TemporalEnsemble(tau0=0.9, c=1.0, every_n_steps=3, interval_factor=10)
    fit(module, [ens], epochs=3, tmp_path=tmp_path)
    assert module.history == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.1, 6.2, 6.3])
    assert ens.interval == 30
    assert ens.n_updates == 2  # t=3 (copy: 3.0) and t=6 (tau=1/2)
    assert float(module.w.detach()) == pytest.approx(0.5 * 3.0 + 0.5 * 6.0, abs=1e-6)


class ValBNNet(BNNet):
    """BNNet with a validation loop (the ensemble is swapped in for it)."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=8)


def test_bf16_validation_swap_keeps_the_ensemble_in_fp32(tmp_path) -> None:
    """Swapping the fp32 ensemble into a bf16-true module and back used to round it to bf16 at every validation."""
    ensembles = []
    for val_batches in (0, 1):
        torch.manual_seed(0)
        ens = TemporalEnsemble(tau0=0.9, c=1.0, every_n_steps=1, bn="copy")
        trainer = quiet_trainer(
            tmp_path, [ens], max_epochs=3, precision="bf16-true", limit_val_batches=val_batches, num_sanity_val_steps=0
        )
        trainer.fit(ValBNNet())
        ensembles.append([p.detach().clone() for p in ens._average_model.module.parameters()])
    assert all(p.dtype == torch.float32 for p in ensembles[1])
    assert any(not torch.equal(p, p.bfloat16().float()) for p in ensembles[0])  # not representable in bf16
    for without, with_val in zip(*ensembles, strict=True):
        assert torch.equal(without, with_val)  # validating changes nothing in the ensemble


class ClimbVal(Climb):
    """Climb with a validation step that fails, or that saves a checkpoint (a signal handler's save)."""

    def __init__(self, action: str, path=None) -> None:
        super().__init__()
        self.action, self.path = action, path

    def forward(self, x):
        return self.w * x

    def validation_step(self, batch, batch_idx):
        if self.action == "fail":
            raise RuntimeError("validation failed")
        self.trainer.save_checkpoint(self.path)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)


def test_failure_inside_validation_leaves_the_live_model_in_the_module(tmp_path) -> None:
    # steps 1, 2 give w = 1, 2; the ensemble is 1.0, then 0.5 * 1 + 0.5 * 2 = 1.5; validation after step 2 fails
    module, ens = ClimbVal("fail"), TemporalEnsemble(tau0=0.9, c=1.0, every_n_steps=1, bn="copy")
    trainer = quiet_trainer(tmp_path, [ens], max_epochs=2, num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match="validation failed"):
        trainer.fit(module)
    assert float(module.w.detach()) == 2.0
    assert float(ens._average_model.module.w.detach()) == 1.5 and not ens._swapped


def test_checkpoint_saved_inside_validation_has_the_fit_layout(tmp_path) -> None:
    path = tmp_path / "inside.ckpt"
    module, ens = ClimbVal("save", path), TemporalEnsemble(tau0=0.9, c=1.0, every_n_steps=1, bn="copy")
    quiet_trainer(tmp_path, [ens], max_epochs=1, num_sanity_val_steps=0).fit(module)
    ckpt = torch.load(path, weights_only=True)
    assert float(ckpt["state_dict"]["w"]) == 1.5  # the ensemble
    assert float(ckpt["current_model_state"]["w"]) == 2.0  # the live model
    assert float(module.w.detach()) == 1.5  # kept at the end, as always


def test_pruning_after_the_last_update_refreshes_the_ensemble_batchnorm(tmp_path) -> None:
    """BN statistics recomputed at a validation describe the unpruned ensemble; pruning changes its weights
    without an update, so the statistics kept at the end must be recomputed for the pruned weights."""
    from frep_lightning.pruning import RobustPruning

    module = ValBNNet()
    ens = TemporalEnsemble(every_n_steps=4, bn="recompute", bn_batches=4)  # one update: step 4, end of epoch 0
    pruning = RobustPruning(0.5, epoch=1)
    fit_trainer = quiet_trainer(tmp_path, [ens, pruning], max_epochs=2, max_steps=7, num_sanity_val_steps=0)
    fit_trainer.fit(module)
    assert pruning.pruned and ens.n_updates == 1
    avg = ens._average_model.module
    with torch.no_grad():
        h = avg.net[0](torch.cat([b[0] for b in module.train_dataloader()]))  # the pruned ensemble's layer
    assert int((avg.net[0].weight == 0).sum()) > 0
    torch.testing.assert_close(avg.net[1].running_mean, h.mean(0), rtol=1e-5, atol=1e-5)
    assert torch.equal(module.net[1].running_mean, avg.net[1].running_mean)


def test_side_loader_of_a_batch_sampler_loader_keeps_its_batch_size() -> None:
    """BN re-estimation on a user's loader built with batch_sampler= (batch_size None) uses its batches'
    size, not batches of one (whose statistics would be meaningless)."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    from frep_lightning.ensemble import _side_loader

    class Pairs:  # a sampler of index lists without a batch_size attribute
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])

        def __len__(self) -> int:
            return 2

    data = TensorDataset(torch.rand(10, 3))
    sampled = DataLoader(data, batch_sampler=BatchSampler(RandomSampler(data), batch_size=4, drop_last=False))
    assert next(iter(_side_loader(sampled)))[0].shape[0] == 4
    assert next(iter(_side_loader(DataLoader(data, batch_sampler=Pairs()))))[0].shape[0] == 5  # type: ignore[arg-type]


class Climb4(Climb):
    """Climb with four batches per epoch."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=1)


def test_gradient_accumulation_updates_once_per_optimizer_step(tmp_path) -> None:
    # accumulate_grad_batches=2: 4 batches, 2 optimizer steps (w = 1, 2); batch-end hooks of the batches
    # that do not step see the same global_step and must not update again (nor update before any step)
    module, ens = Climb4(), TemporalEnsemble(tau0=0.9, c=1.0, every_n_steps=1)
    fit_trainer = quiet_trainer(tmp_path, [ens], max_epochs=1, accumulate_grad_batches=2)
    fit_trainer.fit(module)
    assert fit_trainer.global_step == 2 and module.history == pytest.approx([0.0, 1.0, 1.0, 2.0])
    assert ens.n_updates == 2
    assert float(module.w.detach()) == pytest.approx(0.5 * 1.0 + 0.5 * 2.0)  # t=1 copy, t=2 tau=1/2


def test_bn_average_mode_is_an_ema_of_the_live_buffers() -> None:
    from torch.optim.swa_utils import AveragedModel

    live = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    cb = TemporalEnsemble(tau0=0.9, c=1.0, bn="average")
    cb._average_model = AveragedModel(live, use_buffers=False)
    means = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, 1.0]), torch.tensor([0.0, 6.0, 4.0])]
    for step, mean in enumerate(means, start=1):  # three updates: tau = 0, 1/2, 2/3
        with torch.no_grad():
            live[1].running_mean.copy_(mean)
            live[1].running_var.fill_(float(step))
            live[1].num_batches_tracked.fill_(10 * step)
        cb.update(live)
    bn = cb._average_model.module[1]
    expected = (means[0] * 0.5 + means[1] * 0.5) * (2 / 3) + means[2] / 3
    torch.testing.assert_close(bn.running_mean, expected)
    torch.testing.assert_close(bn.running_var, torch.full((3,), (1.0 * 0.5 + 2.0 * 0.5) * (2 / 3) + 3.0 / 3))
    assert int(bn.num_batches_tracked) == 30  # an integer counter: copied, not averaged


class ClimbValRecord(Climb):
    """Climb whose validation records the weight the module holds."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def forward(self, x):
        return self.w * x

    def validation_step(self, batch, batch_idx):
        self.seen.append(float(self.w.detach()))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)


def test_validation_uses_the_live_model_until_the_first_update(tmp_path) -> None:
    # 2 steps per epoch, f_e = 3: validation after step 2 has no ensemble yet (the averaged copy is the
    # initial model, w = 0): it validates the live w = 2; after step 4 the ensemble (the copy made at t=3)
    module, ens = ClimbValRecord(), TemporalEnsemble(tau0=0.9, c=1.0, every_n_steps=3, bn="copy")
    quiet_trainer(tmp_path, [ens], max_epochs=2, num_sanity_val_steps=0).fit(module)
    assert module.seen == [2.0, 3.0]
    assert module.history == pytest.approx([1.0, 2.0, 3.0, 4.0])  # the live weight came back after validation


class ValBNNetRecord(ValBNNet):
    """ValBNNet whose validation records the module's whole state (weights and BatchNorm buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, torch.Tensor]] = []

    def validation_step(self, batch, batch_idx):
        self.seen.append({k: v.detach().clone() for k, v in self.state_dict().items()})
        super().validation_step(batch, batch_idx)


def test_validation_swaps_in_the_ensemble_batchnorm_statistics_too(tmp_path) -> None:
    """The ensemble is validated with its own (recomputed) BN statistics, not the live model's; Eq. 14's
    distance to the live model is logged."""
    module = ValBNNetRecord()
    ens = TemporalEnsemble(tau0=0.9, c=1.0, every_n_steps=2, bn="recompute", bn_batches=4)  # updates at t=2, 4
    trainer = quiet_trainer(tmp_path, [ens], max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(module)
    (seen,) = module.seen
    ensemble = ens._average_model.module.state_dict()
    assert seen.keys() == ensemble.keys()
    for k, v in ensemble.items():
        assert torch.equal(seen[k], v), k
    assert float(trainer.callback_metrics["ensemble/delta"]) > 1e-6


def test_checkpoint_before_the_first_update_holds_the_live_model(tmp_path) -> None:
    """Before its first update the averaged copy is the initial model (w = 0): a checkpoint's state_dict
    (what load_from_checkpoint and evaluation read) must be the live model (w = 2) then."""
    path = tmp_path / "early.ckpt"
    module, ens = ClimbVal("save", path), TemporalEnsemble(every_n_steps=100, bn="copy")
    with pytest.warns(UserWarning, match="no update"):
        quiet_trainer(tmp_path, [ens], max_epochs=1, num_sanity_val_steps=0).fit(module)
    ckpt = torch.load(path, weights_only=True)
    assert float(ckpt["state_dict"]["w"]) == 2.0 and float(ckpt["current_model_state"]["w"]) == 2.0


def test_resuming_a_finished_run_leaves_the_ensemble_in_the_module(tmp_path) -> None:
    """Resuming from the last checkpoint of a finished run trains 0 steps and skips ``on_train_end``: the
    module must still end up holding the ensemble, not the live weights restored from the checkpoint."""
    from frep_lightning.checkpointing import LastCheckpoint

    # w = 1, 2, 3, 4; ensemble 1 -> 1.5 (tau 1/2) -> 2.0 (tau 2/3) -> 2.5 (tau 3/4)
    first = TemporalEnsemble(tau0=0.9, c=1.0, every_n_steps=1, bn="copy")
    quiet_trainer(tmp_path, [first, LastCheckpoint(tmp_path / "ckpt")], max_epochs=2, enable_checkpointing=True).fit(
        Climb()
    )
    again, ens = Climb(), TemporalEnsemble(tau0=0.9, c=1.0, every_n_steps=1, bn="copy")
    trainer = quiet_trainer(
        tmp_path, [ens, LastCheckpoint(tmp_path / "again")], max_epochs=2, enable_checkpointing=True
    )
    trainer.fit(again, ckpt_path=tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert trainer.global_step == 4 and again.history == []  # nothing trained
    assert float(again.w.detach()) == pytest.approx(2.5)


class ClimbClassifier(Climb):
    """Climb as a 2-class classifier of x = 1: logits (w x, 3.5), so class 0 iff w x > 3.5; validation logs the
    accuracy of the model in the module (the ensemble once it exists) and has FReP's ``val_attack`` hook."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        from frep_lightning.attacks import PGD

        self.val_attack = PGD(eps=eps, steps=2, step_size=eps, random_start=False)

    def forward(self, x):
        return torch.cat([self.w * x, torch.full_like(x, 3.5)], dim=1)

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.ones(1, 1), torch.zeros(1, dtype=torch.long)), batch_size=1)


@pytest.mark.parametrize(("eps", "live_robust"), [(0.1, 1.0), (0.2, 0.0)])
def test_validate_live_scores_the_live_model_beside_the_ensemble(tmp_path, eps: float, live_robust: float) -> None:
    """2 steps per epoch, f_e = 3: at the validation after step 4 the ensemble is the copy made at t=3 (w = 3:
    3 < 3.5, wrong) and the live model has w = 4 (right). Under an L-inf attack of radius eps on x = 1 the live
    logit is 4 (1 - eps): 3.6 > 3.5 for eps = 0.1 (robust), 3.2 for eps = 0.2 (broken). Training goes on from
    the live weights."""
    module = ClimbClassifier(eps)
    ens = TemporalEnsemble(tau0=0.9, c=1.0, every_n_steps=3, bn="copy", validate_live=True)
    trainer = quiet_trainer(tmp_path, [ens], max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(module)
    metrics = trainer.callback_metrics
    assert float(metrics["val/acc"]) == 0.0  # the ensemble (w = 3)
    assert float(metrics["val_live/acc"]) == 1.0  # the live model (w = 4)
    assert float(metrics["val_live/pgd2"]) == live_robust
    assert module.history == pytest.approx([1.0, 2.0, 3.0, 4.0])


def test_validate_live_is_off_by_default(tmp_path) -> None:
    module = ClimbClassifier(0.1)
    trainer = quiet_trainer(tmp_path, [TemporalEnsemble(tau0=0.9, c=1.0, every_n_steps=3, bn="copy")], max_epochs=2,
                            num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module)
    assert "val/acc" in trainer.callback_metrics
    assert not any(k.startswith("val_live/") for k in trainer.callback_metrics)
