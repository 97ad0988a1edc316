"""The yes-or-no questions all ranks must answer alike at every training step, settled in one
all-reduce: is the loss finite everywhere (else every rank skips the step, or stops), has any
rank been told to stop (the preemption signal, SIGTERM), is a checkpoint due by the clock.
Asked separately they were a collective each per step; together they cost one tiny all-reduce,
whatever the world size.
"""

import lightning.pytorch as pl
import torch
import torch.distributed as dist


def _all_max(flags: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def loss_is_finite_everywhere(loss: torch.Tensor, trainer: pl.Trainer | None) -> bool:
    """Whether `loss` is finite on every rank: in the step's agreement when the Trainer has one (no
    collective of its own), else by a collective of its own."""
    agreement = StepAgreement.of(trainer)
    if agreement is not None:
        return agreement.settle(loss)
    return _all_max((~torch.isfinite(loss.detach())).float().reshape(1)).item() == 0


class StepAgreement(pl.Callback):
    """Callbacks `ask` their question once (a function giving this rank's answer: a bool, or a
    small whole number such as a signal's) and `take` the agreed answer at the end of each step:
    the largest of all ranks' answers, so true when any rank said yes.

    The one collective happens at the first of: the LightningModule's training step settling it
    with its loss (`loss_is_finite_everywhere`, as Classifier does), or the first `take` of the
    step. Every rank runs the same hooks in the same order, so every rank reaches it at the same
    point; no callback needs to come before another for it. A module that knows nothing of it
    (a user's own) still gets preemption and the checkpoint clock."""

    def __init__(self):
        self.questions, self.answers = {}, None
        self.device = torch.device("cpu")  # the training device: NCCL reduces CUDA tensors only

    @staticmethod
    def of(trainer: pl.Trainer | None) -> "StepAgreement | None":
        """The Trainer's agreement, if it has one."""
        found = [c for c in (trainer.callbacks if trainer is not None else []) if isinstance(c, StepAgreement)]
        return found[0] if found else None

    def ask(self, name: str, question) -> None:
        self.questions[name] = question

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.answers = None  # a new step: nothing settled yet
        self.device = trainer.strategy.root_device

    def settle(self, loss: torch.Tensor | None = None) -> bool:
        """Whether the loss (if given) is finite on every rank; the questions' answers are kept for `take`."""
        mine = [float(question() or 0) for question in self.questions.values()]
        if loss is None:
            nonfinite = torch.zeros(1, device=self.device)
        else:
            nonfinite = (~torch.isfinite(loss.detach())).float().reshape(1)
        flags = _all_max(torch.cat([nonfinite, nonfinite.new_tensor(mine)]))
        bad, *answers = flags.tolist()  # the one wait for the device in this bookkeeping
        self.answers = {name: int(answer) for name, answer in zip(self.questions, answers, strict=True)}
        return bad == 0

    def take(self, name: str) -> int:
        """The agreed answer of this step (0 once taken)."""
        if self.answers is None:
            self.settle()
        return self.answers.pop(name, 0)
