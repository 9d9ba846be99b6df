"""The fast path's CUDA graphs (`train.fast.cuda_graphs`): the language model's forward, the answer loss and its
backward recorded as one CUDA graph per batch shape, replayed with a single launch.

Once the vision cache holds every tile, a step of the 1B recipe is little more than the language model, and
launching its kernels one by one from Python took about twice their GPU time: 24 compiled blocks forward, their
backward in autograd's thread, the adapters' gradient kernels. Recorded once, the step's whole language-model part
is one launch. Forward and backward are recorded together so the activations saved for the backward pass are the
graph's own temporaries: graphs of every shape share one memory pool, which holds the largest shape's activations
once (recording forward and backward apart would keep every shape's saved activations alive for good, each as
large as an eager step's). In the 1B recipe's 20-epoch run the peak memory grew from 42.7 to 46.0 GiB.

The graph computes the summed loss and its gradients at each replay; `ReplayedGradients` hands them to autograd
when the Trainer calls `backward`, scaled by the gradient it passes down (the Trainer's loss scaling), so the
Trainer's clipping, optimizer and logging see ordinary gradients. Evaluation batches (no gradients) get graphs of
the forward and the loss alone, in the same pool: the Trainer evaluates the same batches every epoch. Each graph's inputs are fixed buffers: the input
embeddings (the cached or freshly computed image features already placed), the answer positions and their target
tokens, padded with ignored targets to a few counts (`answer_slots`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn import functional as F

IGNORED_TARGET = -100  # cross_entropy's ignore_index: a padded answer slot adds nothing to the loss


def answer_slots(count: int) -> int:
    """Answer positions a graph has room for: `count` rounded up to a quarter of its power of two (at least 64),
    so batches with similar answer lengths share a graph and padding adds at most about a quarter."""
    step = max(64, 1 << max(0, count.bit_length() - 3))
    return -(-count // step) * step


def padded_answers(rows: torch.Tensor, columns: torch.Tensor, targets: torch.Tensor,
                   slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The answer positions and targets padded to `slots` entries: position (0, 0), target ignored."""
    extra = slots - len(targets)
    return F.pad(rows, (0, extra)), F.pad(columns, (0, extra)), F.pad(targets, (0, extra), value=IGNORED_TARGET)


class ReplayedGradients(torch.autograd.Function):
    """The summed loss a graph replay computed, attached to the tensors it depends on: its backward returns the
    replay's gradients times the gradient passed down, so autograd accumulates them as if it had computed them."""

    @staticmethod
    def forward(ctx, total: torch.Tensor, gradients: list[torch.Tensor | None], *inputs: torch.Tensor):
        ctx.gradients = gradients
        return total.clone()  # the next replay overwrites the graph's own output

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        present = [gradient for gradient in ctx.gradients if gradient is not None]
        scaled = iter(torch._foreach_mul(present, upstream) if present else ())
        return None, None, *(None if gradient is None else next(scaled) for gradient in ctx.gradients)


@dataclasses.dataclass
class RecordedStep:
    """One batch shape's graph with its input buffers and outputs."""

    graph: torch.cuda.CUDAGraph
    embeds: torch.Tensor
    rows: torch.Tensor
    columns: torch.Tensor
    targets: torch.Tensor
    total: torch.Tensor
    gradients: list[torch.Tensor | None]


class AnswerLossGraphs:
    """The summed answer loss of the language model's last hidden states, from recorded graphs. `masks`: what the
    language model gets as its attention mask (causal attention alone)."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, masks: dict[str, None],
                 summed_loss: Callable[[torch.Tensor, torch.Tensor, nn.Module], torch.Tensor]):
        self.language_model = language_model
        self.lm_head = lm_head
        self.masks = masks
        self.summed_loss = summed_loss
        self.recorded: dict[tuple, RecordedStep] = {}
        self.pool = None
        self.stream: torch.cuda.Stream | None = None  # where graphs are recorded (and their first run warms up)
        self.leaf_edges: dict[int, GradientEdge] = {}
        self.replays = 0

    def __call__(self, embeds: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
        rows, columns, targets = padded_answers(rows, columns, targets, answer_slots(len(targets)))
        step = self.step_for(embeds, len(targets))
        with torch.no_grad():
            for buffer, value in ((step.embeds, embeds), (step.rows, rows), (step.columns, columns),
                                  (step.targets, targets)):
                buffer.copy_(value, non_blocking=True)
        step.graph.replay()
        self.replays += 1
        if not torch.is_grad_enabled():
            return step.total.clone()  # the next replay overwrites the graph's own output
        return ReplayedGradients.apply(step.total, step.gradients, *self.gradient_inputs(embeds))

    @functools.cached_property
    def trained_parameters(self) -> list[nn.Parameter]:
        """The parameters the graphs differentiate (tied weights once)."""
        unique = {id(p): p for module in (self.language_model, self.lm_head) for p in module.parameters()}
        return [p for p in unique.values() if p.requires_grad]

    def gradient_inputs(self, embeds: torch.Tensor) -> list[torch.Tensor]:
        return ([embeds] if embeds.requires_grad else []) + self.trained_parameters

    def step_for(self, embeds: torch.Tensor, slots: int) -> RecordedStep:
        kind = compile_kind(embeds)
        key = (tuple(embeds.shape), embeds.dtype, kind, slots, torch.is_autocast_enabled("cuda"))
        if key not in self.recorded:
            self.recorded[key] = self.record(embeds, slots, new_kind=kind not in {known[2] for known in self.recorded})
        return self.recorded[key]

    def record(self, embeds: torch.Tensor, slots: int, new_kind: bool) -> RecordedStep:
        """Record the step for this shape. A shape of a kind not recorded before (`compile_kind`) is run once
        first, outside the graph: compiled blocks compile their variant for it then, which they cannot while
        recording. Other shapes are recorded straight away: a run outside the pool, beside the pool that holds the
        largest activations, would need them twice over (the length-grouped sampler gives the longest batch
        first)."""
        buffers = {
            "embeds": embeds.detach().clone().requires_grad_(embeds.requires_grad),
            "rows": torch.zeros(slots, dtype=torch.long, device=embeds.device),
            "columns": torch.zeros(slots, dtype=torch.long, device=embeds.device),
            "targets": torch.full((slots,), IGNORED_TARGET, dtype=torch.long, device=embeds.device),
        }
        if self.stream is None:
            self.stream = torch.cuda.Stream(embeds.device)
        if torch.is_grad_enabled():  # an evaluation's graph has no backward
            with torch.cuda.stream(self.stream):
                self.hold_leaf_nodes(buffers["embeds"])
        with uncached_autocast():
            if new_kind:
                self.warm_up(buffers)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the data loader's pin-memory thread may query CUDA events meanwhile
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                total, gradients = self.loss_and_gradients(**buffers)
        self.pool = graph.pool()
        return RecordedStep(graph=graph, total=total, gradients=gradients, **buffers)

    def hold_leaf_nodes(self, embeds: torch.Tensor) -> None:
        """Create the autograd nodes that take the gradients of the graphs' inputs (their `AccumulateGrad` nodes)
        on the recording stream, and keep them. A leaf's node remembers the stream it was created on, and at the
        end of a backward pass autograd makes the caller's stream wait on it. Created on the default stream (by the
        previous step's `ReplayedGradients`, while something still holds that step's loss), it would pull the
        default stream into the next recording, which CUDA refuses ("operation would make the legacy stream depend
        on a capturing blocking stream"); kept, every later use finds this one."""
        for leaf in self.gradient_inputs(embeds):
            if id(leaf) not in self.leaf_edges:
                self.leaf_edges[id(leaf)] = get_gradient_edge(leaf)

    def warm_up(self, buffers: dict[str, torch.Tensor]) -> None:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.loss_and_gradients(**buffers)
        torch.cuda.current_stream().wait_stream(self.stream)

    def loss_and_gradients(self, embeds: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
                           targets: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """What a graph records: the summed loss at the answer slots and, with gradients enabled, its gradients
        (None: an input the loss does not reach)."""
        hidden = self.language_model(inputs_embeds=embeds, attention_mask=self.masks).last_hidden_state
        total = self.summed_loss(hidden[rows, columns], targets, self.lm_head)
        if not torch.is_grad_enabled():
            return total, []
        gradients = torch.autograd.grad(total, self.gradient_inputs(embeds), allow_unused=True)
        return total.detach(), list(gradients)


def compile_kind(embeds: torch.Tensor) -> tuple[bool, bool, bool, bool]:
    """What a compiled block specialises on beyond the sizes it takes as symbols: a batch of one sample, a length
    that is a multiple of 8 or not (memory alignment), whether its input needs gradients, and whether gradients
    are on (training) or off (evaluation, where the blocks also run in evaluation mode)."""
    return embeds.shape[0] == 1, embeds.shape[1] % 8 == 0, embeds.requires_grad, torch.is_grad_enabled()


def uncached_autocast():
    """The autocast in force, without its cache of cast weights: a cast cached before a recording would be
    replayed as that stale copy instead of being recorded (PyTorch's rule for graphs under autocast)."""
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                          cache_enabled=False)
