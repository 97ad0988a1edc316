"""The Run that owns a training run's life, the step agreement any LightningModule gets, and the
places alexnet_dist reaches past Lightning's public API (training/lightning_seams.py): each seam
is run against the installed Lightning, so a release that renames what it uses fails here."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from alexnet_dist.config import Train, make
from alexnet_dist.training.agreement import StepAgreement
from alexnet_dist.training.checkpoint import BestCheckpoint, LastCheckpoint
from alexnet_dist.training.lightning_seams import silence_sigterm_broadcast, stop_without_validating, training_batches
from alexnet_dist.training.pictures import Pictures
from alexnet_dist.training.preemption import Preemption
from alexnet_dist.training.run import Run
from alexnet_dist.training.run_dir import RunDirectory


class Plain(pl.LightningModule):
    """A user's own LightningModule: it knows nothing of alexnet_dist."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.validated = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        self.validated += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n=16):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)), 4)


def trainer(tmp_path, callbacks, **kw) -> pl.Trainer:
    args = (
        dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
        | kw
    )
    return pl.Trainer(default_root_dir=tmp_path, callbacks=callbacks, **args)


def settings(tmp_path, **checkpoint) -> Train:
    trainer_args = {"devices": 1, "num_nodes": 1, "accelerator": "cpu", "strategy": "auto"}
    return make(Train, {"run_id": "r", "data": {"root": str(tmp_path)}, "trainer": trainer_args, **checkpoint})


class Ask(pl.Callback):
    """Asks the agreement a question answered yes at step 2, and records what it took."""

    def __init__(self, agreement):
        self.agreement, self.taken = agreement, []
        agreement.ask("now", lambda: self.step == 2)
        self.step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.taken.append(self.agreement.take("now"))


class Counting(StepAgreement):
    """The agreement, noting each settle: with a loss (the module's) or without (a take's)."""

    def __init__(self):
        super().__init__()
        self.with_loss = []

    def settle(self, loss=None):
        self.with_loss.append(loss is not None)
        return super().settle(loss)


@pytest.mark.parametrize("first", [True, False], ids=["agreement-first", "agreement-last"])
def test_a_users_module_gets_the_agreement_settled_once_a_step_whatever_the_callback_order(tmp_path, first):
    agreement = Counting()
    ask = Ask(agreement)
    trainer(tmp_path, [agreement, ask] if first else [ask, agreement]).fit(Plain(), loader())
    assert ask.taken == [0, 0, 1, 0]  # the question's answer, agreed at the step it was yes
    assert agreement.with_loss == [False] * 4  # once a step, by the first take: no loss from this module


def test_the_classifier_settles_the_agreement_with_its_loss_no_second_collective(tmp_path):
    from alexnet_dist.training.module import Classifier

    agreement = Counting()
    ask = Ask(agreement)
    module = Classifier(
        {"_target_": "alexnet_dist.models.AlexNetSmall", "num_classes": 2, "width": 4, "fc": 8}, {}, global_batch=4
    )
    images = torch.randint(0, 255, (16, 3, 28, 28), generator=torch.Generator().manual_seed(0)).float()
    data = DataLoader(TensorDataset(images, torch.randint(0, 2, (16,))), 4)
    trainer(tmp_path, [ask, agreement]).fit(module, data)
    assert agreement.with_loss == [True] * 4 and ask.taken == [0, 0, 1, 0]


def test_the_runs_callbacks_keep_the_order_their_hooks_rely_on(tmp_path):
    run = Run(settings(tmp_path), tmp_path / "run", "r", "seed: 0\n")
    claim = RunDirectory(tmp_path / "run", "seed: 0\n", first=True)
    try:
        kinds = [type(c) for c in run.callbacks(claim, module=None, data=None)]
    finally:
        claim.release()
    # the claim first: nothing is written into the run directory before it is held
    assert kinds[0] is RunDirectory
    # the pictures before the saver: a checkpoint holds the curves up to its own step
    assert kinds.index(Pictures) < kinds.index(LastCheckpoint)
    assert {StepAgreement, Preemption, BestCheckpoint} <= set(kinds)
    assert run.preemption.agreement is run.agreement and run.saver.agreement is run.agreement


def test_the_preemption_signal_ends_a_users_module_fit_with_a_checkpoint(tmp_path):
    """Preemption works through the Run's callbacks alone: the module never hears of it."""
    import os
    import signal

    s = settings(tmp_path)
    run = Run(s, tmp_path / "run", "r", "")
    run.ckpt_dir.mkdir(parents=True)
    handlers = {n: signal.getsignal(n) for n in (signal.SIGUSR1, signal.SIGINT, signal.SIGTERM)}

    class SignalAtStep2(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    module = Plain()
    try:
        fit = trainer(tmp_path, [run.saver, run.preemption, run.agreement, SignalAtStep2()], max_epochs=3)
        fit.fit(module, loader(), loader())
    finally:
        for n, h in handlers.items():
            signal.signal(n, h)
    assert run.preemption.preempted_at == 3 and fit.global_step == 3  # stopped at the next step boundary
    assert sorted(p.name for p in run.ckpt_dir.iterdir()) == ["last.ckpt", "step-000000003.ckpt"]
    assert module.validated == 0  # the cut epoch was not validated on the way out


def test_the_lightning_seams_act_on_the_installed_lightning(tmp_path):
    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            loop = trainer.fit_loop.epoch_loop
            assert hasattr(loop, "_broadcast_sigterm_tensor"), "Lightning renamed its SIGTERM broadcast"
            silence_sigterm_broadcast(trainer)
            seen["silenced"] = loop._broadcast_sigterm_tensor() is None
            seen["batches"] = training_batches(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                stop_without_validating(trainer)

    module = Plain()
    fit = trainer(tmp_path, [Probe()], max_epochs=2)
    fit.fit(module, loader(), loader())
    assert seen == {"silenced": True, "batches": 4}
    assert fit.global_step == 2 and module.validated == 0  # stopped at once, the cut epoch not validated

    class CountLate(Plain):
        def configure_optimizers(self):  # with max_epochs=-1 Lightning has not counted the batches yet
            seen["late"] = training_batches(self.trainer)
            return super().configure_optimizers()

    trainer(tmp_path, [], max_epochs=-1, max_steps=2).fit(CountLate(), loader())
    assert seen["late"] == 4
