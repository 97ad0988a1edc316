"""The yes-or-no questions all ranks must answer alike at every training step, settled in one
all-reduce: is the loss finite everywhere (else every rank skips the step, or stops), has any
rank been told to stop (the preemption signal, SIGTERM), is a checkpoint due by the clock.
Asked separately they were a collective each per step; together they cost one tiny all-reduce,
whatever the world size.
"""

import torch
import torch.distributed as dist


class StepAgreement:
    """Callbacks `ask` their question once (a function giving this rank's answer: a bool, or a
    small whole number such as a signal's); the module's training step `settle`s them all with the
    loss; each callback then `take`s its agreed answer: the largest of all ranks' answers, so true
    when any rank said yes."""

    def __init__(self):
        self.questions, self.answers = {}, {}

    def ask(self, name: str, question) -> None:
        self.questions[name] = question

    def settle(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank; the questions' answers are kept for `take`."""
        mine = [float(question() or 0) for question in self.questions.values()]
        flags = torch.cat([(~torch.isfinite(loss.detach())).float().reshape(1), loss.new_tensor(mine).float()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, *answers = flags.tolist()  # the one wait for the device in this bookkeeping
        self.answers = {name: int(answer) for name, answer in zip(self.questions, answers, strict=True)}
        return nonfinite == 0

    def take(self, name: str) -> int:
        """The agreed answer of this step (asked once per settle: 0 once taken)."""
        return self.answers.pop(name, 0)
