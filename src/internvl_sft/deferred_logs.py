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

from internvl_sft.checkpoint_writer import host_copies


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
        loss, grad_norm = host_copies(loss), host_copies(grad_norm)
        ready = None
        if torch.cuda.is_available():
            ready = torch.cuda.Event()
            ready.record()
        return cls(step, epoch, steps, loss, grad_norm, learning_rate, ready)

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
