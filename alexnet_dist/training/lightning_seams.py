"""The places where alexnet_dist reaches past Lightning's public API, gathered here with the reason
for each. tests/test_lightning_seams.py runs each against the installed Lightning and fails when a
release renames or changes what it uses, instead of preemption quietly breaking on a cluster."""

import math

import lightning.pytorch as pl


def silence_sigterm_broadcast(trainer: pl.Trainer) -> None:
    """Lightning (2.6) broadcasts rank zero's SIGTERM flag before every training step, a collective
    of its own; alexnet_dist handles SIGTERM itself and sends it in the step's one agreement
    (agreement.py), so that broadcast is switched off. A Lightning without it needs nothing."""
    loop = trainer.fit_loop.epoch_loop
    if hasattr(loop, "_broadcast_sigterm_tensor"):
        loop._broadcast_sigterm_tensor = lambda: None


def stop_without_validating(trainer: pl.Trainer) -> None:
    """Ends the fit at this step boundary without the validation Lightning would run for the cut
    epoch (as for early stopping): a whole pass over the val set inside a scheduler's grace period.
    The fit's last validation is the only reader of limit_val_batches after this point."""
    trainer.should_stop = True
    trainer.limit_val_batches = 0


def training_batches(trainer: pl.Trainer) -> float:
    """The training loader's batches per epoch, counted now if the Trainer has not yet (it counts
    them after configure_optimizers when trainer.max_epochs=-1); infinite for a loader without a
    length."""
    if not math.isfinite(trainer.num_training_batches):
        trainer.fit_loop.setup_data()
    return trainer.num_training_batches


def waiting_for_training_batch(frame) -> bool:
    """Whether the main thread, stopped at `frame` (a signal handler's), waits for the next training
    batch: inside Lightning's data fetcher (loops/fetchers.py) called by the training loops (2.6:
    training_epoch_loop.advance's next(data_fetcher), fit_loop's iter), not by a validation, and not in
    an object's __del__ (where an exception would be lost). There the last step is finished, its
    state whole: a checkpoint taken then is that of the last finished step."""
    fetching = training = False
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if frame.f_code.co_name == "__del__" or name.endswith("/loops/evaluation_loop.py"):
            return False
        fetching = fetching or name.endswith("/loops/fetchers.py")
        training = training or name.endswith(("/loops/training_epoch_loop.py", "/loops/fit_loop.py"))
        frame = frame.f_back
    return fetching and training
