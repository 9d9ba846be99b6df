"""Samples to training tensors: tokens and labels from the chat template, tiles from dynamic resolution.

`collate` builds the keyword arguments of `InternVLForConditionalGeneration.forward`: right-padded
`input_ids` / `labels` / `attention_mask` and, when the batch has images, all tiles concatenated in sample
order, which is the order of the image tokens in the flattened batch. For the fast training path it adds where
the answer and image tokens are (`fast_step_inputs`), and for its vision feature cache one key and one source per
tile in tile order; the pixels of a sample whose tiles the cache holds are then left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from internvl_sft.config import InputsConfig, TrainConfig
from internvl_sft.data.images import ImageProblem, load_image, oriented_size
from internvl_sft.data.meta import DataError, Sample, load_meta, read_samples
from internvl_sft.data.template import (
    IGNORE_INDEX,
    IMG_END,
    ChatTemplate,
    Encoded,
    encode_conversation,
    get_template,
    token_id,
)
from internvl_sft.data.tiling import dynamic_tiles, jpeg_degrade, tile_count, to_pixel_values

# JPEG qualities drawn from when a dataset sets data_augment, as upstream.
JPEG_QUALITIES = (75, 100)

# Where a tile of a batch comes from: (dataset tag, sample index, whether the batch carries its pixels).
TileSource = tuple[int, int, bool]


@dataclasses.dataclass(frozen=True)
class TilingSettings:
    """How images become tiles; a dataset's own max_dynamic_patch overrides the one here."""

    tile_size: int = 448
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    use_thumbnail: bool = True
    dynamic_image_size: bool = True

    def options(self, sample: Sample) -> dict:
        """Keyword arguments of `dynamic_tiles` / `tile_count` for each image of `sample`."""
        return self.options_for(len(sample.images), sample.max_dynamic_patch)

    def options_for(self, image_count: int, max_dynamic_patch: int | None = None) -> dict:
        """As upstream, the images of a multi-image sample share the tile budget: each gets at most
        max(1, max_dynamic_patch // number of images) tiles."""
        budget = max_dynamic_patch or self.max_dynamic_patch
        most = max(1, budget // max(1, image_count))
        return {
            "tile_size": self.tile_size,
            "min_num": min(self.min_dynamic_patch, most),
            "max_num": most,
            "use_thumbnail": self.use_thumbnail,
        }

    def tiles(self, image: Image.Image, image_count: int, max_dynamic_patch: int | None = None) -> list[Image.Image]:
        """The tiles of one image; without dynamic resolution the whole image is one tile."""
        if not self.dynamic_image_size:
            return [image]
        return dynamic_tiles(image, **self.options_for(image_count, max_dynamic_patch))


class TooLong(DataError):
    """A sample over max_seq_length, left out because `too_long` is `drop`."""


class SupervisedDataset(Dataset):
    """Checked samples as dicts of input_ids, labels, pixel_values (or None), num_tiles and, with `tile_keys`,
    a content key per tile. After `skip_cached_pixels`, a sample's item also tells its `TileSource`, and a
    flagged sample comes without pixels.

    Every sample is measured when the dataset is built, from image headers and the tokenizer only, so a
    sample that cannot fit max_seq_length fails before training starts, and `lengths` is exact. A sample is
    left out, with a message, when it is too long and `too_long` is `drop`, or when one of its images can no
    longer be read (the data stage checked them all, so the file changed since). An image that breaks while
    training runs makes the next sample stand in for that one, with a warning: the run goes on.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        tokenizer: PreTrainedTokenizerBase,
        template: ChatTemplate,
        tiling: TilingSettings,
        *,
        num_image_token: int,
        max_seq_length: int,
        too_long: str = "truncate",
        tile_keys: bool = False,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.tiling = tiling
        self.num_image_token = num_image_token
        self.max_seq_length = max_seq_length
        self.too_long = too_long
        self.tile_keys = tile_keys
        self.image_end_id = token_id(tokenizer, IMG_END)
        self.samples, self._lengths = self.measure(list(samples))
        self.tag = 0
        self.pixels_cached: torch.Tensor | None = None  # set by skip_cached_pixels

    def skip_cached_pixels(self, tag: int, flags: torch.Tensor) -> None:
        """Leave out the pixels of each sample whose flag is set: the vision feature cache, which sets them in
        shared memory, holds all its tiles. `tag` names this dataset in the tiles' sources."""
        if not self.tile_keys:
            raise ValueError("only a dataset with tile keys can leave out cached pixels")
        self.tag, self.pixels_cached = tag, flags

    @property
    def lengths(self) -> list[int]:
        """Token count of each sample after truncation, for length-grouped sampling."""
        return self._lengths

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.samples)):
            position = (index + offset) % len(self.samples)
            sample = self.samples[position]
            try:
                return self.item(position)
            except (ImageProblem, DataError) as err:
                warnings.warn(f"{sample.where}: {err}; sample skipped, the next one stands in", stacklevel=2)
        raise DataError([f"none of the {len(self.samples)} samples can be loaded any more"])

    def item(self, position: int) -> dict:
        sample = self.samples[position]
        if self.pixels_cached is not None and bool(self.pixels_cached[position]):
            return self.item_without_pixels(position, sample)
        tiles_per_image = [self.image_tiles(load_image(path), sample) for path in sample.images]
        counts = [len(tiles) for tiles in tiles_per_image]
        tiles = [tile for tiles in tiles_per_image for tile in tiles]
        if sample.data_augment:
            tiles = [jpeg_degrade(tile, random_jpeg_quality()) for tile in tiles]
        pixel_values = to_pixel_values(tiles, self.tiling.tile_size) if tiles else None
        return self.assemble(position, sample, counts, pixel_values)

    def item_without_pixels(self, position: int, sample: Sample) -> dict:
        """The item of a sample whose tiles the vision feature cache holds: tile counts from the image headers."""
        counts = [self.count_tiles(path, sample) for path in sample.images]
        return self.assemble(position, sample, counts, None)

    def assemble(self, position: int, sample: Sample, counts: list[int], pixel_values: torch.Tensor | None) -> dict:
        encoded = self.encode(sample, counts)
        item = {
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "num_tiles": sum(counts),
        }
        if self.tile_keys:
            item["tile_keys"] = self.sample_tile_keys(sample, counts)
        if self.pixels_cached is not None:
            item["tile_source"] = (self.tag, position, pixel_values is not None)
        return item

    def sample_tile_keys(self, sample: Sample, counts: list[int]) -> list[str | None]:
        """A key per tile: a hash of its image file's bytes and of how the image is tiled, with the tile's place.
        Computed without decoding the image, so a sample whose pixels are left out still has its keys. An augmented
        sample's tiles change every time they are drawn: no keys."""
        if sample.data_augment:
            return [None] * sum(counts)
        keys = []
        for path, count in zip(sample.images, counts):
            image = content_digest((Path(path).read_bytes(), repr(self.tiling), repr(self.tiling.options(sample))))
            keys += [f"{image}:{index}" for index in range(count)]
        return keys

    def image_tiles(self, image: Image.Image, sample: Sample) -> list[Image.Image]:
        return self.tiling.tiles(image, len(sample.images), sample.max_dynamic_patch)

    def count_tiles(self, path: Path, sample: Sample) -> int:
        """How many tiles `image_tiles` gives for an image, read from its header only."""
        if not self.tiling.dynamic_image_size:
            return 1
        return tile_count(*oriented_size(path), **self.tiling.options(sample))

    def encode(self, sample: Sample, tiles_per_image: list[int]) -> Encoded:
        """Tokens and labels of a sample, cut to max_seq_length when that is safe."""
        counts = [tiles * self.num_image_token for tiles in tiles_per_image]
        try:
            encoded = encode_conversation(self.tokenizer, self.template, sample.conversations, counts)
        except ValueError as err:
            raise DataError([f"{sample.where}: {err}"]) from err
        return self.truncate(sample, encoded)

    def truncate(self, sample: Sample, encoded: Encoded) -> Encoded:
        """Drop the tail beyond max_seq_length, only if no image token and not every answer token is in it."""
        limit = self.max_seq_length
        if len(encoded.input_ids) <= limit:
            return encoded
        where = f"{sample.where}: {len(encoded.input_ids)} tokens exceed max_seq_length {limit}"
        if self.too_long == "drop":
            raise TooLong([f"{where}; sample left out (inputs.too_long: drop)"])
        if self.image_end_id in encoded.input_ids[limit:]:
            raise DataError([f"{where} and cutting there would split or drop an image"])
        labels = encoded.labels[:limit]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError([f"{where} and cutting there would leave no answer token"])
        return Encoded(encoded.input_ids[:limit], labels)

    def measure(self, samples: list[Sample]) -> tuple[list[Sample], list[int]]:
        """The samples kept and their token counts; every sample that cannot be cut safely is an error."""
        kept: list[Sample] = []
        lengths: list[int] = []
        problems: list[str] = []
        left_out: list[str] = []
        for sample in samples:
            try:
                tiles = [self.count_tiles(path, sample) for path in sample.images]
                lengths.append(len(self.encode(sample, tiles).input_ids))
                kept.append(sample)
            except ImageProblem as err:
                left_out.append(f"{sample.where}: {err}; sample left out")
            except TooLong as err:
                left_out.extend(err.problems)
            except DataError as err:
                problems.extend(err.problems)
        if samples and not kept:
            problems += left_out + ["every sample was left out"]
        if problems:
            raise DataError(problems)
        report_left_out(left_out, len(samples))
        return kept, lengths


def report_left_out(left_out: list[str], total: int) -> None:
    if left_out:
        listed = "".join(f"\n  {line}" for line in left_out)
        print(f"{len(left_out)} of {total} sample(s) left out:{listed}", file=sys.stderr, flush=True)


def content_digest(parts: Iterable[str | bytes | memoryview]) -> str:
    """A short hash of some text and binary pieces, in order."""
    digest = hashlib.blake2b(digest_size=20)
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()


def random_jpeg_quality() -> int:
    """Drawn from torch's generator, which the DataLoader seeds per worker."""
    low, high = JPEG_QUALITIES
    return int(torch.randint(low, high + 1, ()).item())


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(2, n) rows and columns, in row-major order, of the positions whose next token is labelled."""
    return (labels[:, 1:] != IGNORE_INDEX).nonzero().T.contiguous()


def image_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(2, n) rows and columns, in row-major order, of the image tokens."""
    return (input_ids == image_token_id).nonzero().T.contiguous()


def fast_step_inputs(input_ids: torch.Tensor, labels: torch.Tensor, image_token_id: int) -> dict:
    """The `FAST_STEP_KEYS` of a right-padded batch: its answer and image positions and that it is right-padded.
    Computed on the CPU with the batch, the positions let the fast training step pick them on the GPU without
    waiting for it: turning a mask into positions on the GPU makes the host wait there until every kernel queued
    before has run."""
    return {"answer_positions": answer_positions(labels), "image_positions": image_positions(input_ids, image_token_id),
            "right_padded": True}


FAST_STEP_KEYS = ("answer_positions", "image_positions", "right_padded")


def collate(batch: list[dict], pad_token_id: int | None, image_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch; `pixel_values` (tiles in sample order) only when some sample carries pixels; with an
    `image_token_id`, the `FAST_STEP_KEYS`."""
    if pad_token_id is None:
        raise ValueError("collate needs a pad token id, but the tokenizer defines no pad token")
    longest = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, item in enumerate(batch):
        size = len(item["input_ids"])
        input_ids[row, :size] = item["input_ids"]
        labels[row, :size] = item["labels"]
        attention_mask[row, :size] = 1
    collated = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    tiles = [item["pixel_values"] for item in batch if item.get("pixel_values") is not None]
    if tiles:
        collated["pixel_values"] = torch.cat(tiles)
    if image_token_id is not None:
        collated.update(fast_step_inputs(input_ids, labels, image_token_id))
    if any(item["num_tiles"] for item in batch) and all("tile_keys" in item for item in batch):
        collated["tile_keys"] = [key for item in batch for key in item["tile_keys"]]
    if "tile_keys" in collated and all("tile_source" in item for item in batch):
        collated["tile_sources"] = [item["tile_source"] for item in batch for _ in range(item["num_tiles"])]
    return collated


def image_geometry(sidecar: dict) -> tuple[int, int]:
    """(tile size, image tokens per tile) from the model's settings sidecar."""
    missing = [key for key in ("image_size", "num_image_token") if key not in sidecar]
    if missing:
        raise ValueError(f"model settings lack {', '.join(missing)}; got keys {sorted(sidecar)}")
    return int(sidecar["image_size"]), int(sidecar["num_image_token"])


def tiling_settings(inputs: InputsConfig, sidecar: dict) -> TilingSettings:
    """Tiling of the params' `inputs` section at the model's tile size."""
    tile_size, _ = image_geometry(sidecar)
    return TilingSettings(
        tile_size=tile_size,
        min_dynamic_patch=inputs.min_dynamic_patch,
        max_dynamic_patch=inputs.max_dynamic_patch,
        use_thumbnail=inputs.use_thumbnail,
        dynamic_image_size=inputs.dynamic_image_size,
    )


def read_meta_samples(meta_path: str | Path, seed: int) -> list[Sample]:
    """The samples of every dataset a meta file lists, in meta order; all data problems are reported together."""
    samples: list[Sample] = []
    problems: list[str] = []
    for spec in load_meta(Path(meta_path)):
        try:
            samples.extend(read_samples(spec, seed))
        except DataError as err:
            problems.extend(err.problems)
    if problems:
        raise DataError(problems)
    if not samples:
        raise DataError([f"{meta_path}:1: the datasets listed hold no samples"])
    return samples


def pins_memory(train: TrainConfig) -> bool:
    return train.dataloader_pin_memory and torch.cuda.is_available()


def loader_options(train: TrainConfig, workers: int) -> dict:
    """Data-loader settings from the train section: page-locked batches only where a GPU takes them, prefetch
    only with worker processes (torch refuses it without)."""
    return {"pin_memory": pins_memory(train),
            "prefetch_factor": train.dataloader_prefetch_factor if workers else None}


def build_dataset(
    meta_path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    sidecar: dict,
    inputs: InputsConfig,
    seed: int,
    samples: Sequence[Sample] | None = None,
    tile_keys: bool = False,
) -> SupervisedDataset:
    """The training view of a meta file's samples (or of `samples` already read from it, e.g. a subset);
    `tile_keys` adds the keys of the fast path's vision feature cache."""
    if samples is None:
        samples = read_meta_samples(meta_path, seed)
    _, num_image_token = image_geometry(sidecar)
    return SupervisedDataset(
        samples,
        tokenizer,
        get_template(inputs.template),
        tiling_settings(inputs, sidecar),
        num_image_token=num_image_token,
        max_seq_length=inputs.max_seq_length,
        too_long=inputs.too_long,
        tile_keys=tile_keys,
    )
