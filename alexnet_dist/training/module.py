"""The LightningModule: cross-entropy training of any network a model config names (ours or a
user's, models/build.py), top-1 and top-5 on train/val/test, the configured optimiser and
learning-rate schedule."""

import math
from functools import partial

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..collectives import gather_to_rank_zero
from ..config import NonFinite, Optim, ScheduleName, make, plain
from ..errors import ConfigError, TrainingError
from ..models import build, compiled
from .agreement import loss_is_finite_everywhere
from .checkpoint import rng_state, set_rng_state
from .lightning_seams import training_batches
from .optim import build_optimizer, param_groups, scaled_lr
from .schedules import lr_factor


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()


class Classifier(pl.LightningModule):
    """`model` is the network's completed config ({"_target_": ..., "num_classes": ..., its other
    arguments}: models.complete), so that a checkpoint alone is enough to rebuild it; `optim`
    holds the optimiser and schedule settings (typed, or as a checkpoint stores them: plain
    values, missing keys taking the defaults)."""

    def __init__(
        self,
        model: dict,
        optim: Optim | dict,
        global_batch: int,
        seed: int = 0,
        channels_last: bool = False,
        compile: bool = False,
        fuse_norms: bool = False,
    ):
        super().__init__()
        optim = make(Optim, optim)
        # plain values only: checkpoints load with weights_only=True
        self.save_hyperparameters(
            dict(model=model, optim=plain(optim), global_batch=global_batch, seed=seed)
            | dict(channels_last=channels_last, compile=compile, fuse_norms=fuse_norms)
        )
        self.model = build(model)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        # A compiled model shares the parameters; kept off the module tree so checkpoints hold
        # the plain model's names either way (fused norm blocks are compiled in place).
        object.__setattr__(self, "net", compiled(self.model, compile, fuse_norms))
        self.optim = optim
        self.steps_per_epoch, self.total_steps = 1, 1  # set with the optimizer (optimizer_and_schedule)
        self.global_batch = global_batch
        self.eval_sums = None  # loss sum, top-1 and top-5 hits, count: summed over ranks at epoch end
        self.plateau = {"best": -1.0, "bad_epochs": 0, "drops": 0}
        self.skipped_steps = 0  # non-finite losses skipped (optim.on_nonfinite=skip)
        self.rng_to_restore = None
        self.last_validation = {}  # the latest validation's metrics, kept in checkpoints

    def on_train_start(self):
        if self.rng_to_restore is not None:  # resumed: continue the generators where they stopped
            set_rng_state(self.rng_to_restore[min(self.global_rank, len(self.rng_to_restore) - 1)])
            self.rng_to_restore = None
        else:  # same weights on every rank (DDP broadcasts rank 0's), each rank its own dropout masks
            torch.manual_seed(self.hparams.seed * 1000 + self.global_rank)

    def forward(self, x):
        return self.net(x.contiguous(memory_format=self.memory_format))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        # all ranks skip a step together; asked in the step's one agreement (agreement.py)
        if not loss_is_finite_everywhere(loss, self.trainer):
            if self.optim.on_nonfinite == NonFinite.skip:
                self.skipped_steps += 1
                self.log("skipped_steps", float(self.skipped_steps))
                return None  # Lightning then skips backward and the optimizer step
            raise TrainingError(
                f"loss is {loss.item()} at step {self.global_step}; the last checkpoint is kept. "
                "Lower optim.lr, check data.mean/data.std, or set optim.on_nonfinite=skip"
            )
        top1 = topk_correct(logits.detach(), labels, 1) / len(labels)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_top1", top1)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        return loss

    # Evaluation: sum on each rank, reduce once per epoch, so every sample counts exactly once
    # and ranks may hold different numbers of batches.
    def _eval_start(self):
        self.eval_sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def predict_log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Log class probabilities; a batch of views (N, V, C, H, W) gets the mean of the V
        softmaxes, the paper's 10-view test (section 4.1)."""
        if images.dim() == 5:
            n, views = images.shape[:2]
            probs = self(images.flatten(0, 1)).float().softmax(dim=1).view(n, views, -1).mean(dim=1)
            return probs.clamp_min(1e-30).log()
        return self(images).float().log_softmax(dim=1)

    def _eval_step(self, batch):
        images, labels = batch
        logits = self.predict_log_probs(images)
        loss = F.nll_loss(logits, labels, reduction="sum")
        self.eval_sums += torch.stack(
            [
                loss.double(),
                topk_correct(logits, labels, 1).double(),
                topk_correct(logits, labels, 5).double(),
                torch.tensor(len(labels), dtype=torch.float64, device=self.device),
            ]
        )

    def _eval_end(self, prefix: str) -> dict:
        sums = self.eval_sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        loss, top1, top5, n = sums.tolist()
        n = max(n, 1)
        metrics = {
            f"{prefix}_loss": loss / n,
            f"{prefix}_top1": top1 / n,
            f"{prefix}_top5": top5 / n,
            f"{prefix}_count": float(sums[3]),
        }
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name.endswith("top1"), sync_dist=False)
        return metrics

    def on_validation_epoch_start(self):
        self._eval_start()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        metrics = self._eval_end("val")
        if not self.trainer.sanity_checking:
            self.last_validation = {k: v for k, v in metrics.items() if k != "val_count"}
        if self.optim.schedule.name == ScheduleName.plateau and not self.trainer.sanity_checking:
            self._plateau_update(metrics["val_top1"])

    def on_test_epoch_start(self):
        self._eval_start()

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_test_epoch_end(self):
        self._eval_end("test")

    def _plateau_update(self, top1: float):
        """Divide the rate by 10 when validation accuracy stops improving (paper section 5)."""
        sched, p = self.optim.schedule, self.plateau
        if top1 > p["best"] + sched.threshold:
            p["best"], p["bad_epochs"] = top1, 0
        else:
            p["bad_epochs"] += 1
            if p["bad_epochs"] > sched.patience and p["drops"] < sched.max_drops:
                p["drops"], p["bad_epochs"] = p["drops"] + 1, 0

    def training_state(self) -> dict:
        """The checkpoint's "training" part (training/ckpt_format.py); every rank calls it."""
        return {
            "plateau": dict(self.plateau),
            "skipped_steps": self.skipped_steps,
            "rng": gather_to_rank_zero(rng_state()),  # each rank's own dropout generator
            "validation": dict(self.last_validation),  # {val_top1, val_top5, val_loss} or {}
        }

    def restore_training_state(self, state: dict) -> None:
        self.plateau = dict(state["plateau"])
        self.skipped_steps = state["skipped_steps"]
        self.rng_to_restore = state["rng"]  # None: generators seeded afresh
        self.last_validation = dict(state.get("validation", {}))

    def lr_multiplier(self, step: int) -> float:
        s = self.optim.schedule
        factor = lr_factor(
            str(s.name),
            step / self.steps_per_epoch,
            max_epochs=self.total_steps / self.steps_per_epoch,
            milestones=s.milestones,
            gamma=s.gamma,
            warmup_epochs=s.warmup_epochs,
            warmup_from=s.warmup_from,
            min_factor=s.min_factor,
            power=s.power,
        )
        return factor * s.gamma ** self.plateau["drops"]

    def layer_multiplier(self, layer: str, step: int) -> float:
        """A layer's own rate once its optim.layer_rates entries start (the latest that has),
        else the common schedule. The rates are at the reference batch, like optim.lr."""
        epoch = step / self.steps_per_epoch
        started = [r for r in self.optim.layer_rates if r.layer == layer and epoch >= r.from_epoch]
        if not started:
            return self.lr_multiplier(step)
        return max(started, key=lambda r: r.from_epoch).lr / self.optim.lr

    def configure_optimizers(self):
        # The schedule spans the optimizer steps this fit really takes: trainer.max_epochs,
        # max_steps, limit_train_batches and accumulate_grad_batches all count.
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError(
                "trainer.max_epochs=-1 and trainer.max_steps=-1 give the learning-rate schedule no end; set one of them"
            )
        batches = training_batches(self.trainer)  # infinite for a loader without a length
        per_epoch = math.ceil(batches / self.trainer.accumulate_grad_batches) if math.isfinite(batches) else total
        return self.optimizer_and_schedule(int(per_epoch), int(total), self.trainer.accumulate_grad_batches)

    def optimizer_and_schedule(self, steps_per_epoch: int, total_steps: int, accumulate: int = 1) -> dict:
        """The optimizer and its per-step schedule for a fit of `total_steps` optimizer steps,
        `steps_per_epoch` of them per epoch (epochs place the milestones and layer rates), each
        step taken after `accumulate` batches (so the batch a step learns from is `accumulate`
        global batches, which linear scaling counts)."""
        self.steps_per_epoch, self.total_steps = max(1, steps_per_epoch), max(1, total_steps)
        o = self.optim
        lr = scaled_lr(o.lr, self.global_batch * accumulate, o.reference_batch)
        layers = tuple(dict.fromkeys(r.layer for r in o.layer_rates))
        groups = param_groups(self.model, lr, o.weight_decay, o.bias_lr_mult, layers, o.bias_weight_decay)
        optimizer = build_optimizer(str(o.name), groups, lr, o.momentum, str(o.impl), o.trust, o.weight_decay)
        rules = [partial(self.layer_multiplier, g["layer"]) if g["layer"] else self.lr_multiplier for g in groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rules)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
