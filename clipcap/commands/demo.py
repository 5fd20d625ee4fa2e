"""``clipcap demo``: the main job, end to end, on the embedded synthetic world.

Builds the world if it is absent, trains a captioner with cross-entropy, fine-tunes it with DiscriTune,
runs the two-stage recipe of Jin (2023) (cross-entropy on 2% of the labels, then Gumbel-CLIP on the
unlabelled rest), tests every stage with ``CaptionEvaluation`` (beam 5: BLEU, METEOR, ROUGE-L, CIDEr, CLIPScore,
RefCLIPScore, RefCompare, retrieval P@1, and a ``report.html`` each), and prints the metrics side by side
with a trivial baseline (the most frequent training caption for every image), plus a few samples.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import torch
import yaml

from clipcap.commands.parsing import run_function
from clipcap.synthetic.world import ensure_world
from clipcap.training.cli import lightning_cli
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


def fit_and_test(
    config: str, root: str, *options: str, last: bool = False
) -> tuple[object, CaptionEvaluation, str]:
    """Trains with ``config``, then tests its best checkpoint with the config's ``CaptionEvaluation``.

    Args:
        last: test the last checkpoint instead of the best (a stage trained for a fixed number of epochs).

    Returns:
        The LightningCLI (trainer, model, datamodule), the evaluation callback, and the tested checkpoint.
    """
    cli = lightning_cli(["fit", "--config", config, "--trainer.default_root_dir", root, *options])
    checkpoints = cli.trainer.checkpoint_callback
    best = (None if last else checkpoints.best_model_path) or checkpoints.last_model_path
    evaluation = next((c for c in cli.trainer.callbacks if isinstance(c, CaptionEvaluation)), None)
    if evaluation is None:
        raise SystemExit(f"[demo] {config} has no CaptionEvaluation callback to test with")
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)
    return cli, evaluation, best


STAGE1_EPOCHS = 20
"""Stage 1 of the two-stage recipe trains this many epochs on its few labelled pairs (its last checkpoint
starts stage 2)."""


def stage1_options(labelled: int, epochs: int) -> list[str]:
    """The options that turn the cross-entropy config into stage 1 of the two-stage recipe."""
    return [
        f"--data.init_args.labelled_images={labelled}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.check_val_every_n_epoch=10",
    ]


def two_stage_labels(gumbel_config: str) -> int:
    """The labelled subset size of the two-stage recipe, as the stage-2 config sets it."""
    data = yaml.safe_load(Path(gumbel_config).read_text())["data"]["init_args"]
    if data.get("labelled_images") is None:
        raise SystemExit(f"[demo] {gumbel_config} sets no data.init_args.labelled_images for stage 1")
    return int(data["labelled_images"])


def read_predictions(folder: Path) -> dict[str, str]:
    return {row["image_id"]: row["caption"] for row in json.loads((folder / "predictions.json").read_text())}


def demo(
    config: str = "lightning_configs/synthetic/ce.yaml",
    discritune_config: str = "lightning_configs/synthetic/discritune.yaml",
    gumbel_config: str = "lightning_configs/synthetic/gumbel_clip.yaml",
    stage1_epochs: int = STAGE1_EPOCHS,
    out: str = "runs/demo",
    samples: int = 6,
    overrides: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Run the main job end to end on the synthetic world and print the metrics.

    Args:
        config: cross-entropy config
        discritune_config: DiscriTune config, started from the cross-entropy model; '' skips the stage
        gumbel_config: Gumbel-CLIP stage-2 config of the two-stage recipe; its labelled_images set stage 1's
            labelled subset; '' skips both stages
        stage1_epochs: epochs of the two-stage recipe's stage 1
        out: run folder (logs, checkpoints, results)
        samples: image → caption samples to print
        overrides: extra LightningCLI options for the cross-entropy stage, after ``--``
            (``clipcap demo -- --trainer.max_epochs=2``)

    Returns:
        The metrics of each row of the table.
    """
    overrides = list(overrides or [])
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    started = time.perf_counter()
    world = ensure_world()
    print(f"[demo] synthetic world ready at {world} ({time.perf_counter() - started:.0f}s)")

    run_dir = Path(out)
    cli, evaluation, best = fit_and_test(config, str(run_dir / "ce"), *overrides)
    print(f"[demo] cross-entropy trained and tested in {time.perf_counter() - started:.0f}s ({best})")
    datamodule = cli.datamodule
    test_images = datamodule.split("test").images
    baseline_caption = most_frequent_caption(datamodule)
    baseline = score_captions(
        evaluation, datamodule, "test", {e.image_id: baseline_caption for e in test_images}
    )
    rows = {f"baseline: always {baseline_caption!r}": baseline}
    predictions: dict[str, dict[str, str]] = {}
    reports: dict[str, str] = {}

    def record(row: str, short: str, stage_cli, stage_evaluation: CaptionEvaluation) -> None:
        """Adds a tested stage's metrics row, test predictions (for the samples) and report."""
        rows[row] = dict(stage_evaluation.last_metrics)
        folder = stage_evaluation.output_folder(stage_cli.trainer, "test")
        predictions[short] = read_predictions(folder)
        reports[short] = str(folder / "report.html")

    record("clipcap (cross-entropy)", "cross-entropy", cli, evaluation)
    if discritune_config:
        dt_cli, dt_evaluation, dt_best = fit_and_test(
            discritune_config, str(run_dir / "discritune"), f"--model.init_from={best}"
        )
        print(f"[demo] DiscriTune trained and tested in {time.perf_counter() - started:.0f}s ({dt_best})")
        record("clipcap (cross-entropy, then DiscriTune)", "DiscriTune", dt_cli, dt_evaluation)

    if gumbel_config:
        labelled = two_stage_labels(gumbel_config)
        share = f"{100 * labelled / len(datamodule.split('train').images):g}%"
        stage1_cli, stage1_evaluation, stage1_last = fit_and_test(
            config, str(run_dir / "stage1"), *stage1_options(labelled, stage1_epochs), last=True
        )
        print(f"[demo] stage 1 ({share} labels) trained and tested in {time.perf_counter() - started:.0f}s")
        record(f"clipcap (cross-entropy, {share} labels)", f"{share} labels", stage1_cli, stage1_evaluation)
        gc_cli, gc_evaluation, _ = fit_and_test(
            gumbel_config, str(run_dir / "gumbel_clip"), f"--model.init_from={stage1_last}"
        )
        print(f"[demo] stage 2 (Gumbel-CLIP) trained and tested in {time.perf_counter() - started:.0f}s")
        record(f"clipcap ({share} labels, then Gumbel-CLIP)", "Gumbel-CLIP", gc_cli, gc_evaluation)

    print(
        f"\n[demo] test split, {len(test_images)} images, beam {evaluation.decoding['test'].num_beams}\n"
        + format_table(rows)
    )
    print("\n[demo] samples (" + " | ".join([*predictions, "first reference"]) + "):")
    for entry in test_images[:samples]:
        captions = " | ".join(repr(by_id[entry.image_id]) for by_id in predictions.values())
        print(f"  {entry.image_id}: {captions} | {entry.references[0]!r}")
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "checkpoint": best,
        "scores": rows,
        "reports": reports,
        "seconds": time.perf_counter() - started,
    }
    (run_dir / "demo_results.json").write_text(json.dumps(results, indent=2))
    print("\n[demo] reports: " + ", ".join(reports.values()))
    print(f"[demo] done in {time.perf_counter() - started:.0f}s; results in {run_dir / 'demo_results.json'}")
    return rows


def main(argv: list[str]) -> dict[str, dict[str, float]]:
    return run_function(demo, argv, "clipcap demo", positional=("overrides",))
