"""Batched greedy generation with a native InternVL model: used by evaluation and the demo."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from internvl_sft.config import InputsConfig
from internvl_sft.data.dataset import image_geometry, tiling_settings
from internvl_sft.data.images import load_image
from internvl_sft.data.template import encode_prompt, get_template
from internvl_sft.data.tiling import to_pixel_values


@dataclass(frozen=True)
class Query:
    """One generation request: images (in placeholder order) and the conversation so far (ends with a user turn)."""

    images: tuple[Path, ...]
    conversations: tuple[tuple[str, str], ...]


class Predictor:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, inputs: InputsConfig,
                 sidecar: dict, max_new_tokens: int):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = get_template(inputs.template)
        self.tiling = tiling_settings(inputs, sidecar)
        self.tile_size, self.tokens_per_tile = image_geometry(sidecar)
        self.max_new_tokens = max_new_tokens
        self.end_id = tokenizer.convert_tokens_to_ids(self.template.stop_token)

    def pixel_values(self, path: Path, image_count: int) -> torch.Tensor:
        """Tiles of one image exactly as training makes them (multi-image samples share the tile budget)."""
        return to_pixel_values(self.tiling.tiles(load_image(path), image_count), self.tile_size)

    def encode(self, query: Query) -> tuple[list[int], list[torch.Tensor]]:
        pixels = [self.pixel_values(path, len(query.images)) for path in query.images]
        counts = [p.shape[0] * self.tokens_per_tile for p in pixels]
        ids = encode_prompt(self.tokenizer, self.template, list(query.conversations), counts)
        return ids, pixels

    @torch.inference_mode()
    def generate(self, queries: Sequence[Query]) -> list[str]:
        """Greedy answers for a batch, left-padded so every prompt ends where generation starts."""
        encoded = [self.encode(q) for q in queries]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in encoded])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in encoded])
        pixels = [p for _, sample in encoded for p in sample]
        device = self.model.device
        kwargs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
        if pixels:
            kwargs["pixel_values"] = torch.cat(pixels).to(device, self.model.dtype)
        out = self.model.generate(**kwargs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  eos_token_id=self.end_id, pad_token_id=pad)
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
