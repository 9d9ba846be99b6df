"""The fast training forward gives the stock loss and gradients; the vision feature cache hits and misses."""

import dataclasses
import types

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import Trainer, TrainingArguments

from internvl_sft.config import STOCK_FAST, FastConfig, LoraConfig, TrainConfig
from internvl_sft.data.dataset import content_digest, fast_step_inputs
from internvl_sft.data.template import IGNORE_INDEX
from internvl_sft.fast import (
    FeatureCache,
    Tiles,
    aligned_logits,
    answer_loss,
    causal_mask_mapping,
    choose_attention_kernels,
    embed_patches_by_matmul,
    is_patch_embedding,
    patches_by_matmul,
    vision_attention_kernels,
    describe,
    install_fast_path,
    is_right_padded,
    pad_positions,
    run_frozen_stages,
    run_stages,
    tensor_bytes,
)
from internvl_sft.model.load import load_model, prepare_for_training
from peft.tuners.tuners_utils import BaseTunerLayer

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = TrainConfig(llm_lora=LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=LLM_TARGETS), grad_checkpoint=False)
FAST = FastConfig()
# Three right-padded samples: (text tokens, tiles of an image, answer tokens) pieces in order.
SAMPLES = (
    (("text", 5), ("image", 3), ("text", 4), ("answer", 6), ("text", 3), ("answer", 4)),
    (("text", 8), ("answer", 5)),
    (("text", 3), ("image", 1), ("text", 2), ("image", 2), ("text", 2), ("answer", 7)),
)
TILES = 6


def tile_keys(pixel_values: torch.Tensor) -> list[str]:
    return [content_digest((str(tuple(tile.shape)), tensor_bytes(tile))) for tile in pixel_values]


def padded_batch(config, seed: int = 0) -> dict:
    """input_ids / labels / attention_mask / pixel_values (+ tile keys) of SAMPLES, padded with token 0."""
    generator = torch.Generator().manual_seed(seed)
    side = config.vision_config.image_size[0] // config.vision_config.patch_size[0]
    per_tile = int(side * side * config.downsample_ratio**2)
    rows = []
    for pieces in SAMPLES:
        ids, labels = [], []
        for kind, count in pieces:
            if kind == "image":
                ids += [config.image_token_id] * (count * per_tile)
                labels += [IGNORE_INDEX] * (count * per_tile)
                continue
            tokens = torch.randint(1, config.image_token_id, (count,), generator=generator).tolist()
            ids += tokens
            labels += tokens if kind == "answer" else [IGNORE_INDEX] * count
        rows.append((ids, labels))
    longest = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": torch.zeros(len(rows), longest, dtype=torch.long),
        "labels": torch.full((len(rows), longest), IGNORE_INDEX),
        "attention_mask": torch.zeros(len(rows), longest, dtype=torch.long),
    }
    for row, (ids, labels) in enumerate(rows):
        batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
        batch["labels"][row, : len(ids)] = torch.tensor(labels)
        batch["attention_mask"][row, : len(ids)] = 1
    size = config.vision_config.image_size[0]
    batch["pixel_values"] = torch.randn(TILES, 3, size, size, generator=generator)
    return batch


def training_model(tiny_native, cfg: TrainConfig, fast: FastConfig, random_lora_b):
    """The model as the train stage prepares it; the same LoRA weights for every call with the same cfg."""
    torch.manual_seed(0)
    model = prepare_for_training(load_model(tiny_native), cfg)
    random_lora_b(model)
    install_fast_path(model, fast)
    return model


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """fp32 equality up to summation order: elementwise within 1e-5 of the tensor's largest magnitude."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=name)


def assert_gradients_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Fused (compiled) kernels against eager ones: each gradient within 1e-4, relative and of its largest value."""
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()), msg=name)


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_answer_loss_equals_the_model_loss_without_lora(tiny_native):
    model = load_model(tiny_native).eval()
    batch = padded_batch(model.config)
    with torch.no_grad():
        stock = model(**batch).loss
        stock_items = model(**batch, num_items_in_batch=40).loss
        install_fast_path(model, FAST)
        fast = model(**batch).loss
        fast_items = model(**batch, num_items_in_batch=40).loss
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert labelled == 22 and fast_items == pytest.approx(float(fast) * labelled / 40, rel=1e-6)
    torch.testing.assert_close(fast, stock, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_items, stock_items, rtol=1e-6, atol=1e-6)


def test_patch_embedding_as_a_matrix_product_equals_the_convolution(tiny_native):
    conv = load_model(tiny_native).model.vision_tower.embeddings.patch_embeddings.projection
    pixels = torch.randn(3, 3, 112, 112)
    assert is_patch_embedding(conv) and not is_patch_embedding(torch.nn.Conv2d(3, 8, 3, stride=1))
    torch.testing.assert_close(patches_by_matmul(conv, pixels), conv(pixels), rtol=1e-5, atol=1e-5)


def test_fast_vision_kernels_change_no_cpu_result(tiny_native):
    """The matrix-product patch embedding is for GPUs: on the CPU the vision tower computes as it did."""
    model = load_model(tiny_native)
    pixels = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        before = model.model.vision_tower(pixel_values=pixels).last_hidden_state
        assert embed_patches_by_matmul(model.model)
        with vision_attention_kernels(True):
            after = model.model.vision_tower(pixel_values=pixels).last_hidden_state
    assert torch.equal(after, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_vision_kernels_on_a_gpu_give_the_stock_vision_features(tiny_native):
    """bf16 on a GPU: the patch embedding as a matrix product and cuDNN's attention, against cuDNN's convolution and
    the attention kernel PyTorch picks with cuDNN's left out."""
    model = load_model(tiny_native, torch.bfloat16).cuda()
    pixels = torch.randn(5, 3, 112, 112, device="cuda")
    choose_attention_kernels(FAST)
    with torch.no_grad():
        before = run_stages(model.model, pixels, 0, 1)
        assert embed_patches_by_matmul(model.model)
        with vision_attention_kernels(True):
            after = run_stages(model.model, pixels, 0, 1)
    torch.testing.assert_close(after, before, rtol=2e-2, atol=2e-2 * float(before.abs().max()))


def test_a_language_model_of_full_attention_gets_its_causal_masks_as_given(tiny_native):
    config = load_model(tiny_native).model.language_model.config
    assert causal_mask_mapping(config) == {"full_attention": None}
    config.layer_types = ["full_attention", "sliding_attention"]
    assert causal_mask_mapping(config) is None


def test_logits_of_an_odd_vocabulary_come_from_an_aligned_product_unchanged():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 301)  # padded to 320 rows for the product
    states = torch.randn(7, 32, requires_grad=True)
    expected = head(states)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), states)
    logits = aligned_logits(states, head)
    assert logits.shape == (7, 301)
    torch.testing.assert_close(logits, expected)
    (grad,) = torch.autograd.grad(logits.square().sum(), states)
    torch.testing.assert_close(grad, expected_grad)
    aligned = torch.nn.Linear(32, 320, bias=False)
    assert torch.equal(aligned_logits(states, aligned), aligned(states))


def test_adapter_inputs_left_in_the_autocast_dtype_change_no_bit(tiny_native, random_lora_b):
    """A bf16 model with fp32 adapters under bf16 autocast (the Trainer's mixed precision), without dropout: peft
    casts each adapter's bf16 input to fp32, the fast path does not, and the loss and gradients are the same."""
    results, flags = [], []
    for skip in (False, True):
        torch.manual_seed(0)
        model = prepare_for_training(load_model(tiny_native, torch.bfloat16), LORA)
        random_lora_b(model)
        install_fast_path(model, dataclasses.replace(FAST, skip_lora_input_cast=skip))
        layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
        assert {layer.lora_A["default"].weight.dtype for layer in layers} == {torch.float32}
        flags.append({layer.cast_input_dtype_enabled for layer in layers})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_grads(model, padded_batch(model.config)))
    (cast_loss, cast_grads), (loss, grads) = results
    assert flags == [{True}, {False}]
    assert torch.equal(loss, cast_loss)
    assert all(torch.equal(grads[name], grad) for name, grad in cast_grads.items())


def test_answer_loss_chunks_give_the_same_loss():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9), generator=generator)
    labels[0, :4] = IGNORE_INDEX
    head = torch.nn.Linear(16, 50, bias=False)
    whole = answer_loss(hidden, labels, head)
    (whole_grad,) = torch.autograd.grad(whole, hidden)
    chunked = answer_loss(hidden, labels, head, chunk_tokens=3)
    (chunked_grad,) = torch.autograd.grad(chunked, hidden)
    reference = torch.nn.functional.cross_entropy(head(hidden[:, :-1]).reshape(-1, 50), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(whole, reference)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(chunked_grad, whole_grad)


def with_fast_step_keys(batch: dict, config) -> dict:
    """The batch with the keys `collate` adds for the fast step."""
    return {**batch, **fast_step_inputs(batch["input_ids"], batch["labels"], config.image_token_id)}


@pytest.mark.parametrize(
    ("grad_checkpoint", "freeze_mlp", "fast", "step_keys"),
    [
        (False, True, FAST, False),
        (False, True, FAST, True),
        (True, True, dataclasses.replace(FAST, logit_chunk_tokens=5), True),
        (True, False, dataclasses.replace(FAST, vision_cache_mib=4), False),
    ],
    ids=["lora", "lora-collate-positions", "grad-checkpoint-chunks", "trainable-projector-cache"],
)
def test_lora_loss_and_gradients_equal_the_stock_ones(tiny_native, random_lora_b, grad_checkpoint, freeze_mlp, fast,
                                                      step_keys):
    cfg = dataclasses.replace(LORA, grad_checkpoint=grad_checkpoint, freeze_mlp=freeze_mlp)
    stock_model = training_model(tiny_native, cfg, STOCK_FAST, random_lora_b)
    fast_model = training_model(tiny_native, cfg, fast, random_lora_b)
    batch = padded_batch(stock_model.config)
    stock_loss, stock_grads = loss_and_grads(stock_model, batch)
    fast_batch = with_fast_step_keys(batch, stock_model.config) if step_keys else batch
    fast_loss, fast_grads = loss_and_grads(fast_model, {**fast_batch, "tile_keys": tile_keys(batch["pixel_values"])})
    torch.testing.assert_close(fast_loss, stock_loss, rtol=1e-6, atol=1e-6)
    assert fast_grads.keys() == stock_grads.keys()
    assert any("multi_modal_projector" in name for name in fast_grads) is not freeze_mlp
    for name, grad in stock_grads.items():
        assert grad.abs().sum() > 0, name
        assert_close_to_scale(fast_grads[name], grad, name)


def vision_output_requires_grad(model, batch: dict) -> bool:
    seen = []
    tower = model.get_base_model().model.vision_tower
    handle = tower.register_forward_hook(lambda module, args, output: seen.append(output.last_hidden_state))
    try:
        model(**batch).loss.backward()
    finally:
        handle.remove()
    return seen[0].requires_grad


def test_frozen_vision_tower_runs_without_autograd(tiny_native, random_lora_b):
    """With gradient checkpointing, peft makes the patch embedding require gradients: the stock path then
    records the whole frozen vision tower for backward; the fast path does not."""
    cfg = dataclasses.replace(LORA, grad_checkpoint=True)
    batch = padded_batch(load_model(tiny_native).config)
    assert vision_output_requires_grad(training_model(tiny_native, cfg, STOCK_FAST, random_lora_b), batch)
    assert not vision_output_requires_grad(training_model(tiny_native, cfg, FAST, random_lora_b), batch)


def test_cached_features_equal_recomputed_ones_and_changes_miss(tiny_native, random_lora_b):
    model = training_model(tiny_native, LORA, dataclasses.replace(FAST, vision_cache_mib=4), random_lora_b)
    fast = model.get_base_model().forward
    inner = model.get_base_model().model
    pixels = padded_batch(model.config)["pixel_values"]
    keys = tile_keys(pixels)
    first = fast.image_features(pixels, Tiles(keys), pixels.device)
    assert (fast.cache.hits, fast.cache.misses) == (0, TILES)
    again = fast.image_features(pixels, Tiles(keys), pixels.device)
    assert (fast.cache.hits, fast.cache.misses) == (TILES, TILES)
    with torch.no_grad():
        recomputed = run_stages(inner, pixels, 0, 2)
    torch.testing.assert_close(again, recomputed, rtol=0, atol=0)
    torch.testing.assert_close(first, recomputed, rtol=0, atol=0)

    changed = pixels.clone()
    changed[2, :, :4, :4] += 0.5
    fast.image_features(changed, Tiles(tile_keys(changed)), changed.device)
    assert (fast.cache.hits, fast.cache.misses) == (2 * TILES - 1, TILES + 1)

    with torch.no_grad():
        inner.vision_tower.encoder.layer[0].mlp.fc1.weight.mul_(1.01)
    fresh = fast.image_features(pixels, Tiles(keys), pixels.device)
    assert fast.cache.misses == 2 * TILES + 1
    assert not torch.equal(fresh, first)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cache_on_a_gpu_holds_page_locked_rows_and_returns_them_unchanged(tiny_native, random_lora_b):
    """Rows go to and come from the cache by asynchronous copies: what a later step gets must be what the
    vision tower computed, also when hits and misses share a batch."""
    model = training_model(tiny_native, LORA, dataclasses.replace(FAST, vision_cache_mib=4), random_lora_b).cuda()
    fast = model.get_base_model().forward
    pixels = padded_batch(model.config)["pixel_values"].cuda()
    first = fast.image_features(pixels, Tiles(tile_keys(pixels.cpu())), pixels.device)
    assert len(fast.cache.entries) == TILES and all(row.is_pinned() for row in fast.cache.entries.values())
    again = fast.image_features(pixels, Tiles(tile_keys(pixels.cpu())), pixels.device)
    changed = pixels.clone()
    changed[2, :, :4, :4] += 0.5
    mixed = fast.image_features(changed, Tiles(tile_keys(changed.cpu())), changed.device)
    assert (fast.cache.hits, fast.cache.misses) == (2 * TILES - 1, TILES + 1)
    # the miss alone, as the cache computed it (another batch size may take other kernels)
    recomputed = run_frozen_stages(model.get_base_model().model, changed[2:3], 2)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    kept = [row for row in range(TILES) if row != 2]
    torch.testing.assert_close(mixed[kept], first[kept], rtol=0, atol=0)
    torch.testing.assert_close(mixed[2:3], recomputed, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("trained_projector", [False, True], ids=["adapters", "adapters-and-projector"])
def test_cuda_graphs_train_like_the_compiled_blocks_alone(tiny_native, random_lora_b, trained_projector):
    """SGD steps over batches of two shapes, each recorded once and then replayed: the same losses and trained
    weights as the compiled blocks launching their kernels one by one, and the same evaluation losses (an
    evaluation batch recorded once more, forward and loss alone, and replayed)."""
    cfg = dataclasses.replace(LORA, freeze_mlp=not trained_projector)
    runs = []
    for graphs in (False, True):
        fast = dataclasses.replace(FAST, compile=True, cuda_graphs=graphs, pad_to_multiple_of=16)
        model = training_model(tiny_native, cfg, fast, random_lora_b).cuda().train()
        batch = padded_batch(model.config)
        shorter = {key: value if key == "pixel_values" else value[[0, 2], :-5] for key, value in batch.items()}
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trained, lr=0.05)  # small steps: fp32 rounding of two padded lengths stays small
        losses = []
        for step in (batch, shorter, batch, shorter, batch):
            optimizer.zero_grad(set_to_none=True)
            loss = model(**{key: value.cuda() for key, value in step.items()}).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            for step in (batch, batch):
                losses.append(model(**{key: value.cuda() for key, value in step.items()}).loss.item())
        runs.append((losses, [p.detach().cpu() for p in trained]))
    recorded = model.get_base_model().forward.graphs
    assert len(recorded.recorded) == 3 and recorded.replays == 7
    (plain_losses, plain_weights), (graph_losses, graph_weights) = runs
    torch.testing.assert_close(graph_losses, plain_losses, rtol=1e-5, atol=1e-5)
    for graph_weight, plain_weight in zip(graph_weights, plain_weights):
        assert_close_to_scale(graph_weight, plain_weight, "trained weight")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_draw_new_dropout_masks_at_every_replay(tiny_native, random_lora_b):
    cfg = dataclasses.replace(LORA, llm_lora=dataclasses.replace(LORA.llm_lora, dropout=0.5))
    fast = dataclasses.replace(FAST, compile=True, cuda_graphs=True, pad_to_multiple_of=16)
    model = training_model(tiny_native, cfg, fast, random_lora_b).cuda().train()
    batch = {key: value.cuda() for key, value in padded_batch(model.config).items()}
    losses = [model(**batch).loss.item() for _ in range(3)]
    assert model.get_base_model().forward.graphs.replays == 3 and len(set(losses)) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fast", [FAST, dataclasses.replace(FAST, compile=True),
                                  dataclasses.replace(FAST, compile=True, cuda_graphs=True, pad_to_multiple_of=16)],
                         ids=["eager", "compiled", "graphs"])
def test_a_step_on_a_batch_from_collate_never_waits_for_the_gpu(tiny_native, random_lora_b, fast):
    """With the positions `collate` computed, forward and backward queue all their GPU work without one
    synchronisation (CUDA's sync debug mode raises on any); without them, finding the positions waits. With CUDA
    graphs the first step records (which waits); a replayed step does not."""
    model = training_model(tiny_native, LORA, fast, random_lora_b).cuda().train()
    batch = padded_batch(model.config)
    on_gpu = {key: value.pin_memory().cuda(non_blocking=True) for key, value in batch.items()}
    keyed = {**on_gpu, **{key: value.pin_memory().cuda(non_blocking=True) if torch.is_tensor(value) else value
                          for key, value in with_fast_step_keys(batch, model.config).items() if key not in batch}}
    model(**keyed).loss.backward()  # first calls: compilation, lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(**keyed).loss.backward()
        with pytest.raises(RuntimeError, match="synchroniz"):
            model(**on_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cache_keeps_the_first_entries_that_fit_and_no_later_ones():
    cache = FeatureCache(max_bytes=2 * 64 * 4)
    for name in "abc":
        cache.put(name, torch.zeros(64))
    assert set(cache.entries) == {"a", "b"} and cache.bytes == 2 * 64 * 4
    assert "b" in cache and "c" not in cache
    assert cache.get("c") is None and cache.get("a") is not None
    assert (cache.hits, cache.misses) == (1, 1)


class FlaggedSamples:
    """Stands in for a dataset whose workers leave out cached pixels: its size, flags and samples' places."""

    def __init__(self, count: int):
        self.count, self.flags = count, None
        self.samples = [types.SimpleNamespace(where=f"ui.jsonl:{line}") for line in range(1, count + 1)]

    def __len__(self) -> int:
        return self.count

    def skip_cached_pixels(self, tag: int, flags: torch.Tensor) -> None:
        self.flags = flags


def test_samples_whose_tiles_are_cached_train_without_pixels_to_the_same_loss(tiny_native, random_lora_b):
    model = training_model(tiny_native, LORA, dataclasses.replace(FAST, vision_cache_mib=4), random_lora_b)
    fast = model.get_base_model().forward
    other, samples = FlaggedSamples(2), FlaggedSamples(len(SAMPLES))
    fast.share_cached_samples(other, samples)
    batch = padded_batch(model.config)
    keys = tile_keys(batch["pixel_values"])  # samples 0 and 2 have 3 tiles each, sample 1 none
    loaded = {**batch, "tile_keys": keys, "tile_sources": [(1, 0, True)] * 3 + [(1, 2, True)] * 3}
    with torch.no_grad():
        first = model(**loaded).loss
        assert samples.flags.tolist() == [True, False, True] and not other.flags.any()
        half = {**loaded, "pixel_values": batch["pixel_values"][3:],
                "tile_sources": [(1, 0, False)] * 3 + [(1, 2, True)] * 3}
        torch.testing.assert_close(model(**half).loss, first, rtol=0, atol=0)
        bare = {key: value for key, value in loaded.items() if key != "pixel_values"}
        bare["tile_sources"] = [(1, 0, False)] * 3 + [(1, 2, False)] * 3
        torch.testing.assert_close(model(**bare).loss, first, rtol=0, atol=0)
        assert fast.cache_stats()["tiles_without_pixels"] == 3 + 6
        inner = model.get_base_model().model
        inner.vision_tower.encoder.layer[0].mlp.fc1.weight.mul_(1.01)  # every cached row is stale now
        with pytest.raises(RuntimeError, match="ui.jsonl:1: 6 tile.* neither in the vision feature cache nor loaded"):
            model(**bare)


def test_cache_refuses_a_trainable_vision_tower(tiny_native):
    cfg = dataclasses.replace(LORA, backbone_lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj",)))
    model = prepare_for_training(load_model(tiny_native), cfg)
    with pytest.raises(ValueError, match="frozen vision tower"):
        install_fast_path(model, dataclasses.replace(FAST, vision_cache_mib=4))


def test_every_switch_off_keeps_the_stock_forward(tiny_native):
    model = prepare_for_training(load_model(tiny_native), LORA)
    assert install_fast_path(model, STOCK_FAST) is None
    assert "forward" not in vars(model.get_base_model())


def test_the_log_line_names_every_switch_that_is_on():
    assert describe(STOCK_FAST).startswith("stock training step")
    compiled_only = describe(dataclasses.replace(STOCK_FAST, compile=True))
    assert compiled_only == "fast path: transformer blocks compiled"
    everything = describe(FastConfig(logit_chunk_tokens=8, vision_cache_mib=4, compile=True, cuda_graphs=True))
    for words in ("label positions only, 8 positions a chunk", "without autograd", "cache of 4 MiB", "compiled",
                  "answer loss and backward as CUDA graphs", "without cuDNN", "without the padding mask",
                  "lengths padded to multiples of 8", "checkpoints written in the background"):
        assert words in everything
    assert "lengths padded" not in describe(FastConfig())  # uncompiled: nothing is padded


@pytest.fixture
def restore_cudnn_attention():
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(enabled)


def test_fast_path_leaves_cudnn_attention_out_and_the_stock_path_lets_it_in(tiny_native, restore_cudnn_attention):
    model = prepare_for_training(load_model(tiny_native), LORA)
    install_fast_path(model, FAST)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    install_fast_path(prepare_for_training(load_model(tiny_native), LORA), STOCK_FAST)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    install_fast_path(prepare_for_training(load_model(tiny_native), LORA),
                      dataclasses.replace(FAST, sdpa_without_cudnn=False))
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_right_padding_is_told_from_left_padding():
    assert is_right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert is_right_padded(None)
    assert not is_right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))
    assert not is_right_padded(torch.tensor([[1, 0, 1]]))


def left_padded(batch: dict) -> dict:
    """The same samples with their padding moved before the tokens."""
    shifts = (batch["attention_mask"] == 0).sum(dim=1)
    rolled = {key: torch.stack([row.roll(int(shift)) for row, shift in zip(batch[key], shifts)])
              for key in ("input_ids", "labels", "attention_mask")}
    return {**batch, **rolled}


def language_model_masks(model, batch: dict) -> list:
    """The attention masks the language model received during one forward with labels."""
    seen = []
    language_model = model.get_base_model().model.language_model
    handle = language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    try:
        model(**batch)
    finally:
        handle.remove()
    return seen


def test_padding_mask_is_dropped_only_for_right_padded_batches(tiny_native, random_lora_b):
    """Right padding: the causal mask alone gives the real positions' outputs, so the mask is left out; left
    padding keeps it (positions 0.. would otherwise see the padding), and both give the stock loss."""
    model = training_model(tiny_native, LORA, FAST, random_lora_b)
    stock = training_model(tiny_native, LORA, STOCK_FAST, random_lora_b)
    right = padded_batch(model.config)
    left = left_padded(right)
    assert language_model_masks(model, right) == [{"full_attention": None}]  # causal attention alone, every layer
    (left_mask,) = language_model_masks(model, left)
    torch.testing.assert_close(left_mask, left["attention_mask"])
    kept = training_model(tiny_native, LORA, dataclasses.replace(FAST, drop_padding_mask=False), random_lora_b)
    (kept_mask,) = language_model_masks(kept, right)
    torch.testing.assert_close(kept_mask, right["attention_mask"])
    with torch.no_grad():
        for batch in (right, left):
            torch.testing.assert_close(model(**batch).loss, stock(**right).loss, rtol=1e-6, atol=1e-6)


def test_positions_are_padded_to_a_multiple_with_zeros():
    embeds = torch.randn(2, 70, 8)
    padded = pad_positions(embeds, 64)
    assert padded.shape == (2, 128, 8)
    torch.testing.assert_close(padded[:, :70], embeds)
    assert not padded[:, 70:].any()
    assert pad_positions(padded, 64) is padded


def language_model_lengths(model, batch: dict) -> list[int]:
    """The sequence lengths the language model received during one training step."""
    seen = []
    language_model = model.get_base_model().model.language_model
    handle = language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        loss_and_grads(model, batch)
    finally:
        handle.remove()
    return seen


def test_padded_positions_leave_loss_and_gradients_alone(tiny_native, random_lora_b):
    """With compiled blocks, zero positions appended behind right-padded samples: the language model sees a longer
    batch, the loss and gradients are those of the unpadded one. Uncompiled, nothing is padded."""
    padding = dataclasses.replace(FAST, compile=True, pad_to_multiple_of=64)
    model = training_model(tiny_native, LORA, padding, random_lora_b)
    batch = padded_batch(model.config)
    length = batch["input_ids"].shape[1]
    assert language_model_lengths(model, batch) == [64 * -(-length // 64)] and length % 64
    loss, grads = loss_and_grads(model, batch)
    unpadded = training_model(tiny_native, LORA, dataclasses.replace(padding, pad_to_multiple_of=1), random_lora_b)
    plain_loss, plain_grads = loss_and_grads(unpadded, batch)
    assert_close_to_scale(loss, plain_loss, "loss")
    assert_gradients_close(grads, plain_grads)
    uncompiled = dataclasses.replace(padding, compile=False)
    assert language_model_lengths(training_model(tiny_native, LORA, uncompiled, random_lora_b), batch) == [length]


def one_sgd_step(tiny_native, fast: FastConfig, batch: dict, tmp_path, random_lora_b) -> dict[str, torch.Tensor]:
    """LoRA weights after one Trainer step of SGD over two accumulated micro-batches (loss scaling matters)."""
    model = training_model(tiny_native, LORA, fast, random_lora_b)
    items = [{key: value[row] for key, value in batch.items() if key != "pixel_values"} for row in (1, 0)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                             weight_decay=0.0, max_grad_norm=0.0, use_cpu=True, report_to=[], save_strategy="no",
                             remove_unused_columns=False, logging_strategy="no")
    collate = lambda rows: {key: torch.stack([row[key] for row in rows]) for key in rows[0]}  # noqa: E731
    Trainer(model=model, args=args, train_dataset=items, data_collator=collate).train()
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_a_trainer_step_equals_the_stock_one(tiny_native, random_lora_b, tmp_path):
    """The Trainer divides by the label tokens of the whole accumulated batch; the fast forward must too."""
    batch = padded_batch(load_model(tiny_native).config)
    stock = one_sgd_step(tiny_native, STOCK_FAST, batch, tmp_path / "stock", random_lora_b)
    fast = one_sgd_step(tiny_native, FAST, batch, tmp_path / "fast", random_lora_b)
    before = training_model(tiny_native, LORA, STOCK_FAST, random_lora_b)
    moved = [n for n, p in before.named_parameters() if p.requires_grad and not torch.equal(p, stock[n])]
    assert moved
    for name, weight in stock.items():
        assert_close_to_scale(fast[name], weight, name)


def test_compiled_blocks_give_the_same_loss_and_gradients(tiny_native, random_lora_b):
    cfg = dataclasses.replace(LORA, grad_checkpoint=True)
    plain = training_model(tiny_native, cfg, FAST, random_lora_b)
    compiled = training_model(tiny_native, cfg, dataclasses.replace(FAST, compile=True), random_lora_b)
    inner = compiled.get_base_model().model
    assert torch._dynamo.config.recompile_limit >= 16  # every context a block runs in (allow_block_variants)
    assert all(block._compiled_call_impl is not None
               for block in (*inner.language_model.layers, *inner.vision_tower.encoder.layer))
    batch = padded_batch(plain.config)
    plain_loss, plain_grads = loss_and_grads(plain, batch)
    compiled_loss, compiled_grads = loss_and_grads(compiled, batch)
    torch.testing.assert_close(compiled_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert_gradients_close(compiled_grads, plain_grads)


def test_compiled_blocks_take_other_batch_and_sequence_sizes_without_compiling_again(tiny_native, random_lora_b):
    model = training_model(tiny_native, LORA, dataclasses.replace(FAST, compile=True), random_lora_b)
    batch = padded_batch(model.config)
    loss_and_grads(model, batch)
    compiled = counters["stats"]["unique_graphs"]
    shorter = {key: value if key == "pixel_values" else value[[0, 2], :-5] for key, value in batch.items()}
    loss_and_grads(model, shorter)  # samples 0 and 2 hold all the tiles; fewer rows, fewer positions
    with torch.no_grad():
        model(**batch)
        after_evaluation = counters["stats"]["unique_graphs"]
        model(**shorter)
    assert counters["stats"]["unique_graphs"] == after_evaluation == compiled + 1  # + the variant without autograd


def test_compiled_vision_blocks_take_a_single_tile_without_compiling_again(tiny_native, random_lora_b):
    torch._dynamo.reset()  # no graph compiled by another test serves this one
    model = training_model(tiny_native, LORA, dataclasses.replace(FAST, compile=True), random_lora_b)
    batch = padded_batch(model.config)
    loss_and_grads(model, batch)
    compiled = counters["stats"]["unique_graphs"]
    length = int(batch["attention_mask"][:2].sum(dim=1).max())
    input_ids = batch["input_ids"][:2, :length].clone()
    image_positions = (input_ids[0] == model.config.image_token_id).nonzero()[:, 0]
    input_ids[0, image_positions[len(image_positions) // 3:]] = 1  # text instead of sample 0's last two tiles
    one_tile = {"input_ids": input_ids, "labels": batch["labels"][:2, :length],
                "attention_mask": batch["attention_mask"][:2, :length], "pixel_values": batch["pixel_values"][:1]}
    loss, grads = loss_and_grads(model, one_tile)
    plain_loss, plain_grads = loss_and_grads(training_model(tiny_native, LORA, FAST, random_lora_b), one_tile)
    assert counters["stats"]["unique_graphs"] == compiled  # a batch of one tile was not compiled apart
    assert_close_to_scale(loss, plain_loss, "loss")
    assert_gradients_close(grads, plain_grads)


def test_evaluation_compiles_only_the_language_blocks_again(tiny_native, random_lora_b):
    """The frozen vision tower (no dropout) stays in evaluation mode, so its compiled blocks serve evaluation too;
    the language blocks get their variant without autograd."""
    torch._dynamo.reset()  # no graph compiled by another test serves this one
    model = training_model(tiny_native, LORA, dataclasses.replace(FAST, compile=True), random_lora_b)
    batch = padded_batch(model.config)
    model.train()
    loss_and_grads(model, batch)
    compiled = counters["stats"]["unique_graphs"]
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert counters["stats"]["unique_graphs"] == compiled + 1
    model.train()
    assert not model.get_base_model().model.vision_tower.training
    assert model.get_base_model().model.language_model.training
