"""The callbacks inside a plain user LightningModule with a torchvision model and its own optimizer.

Checks, during the run, that pruned entries are zero at every step in the live and the ensemble
model; after it, that model.pt loads into an unmodified torchvision model with the target
sparsity, and that the merged export equals the reparameterized ensemble on the same inputs.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from frep_lightning import MergeReparameterization, RobustPruning, TemporalEnsemble, reparameterize_
from frep_lightning.reparam import iter_masked


class UserModule(pl.LightningModule):
    """A user's own module: plain cross-entropy, Adam-free SGD + cosine schedule of their choice."""

    def __init__(self, reparam: str | None) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=10)
        if reparam is not None:
            reparameterize_(self.net, reparam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)}

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=8)


class ZeroWatch(pl.Callback):
    """Asserts after every optimizer step that pruned weights are exactly zero in both models."""

    def __init__(self, pruning: RobustPruning, ensemble: TemporalEnsemble) -> None:
        self.pruning, self.ensemble, self.checked = pruning, ensemble, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.pruning.pruned:
            return
        avg = dict((n, m) for n, m, _ in iter_masked(self.ensemble._average_model.module))
        with torch.no_grad():
            for name, module, p in iter_masked(pl_module):
                dead = p.mask == 0
                assert torch.all(module.weight[dead] == 0), name
                assert torch.equal(avg[name].parametrizations["weight"][0].mask, p.mask), name
                assert torch.all(avg[name].weight[dead] == 0), name
        self.checked += 1


@pytest.mark.parametrize(
    ("reparam", "mode", "sparsity"),
    [("hadamard", "unstructured", 0.95), (None, "unstructured", 0.9), ("channel", "structured", 0.5)],
)
def test_callbacks_in_a_foreign_module(tmp_path, reparam, mode, sparsity) -> None:
    torch.manual_seed(0)
    module = UserModule(reparam)
    pruning = RobustPruning(sparsity=sparsity, epoch=1, mode=mode)
    ensemble = TemporalEnsemble(every_n_steps=2, bn="recompute", bn_batches=2)
    export = MergeReparameterization(dirpath=str(tmp_path), attr="net")
    watch = ZeroWatch(pruning, ensemble)
    # ensemble listed first on purpose: masks must still exist before its averaged copy is made
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[ensemble, pruning, export, watch],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    assert pruning.pruned and watch.checked == 8  # epochs 1 and 2, 4 steps each
    assert ensemble.interval == 20  # StepLR dropped the LR after epoch 1: 2 x 10

    state = torch.load(tmp_path / "model.pt", weights_only=True)
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(state, strict=True)  # unmodified backbone, plain keys
    weights = [m.weight for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    if mode == "unstructured":
        assert abs(zeros / total - sparsity) < 1e-3
    else:
        channels = sum(w.shape[0] for w in weights)
        live = sum(int((w.flatten(1) != 0).any(1).sum()) for w in weights)
        assert live == channels - round(sparsity * channels)

    # merged export == reparameterized ensemble (eval mode, same inputs)
    ens = copy.deepcopy(ensemble._average_model.module.net).eval()
    plain.eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert (plain(x) - ens(x)).abs().max().item() < 1e-5


def test_frep_module_keeps_pruned_weights_zero_every_step(tmp_path) -> None:
    """The same during-run check on our own FReP module (SRE + FGSM-RS step, Hadamard factors)."""
    from frep_lightning import FReP
    from frep_lightning.models import build_model

    torch.manual_seed(0)
    module = FReP(build_model("resnet18", width=4), milestones=[2], val_attack_steps=0)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(
        TensorDataset(torch.rand(24, 3, 32, 32, generator=g), torch.randint(0, 10, (24,), generator=g)), batch_size=8
    )
    pruning = RobustPruning(sparsity=0.98, epoch=1)
    ensemble = TemporalEnsemble(every_n_steps=2, bn_batches=2)
    export = MergeReparameterization(dirpath=str(tmp_path))
    watch = ZeroWatch(pruning, ensemble)
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[pruning, ensemble, export, watch],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=data, val_dataloaders=DataLoader(data.dataset, batch_size=12))
    assert watch.checked == 6 and ensemble.interval == 20
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    plain = build_model("resnet18", width=4)
    plain.load_state_dict(state, strict=True)
    weights = [m.weight for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert abs(zeros / sum(w.numel() for w in weights) - 0.98) < 1e-3
