"""Benchmark of the training step: the stock path (reference) against the fast path, on the same batches.

    python -m internvl_sft.bench --size tiny | --size 1b | --model DIR  [--steps 20] [--warmup 3] [--out FILE]

Both modes train the recipe of --preset over --params (by default the seed recipe: LoRA r=64, alpha=128 on the
LLM's q/k/v/o/gate/up/down, vision tower, projector and LLM frozen, gradient checkpointing on) with AdamW (in
bf16 as the recipe's engine trains: DeepSpeed's bf16 weights with fp32 master copies, or the Trainer's
autocast), one after the other in this process, on the same deterministic synthetic batches: per sample,
--prompt-tokens text tokens, the image tokens of --tiles tiles and an answer of about --answer-tokens tokens
(lengths vary, so batches are right-padded), the loss on the answer only. The reference is transformers'
forward with full-vocabulary logits; the fast mode is the training code's fast path as `train.fast` configures
it. The model has random weights: the embedded default's sizes (`tiny`), the InternVL2-1B shape (`1b`, the sizes
of presets/internvl2-1b-random.yaml), or a given native checkpoint.

Warm-up steps are not timed; CUDA is synchronised around the timed steps. Useful FLOPs per sample are
2 x vision-tower parameters x patch tokens (forward only) + 4 x language-model parameters x non-padding tokens
(forward and backward), MFU is their rate over --peak-tflops. Before training, both modes must give the same
loss on the first batch (without dropout, within a tolerance of the dtype); otherwise the command exits with
status 1 after writing its report. With --fast-batch-size the fast mode trains several of the reference's
batches in one step, as a larger per-device batch with less gradient accumulation does in training (same global
batch).

When both modes train the same batches, the report compares their loss at every step. Two bf16 runs of the same
math part by the dtype's rounding alone, so --fp32-reference also trains the reference in fp32 from the same
weights (untimed) and reports how far each mode's step losses lie from it: the scale against which the two modes'
own difference is judged.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import peft
import torch
import transformers
from torch.nn import functional as F
from transformers import PretrainedConfig

from internvl_sft.bench_train import FP32_MODE, MODES, largest_relative_difference
from internvl_sft.config import STOCK_FAST, Params, TrainConfig, load_params
from internvl_sft.data.dataset import FAST_STEP_KEYS, content_digest, fast_step_inputs
from internvl_sft.data.synthetic import LEXICON
from internvl_sft.data.template import IGNORE_INDEX
from internvl_sft.fast import install_fast_path, takes_fast_forward, tensor_bytes, unwrap
from internvl_sft.model.convert import upstream_to_native
from internvl_sft.model.load import (
    attention_implementation,
    inference_device,
    load_model,
    prepare_for_training,
    resolve_dtype,
)
from internvl_sft.paths import write_report
from internvl_sft.model.tiny import TinySizes, build_tiny_checkpoint
from internvl_sft.preset import resolve
from internvl_sft.profiling import operator_table, step_profiler
from internvl_sft.stages.pretrained import tiny_sizes

H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--size", choices=("tiny", "1b"), default="tiny", help="random weights of these sizes")
    source.add_argument("--model", type=Path, help="a native checkpoint folder instead of random weights")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--preset", type=Path, default=Path("presets/internvl2-1b-random.yaml"),
                        help="the recipe (its train and inputs sections) and the sizes of --size 1b")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, help="samples a step (default: the recipe's per-device batch)")
    parser.add_argument("--tiles", type=int, help="tiles a sample (default: the recipe's max tiles + thumbnail)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=128, help="mean answer length (each varies by 1/8)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="auto: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--fast-grad-checkpoint", choices=("on", "off"),
                        help="gradient checkpointing of the fast mode (default: the recipe's, as the reference)")
    parser.add_argument("--logit-chunk-tokens", type=int, help="of the fast mode (default: params train.fast)")
    parser.add_argument("--vision-cache-mib", type=int, help="of the fast mode (default: params train.fast)")
    parser.add_argument("--compile", choices=("on", "off"), help="of the fast mode (default: params train.fast)")
    parser.add_argument("--cuda-graphs", choices=("on", "off"),
                        help="of the fast mode, with --compile on and a GPU (default: params train.fast)")
    parser.add_argument("--fast-batch-size", type=int,
                        help="samples a step of the fast mode, a multiple of --batch-size: the reference's batches "
                             "trained that many at once, as a larger per-device batch with less accumulation does "
                             "(default: the same as the reference)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after the timed steps, profile this many more of each mode (torch.profiler) and "
                             "write the operators that took the most device time next to --out")
    parser.add_argument("--distinct-batches", type=int, default=0,
                        help="cycle through this many batches, as epochs repeat data (default 0: all distinct)")
    parser.add_argument("--peak-tflops", type=float,
                        help=f"peak FLOP/s for MFU (default: {H100_BF16_TFLOPS:g} on CUDA, none on a CPU)")
    parser.add_argument("--fp32-reference", action="store_true",
                        help="also train the reference in fp32 from the same weights and report each mode's step "
                             "losses against it (needs a bf16 / fp16 training dtype and equal batch sizes)")
    parser.add_argument("--seed", type=int, default=0, help="of the batches and the LoRA initialisation")
    parser.add_argument("--build-dir", type=Path,
                        help="build the random checkpoint here and reuse it later (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("work_dirs/bench/bench.json"))
    args = parser.parse_args(argv)
    if args.steps < 1 or min(args.warmup, args.distinct_batches, args.profile_steps) < 0:
        parser.error("--steps must be >= 1, --warmup, --distinct-batches and --profile-steps >= 0")
    if args.fast_batch_size is not None and args.fast_batch_size < 1:
        parser.error("--fast-batch-size must be >= 1")
    return args


@dataclasses.dataclass(frozen=True)
class BatchShape:
    batch_size: int
    tiles: int
    prompt_tokens: int
    answer_tokens: int


def batch_shape(args: argparse.Namespace, recipe: Params) -> BatchShape:
    """The command line's shape; what it leaves out comes from the recipe."""
    tiles = recipe.inputs.max_dynamic_patch + int(recipe.inputs.use_thumbnail and recipe.inputs.max_dynamic_patch > 1)
    return BatchShape(
        batch_size=args.batch_size or recipe.train.per_device_batch_size,
        tiles=args.tiles or tiles,
        prompt_tokens=args.prompt_tokens,
        answer_tokens=args.answer_tokens,
    )


def mode_configs(args: argparse.Namespace, recipe: TrainConfig) -> dict[str, TrainConfig]:
    """The recipe with every fast switch off (reference) and as params and the command line set them (fast)."""
    overrides = {"logit_chunk_tokens": args.logit_chunk_tokens, "vision_cache_mib": args.vision_cache_mib,
                 "compile": None if args.compile is None else args.compile == "on",
                 "cuda_graphs": None if args.cuda_graphs is None else args.cuda_graphs == "on"}
    fast = dataclasses.replace(recipe.fast, **{key: value for key, value in overrides.items() if value is not None})
    checkpointing = recipe.grad_checkpoint if args.fast_grad_checkpoint is None else args.fast_grad_checkpoint == "on"
    if fast.cuda_graphs and (checkpointing or not fast.compile or not fast.answer_logits_only):
        raise SystemExit("bench: CUDA graphs need --compile on, --fast-grad-checkpoint off and "
                         "train.fast.answer_logits_only: true")
    return {
        "reference": dataclasses.replace(recipe, fast=STOCK_FAST),
        "fast": dataclasses.replace(recipe, fast=fast, grad_checkpoint=checkpointing),
    }


def random_checkpoint(sizes: TinySizes, seed: int, folder: Path) -> Path:
    """A native checkpoint with random weights of `sizes`, built in the upstream layout and converted like a real
    one; a folder that already holds one of the same sizes and seed is reused."""
    stamp = json.dumps({"sizes": dataclasses.asdict(sizes), "seed": seed}, sort_keys=True)
    native, built = folder / "native", folder / "built.json"
    if built.exists() and built.read_text(encoding="utf-8") == stamp and (native / "config.json").exists():
        return native
    build_tiny_checkpoint(folder / "upstream", corpus=LEXICON, seed=seed, sizes=sizes)
    upstream_to_native(folder / "upstream", native)
    built.write_text(stamp, encoding="utf-8")
    return native


@contextlib.contextmanager
def model_folder(args: argparse.Namespace) -> Iterator[Path]:
    """The native checkpoint to benchmark: --model, or random weights of --size built for the run."""
    if args.model is not None:
        yield args.model
        return
    params = resolve(args.preset, args.params)[0] if args.size == "1b" else load_params(args.params)
    sizes, seed = tiny_sizes(params.pretrained), params.pretrained.tiny.seed
    if args.build_dir is not None:
        yield random_checkpoint(sizes, seed, args.build_dir)
        return
    folder = Path(tempfile.mkdtemp(prefix="internvl-bench-"))
    try:
        yield random_checkpoint(sizes, seed, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def tokens_per_tile(config: PretrainedConfig) -> int:
    return int(patches_per_tile(config) * config.downsample_ratio**2)


def patches_per_tile(config: PretrainedConfig) -> int:
    vision = config.vision_config
    return (first(vision.image_size) // first(vision.patch_size)) ** 2


def first(value: int | list[int] | tuple[int, ...]) -> int:
    """Sizes may be one number or (height, width); tiles are square."""
    return value if isinstance(value, int) else value[0]


def synthetic_batch(config: PretrainedConfig, shape: BatchShape, generator: torch.Generator) -> dict:
    """Random text tokens around each sample's image tokens, random tiles, the loss on the answers only."""
    image_tokens = shape.tiles * tokens_per_tile(config)
    jitter = shape.answer_tokens // 8
    answers = torch.randint(-jitter, jitter + 1, (shape.batch_size,), generator=generator) + shape.answer_tokens
    lengths = shape.prompt_tokens + image_tokens + answers
    longest = int(lengths.max())
    input_ids = torch.randint(0, config.image_token_id, (shape.batch_size, longest), generator=generator)
    input_ids[:, shape.prompt_tokens: shape.prompt_tokens + image_tokens] = config.image_token_id
    positions = torch.arange(longest)
    attention_mask = (positions < lengths[:, None]).long()
    labels = torch.where(positions >= shape.prompt_tokens + image_tokens, input_ids, IGNORE_INDEX)
    labels[attention_mask == 0] = IGNORE_INDEX
    input_ids[attention_mask == 0] = 0
    size = first(config.vision_config.image_size)
    pixel_values = torch.randn(shape.batch_size * shape.tiles, 3, size, size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values}


def with_tile_keys(batch: dict) -> dict:
    """The batch with the vision feature cache's key of every tile."""
    keys = [content_digest((str(tuple(tile.shape)), tensor_bytes(tile))) for tile in batch["pixel_values"]]
    return {**batch, "tile_keys": keys}


def with_fast_step_keys(batch: dict, image_token_id: int) -> dict:
    """The batch with the keys the train stage's `collate` adds for the fast training step."""
    return {**batch, **fast_step_inputs(batch["input_ids"], batch["labels"], image_token_id)}


def pinned(batches: list[dict]) -> list[dict]:
    """The batches in page-locked memory, as the train stage's loader hands them to a GPU (a batch listed for
    several steps copied once)."""
    copies: dict[int, dict] = {}
    for batch in batches:
        if id(batch) not in copies:
            copies[id(batch)] = {key: value.pin_memory() if torch.is_tensor(value) else value
                                 for key, value in batch.items()}
    return [copies[id(batch)] for batch in batches]


def model_inputs(batch: dict, cfg: TrainConfig, device: torch.device) -> dict:
    """The batch on `device`, with tile keys only where the mode has a vision feature cache and the fast step's
    keys only where it has the fast path."""
    dropped = (() if cfg.fast.vision_cache_mib else ("tile_keys",)) + (
        () if takes_fast_forward(cfg.fast) else FAST_STEP_KEYS)
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items() if key not in dropped}


def distinct_batch_count(args: argparse.Namespace) -> int:
    steps = args.warmup + args.steps
    return min(args.distinct_batches or steps, steps)


def step_batches(config: PretrainedConfig, shape: BatchShape, args: argparse.Namespace, *, with_keys: bool
                 ) -> list[dict]:
    """A batch for every step: all distinct, or --distinct-batches of them in turn."""
    generator = torch.Generator().manual_seed(args.seed)
    distinct = [synthetic_batch(config, shape, generator) for _ in range(distinct_batch_count(args))]
    if with_keys:
        distinct = [with_tile_keys(batch) for batch in distinct]
    distinct = [with_fast_step_keys(batch, config.image_token_id) for batch in distinct]
    return [distinct[index % len(distinct)] for index in range(args.warmup + args.steps)]


def merge_batches(batches: list[dict], image_token_id: int) -> dict:
    """One batch holding the samples of `batches`, right-padded to the longest."""
    longest = max(batch["input_ids"].shape[1] for batch in batches)
    fills = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
    merged = {key: torch.cat([F.pad(batch[key], (0, longest - batch[key].shape[1]), value=fill) for batch in batches])
              for key, fill in fills.items()}
    merged["pixel_values"] = torch.cat([batch["pixel_values"] for batch in batches])
    if "tile_keys" in batches[0]:
        merged["tile_keys"] = [key for batch in batches for key in batch["tile_keys"]]
    return with_fast_step_keys(merged, image_token_id)


def grouped(batches: list[dict], per_step: int, image_token_id: int) -> list[dict]:
    """The batches in steps of `per_step` each, cycling through them as often as needed."""
    return [merge_batches([batches[(step * per_step + k) % len(batches)] for k in range(per_step)], image_token_id)
            for step in range(len(batches))]


@dataclasses.dataclass(frozen=True)
class FlopCounts:
    """Parameter counts behind the useful-FLOP accounting of a training step."""

    vision_params: int
    llm_params: int
    patches_per_tile: int

    def useful_flops(self, batch: dict) -> float:
        patches = batch["pixel_values"].shape[0] * self.patches_per_tile
        tokens = int(batch["attention_mask"].sum())
        return 2.0 * self.vision_params * patches + 4.0 * self.llm_params * tokens


def flop_counts(model: torch.nn.Module) -> FlopCounts:
    inner = unwrap(model).model

    def base_params(module: torch.nn.Module) -> int:
        return sum(p.numel() for name, p in module.named_parameters() if "lora_" not in name)

    return FlopCounts(base_params(inner.vision_tower), base_params(inner.language_model),
                      patches_per_tile(inner.config))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Free what the previous mode left and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def uses_master_weights(cfg: TrainConfig, dtype: torch.dtype) -> bool:
    """Whether the recipe trains as DeepSpeed's bf16 / fp16 mode does: every parameter, the adapters included, in
    the training dtype, fp32 master copies in the optimizer, no autocast. Without DeepSpeed the Trainer keeps
    peft's fp32 adapters and autocasts, which adds dtype copies of the activations around every adapter."""
    return cfg.deepspeed != "none" and dtype != torch.float32


def autocast_for(device: torch.device, dtype: torch.dtype,
                 master_weights: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """Mixed precision as the Trainer applies it with bf16/fp16 (the weights are loaded in that dtype too); none
    where the weights are all in the training dtype already."""
    if dtype == torch.float32 or master_weights:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def precision_name(dtype: torch.dtype, master_weights: bool) -> str:
    if dtype == torch.float32:
        return "fp32"
    return "fp32 master weights" if master_weights else "autocast"


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters (not buffers, e.g. rotary frequencies) to `dtype`, as DeepSpeed casts the model it wraps."""
    for param in model.parameters():
        param.data = param.data.to(dtype)


class ClippedAdamW:
    """AdamW after clipping the gradients' norm, as the Trainer steps; with `master_weights`, on fp32 copies of
    the parameters (DeepSpeed's bf16 / fp16 mode): gradients are copied up, the update is applied to the copies
    and they are copied back into the model, so updates smaller than the training dtype's precision add up. Both
    copies run as grouped (foreach) kernels into buffers kept for the run, as DeepSpeed copies its flat buffers: a
    copy per parameter was hundreds of small launches at the end of every step, with the GPU idle behind them."""

    def __init__(self, params: list[torch.nn.Parameter], *, max_grad_norm: float, master_weights: bool,
                 **adamw) -> None:
        self.params, self.master_weights, self.max_grad_norm = params, master_weights, max_grad_norm
        self.targets = [p.detach().float() for p in params] if master_weights else params
        if master_weights:
            for target in self.targets:
                target.grad = torch.zeros_like(target)
        self.adamw = torch.optim.AdamW(self.targets, **adamw)

    def step(self) -> None:
        if self.master_weights:
            torch._foreach_copy_([target.grad for target in self.targets], [param.grad for param in self.params])
            for param in self.params:
                param.grad = None
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.targets, self.max_grad_norm)
        self.adamw.step()
        if self.master_weights:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.targets)
        else:
            self.adamw.zero_grad(set_to_none=True)


def train_step(model, optimizer: ClippedAdamW, batch: dict, *,
               autocast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
    with autocast():
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


def profile_table(step: Callable[[dict], torch.Tensor], batches: list[dict], device: torch.device,
                  out: Path) -> None:
    """Run `step` on each batch under torch.profiler; write the operators sorted by their own device time."""
    on_gpu = device.type == "cuda"
    with step_profiler(on_gpu) as profiler:
        for batch in batches:
            step(batch)
        synchronize(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(operator_table(profiler, "device", on_gpu) + "\n", encoding="utf-8")
    print(f"profile of {len(batches)} step(s) written to {out}", flush=True)


def evaluation_loss(model: torch.nn.Module, batch: dict,
                    autocast: Callable[[], contextlib.AbstractContextManager]) -> float:
    """The loss of `batch` without dropout or autograd: what both modes must agree on."""
    model.eval()
    with torch.no_grad(), autocast():
        loss = float(model(**batch).loss)
    model.train()
    return loss


def run_mode(mode: str, model_dir: Path, cfg: TrainConfig, batches: list[dict], check_batch: dict,
             args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
             fp32_compute: bool = False) -> tuple[dict, FlopCounts]:
    """The loss of `check_batch` before training, then train `cfg` on `batches`, timing all but the first
    --warmup steps. With `fp32_compute` the weights are rounded to `dtype` as the other modes hold them, then
    trained in fp32."""
    release_memory(device)
    torch.manual_seed(args.seed)
    model = prepare_for_training(load_model(model_dir, dtype), cfg).to(device)
    master_weights = uses_master_weights(cfg, dtype)
    if master_weights:
        cast_parameters(model, dtype)
    if fp32_compute:
        cast_parameters(model, torch.float32)
        dtype, master_weights = torch.float32, False
    fast = install_fast_path(model, cfg.fast)
    model.train()
    optimizer = ClippedAdamW([p for p in model.parameters() if p.requires_grad], max_grad_norm=cfg.max_grad_norm,
                             master_weights=master_weights, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda")
    counts, autocast = flop_counts(model), autocast_for(device, dtype, master_weights)
    check_inputs = {k: v for k, v in model_inputs(check_batch, cfg, device).items() if k != "tile_keys"}
    check_loss = evaluation_loss(model, check_inputs, autocast)  # computed, not cached
    start, losses = time.perf_counter(), []
    for index, batch in enumerate(batches):
        if index == args.warmup:
            synchronize(device)
            start = time.perf_counter()
        losses.append(train_step(model, optimizer, model_inputs(batch, cfg, device), autocast=autocast))
    synchronize(device)
    seconds = time.perf_counter() - start
    result = timing(batches[args.warmup:], seconds, counts, args, device)
    result["step_losses"] = [float(loss) for loss in losses]
    if args.profile_steps:
        step = partial(train_step, model, optimizer, autocast=autocast)
        profile_table(step, [model_inputs(b, cfg, device) for b in batches[:args.profile_steps]], device,
                      args.out.with_name(f"{args.out.stem}_{mode}_profile.txt"))
    result["first_batch_loss"] = check_loss
    result["batch_size"] = int(batches[0]["input_ids"].shape[0])
    result["grad_checkpoint"] = cfg.grad_checkpoint
    result["precision"] = precision_name(dtype, master_weights)
    result["fast"] = dataclasses.asdict(cfg.fast)
    if fast is not None and fast.cache is not None:
        result["vision_cache"] = fast.cache_stats()
    del model, optimizer, fast
    release_memory(device)
    return result, counts


def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops
    return H100_BF16_TFLOPS if device.type == "cuda" else None


def timing(timed: list[dict], seconds: float, counts: FlopCounts, args: argparse.Namespace,
           device: torch.device) -> dict:
    samples = sum(batch["input_ids"].shape[0] for batch in timed)
    tokens = sum(int(batch["attention_mask"].sum()) for batch in timed)
    flops = sum(counts.useful_flops(batch) for batch in timed)
    peak = peak_tflops(args, device)
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "useful_tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / (peak * 1e12) if peak else None,
        "peak_memory_bytes": memory,
        "peak_memory_gib": memory / 2**30 if memory is not None else None,
    }


def loss_check(reference: float, fast: float, dtype: torch.dtype) -> dict:
    rtol = LOSS_RTOL[dtype]
    difference = abs(fast - reference)
    return {"reference": reference, "fast": fast, "abs_diff": difference, "rtol": rtol,
            "equal": difference <= rtol * abs(reference)}


def step_loss_differences(results: dict) -> dict:
    """The largest relative difference of the step losses: fast against reference, and, where an fp32 run
    exists, each against it."""
    losses = {mode: result["step_losses"] for mode, result in results.items()}
    differences = {"steps": len(losses["reference"]),
                   "fast_vs_reference": largest_relative_difference(losses["fast"], losses["reference"])}
    if FP32_MODE in losses:
        for mode in MODES:
            differences[f"{mode}_vs_fp32"] = largest_relative_difference(losses[mode], losses[FP32_MODE])
    return differences


def ratio(results: dict, key: str) -> float | None:
    reference, fast = results["reference"][key], results["fast"][key]
    return fast / reference if reference and fast is not None else None


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "attention": attention_implementation(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def format_value(value: float | None, kind: str) -> str:
    if value is None:
        return "n/a"
    return {"rate": f"{value:,.2f}", "percent": f"{100 * value:.1f}%", "ratio": f"{value:.2f}x"}[kind]


def table(report: dict) -> str:
    """The results as a text table: a row per measure, a column per mode and their ratio."""
    rows = [("samples/s", "samples_per_s", "rate"), ("tokens/s", "tokens_per_s", "rate"),
            ("MFU (useful FLOPs)", "mfu", "percent"), ("peak GPU memory (GiB)", "peak_memory_gib", "rate")]
    modes, ratios = report["modes"], report["ratios"]
    lines = [f"{'':24}{'reference':>14}{'fast':>14}{'fast/reference':>16}",
             f"{'samples a step':24}{modes['reference']['batch_size']:>14}{modes['fast']['batch_size']:>14}"]
    for label, key, kind in rows:
        lines.append(f"{label:24}{format_value(modes['reference'][key], kind):>14}"
                     f"{format_value(modes['fast'][key], kind):>14}{format_value(ratios[key], 'ratio'):>16}")
    check = report["first_batch_loss"]
    verdict = "equal" if check["equal"] else "DIFFERENT"
    lines.append(f"first-batch loss: reference {check['reference']:.6f}, fast {check['fast']:.6f} "
                 f"(|diff| {check['abs_diff']:.2e}, relative tolerance {check['rtol']:g}): {verdict}")
    steps = report.get("step_losses")
    if steps:
        against_fp32 = "".join(f", {mode} vs fp32 {steps[f'{mode}_vs_fp32']:.2e}"
                               for mode in MODES if f"{mode}_vs_fp32" in steps)
        lines.append(f"step losses over {steps['steps']} steps, largest relative difference: fast vs reference "
                     f"{steps['fast_vs_reference']:.2e}{against_fp32}")
    return "\n".join(lines)


def fast_steps_of(args: argparse.Namespace, shape: BatchShape) -> int:
    """How many of the reference's batches one step of the fast mode trains."""
    size = args.fast_batch_size or shape.batch_size
    if size % shape.batch_size:
        raise SystemExit(f"--fast-batch-size {size} is not a multiple of the batch size {shape.batch_size}")
    return size // shape.batch_size


def check_fp32_reference(dtype: torch.dtype, per_step: int) -> None:
    if dtype == torch.float32:
        raise SystemExit("--fp32-reference: the modes train in fp32 already (choose --precision bf16 or fp16)")
    if per_step > 1:
        raise SystemExit("--fp32-reference: the fast mode must train the reference's batches (no --fast-batch-size)")


def run(args: argparse.Namespace) -> dict:
    recipe = resolve(args.preset, args.params)[0]
    device = inference_device()
    dtype = resolve_dtype(args.precision)
    shape = batch_shape(args, recipe)
    configs = mode_configs(args, recipe.train)
    per_step = fast_steps_of(args, shape)
    if args.fp32_reference:
        check_fp32_reference(dtype, per_step)
    with model_folder(args) as model_dir:
        config = transformers.AutoConfig.from_pretrained(model_dir)
        batches = step_batches(config, shape, args, with_keys=bool(configs["fast"].fast.vision_cache_mib))
        fast_batches = grouped(batches, per_step, config.image_token_id) if per_step > 1 else batches
        if device.type == "cuda":
            batches = pinned(batches)
            fast_batches = pinned(fast_batches) if per_step > 1 else batches
        mode_batches = {"reference": batches, "fast": fast_batches}
        results, counts = {}, None
        for mode in MODES:
            results[mode], counts = run_mode(mode, model_dir, configs[mode], mode_batches[mode], batches[0], args,
                                             device, dtype)
        if args.fp32_reference:
            results[FP32_MODE], _ = run_mode(FP32_MODE, model_dir, configs["reference"], batches, batches[0], args,
                                             device, dtype, fp32_compute=True)
    return {
        "environment": environment(device, dtype),
        "model": str(args.model) if args.model else f"random, --size {args.size}",
        "recipe": {"preset": str(args.preset), "params": str(args.params)},
        "shape": dataclasses.asdict(shape),
        "distinct_batches": distinct_batch_count(args),
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": peak_tflops(args, device),
        "flop_counts": dataclasses.asdict(counts),
        "modes": results,
        "ratios": {key: ratio(results, key) for key in ("samples_per_s", "tokens_per_s", "mfu", "peak_memory_gib")},
        "first_batch_loss": loss_check(results["reference"]["first_batch_loss"],
                                       results["fast"]["first_batch_loss"], dtype),
        "step_losses": step_loss_differences(results) if per_step == 1 else None,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    write_report(report, table(report), args.out)
    if not report["first_batch_loss"]["equal"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
