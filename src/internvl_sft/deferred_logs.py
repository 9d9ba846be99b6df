"""A step's logged loss and gradient norm read from the GPU one step late (`train.fast.deferred_logs`).

The Trainer logs every step (`logging_steps: 1`) by reading the step's loss and gradient norm with `.item()`,
which makes the host wait until the GPU has finished everything queued so far; the host then prepares the next
step (data, embeddings, launches) while the GPU waits in turn. Here the two values are copied to the host by
queued copies, and read (and logged) when the next step has been queued: the values, their order in the log
history and the steps they are logged at stay those of the Trainer's own logging, and the host runs one step ahead
of the GPU. Evaluations, checkpoint saves and the end of training publish the pending log first.
"""

from __future__ import annotations

import dataclasses

import torch

from internvl_sft.checkpoint_writer import host_copies, queued_event


@dataclasses.dataclass
class PendingLog:
    """One step's logs on their way from the GPU: the summed loss over `steps` optimizer steps (host copy), the
    gradient norm (host copy or number), the learning rate, and the step and epoch they belong to."""

    step: int
    epoch: float | None
    steps: int
    loss: torch.Tensor
    grad_norm: torch.Tensor | float | None
    learning_rate: float
    ready: torch.cuda.Event | None

    @classmethod
    def queued(cls, step: int, epoch: float | None, steps: int, loss: torch.Tensor,
               grad_norm: torch.Tensor | float | None, learning_rate: float) -> PendingLog:
        """Queue host copies of the step's values (`loss` may be reset in place afterwards: the GPU copies it
        first)."""
        return cls(step, epoch, steps, host_copies(loss), host_copies(grad_norm), learning_rate, queued_event())

    def logs(self) -> tuple[float, dict[str, float]]:
        """The summed loss and the logs as the Trainer writes them (loss per step, gradient norm, learning rate),
        once the copies have arrived."""
        if self.ready is not None:
            self.ready.synchronize()
        total = self.loss.item()
        logs = {"loss": total / self.steps}
        if self.grad_norm is not None:
            logs["grad_norm"] = self.grad_norm.item() if torch.is_tensor(self.grad_norm) else self.grad_norm
        logs["learning_rate"] = self.learning_rate
        return total, logs


class LogsOneStepLate:
    """Trainer mixin: with `deferred_logs`, each step's log is queued as a `PendingLog` and published at the next
    step (or at once before an evaluation, a save or the end of training), as the Trainer would have logged it."""

    deferred_logs = False
    pending_log: PendingLog | None = None

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, learning_rate=None, **kwargs):
        if self.deferred_logs:
            self.defer_step_log(tr_loss, grad_norm, learning_rate)
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, learning_rate=learning_rate, **kwargs)

    def defer_step_log(self, tr_loss: torch.Tensor, grad_norm, learning_rate: float | None) -> None:
        """Publish the previous step's log, queue this step's, and leave the Trainer nothing to log."""
        due = self.control.should_log and self.state.global_step > self._globalstep_last_logged
        self.publish_pending_log()
        if due:
            rate = self._get_learning_rate() if learning_rate is None else learning_rate
            steps = self.state.global_step - self._globalstep_last_logged
            self.pending_log = PendingLog.queued(self.state.global_step, self.state.epoch, steps, tr_loss, grad_norm,
                                                 rate)
            tr_loss -= tr_loss  # the Trainer's reset of its running loss, queued after the copy
            self._globalstep_last_logged = self.state.global_step
            self.store_flos()
        if self.control.should_evaluate or self.control.should_save or self.control.should_training_stop:
            self.publish_pending_log()
        self.control.should_log = False

    def publish_pending_log(self) -> None:
        """Log the queued step's values as the Trainer would have at that step (its step and epoch)."""
        if self.pending_log is None:
            return
        record, self.pending_log = self.pending_log, None
        total, logs = record.logs()
        self._total_loss_scalar += total
        now = self.state.global_step, self.state.epoch
        self.state.global_step, self.state.epoch = record.step, record.epoch
        try:
            self.log(logs)
        finally:
            self.state.global_step, self.state.epoch = now
