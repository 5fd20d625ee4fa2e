"""``clipcap demo``: the main job, end to end, on the embedded synthetic world.

Builds the world if it is absent, trains a captioner with the given config (cross-entropy by default),
reloads the best checkpoint the way a user would, captions the test split, and prints BLEU-4 and CIDEr
next to a trivial baseline (the most frequent training caption for every image), plus a few samples.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from clipcap.data.batch import collate_caption_batch
from clipcap.metrics.nlg import coco_caption_scores
from clipcap.training.data import CaptionDataModule, CaptionImages
from clipcap.training.module import CaptionModule


def caption_split(module: CaptionModule, datamodule: CaptionDataModule, split: str) -> dict[str, str]:
    """Captions every image of ``split`` with the module's decoding settings: image id → caption."""
    images = CaptionImages(datamodule.split(split))
    predictions: dict[str, str] = {}
    module.eval()
    for start in range(0, len(images), datamodule.eval_batch_size):
        batch = collate_caption_batch(
            [images[i] for i in range(start, min(start + datamodule.eval_batch_size, len(images)))]
        )
        with torch.no_grad():
            captions = module.captioner.generate(batch.clip_features.to(module.device), module.decoding)
        predictions.update(
            {image_id: texts[0] for image_id, texts in zip(batch.image_ids, captions, strict=True)}
        )
    return predictions


def most_frequent_caption(datamodule: CaptionDataModule) -> str:
    """The trivial baseline's caption: the most frequent training reference."""
    counts = Counter(caption for record in datamodule.split("train").images for caption in record.references)
    return counts.most_common(1)[0][0]


def format_table(rows: dict[str, dict[str, float]], columns: tuple[str, ...] = ("Bleu_4", "CIDEr")) -> str:
    width = max(len(name) for name in rows) + 2
    lines = [f"{'':<{width}}" + "".join(f"{c:>10}" for c in columns)]
    for name, scores in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{scores[c]:>10.3f}" for c in columns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(prog="clipcap demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="lightning_configs/synthetic/ce.yaml", help="the training config")
    parser.add_argument("--out", default="runs/demo", help="run folder (logs, checkpoints, results)")
    parser.add_argument("--samples", type=int, default=6, help="image → caption samples to print")
    parser.add_argument(
        "overrides", nargs="*", help="extra LightningCLI options, e.g. --trainer.max_epochs=2"
    )
    args, extra = parser.parse_known_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    from clipcap.cli import lightning_cli
    from clipcap.synthetic.world import ensure_world

    started = time.perf_counter()
    world = ensure_world()
    print(f"[demo] synthetic world ready at {world} ({time.perf_counter() - started:.0f}s)")

    fit_args = [
        "fit",
        "--config",
        args.config,
        "--trainer.default_root_dir",
        args.out,
        *args.overrides,
        *extra,
    ]
    cli = lightning_cli(fit_args)
    best = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
    print(f"[demo] trained in {time.perf_counter() - started:.0f}s; reloading {best}")
    module = CaptionModule.load_from_checkpoint(best, map_location="cpu", weights_only=False)
    datamodule = cli.datamodule

    references = {r.image_id: r.references for r in datamodule.split("test").images}
    predictions = caption_split(module, datamodule, "test")
    baseline_caption = most_frequent_caption(datamodule)
    rows = {
        f"baseline: always {baseline_caption!r}": coco_caption_scores(
            {image_id: baseline_caption for image_id in references}, references
        ),
        "clipcap (cross-entropy)": coco_caption_scores(predictions, references),
    }
    print(f"\n[demo] test split, {len(references)} images\n" + format_table(rows))
    print("\n[demo] samples (generated | first reference):")
    for image_id in list(references)[: args.samples]:
        print(f"  {image_id}: {predictions[image_id]!r} | {references[image_id][0]!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"checkpoint": best, "scores": rows, "seconds": time.perf_counter() - started}
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    (out / "test_predictions.json").write_text(
        json.dumps([{"image_id": i, "caption": c} for i, c in predictions.items()], indent=1)
    )
    print(f"\n[demo] done in {time.perf_counter() - started:.0f}s; results in {out / 'demo_results.json'}")
    return rows
