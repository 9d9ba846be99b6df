import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_template import build_tiny_tokenizer

from internvl_sft.config import InputsConfig
from internvl_sft.data.dataset import (
    FAST_STEP_KEYS,
    SupervisedDataset,
    TilingSettings,
    build_dataset,
    collate,
    image_geometry,
    read_meta_samples,
)
from internvl_sft.data.meta import DataError, Sample
from internvl_sft.data.template import IGNORE_INDEX, get_template
from internvl_sft.data.tiling import IMAGENET_MEAN, IMAGENET_STD

TILE = 28
TOKENS_PER_TILE = 2
RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """wide: 4:1 (4 tiles + thumbnail alone), square: 1 tile, tall: 1:2 (2 tiles + thumbnail)."""
    sizes = {"wide": ((112, 28), RED), "square": ((28, 28), BLUE), "tall": ((40, 80), BLUE)}
    paths = {}
    for name, (size, colour) in sizes.items():
        paths[name] = tmp_path / f"{name}.png"
        Image.new("RGB", size, colour).save(paths[name])
    return paths


def sample(images=(), question="点击", answer="A cat.", line=1, **settings) -> Sample:
    """A sample with one placeholder per image, in image order, before the question."""
    human = "<image>" * len(images) + "\n" + question if images else question
    return Sample(
        source=Path("data/ui.jsonl"),
        line=line,
        sample_id=str(line),
        images=tuple(images),
        conversations=(("human", human), ("gpt", answer)),
        **settings,
    )


def dataset(tokenizer, samples, max_seq_length=4096, too_long="truncate", tile_keys=False,
            **tiling) -> SupervisedDataset:
    settings = TilingSettings(tile_size=TILE, min_dynamic_patch=1, max_dynamic_patch=6, use_thumbnail=True)
    return SupervisedDataset(
        samples,
        tokenizer,
        get_template("Hermes-2"),
        TilingSettings(**{**settings.__dict__, **tiling}),
        num_image_token=TOKENS_PER_TILE,
        max_seq_length=max_seq_length,
        too_long=too_long,
        tile_keys=tile_keys,
    )


def context_count(tokenizer, input_ids: torch.Tensor) -> int:
    return int((input_ids == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")).sum())


def test_item_has_one_image_token_run_per_tile(tokenizer, images):
    data = dataset(tokenizer, [sample([images["wide"]])])
    item = data[0]
    assert item["num_tiles"] == 5
    assert item["pixel_values"].shape == (5, 3, TILE, TILE) and item["pixel_values"].dtype == torch.float32
    assert context_count(tokenizer, item["input_ids"]) == 5 * TOKENS_PER_TILE
    assert item["input_ids"].dtype == torch.long and item["labels"].shape == item["input_ids"].shape
    answer = [label for label in item["labels"].tolist() if label != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "A cat.<|im_end|>"
    assert data.lengths == [len(item["input_ids"])]


def test_multi_image_tiles_follow_the_placeholders_and_share_the_budget(tokenizer, images):
    data = dataset(tokenizer, [sample([images["square"], images["wide"]])])
    item = data[0]
    # Two images share max_dynamic_patch 6: at most 3 tiles each, so wide becomes 3 tiles + thumbnail.
    assert item["num_tiles"] == 1 + 4
    blue = (torch.tensor(BLUE) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    red = (torch.tensor(RED) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(item["pixel_values"][0, :, 5, 5], blue, atol=1e-5)
    assert torch.allclose(item["pixel_values"][1, :, 5, 5], red, atol=1e-5)
    text = tokenizer.decode(item["input_ids"])
    context = "<IMG_CONTEXT>" * TOKENS_PER_TILE
    assert f"<img>{context}</img><img>{context * 4}</img>" in text


def test_dataset_max_dynamic_patch_overrides_the_default(tokenizer, images):
    data = dataset(tokenizer, [sample([images["wide"]], max_dynamic_patch=2), sample([images["wide"]])])
    assert [data[0]["num_tiles"], data[1]["num_tiles"]] == [3, 5]


def test_without_dynamic_size_every_image_is_one_tile(tokenizer, images):
    data = dataset(tokenizer, [sample([images["wide"], images["tall"]])], dynamic_image_size=False)
    item = data[0]
    assert item["num_tiles"] == 2 and item["pixel_values"].shape == (2, 3, TILE, TILE)
    assert context_count(tokenizer, item["input_ids"]) == 2 * TOKENS_PER_TILE


def test_text_only_sample_has_no_pixels(tokenizer):
    item = dataset(tokenizer, [sample()])[0]
    assert item["pixel_values"] is None and item["num_tiles"] == 0
    assert context_count(tokenizer, item["input_ids"]) == 0


def test_lengths_from_image_headers_match_the_items_of_rotated_images(tokenizer, tmp_path):
    path = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (80, 40), RED)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif)
    data = dataset(tokenizer, [sample([path])])
    item = data[0]
    assert item["num_tiles"] == 3  # shown as 40x80: 1x2 grid + thumbnail
    assert data.lengths == [len(item["input_ids"])]


def test_augmented_sample_keeps_its_shape(tokenizer, images):
    torch.manual_seed(0)
    item = dataset(tokenizer, [sample([images["tall"]], data_augment=True)])[0]
    assert item["pixel_values"].shape == (3, 3, TILE, TILE)


def full_length(tokenizer, images, answer: str) -> tuple[int, int]:
    """(length, index just after </img>) of a one-image sample, untruncated."""
    item = dataset(tokenizer, [sample([images["square"]], answer=answer)])[0]
    ids = item["input_ids"].tolist()
    return len(ids), ids.index(tokenizer.convert_tokens_to_ids("</img>")) + 1


def test_long_sample_is_cut_after_the_last_image(tokenizer, images):
    answer = "操作：点击\n参数：[481, 472] " * 4
    length, _ = full_length(tokenizer, images, answer)
    data = dataset(tokenizer, [sample([images["square"]], answer=answer)], max_seq_length=length - 5)
    item = data[0]
    assert len(item["input_ids"]) == len(item["labels"]) == length - 5 == data.lengths[0]
    assert context_count(tokenizer, item["input_ids"]) == TOKENS_PER_TILE
    assert item["labels"][-1] != IGNORE_INDEX


def test_cut_inside_an_image_is_an_error_naming_the_line(tokenizer, images):
    _, image_end = full_length(tokenizer, images, "A cat.")
    with pytest.raises(DataError, match=r"data/ui.jsonl:7: \d+ tokens exceed max_seq_length \d+ and cutting there "
                                        "would split or drop an image"):
        dataset(tokenizer, [sample([images["square"]], line=7)], max_seq_length=image_end - 1)


def test_cut_before_any_answer_is_an_error(tokenizer, images):
    _, image_end = full_length(tokenizer, images, "A cat.")
    with pytest.raises(DataError, match="would leave no answer token"):
        dataset(tokenizer, [sample([images["square"]])], max_seq_length=image_end + 1)


def test_too_long_drop_leaves_out_every_long_sample_and_says_so(tokenizer, images, capsys):
    answer = "操作：点击\n参数：[481, 472] " * 4
    length, _ = full_length(tokenizer, images, answer)
    samples = [sample([images["square"]], answer=answer, line=3), sample([images["square"]], line=4)]
    data = dataset(tokenizer, samples, max_seq_length=length - 5, too_long="drop")
    assert [s.line for s in data.samples] == [4] and len(data.lengths) == len(data) == 1
    err = capsys.readouterr().err
    assert "1 of 2 sample(s) left out:" in err
    assert f"data/ui.jsonl:3: {length} tokens exceed max_seq_length {length - 5}; sample left out" in err
    with pytest.raises(DataError, match="every sample was left out"):
        dataset(tokenizer, samples[:1], max_seq_length=length - 5, too_long="drop")


def test_image_gone_before_training_leaves_its_sample_out(tokenizer, images, capsys):
    images["tall"].unlink()
    data = dataset(tokenizer, [sample([images["tall"]], line=2), sample([images["square"]], line=5)])
    assert [s.line for s in data.samples] == [5]
    assert f"data/ui.jsonl:2: image {images['tall']}: file not found; sample left out" in capsys.readouterr().err


def test_image_broken_while_training_is_skipped_with_a_warning(tokenizer, images):
    data = dataset(tokenizer, [sample([images["tall"]], line=2), sample([images["square"]], line=5)])
    images["tall"].write_bytes(b"overwritten mid-run")
    with pytest.warns(UserWarning, match=r"data/ui.jsonl:2: image .*tall.png: not an image file .*sample skipped"):
        item = data[0]
    assert torch.equal(item["input_ids"], data[1]["input_ids"])
    images["square"].unlink()
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 2 samples can be loaded"):
        data[0]


def test_collate_pads_right_and_concatenates_tiles_in_sample_order(tokenizer, images):
    data = dataset(tokenizer, [sample([images["tall"]]), sample(), sample([images["square"]])])
    items = [data[0], data[1], data[2]]
    batch = collate(items, pad_token_id=tokenizer.pad_token_id)
    longest = max(len(item["input_ids"]) for item in items)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "pixel_values"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    assert batch["pixel_values"].shape == (3 + 1, 3, TILE, TILE)
    assert torch.equal(batch["pixel_values"][:3], items[0]["pixel_values"])
    assert torch.equal(batch["pixel_values"][3:], items[2]["pixel_values"])
    for row, item in enumerate(items):
        size = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :size], item["input_ids"])
        assert (batch["input_ids"][row, size:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, size:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * size + [0] * (longest - size)
    assert context_count(tokenizer, batch["input_ids"]) == 4 * TOKENS_PER_TILE


def test_collate_for_the_fast_step_adds_answer_and_image_positions(tokenizer, images):
    """Row and column of every position whose next token is labelled and of every image token, in row-major order
    (the order of the image features), and that the batch is right-padded."""
    data = dataset(tokenizer, [sample([images["tall"]]), sample(answer="a longer answer"), sample([images["square"]])])
    items = [data[0], data[1], data[2]]
    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    batch = collate(items, pad_token_id=tokenizer.pad_token_id, image_token_id=image_token_id)
    assert set(batch) - set(collate(items, pad_token_id=tokenizer.pad_token_id)) == set(FAST_STEP_KEYS)
    assert batch["right_padded"] is True
    expected = {"answer_positions": batch["labels"][:, 1:] != IGNORE_INDEX,
                "image_positions": batch["input_ids"] == image_token_id}
    for key, mask in expected.items():
        rows, columns = batch[key]
        found = torch.zeros_like(mask)
        found[rows, columns] = True
        assert torch.equal(found, mask), key
        assert (rows * mask.shape[1] + columns).diff().gt(0).all(), key
    assert batch["image_positions"].shape[1] == 4 * TOKENS_PER_TILE


def test_tile_keys_follow_the_image_files_and_their_tiling(tokenizer, images, tmp_path):
    """Keys of the vision feature cache: same file bytes, same keys (whatever the path); a changed file or another
    tiling, new keys; an augmented sample, none."""
    original, copy, changed = tmp_path / "gradient.png", tmp_path / "copy.png", tmp_path / "changed.png"
    image = Image.linear_gradient("L").resize((40, 80)).convert("RGB")  # 1:2, so 2 tiles + thumbnail
    image.save(original)
    image.save(copy)
    image.putpixel((0, 0), RED)
    image.save(changed)
    samples = [sample([original]), sample(), sample([copy]), sample([changed]), sample([copy], data_augment=True)]
    data = dataset(tokenizer, samples, tile_keys=True)
    items = [data[index] for index in range(len(samples))]
    tall, text, same, other, augmented = (item["tile_keys"] for item in items)
    assert len(tall) == 3 and len(set(tall)) == 3 and text == [] and same == tall
    assert not set(other) & set(tall) and augmented == [None] * 3
    collated = collate(items, pad_token_id=tokenizer.pad_token_id)
    assert collated["tile_keys"] == tall + same + other + augmented
    assert "tile_sources" not in collated  # only once the cache's flags are shared
    assert not set(dataset(tokenizer, [sample([original])], tile_keys=True, tile_size=56)[0]["tile_keys"]) & set(tall)
    assert "tile_keys" not in dataset(tokenizer, [sample([images["tall"]])])[0]


def test_a_sample_flagged_as_cached_comes_without_pixels(tokenizer, images):
    """The item of a sample whose tiles the vision cache holds has the same tokens, tile count and keys as
    its item with pixels, and a batch carries pixel values for the other samples' tiles only."""
    data = dataset(tokenizer, [sample([images["wide"]]), sample([images["tall"]], line=2)], tile_keys=True)
    flags = torch.zeros(2, dtype=torch.bool)
    data.skip_cached_pixels(3, flags)
    loaded = [data[0], data[1]]
    assert [item["tile_source"] for item in loaded] == [(3, 0, True), (3, 1, True)]
    flags[0] = True
    bare, still = data[0], data[1]
    assert bare["pixel_values"] is None and bare["num_tiles"] == loaded[0]["num_tiles"] == 5
    for key in ("input_ids", "labels"):
        assert torch.equal(bare[key], loaded[0][key])
    assert bare["tile_keys"] == loaded[0]["tile_keys"] and bare["tile_source"] == (3, 0, False)
    collated = collate([bare, still], pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(collated["pixel_values"], loaded[1]["pixel_values"])
    assert collated["tile_sources"] == [(3, 0, False)] * 5 + [(3, 1, True)] * 3
    flags[1] = True
    assert "pixel_values" not in collate([data[0], data[1]], pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="tile keys"):
        dataset(tokenizer, [sample()]).skip_cached_pixels(0, flags)


def test_collate_of_text_only_batch_has_no_pixel_values(tokenizer):
    data = dataset(tokenizer, [sample(), sample(answer="longer answer here")])
    batch = collate([data[0], data[1]], pad_token_id=tokenizer.pad_token_id)
    assert "pixel_values" not in batch
    with pytest.raises(ValueError, match="pad token"):
        collate([data[0]], pad_token_id=None)


def test_batch_runs_through_native_internvl(tokenizer, images):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=[TILE, TILE], patch_size=[7, 7]),
        text_config=dict(model_type="qwen2", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, vocab_size=len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config).eval()
    # (28 / 7)^2 patches x 0.5^2 = 4 features per tile.
    data = SupervisedDataset(
        [sample([images["tall"]]), sample()], tokenizer, get_template("Hermes-2"),
        TilingSettings(tile_size=TILE), num_image_token=4, max_seq_length=4096,
    )
    batch = collate([data[0], data[1]], pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_build_dataset_from_a_meta_file(tokenizer, tmp_path, monkeypatch, images):
    monkeypatch.chdir(tmp_path)
    lines = [
        {"id": "g1", "image": "wide.png", "conversations": [{"from": "human", "value": "点击"},
                                                             {"from": "gpt", "value": "[[1, 2, 3, 4]]"}]},
        {"id": "t1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "A cat."}]},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({
        "ui": {"root": ".", "annotation": "train.jsonl", "repeat_time": 2, "max_dynamic_patch": 2},
    }))
    inputs = InputsConfig(max_dynamic_patch=6, max_seq_length=512)
    sidecar = {"image_size": TILE, "num_image_token": TOKENS_PER_TILE}
    data = build_dataset(meta, tokenizer, sidecar, inputs, seed=0)
    assert len(data) == 4 and [s.sample_id for s in read_meta_samples(meta, seed=0)] == ["g1", "t1"] * 2
    assert data[0]["num_tiles"] == 3 and data[1]["pixel_values"] is None
    subset = build_dataset(meta, tokenizer, sidecar, inputs, seed=0, samples=data.samples[1:2])
    assert len(subset) == 1


def test_build_dataset_reports_problems_of_every_annotation_file(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text("not json\n")
    (tmp_path / "b.jsonl").write_text('{"conversations": []}\n')
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({
        "a": {"root": ".", "annotation": "a.jsonl", "repeat_time": 1},
        "b": {"root": ".", "annotation": "b.jsonl", "repeat_time": 1},
    }))
    with pytest.raises(DataError) as caught:
        read_meta_samples(meta, seed=0)
    assert [problem.split(": ")[0] for problem in caught.value.problems] == [
        f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'b.jsonl'}:1"
    ]


def test_image_geometry_needs_the_model_settings():
    assert image_geometry({"image_size": 448, "num_image_token": 256}) == (448, 256)
    with pytest.raises(ValueError, match="lack num_image_token"):
        image_geometry({"image_size": 448})
