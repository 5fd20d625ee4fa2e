"""Evidence for the two-stage recipe of Jin (2023) in the synthetic world: for each seed, stage 1
(cross-entropy on 2% of the training images, a labelled subset drawn with that seed) and stage 2
(Gumbel-CLIP on the unlabelled rest, started from stage 1's last checkpoint), each tested like the
cross-entropy model on all labels (beam 5, the whole test split).

Run (after ``make demo``, whose all-labels cross-entropy checkpoint is the comparison row by default):
    .venv/bin/python -m experiments.gumbel_clip_synthetic [--ce_checkpoint CKPT] [--seeds 0,1,2]
        [--write docs/results.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import yaml

from clipcap.training.cli import lightning_cli
from experiments.discritune_synthetic import (
    CE_CONFIG,
    QUIET,
    latest_checkpoint,
    metrics_table,
    spread_row,
    test_metrics,
)

GUMBEL_CONFIG = "lightning_configs/synthetic/gumbel_clip.yaml"
STAGE1_EPOCHS = 20
COLUMNS = ("Bleu_4", "CIDEr", "METEOR", "clip_score", "ref_compare", "retrieval_p_at_1")


def subset(labelled: int, seed: int) -> tuple[str, str]:
    """Options selecting the labelled subset drawn with ``seed`` (stage 1 trains on it, stage 2 leaves it
    out of its pool and uses it as the anchor)."""
    return f"--data.init_args.labelled_images={labelled}", f"--data.init_args.subset_seed={seed}"


def fit(config: str, root: Path, seed: int, *options: str):
    return lightning_cli(
        ["fit", "--config", config, f"--seed_everything={seed}", "--trainer.default_root_dir", str(root),
         *QUIET, *options]
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ce_checkpoint", type=Path, default=None)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("runs/evidence_gumbel_clip"))
    parser.add_argument(
        "--write", type=Path, default=None, help="write the results block into this markdown file"
    )
    parser.add_argument(
        "--stage2_option",
        action="append",
        default=[],
        help="extra `clipcap fit` option for the Gumbel-CLIP runs (repeatable)",
    )
    parser.add_argument("--skip_ce", action="store_true", help="do not test the all-labels model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    config = yaml.safe_load(Path(GUMBEL_CONFIG).read_text())
    labelled = int(config["data"]["init_args"]["labelled_images"])
    rows: dict[str, dict[str, float]] = {}
    ce_checkpoint = None
    if not args.skip_ce:
        ce_checkpoint = args.ce_checkpoint or latest_checkpoint("runs/demo/ce")
        rows["cross-entropy, all labels"] = test_metrics(CE_CONFIG, ce_checkpoint, args.out / "ce")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for seed in seeds:
        root = args.out / f"seed{seed}"
        stage1 = fit(
            CE_CONFIG, root / "stage1", seed, *subset(labelled, seed), f"--trainer.max_epochs={STAGE1_EPOCHS}",
            "--trainer.check_val_every_n_epoch=10",
        )  # fmt: skip
        stage1_last = Path(stage1.trainer.checkpoint_callback.last_model_path)
        rows[f"stage 1 seed {seed}"] = test_metrics(
            CE_CONFIG, stage1_last, root / "stage1", *subset(labelled, seed)
        )
        stage2 = fit(
            GUMBEL_CONFIG, root / "stage2", seed, *subset(labelled, seed), f"--model.init_from={stage1_last}",
            *args.stage2_option,
        )  # fmt: skip
        best = Path(stage2.trainer.checkpoint_callback.best_model_path)
        rows[f"stage 2 (Gumbel-CLIP) seed {seed}"] = test_metrics(
            GUMBEL_CONFIG, best, root / "stage2", *subset(labelled, seed), "--model.init_from=null"
        )
        for stage in ("stage 1", "stage 2 (Gumbel-CLIP)"):
            scores = rows[f"{stage} seed {seed}"]
            print(f"[evidence] seed {seed}, {stage}: {json.dumps({k: scores[k] for k in COLUMNS})}")

    lines = metrics_table("model (test: beam 5)", rows, COLUMNS)
    for stage in ("stage 1", "stage 2 (Gumbel-CLIP)"):
        lines.append(spread_row(stage, [rows[f"{stage} seed {seed}"] for seed in seeds], COLUMNS))
    objective = config["model"]["objective"]["init_args"]
    command = "python -m experiments.gumbel_clip_synthetic " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    block = "\n".join(
        [
            "### Two-stage Gumbel-CLIP from 2% of the labels, synthetic test split (250 images)",
            "",
            f"- Command: `{command.strip()}`"
            + (f", all-labels model `{ce_checkpoint}`" if ce_checkpoint else ""),
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"{time.perf_counter() - started:.0f} s on a 2-core CPU",
            f"- Stage 1: `{CE_CONFIG}` on {labelled} labelled images (subset drawn with the seed), "
            f"{STAGE1_EPOCHS} epochs, last checkpoint. Stage 2: `{GUMBEL_CONFIG}` (AdamW lr "
            f"{config['model']['optimizer']['init_args']['lr']:g}, {config['trainer']['max_epochs']} epochs, "
            f"anchor weight {objective['anchor_weight']}, KL {objective['kl_coefficient']}"
            + (f"; options {' '.join(args.stage2_option)}" if args.stage2_option else "")
            + ") on the other images' CLIP features only; best epoch by validation CLIPScore tested",
            "",
            *lines,
        ]
    )
    print(block)
    if args.write:
        from benchmarks.bench_captioner import write_markdown

        write_markdown(args.write, "gumbel-clip-synthetic", block)


if __name__ == "__main__":
    main()
