"""``clipcap demo``: the main job, end to end, on the embedded synthetic world.

Builds the world if it is absent, trains a captioner with the given config (cross-entropy by default),
tests the best checkpoint with ``CaptionEvaluation`` (beam 5: BLEU, METEOR, ROUGE-L, CIDEr, CLIPScore,
RefCLIPScore, RefCompare, retrieval P@1, and ``report.html``), and prints the metrics next to a trivial
baseline (the most frequent training caption for every image), plus a few samples.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from clipcap.training.data import CaptionDataModule
from clipcap.training.evaluation import CaptionEvaluation, score_captions

TABLE_COLUMNS = (
    "Bleu_4",
    "METEOR",
    "ROUGE_L",
    "CIDEr",
    "clip_score",
    "ref_clip_score",
    "ref_compare",
    "retrieval_p_at_1",
)


def most_frequent_caption(datamodule: CaptionDataModule) -> str:
    """The trivial baseline's caption: the most frequent training reference."""
    counts = Counter(caption for record in datamodule.split("train").images for caption in record.references)
    return counts.most_common(1)[0][0]


def format_table(rows: dict[str, dict[str, float]], columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """A fixed-width table, one row per system; a metric a row lacks is shown as ``-``."""
    columns = tuple(c for c in columns if any(c in scores for scores in rows.values()))
    width = max(len(name) for name in rows) + 2
    cells = [max(8, len(c) + 2) for c in columns]
    lines = [f"{'':<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(columns, cells, strict=True))]
    for name, scores in rows.items():
        values = "".join(
            f"{scores[c]:>{w}.3f}" if c in scores else f"{'-':>{w}}"
            for c, w in zip(columns, cells, strict=True)
        )
        lines.append(f"{name:<{width}}" + values)
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
    print(f"[demo] trained in {time.perf_counter() - started:.0f}s; testing {best}")
    evaluation = next((c for c in cli.trainer.callbacks if isinstance(c, CaptionEvaluation)), None)
    if evaluation is None:
        raise SystemExit(f"[demo] {args.config} has no CaptionEvaluation callback to test with")
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)
    datamodule = cli.datamodule
    folder = evaluation.output_folder(cli.trainer, "test")
    predictions = {
        row["image_id"]: row["caption"] for row in json.loads((folder / "predictions.json").read_text())
    }

    test_images = datamodule.split("test").images
    baseline_caption = most_frequent_caption(datamodule)
    baseline = score_captions(
        evaluation, datamodule, "test", {e.image_id: baseline_caption for e in test_images}
    )
    rows = {
        f"baseline: always {baseline_caption!r}": baseline,
        "clipcap (cross-entropy)": evaluation.last_metrics,
    }
    print(
        f"\n[demo] test split, {len(test_images)} images, beam {evaluation.decoding['test'].num_beams}\n"
        + format_table(rows)
    )
    print("\n[demo] samples (generated | first reference):")
    for entry in test_images[: args.samples]:
        print(f"  {entry.image_id}: {predictions[entry.image_id]!r} | {entry.references[0]!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "checkpoint": best,
        "scores": rows,
        "report": str(folder / "report.html"),
        "seconds": time.perf_counter() - started,
    }
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    print(f"\n[demo] report: {folder / 'report.html'}")
    print(f"[demo] done in {time.perf_counter() - started:.0f}s; results in {out / 'demo_results.json'}")
    return rows
