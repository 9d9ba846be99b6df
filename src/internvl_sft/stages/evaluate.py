"""Stage `eval`: validation loss and UI task metrics by generation, for the base and the fine-tuned model.

Writes a metrics JSON (declared as DVC metrics) with one block per model plus the score of always answering the
train set's mean point, and a predictions JSONL with every prompt, answer, prediction and its scores.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from internvl_sft.config import EvalConfig, InputsConfig, exit_on_config_error, load_params
from internvl_sft.data.dataset import build_dataset, collate, read_meta_samples
from internvl_sft.infer import Predictor, Query
from internvl_sft.metrics import (
    GROUNDING,
    aggregate,
    constant_point_prediction,
    mean_point_baseline,
    parse_action,
    score_sample,
    task_family,
)
from internvl_sft.model.load import inference_device, load_model, load_tokenizer, read_sidecar, resolve_dtype
from internvl_sft.paths import atomic_write_text
from internvl_sft.report import write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--train-meta", required=True, help="meta JSON of the training data (mean-point baseline)")
    parser.add_argument("--val-meta", required=True, help="meta JSON of the validation data")
    parser.add_argument("--base", required=True, help="native base model directory")
    parser.add_argument("--model", required=True, help="merged fine-tuned model directory")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--predictions", required=True, help="per-sample predictions JSONL to write")
    parser.add_argument("--report", required=True, help="HTML report to write (metrics tables, annotated screenshots)")
    return parser.parse_args(argv)


@torch.inference_mode()
def eval_loss(model, dataset, pad_token_id: int, batch_size: int) -> float:
    """Token-weighted mean cross-entropy over the answer tokens of the whole split."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=partial(collate, pad_token_id=pad_token_id))
    total, count = 0.0, 0
    for batch in tqdm(loader, desc="eval loss", leave=False):
        batch = {k: v.to(model.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * tokens
        count += tokens
    return total / max(count, 1)


def queries_and_answers(samples) -> tuple[list[Query], list[str]]:
    """Every sample becomes one query: the conversation up to its final answer."""
    queries, answers = [], []
    for sample in samples:
        turns = tuple(sample.conversations)
        queries.append(Query(images=tuple(sample.images), conversations=turns[:-1]))
        answers.append(turns[-1][1])
    return queries, answers


def predict_all(predictor: Predictor, queries: list[Query], batch_size: int, desc: str) -> list[str]:
    predictions: list[str] = []
    for start in tqdm(range(0, len(queries), batch_size), desc=desc):
        predictions.extend(predictor.generate(queries[start : start + batch_size]))
    return predictions


def evaluate_model(model_dir: str, label: str, samples, dataset, inputs: InputsConfig, cfg: EvalConfig,
                   sidecar: dict) -> tuple[dict, list[dict]]:
    model = load_model(model_dir, resolve_dtype("auto")).to(inference_device())
    tokenizer = load_tokenizer(model_dir)
    loss = eval_loss(model, dataset, tokenizer.pad_token_id, cfg.batch_size)
    queries, answers = queries_and_answers(samples)
    predictor = Predictor(model, tokenizer, inputs, sidecar, cfg.max_new_tokens)
    predictions = predict_all(predictor, queries, cfg.batch_size, desc=f"generate ({label})")
    scores = [score_sample(q.conversations[-1][1], a, p) for q, a, p in zip(queries, answers, predictions)]
    metrics = {"eval_loss": round(loss, 6), **aggregate(scores)}
    rows = [
        {"model": label, "id": s.sample_id, "image": [str(p) for p in s.images], "prompt": q.conversations[-1][1],
         "answer": a, "prediction": p, "score": sc}
        for s, q, a, p, sc in zip(samples, queries, answers, predictions, scores)
    ]
    return metrics, rows


def mean_point_metrics(train_samples, val_queries: list[Query], val_answers: list[str]) -> dict:
    """Score of always answering the train set's mean point (with the right action type), on the point tasks."""
    point = mean_point_baseline([s.conversations[-1][1] for s in train_samples])
    scores = []
    for query, answer in zip(val_queries, val_answers):
        prompt = query.conversations[-1][1]
        action = parse_action(answer) if task_family(prompt, answer) != GROUNDING else None
        if action is not None and action.points:
            scores.append(score_sample(prompt, answer, constant_point_prediction(action.kind, point)))
    return aggregate(scores)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    cfg, inputs = params.eval, params.inputs
    sidecar = read_sidecar(args.base)
    tokenizer = load_tokenizer(args.base)
    samples = read_meta_samples(args.val_meta, seed=params.train.seed)
    if cfg.max_samples:
        samples = samples[: cfg.max_samples]
    dataset = build_dataset(args.val_meta, tokenizer, sidecar, inputs, seed=params.train.seed, samples=samples)
    samples = dataset.samples
    queries, answers = queries_and_answers(samples)
    results = {"mean_point_baseline": mean_point_metrics(read_meta_samples(args.train_meta, seed=params.train.seed), queries,
                                                         answers)}
    rows: list[dict] = []
    models = [("finetuned", args.model)] + ([("base", args.base)] if cfg.eval_base else [])
    for label, model_dir in models:
        results[label], model_rows = evaluate_model(model_dir, label, samples, dataset, inputs, cfg, sidecar)
        rows.extend(model_rows)
    atomic_write_text(Path(args.metrics), json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(Path(args.predictions), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_report(results, rows, Path(args.report))
    print(json.dumps({k: {m: v.get(m) for m in ("all.action_acc", "all.point_error", "eval_loss")}
                      for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    exit_on_config_error(main)
