"""The fast training step (`train.fast` in params.yaml): the stock loss without the work it does not need.

transformers' InternVL computes full-vocabulary logits at every position although the loss reads only the
answer positions, and with gradient checkpointing on, peft makes every input embedding require gradients,
the vision tower's patch embedding included, so the frozen vision tower is recorded, recomputed and
back-propagated for nothing. `FastForward` replaces the model's forward for calls with labels:

- the LM head and the cross-entropy run only where the next-token label is set (the same mean as
  transformers' causal-LM loss), optionally a chunk at a time, each chunk's logits recomputed in backward;
- the frozen part of the vision path (the vision tower, and the projector when it is frozen too) runs
  under torch.no_grad;
- opt-in, that frozen part's output is cached per tile in CPU memory, keyed by the image file's bytes, the
  tiling and the frozen weights, and reused in later epochs, when the data-loader workers no longer load the
  pixels of the samples it holds;
- a right-padded batch reaches the language model without its padding mask: causal attention already keeps
  every real position from seeing the padding after it, and without a mask PyTorch's attention can run
  FlashAttention instead of a kernel that reads a mask;
- the answer and image positions come with the batch from `collate`, found on the CPU, so the step queues its
  GPU work without once waiting for the GPU (a mask turned into positions on the GPU waits there for every kernel
  queued before it, and the host's next launches wait with it).
- opt-in, a training step's language model, answer loss and backward (an evaluation batch's forward and loss) run
  as CUDA graphs recorded per batch shape (`graphs.py`), each replayed with one launch instead of thousands.

It is installed as the forward of the model instance, so the Trainer's loss scaling, DDP's gradient hooks and
DeepSpeed's engine all see one ordinary forward call: computing the loss from sub-modules in
`Trainer.compute_loss` would bypass DDP's forward, and DDP then synchronises no gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from internvl_sft.config import FastConfig
from internvl_sft.data.dataset import SupervisedDataset, TileSource, answer_positions, content_digest, image_positions
from internvl_sft.graphs import AnswerLossGraphs

MIB = 2**20


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, any device), copied to the CPU."""
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def answer_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_tokens: int = 0,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy over the labelled positions only, reduced as transformers' causal-LM loss is:
    the mean over label tokens, or the sum over `num_items_in_batch` when the Trainer counted the label tokens
    of a whole accumulated batch. `positions`: the batch's `answer_positions` (found here when not given)."""
    def summed(rows: torch.Tensor, columns: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return summed_cross_entropy(hidden[rows, columns], targets, lm_head, chunk_tokens)

    return reduced_answer_loss(summed, labels, positions, num_items_in_batch)


def reduced_answer_loss(
    summed: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    positions: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None,
) -> torch.Tensor:
    """`summed(rows, columns, targets)`, the summed loss at the answer positions and their next tokens, over the
    label tokens of the batch or, as the Trainer counted them, of the accumulated batch."""
    if positions is None:
        positions = answer_positions(labels)
    rows, columns = positions
    total = summed(rows, columns, labels[rows, columns + 1])
    divisor = positions.shape[1] if num_items_in_batch is None else num_items_in_batch
    return total / (divisor.to(total.device) if torch.is_tensor(divisor) else divisor)


def summed_cross_entropy(
    states: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, chunk_tokens: int
) -> torch.Tensor:
    """Summed loss of the selected positions; in chunks, each chunk's logits are freed and recomputed in backward."""
    if chunk_tokens <= 0 or len(targets) <= chunk_tokens:
        return chunk_cross_entropy(states, targets, lm_head)
    parts = [
        checkpoint(chunk_cross_entropy, chunk, chunk_targets, lm_head, use_reentrant=False)
        for chunk, chunk_targets in zip(states.split(chunk_tokens), targets.split(chunk_tokens))
    ]
    return torch.stack(parts).sum()


def chunk_cross_entropy(states: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Logits upcast to fp32 before the softmax, as transformers does."""
    return F.cross_entropy(aligned_logits(states, lm_head).float(), targets, reduction="sum")


LOGIT_ALIGNMENT = 64


def aligned_logits(states: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """`lm_head(states)`, computed with the vocabulary padded by zero rows to a multiple of 64 and the padding's
    logits sliced off. InternVL2-1B's vocabulary (151,655) is odd: rows of its logits are not 16-byte aligned, so
    cuBLAS falls back to kernels written for older GPUs, which took 6.4 ms for the forward product of 2,048 answer
    positions on an H200."""
    if type(lm_head) is not nn.Linear:  # e.g. with an adapter of its own
        return lm_head(states)
    extra = -lm_head.out_features % LOGIT_ALIGNMENT
    if not extra:
        return lm_head(states)
    bias = None if lm_head.bias is None else F.pad(lm_head.bias, (0, extra))
    return F.linear(states, F.pad(lm_head.weight, (0, 0, 0, extra)), bias)[..., : lm_head.out_features]


def vision_tokens(inner: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(tiles, tokens, width) pixel-shuffled vision features: the projector's input, as InternVL computes it."""
    config = inner.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise NotImplementedError(f"vision_feature_layer {layer!r}: only a single layer is supported")
    pixel_values = pixel_values.to(dtype=inner.dtype)
    if layer == -1:
        features = inner.vision_tower(pixel_values=pixel_values).last_hidden_state
    else:
        features = inner.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]
    if config.vision_feature_select_strategy == "default":
        features = features[:, 1:, :]  # the class token
    tiles, count, width = features.shape
    side = int(count**0.5)
    shuffled = inner.pixel_shuffle(features.reshape(tiles, side, side, width), scale_factor=config.downsample_ratio)
    return shuffled.reshape(tiles, -1, shuffled.shape[-1])


def project(inner: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return inner.multi_modal_projector(tokens)


# The vision path, stage by stage: a tile's projected features are project(vision_tokens(tile)).
VISION_STAGES = (vision_tokens, project)


def vision_modules(inner: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The module behind each of VISION_STAGES."""
    return inner.vision_tower, inner.multi_modal_projector


def run_stages(inner: nn.Module, values: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    for stage in VISION_STAGES[start:stop]:
        values = stage(inner, values)
    return values


def run_frozen_stages(inner: nn.Module, pixel_values: torch.Tensor, frozen: int) -> torch.Tensor:
    """The first `frozen` stages, which train nothing, without autograd. A single tile runs twice in one batch:
    compiled vision blocks take every tile count as one symbolic size except 1, which PyTorch compiles apart (with
    the vision cache, a batch whose other tiles are all cached already)."""
    with torch.no_grad():
        if len(pixel_values) == 1:
            return run_stages(inner, pixel_values.expand(2, *pixel_values.shape[1:]), 0, frozen)[:1]
        return run_stages(inner, pixel_values, 0, frozen)


def is_frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def frozen_stage_count(inner: nn.Module) -> int:
    """How many of VISION_STAGES, from the first on, train nothing: 0, 1 (vision tower) or 2 (and projector)."""
    count = 0
    for module in vision_modules(inner):
        if not is_frozen(module):
            break
        count += 1
    return count


def has_dropout(module: nn.Module) -> bool:
    """Whether the module's output can depend on train/eval mode through dropout (layers or attention rates)."""
    for part in module.modules():
        rate = getattr(part, "attention_dropout", 0.0)
        if (isinstance(part, nn.Dropout) and part.p > 0) or (isinstance(rate, float | int) and rate > 0):
            return True
    return False


class FeatureCache:
    """Tensors in CPU memory under string keys, at most `max_bytes` in all: the first that fit stay for the run,
    later ones are not kept. Training reads every tile once an epoch, in a new order each time; when not all fit,
    dropping the least recently used would drop each entry before its next use, while keeping the first ones
    hits on them every epoch.

    Values that come from a GPU are kept in page-locked memory and copied in both directions without waiting
    for the host: every copy is queued on the GPU's stream and no CPU code reads an entry (PyTorch's host
    allocator keeps a block from reuse until the copies queued on it are done). A step then does no tensor work
    on the CPU, which ran many times slower on cores that data-loader workers kept busy: stacking a step's
    cached rows took 0.38 s a step in a profile on an H200 machine with 4 workers tiling. The allocator rounds
    each page-locked row up to a power of two, so the memory held can exceed the counted bytes by up to 2x."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if self.bytes + size > self.max_bytes or key in self.entries:
            return
        entry = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=value.is_cuda)
        self.entries[key] = entry.copy_(value.detach(), non_blocking=True)
        self.bytes += size

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self.entries), "bytes": self.bytes}


class WeightsFingerprint:
    """Content hash of some modules' weights, recomputed only after one of them changed in place or was replaced
    (tracked through each tensor's storage address and in-place version counter)."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.modules = tuple(modules)
        self._state: tuple | None = None
        self._digest = ""

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for index, module in enumerate(self.modules):
            for name, tensor in (*module.named_parameters(), *module.named_buffers()):
                yield f"{index}.{name}", tensor

    def current(self) -> str:
        state = tuple((name, t.data_ptr(), t._version) for name, t in self.tensors())
        if state != self._state:
            self._digest = content_digest(
                part
                for name, t in self.tensors()
                for part in (name, str(t.dtype), str(tuple(t.shape)), tensor_bytes(t))
            )
            self._state = state
        return self._digest


@dataclasses.dataclass(frozen=True)
class Tiles:
    """What a batch says of its tiles besides their pixels: each tile's cache key (None: never cached) and, from a
    dataset whose workers leave out cached pixels (`FastForward.share_cached_samples`), each tile's source."""

    keys: list[str | None] | None
    sources: list[TileSource] | None = None

    def loaded(self) -> list[bool]:
        """Whether each tile has a row in the batch's pixel values (in tile order)."""
        if self.sources is None:
            return [True] * len(self.keys)
        return [source[2] for source in self.sources]


class FastForward:
    """The forward of an `InternVLForConditionalGeneration` with the fast path; calls without labels (e.g.
    generation) go to the original forward."""

    def __init__(self, model: PreTrainedModel, cfg: FastConfig):
        self.model = model
        self.cfg = cfg
        self.original = model.forward
        self.causal_masks = causal_mask_mapping(model.model.language_model.config)
        self.cache = FeatureCache(cfg.vision_cache_mib * MIB) if cfg.vision_cache_mib else None
        self.fingerprints: dict[int, WeightsFingerprint] = {}
        self.cached_samples: list[torch.Tensor] = []
        self.flagged_datasets: list[SupervisedDataset] = []
        self.tiles_without_pixels = 0
        if self.cache is not None:
            check_cacheable(model.model)
        self.graphs = self.answer_loss_graphs() if cfg.cuda_graphs else None

    def answer_loss_graphs(self) -> AnswerLossGraphs:
        if self.causal_masks is None:
            raise ValueError("cuda_graphs needs a language model whose every layer attends to all earlier positions "
                             "(layers with sliding windows build their masks from the data each step)")
        return AnswerLossGraphs(self.model.model.language_model, self.model.lm_head, self.causal_masks,
                                functools.partial(summed_cross_entropy, chunk_tokens=self.cfg.logit_chunk_tokens))

    def share_cached_samples(self, *datasets: SupervisedDataset) -> None:
        """Flag, in memory the data-loader workers share, each sample of the datasets whose every tile's features
        the cache holds; the workers then leave out its pixels: no decoding, tiling or copy to the GPU, which in a
        cached epoch are all the data pipeline does."""
        for dataset in datasets:
            flags = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()
            dataset.skip_cached_pixels(len(self.cached_samples), flags)
            self.cached_samples.append(flags)
            self.flagged_datasets.append(dataset)

    def __call__(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        tile_keys: list[str | None] | None = None,
        tile_sources: list[TileSource] | None = None,
        answer_positions: torch.Tensor | None = None,
        image_positions: torch.Tensor | None = None,
        right_padded: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """The loss of a batch from `collate` (with its `FAST_STEP_KEYS`, which spare the GPU every wait for the
        host; without them they are found here, waiting)."""
        if labels is None:
            return self.original(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                 **kwargs)
        if kwargs:
            raise TypeError(f"the fast training forward takes no {', '.join(sorted(kwargs))}")
        if self.cfg.drop_padding_mask and (is_right_padded(attention_mask) if right_padded is None else right_padded):
            attention_mask = None
        embeds, mask = self.language_inputs(input_ids, attention_mask, pixel_values, Tiles(tile_keys, tile_sources),
                                            image_positions)
        if self.takes_graphs(mask):
            return CausalLMOutputWithPast(loss=self.graphed_loss(embeds, labels, answer_positions, num_items_in_batch))
        hidden = self.model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        hidden = hidden[:, : input_ids.shape[1]]
        if self.cfg.answer_logits_only:
            loss = answer_loss(hidden, labels, self.model.lm_head, num_items_in_batch, self.cfg.logit_chunk_tokens,
                               answer_positions)
            return CausalLMOutputWithPast(loss=loss)
        logits = self.model.lm_head(hidden)
        loss = self.model.loss_function(logits=logits, labels=labels, num_items_in_batch=num_items_in_batch,
                                        vocab_size=self.model.config.text_config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def language_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        tiles: Tiles,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | dict | None]:
        """The language model's input embeddings, image features placed at the image tokens (their `positions`,
        found here when not given), and its attention mask (the causal masks when the padding mask is dropped)."""
        inner = self.model.model
        embeds = inner.get_input_embeddings()(input_ids)
        if pixel_values is not None or tiles.keys:
            with vision_attention_kernels(self.cfg.vision_kernels):
                features = self.image_features(pixel_values, tiles, embeds.device).to(embeds.device, embeds.dtype)
            if positions is None:
                positions = image_positions(input_ids, inner.config.image_token_id)
            embeds = place_image_features(embeds, positions, features)
        if attention_mask is not None:
            return embeds, attention_mask
        if self.cfg.compile:
            embeds = pad_positions(embeds, self.cfg.pad_to_multiple_of)
        return embeds, self.causal_masks

    def takes_graphs(self, mask) -> bool:
        """Whether this call runs through the recorded graphs: a training step (gradients on, training mode) or an
        evaluation (gradients off, evaluation mode) of a batch attended causally alone."""
        return (self.graphs is not None and mask is self.causal_masks
                and torch.is_grad_enabled() == self.model.training)

    def graphed_loss(self, embeds: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None,
                     num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
        """`answer_loss` of the language model's output, both from the recorded graphs."""
        return reduced_answer_loss(functools.partial(self.graphs, embeds), labels, positions, num_items_in_batch)

    def image_features(self, pixel_values: torch.Tensor | None, tiles: Tiles, device: torch.device) -> torch.Tensor:
        """Projected features of every tile: the frozen stages without autograd (or from the cache), then the
        trainable ones."""
        inner = self.model.model
        frozen = frozen_stage_count(inner) if self.cfg.frozen_vision_no_grad or self.cache else 0
        if self.cache is not None and tiles.keys is not None and frozen:
            values = self.cached_stages(pixel_values, tiles, frozen, device)
        elif frozen:
            values = run_frozen_stages(inner, pixel_values, frozen)
        else:
            values = pixel_values
        return run_stages(inner, values, frozen, len(VISION_STAGES))

    def cached_stages(self, pixel_values: torch.Tensor | None, tiles: Tiles, frozen: int,
                      device: torch.device) -> torch.Tensor:
        """The output of the first `frozen` stages per tile, computed only for tiles not in the cache (from their
        pixels, which a batch carries for every tile not known to be cached); rows are copied between the cache
        and the device one by one, asynchronously (`FeatureCache`)."""
        loaded = tiles.loaded()
        self.tiles_without_pixels += len(loaded) - sum(loaded)
        pixel_rows = 0 if pixel_values is None else len(pixel_values)
        if sum(loaded) != pixel_rows:
            raise ValueError(f"{sum(loaded)} tiles with pixels for {pixel_rows} rows of pixel values")
        prefix = f"{frozen}:{self.fingerprint(frozen)}:"
        keys = [None if key is None else prefix + key for key in tiles.keys]
        found = [None if key is None else self.cache.get(key) for key in keys]
        missing = [index for index, value in enumerate(found) if value is None]
        fresh = self.compute_missing(pixel_values, tiles, loaded, missing, frozen)
        if fresh is not None:
            for index, row in zip(missing, fresh):
                if keys[index] is not None:
                    self.cache.put(keys[index], row)
        self.flag_cached_samples(tiles, keys)
        hits = [index for index, value in enumerate(found) if value is not None]
        if not hits:
            return fresh
        first = found[hits[0]]
        values = torch.empty((len(keys), *first.shape), dtype=first.dtype, device=device)
        for index in hits:
            values[index].copy_(found[index], non_blocking=True)
        if fresh is not None:
            values[missing] = fresh.to(first.dtype)
        return values

    def compute_missing(self, pixel_values: torch.Tensor | None, tiles: Tiles, loaded: list[bool], missing: list[int],
                        frozen: int) -> torch.Tensor | None:
        """The frozen stages' output for the `missing` tiles, from their rows of `pixel_values` (`loaded`: which
        tiles have one)."""
        if not missing:
            return None
        lost = [index for index in missing if not loaded[index]]
        if lost:
            dataset, sample, _ = tiles.sources[lost[0]]
            raise RuntimeError(f"{self.flagged_datasets[dataset].samples[sample].where}: {len(lost)} tile(s) of a "
                               "batch are neither in the vision feature cache nor loaded: the cache drops nothing, so "
                               "an image or the frozen weights changed during the run")
        row_of_tile = {tile: row for row, tile in enumerate(index for index, has in enumerate(loaded) if has)}
        return run_frozen_stages(self.model.model, pixel_values[[row_of_tile[index] for index in missing]], frozen)

    def flag_cached_samples(self, tiles: Tiles, keys: list[str | None]) -> None:
        """Set the shared flag of every sample of the batch whose tiles are all in the cache now."""
        if tiles.sources is None:
            return
        samples = {(dataset, sample) for dataset, sample, _ in tiles.sources}
        incomplete = {(dataset, sample) for (dataset, sample, _), key in zip(tiles.sources, keys)
                      if key is None or key not in self.cache}
        for dataset, sample in samples - incomplete:
            self.cached_samples[dataset][sample] = True

    def cache_stats(self) -> dict[str, int]:
        """The cache's use, and how many tiles came without pixels because it held their features."""
        return {**self.cache.stats(), "tiles_without_pixels": self.tiles_without_pixels}

    def fingerprint(self, frozen: int) -> str:
        if frozen not in self.fingerprints:
            self.fingerprints[frozen] = WeightsFingerprint(vision_modules(self.model.model)[:frozen])
        return self.fingerprints[frozen].current()


SWITCH_WORDS: tuple[tuple[str, str | Callable[[FastConfig], str]], ...] = (  # in the order the log line names them
    ("answer_logits_only", lambda cfg: "LM head and loss at label positions only"
     + (f", {cfg.logit_chunk_tokens} positions a chunk" if cfg.logit_chunk_tokens else "")),
    ("frozen_vision_no_grad", "frozen vision stages without autograd"),
    ("vision_cache_mib", lambda cfg: f"vision feature cache of {cfg.vision_cache_mib} MiB"),
    ("compile", "transformer blocks compiled"),
    ("cuda_graphs", "language model, answer loss and backward as CUDA graphs"),
    ("background_saves", "checkpoints written in the background"),
    ("deferred_logs", "each step's loss and gradient norm read at the next step"),
    ("sdpa_without_cudnn", "attention without cuDNN's kernels"),
    ("skip_lora_input_cast", "adapter inputs not cast to fp32"),
    ("vision_kernels", "patch embedding as a matrix product, vision attention through cuDNN first"),
    ("drop_padding_mask", lambda cfg: "causal attention without the padding mask for right-padded batches"
     + (f", their lengths padded to multiples of {cfg.pad_to_multiple_of}"
        if cfg.compile and cfg.pad_to_multiple_of > 1 else "")),
)


def describe(cfg: FastConfig) -> str:
    """One line naming every `train.fast` switch that is on, for the training log."""
    parts = [words(cfg) if callable(words) else words for switch, words in SWITCH_WORDS if getattr(cfg, switch)]
    return "fast path: " + "; ".join(parts) if parts else "stock training step (every train.fast switch off)"


def is_right_padded(attention_mask: torch.Tensor | None) -> bool:
    """Whether each row of the padding mask is ones followed by zeros: padding only after the sample's tokens.
    Outputs at the padding positions then change without the mask, the real positions' do not."""
    if attention_mask is None:
        return True
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def pad_positions(embeds: torch.Tensor, multiple: int) -> torch.Tensor:
    """`embeds` (batch, positions, width) with zero rows appended up to a multiple of `multiple` positions. Behind
    every sample under causal attention without a mask, they change no real position's output. Compiled blocks
    are specialised to lengths that are multiples of 8 or not (memory alignment): on the 1B recipe the first
    unaligned batch compiled the language block's two variants again, 16 s of the first epoch. CUDA graphs are
    recorded once per length: a larger multiple, fewer recordings. Only with compiled blocks: elsewhere padding buys
    nothing and would change the LoRA dropout masks (drawn over the padded shape) of a run that was reproducible."""
    extra = -embeds.shape[1] % multiple
    return F.pad(embeds, (0, 0, 0, extra)) if extra else embeds


def causal_mask_mapping(config) -> dict[str, None] | None:
    """The language model's attention masks by layer type, all None (causal attention alone), for a model whose every
    layer attends fully; None for others (e.g. sliding windows), which build their masks. Given a mapping, the
    model skips its check of the positions for packed sequences, which waits for the GPU every step."""
    layer_types = getattr(config, "layer_types", None)
    return {"full_attention": None} if layer_types and set(layer_types) == {"full_attention"} else None


def vision_attention_kernels(enabled: bool) -> contextlib.AbstractContextManager:
    """Within it, attention prefers cuDNN's kernels (over `sdpa_without_cudnn`'s choice), where the vision tower's
    attention runs. Its sequence length is fixed, so cuDNN builds one plan per tile count and reuses it; on an H200
    cuDNN's forward took 1.50 ms where FlashAttention took 2.07 ms for 112 tiles of 1,025 positions. Compiled vision
    blocks keep the kernel chosen when they were compiled, i.e. this one."""
    if not enabled:
        return contextlib.nullcontext()
    return sdpa_kernel(VISION_ATTENTION_KERNELS, set_priority=True)


VISION_ATTENTION_KERNELS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                            SDPBackend.MATH]


def patches_by_matmul(conv: nn.Conv2d, pixels: torch.Tensor) -> torch.Tensor:
    """`conv(pixels)` for a patch embedding (stride equal to the kernel, no padding), as one matrix product of the
    flattened patches. cuDNN's convolution took 6.7 ms for 112 tiles of 448 px on an H200, the product 1.0 ms."""
    batch, channels, height, width = pixels.shape
    patch_height, patch_width = conv.kernel_size
    rows, columns = height // patch_height, width // patch_width
    patches = pixels.reshape(batch, channels, rows, patch_height, columns, patch_width).permute(0, 2, 4, 1, 3, 5)
    weight = conv.weight.reshape(conv.out_channels, -1)
    flat = F.linear(patches.reshape(batch * rows * columns, -1), weight, conv.bias)
    return flat.reshape(batch, rows, columns, -1).permute(0, 3, 1, 2)


class PatchEmbeddingConv2d(nn.Conv2d):
    """A patch-embedding convolution computed by `patches_by_matmul` on a GPU; on the CPU the convolution stays (it
    is not the slow part there, and CPU runs keep their results). Installed by swapping the class of the model's own
    module: its weights, state-dict keys and hooks stay, and no attribute of it refers back to it (a forward set on
    the instance would make a reference cycle, which only the garbage collector breaks, at any time up to the
    interpreter's shutdown)."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return patches_by_matmul(self, pixels) if pixels.is_cuda else super().forward(pixels)


def is_patch_embedding(conv: nn.Conv2d) -> bool:
    return (conv.stride == conv.kernel_size and conv.padding == (0, 0) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros")


def embed_patches_by_matmul(inner: nn.Module) -> bool:
    """Make the vision tower's patch embedding a `PatchEmbeddingConv2d`; False where it is not a plain patch
    convolution."""
    conv = getattr(getattr(inner.vision_tower.embeddings, "patch_embeddings", None), "projection", None)
    if type(conv) is not nn.Conv2d or not is_patch_embedding(conv):
        return False
    conv.__class__ = PatchEmbeddingConv2d
    return True


def place_image_features(embeds: torch.Tensor, positions: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Put the image features, in order, at the image-token `positions` (rows and columns) of the token embeddings."""
    tokens = positions.shape[1]
    if tokens * embeds.shape[-1] != features.numel():
        raise ValueError(f"{tokens} image tokens for {features.shape[0] * features.shape[1]} image features")
    return embeds.index_put(tuple(positions), features.reshape(tokens, embeds.shape[-1]))


def check_cacheable(inner: nn.Module) -> None:
    """The cache is exact only for a frozen, dropout-free vision tower whose full weights this process holds."""
    vision = inner.vision_tower
    if not is_frozen(vision):
        raise ValueError("params: train: fast: vision_cache_mib needs a frozen vision tower "
                         "(freeze_backbone: true, backbone_lora.r: 0)")
    if has_dropout(vision) or has_dropout(inner.multi_modal_projector):
        raise ValueError("params: train: fast: vision_cache_mib needs a vision path without dropout")
    if any(hasattr(p, "ds_id") for p in vision.parameters()):
        raise ValueError("params: train: fast: vision_cache_mib does not work with DeepSpeed ZeRO-3")


def unwrap(model: nn.Module) -> PreTrainedModel:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def compile_blocks(model: nn.Module) -> int:
    """torch.compile each transformer block of the language model and of the vision tower (blocks of one kind
    share their compiled code); returns how many. Fuses the element-wise work around the matrix products
    (norms, activations, rotary embeddings, LoRA scaling), not exact to the last bit."""
    inner = unwrap(model).model
    allow_block_variants()
    if is_frozen(inner.vision_tower) and not has_dropout(inner.vision_tower):
        hold_in_eval_mode(inner.vision_tower)
    for block in inner.language_model.layers:
        compile_with_dynamic_dims(block, LANGUAGE_DYNAMIC_DIMS)
    for block in inner.vision_tower.encoder.layer:
        compile_with_dynamic_dims(block, VISION_DYNAMIC_DIMS)
    return len(inner.language_model.layers) + len(inner.vision_tower.encoder.layer)


# Sizes that change from batch to batch, by the position of the dimension in a block's tensor arguments: batch and
# sequence for language blocks (hidden states, rotary tables, positions), tiles for vision blocks.
LANGUAGE_DYNAMIC_DIMS = (0, 1)
VISION_DYNAMIC_DIMS = (0,)


def hold_in_eval_mode(module: nn.Module) -> None:
    """Put `module` in evaluation mode for good: `train()` on it, or on a model holding it, leaves it there. For
    a frozen module without dropout, whose output does not depend on the mode; its compiled blocks read the mode
    (attention passes a dropout rate only in training), and evaluation would otherwise compile them again."""
    module.eval()
    module.train = lambda mode=True: module


def compile_with_dynamic_dims(block: nn.Module, dims: tuple[int, ...]) -> None:
    """`block.compile()`, with `dims` of every tensor argument compiled as symbolic sizes from the first call on.
    Left to itself, torch.compile specialises a block to the first batch's sizes and compiles it again for the
    second batch's, then for the last, shorter batch: on the 1B recipe each compilation of the language block took
    about 28 s of the first epoch. Every tensor that shares a size must be marked, or the unmarked one pins it."""
    compiled = torch.compile(block._call_impl)

    def call(*args, **kwargs):
        for tensor in tensor_arguments((args, kwargs)):
            for dim in dims:
                if dim < tensor.dim():
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return compiled(*args, **kwargs)

    block._compiled_call_impl = call


def tensor_arguments(values) -> Iterator[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts."""
    if isinstance(values, torch.Tensor):
        yield values
    elif isinstance(values, tuple | list):
        for value in values:
            yield from tensor_arguments(value)
    elif isinstance(values, dict):
        for value in values.values():
            yield from tensor_arguments(value)


COMPILED_VARIANTS = 64


def allow_block_variants() -> None:
    """Let a block keep a compiled variant for every context it runs in. Training calls one block in several: its
    forward, its recomputation under gradient checkpointing (in the backward pass's thread, whose autograd and
    thread-count state differ), the evaluation without autograd, the first language block apart (its input needs
    no gradient), plus micro-batches of one sample and sizes a mask pins. Beyond dynamo's default limit (8) a
    block runs uncompiled with its guards still checked on every call, slower than not compiling at all."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_VARIANTS)


def choose_attention_kernels(cfg: FastConfig) -> None:
    """Let PyTorch's scaled-dot-product attention use cuDNN's kernels only when `sdpa_without_cudnn` is off (a
    process-wide setting). On Hopper GPUs PyTorch prefers cuDNN's attention, which builds an execution plan for
    every new shape: with sequence lengths that change from batch to batch that is 0.5-4.4 milliseconds of
    host time per attention call, most of a batch-4 step. FlashAttention and the memory-efficient kernel compute
    the same attention (equal up to the training dtype) without that cost."""
    torch.backends.cuda.enable_cudnn_sdp(not cfg.sdpa_without_cudnn)


def takes_fast_forward(cfg: FastConfig) -> bool:
    """Whether `install_fast_path` installs `FastForward` (compiled blocks or uncast adapter inputs alone keep
    transformers' forward; the vision kernels' attention choice is made in `FastForward`)."""
    return (cfg.answer_logits_only or cfg.frozen_vision_no_grad or bool(cfg.vision_cache_mib) or cfg.drop_padding_mask
            or cfg.vision_kernels)


def skip_lora_input_casts(model: nn.Module) -> None:
    """Let every peft adapter layer take its input as it comes. peft casts an adapter's input to the adapter's dtype
    (fp32, as the Trainer keeps trainable weights) before its dropout and product; under autocast the product then
    casts both back to bf16, so the cast only adds fp32 copies of activations, read and written around each of the
    adapters (in the 1B recipe's compiled step, element-wise kernels, these copies and the dropout masks among them,
    took about a quarter of the GPU time). The product rounds its inputs to bf16 once either way: without dropout
    the loss and gradients are the same to the bit; with dropout the masks are drawn over bf16 instead of fp32
    tensors, other draws of the same distribution. Training without autocast holds adapters in the activations'
    dtype (fp32, or DeepSpeed's bf16), where peft casts nothing anyway."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def install_fast_path(model: nn.Module, cfg: FastConfig) -> FastForward | None:
    """Make `model` (an InternVL model, with or without peft) train through `FastForward`; None when every
    switch is off (the stock path)."""
    choose_attention_kernels(cfg)
    if cfg.skip_lora_input_cast:
        skip_lora_input_casts(model)
    if cfg.vision_kernels:
        embed_patches_by_matmul(unwrap(model).model)
    if cfg.compile:
        compile_blocks(model)
    if not takes_fast_forward(cfg):
        return None
    base = unwrap(model)
    fast = FastForward(base, cfg)
    base.forward = fast
    return fast
