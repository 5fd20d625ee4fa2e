"""Evidence for DiscriTune in the synthetic world: from one cross-entropy model, DiscriTune runs with
several seeds, each tested like the cross-entropy model (beam 5, the whole test split).

Run (after ``make demo``, whose cross-entropy checkpoint it starts from by default):
    .venv/bin/python -m experiments.discritune_synthetic [--ce_checkpoint CKPT] [--seeds 0,1,2]
        [--write docs/results.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from clipcap.training import CaptionEvaluation
from clipcap.training.cli import lightning_cli

DT_CONFIG = "lightning_configs/synthetic/discritune.yaml"
CE_CONFIG = "lightning_configs/synthetic/ce.yaml"
COLUMNS = (
    "Bleu_4",
    "CIDEr",
    "METEOR",
    "clip_score",
    "ref_compare",
    "retrieval_p_at_1",
    "retrieval_p_at_1_random",
)
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=true"]


def latest_checkpoint(folder: str) -> Path:
    found = sorted(Path(folder).rglob("best.ckpt"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise SystemExit(f"no best.ckpt under {folder}: run `make demo` first or pass --ce_checkpoint")
    return found[-1]


def test_metrics(config: str, checkpoint: Path, root: Path, *options: str) -> dict[str, float]:
    cli = lightning_cli(
        ["test", "--config", config, "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(root),
         *QUIET, *options]
    )  # fmt: skip
    evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, CaptionEvaluation))
    return dict(evaluation.last_metrics)


def greedy_metrics(checkpoint: Path) -> dict[str, float]:
    """The same metrics on the test split with greedy decoding, the decoding DiscriTune trains with."""
    from clipcap.generation import DecodingConfig
    from clipcap.training import CaptionModule, SyntheticCaptions
    from clipcap.training.evaluation import score_captions

    datamodule = SyntheticCaptions(clip_model="synthetic:clip")
    images = datamodule.split("test").images
    features = torch.stack(
        [torch.from_numpy(datamodule.split("test").features.get(e.image_id)) for e in images]
    )
    module = CaptionModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False).eval()
    with torch.no_grad():
        captions = module.captioner.generate(features, DecodingConfig(max_new_tokens=32))
    by_id = {entry.image_id: texts[0] for entry, texts in zip(images, captions, strict=True)}
    return score_captions(CaptionEvaluation(), datamodule, "test", by_id)


def metrics_table(header: str, rows: dict[str, dict[str, float]], columns: tuple[str, ...]) -> list[str]:
    """A markdown table: one row per entry of ``rows``, one column per metric."""
    lines = [f"| {header} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[c]:.3f}" for c in columns) + " |")
    return lines


def spread_row(label: str, runs: list[dict[str, float]], columns: tuple[str, ...]) -> str:
    """A bold table row with each metric's mean ± sd over ``runs`` (the value alone for one run)."""
    cells = [
        f"{statistics.mean(run[c] for run in runs):.3f} ± {statistics.stdev(run[c] for run in runs):.3f}"
        if len(runs) > 1
        else f"{runs[0][c]:.3f}"
        for c in columns
    ]
    return f"| **{label}, mean ± sd over {len(runs)} seeds** | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ce_checkpoint", type=Path, default=None)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("runs/evidence_discritune"))
    parser.add_argument(
        "--write", type=Path, default=None, help="write the results block into this markdown file"
    )
    parser.add_argument(
        "--dt_option",
        action="append",
        default=[],
        help="extra `clipcap fit` option for the DiscriTune runs (repeatable), e.g. "
        "--dt_option=--model.optimizer.init_args.lr=3e-5",
    )
    parser.add_argument("--skip_ce", action="store_true", help="do not re-test the cross-entropy model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    ce_checkpoint = args.ce_checkpoint or latest_checkpoint("runs/demo/ce")
    rows: dict[str, dict[str, float]] = {}
    if not args.skip_ce:
        rows["cross-entropy, beam 5"] = test_metrics(CE_CONFIG, ce_checkpoint, args.out / "ce")
        rows["cross-entropy, greedy"] = greedy_metrics(ce_checkpoint)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for seed in seeds:
        root = args.out / f"seed{seed}"
        cli = lightning_cli(
            ["fit", "--config", DT_CONFIG, f"--model.init_from={ce_checkpoint}", f"--seed_everything={seed}",
             "--trainer.default_root_dir", str(root), *QUIET, *args.dt_option]
        )  # fmt: skip
        best = Path(cli.trainer.checkpoint_callback.best_model_path)
        rows[f"DiscriTune seed {seed}, beam 5"] = test_metrics(
            DT_CONFIG, best, root, "--model.init_from=null"
        )
        rows[f"DiscriTune seed {seed}, greedy"] = greedy_metrics(best)
        for decoding in ("beam 5", "greedy"):
            scores = rows[f"DiscriTune seed {seed}, {decoding}"]
            print(f"[evidence] seed {seed}, {decoding}: {json.dumps({k: scores[k] for k in COLUMNS})}")

    lines = metrics_table("model, test decoding", rows, COLUMNS)
    for decoding in ("beam 5", "greedy"):
        runs = [rows[f"DiscriTune seed {seed}, {decoding}"] for seed in seeds]
        lines.append(spread_row(f"DiscriTune, {decoding}", runs, COLUMNS))
    config = yaml.safe_load(Path(DT_CONFIG).read_text())
    settings = {
        "lr": config["model"]["optimizer"]["init_args"]["lr"],
        "epochs": config["trainer"]["max_epochs"],
    }
    command = "python -m experiments.discritune_synthetic " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    block = "\n".join(
        [
            "### DiscriTune from cross-entropy, synthetic test split (250 images)",
            "",
            f"- Command: `{command.strip()}`, starting from `{ce_checkpoint}`",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"{time.perf_counter() - started:.0f} s on a 2-core CPU",
            f"- DiscriTune: `{DT_CONFIG}` (batch 100, Adam lr {settings['lr']:g}, {settings['epochs']} epochs,"
            ' greedy rollout decoded with dropout on, stop after ".", log π normalised as EGG\'s (the faithful'
            " defaults)"
            + (f"; options {' '.join(args.dt_option)}" if args.dt_option else "")
            + "); the seeds change the order of the training images; the best epoch by validation P@1"
            " (greedy) is tested",
            "",
            *lines,
        ]
    )
    print(block)
    if args.write:
        from benchmarks.bench_captioner import write_markdown

        write_markdown(args.write, "discritune-synthetic", block)


if __name__ == "__main__":
    main()
