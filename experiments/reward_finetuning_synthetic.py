"""Evidence for the policy-gradient objective in the synthetic world, from one cross-entropy model:

- ``scst``: SCST with the CIDEr-D reward (``lightning_configs/synthetic/scst_cider.yaml``) against the
  cross-entropy model, on CIDEr;
- ``advantages``: DiscriTune's retrieval reward with the cumulative-mean baseline (the paper's,
  ``discritune.yaml``) against GRPO's group-normalised advantage (``discritune_grpo.yaml``), on P@1 and
  BLEU-4;
- ``mixture``: CIDEr-D plus a weighted retrieval reward (``cider_retrieval.yaml``) at several retrieval
  weights, P@1 against CIDEr.

Every run is tested on the whole test split with beam 5 (and greedy decoding), several seeds each.

Run (after ``make demo``, whose cross-entropy checkpoint it starts from by default):
    .venv/bin/python -m experiments.reward_finetuning_synthetic --study scst [--seeds 0,1,2]
        [--ce_checkpoint CKPT] [--write docs/results.md] [--fit_option=--trainer.max_epochs=2]
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

from clipcap.training.cli import lightning_cli
from experiments.discritune_synthetic import (
    CE_CONFIG,
    COLUMNS,
    QUIET,
    greedy_metrics,
    latest_checkpoint,
    metrics_table,
    spread_row,
    test_metrics,
)

CONFIGS = "lightning_configs/synthetic"
STUDIES = {
    "scst": [("SCST-CIDEr", f"{CONFIGS}/scst_cider.yaml", [])],
    "advantages": [
        ("DiscriTune, cumulative mean", f"{CONFIGS}/discritune.yaml", []),
        ("DiscriTune, GRPO advantage", f"{CONFIGS}/discritune_grpo.yaml", []),
    ],
    "mixture": [],  # one run per --weights entry, built by mixture_runs
}


def mixture_runs(weights: list[float]) -> list[tuple[str, str, list[str]]]:
    """The mixture study's runs: CIDEr-D (weight 1) plus the retrieval reward at each weight."""
    runs = []
    for weight in weights:
        rewards = [
            {"class_path": "clipcap.objectives.CiderReward", "init_args": {"weight": 1.0}},
            {"class_path": "clipcap.objectives.RetrievalReward", "init_args": {"weight": weight}},
        ]
        option = "--model.objective.init_args.rewards=" + json.dumps(rewards)
        runs.append((f"CIDEr + {weight:g} × retrieval", f"{CONFIGS}/cider_retrieval.yaml", [option]))
    return runs


TITLES = {
    "scst": "SCST with the CIDEr-D reward from cross-entropy",
    "advantages": "DiscriTune: cumulative-mean baseline against GRPO's group-normalised advantage",
    "mixture": "CIDEr-D + retrieval mixture: the retrieval weight's trade-off",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=sorted(STUDIES), required=True)
    parser.add_argument("--ce_checkpoint", type=Path, default=None)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("runs/evidence_rewards"))
    parser.add_argument("--write", type=Path, default=None, help="write the block into this markdown file")
    parser.add_argument(
        "--fit_option",
        action="append",
        default=[],
        help="extra `clipcap fit` option for every run (repeatable)",
    )
    parser.add_argument("--greedy", action="store_true", help="also test each run with greedy decoding")
    parser.add_argument("--weights", default="0,0.5,2", help="the mixture study's retrieval weights")
    parser.add_argument(
        "--key",
        default=None,
        help="the results block's key (default rewards-STUDY), to keep parallel runs apart",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    ce_checkpoint = args.ce_checkpoint or latest_checkpoint("runs/demo/ce")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    rows: dict[str, dict[str, float]] = {}
    rows["cross-entropy, beam 5"] = test_metrics(CE_CONFIG, ce_checkpoint, args.out / "ce")
    if args.greedy:
        rows["cross-entropy, greedy"] = greedy_metrics(ce_checkpoint)
    summaries = []
    runs_of_study = STUDIES[args.study] or mixture_runs([float(w) for w in args.weights.split(",")])
    for label, config, options in runs_of_study:
        runs, greedy_runs = [], []
        for seed in seeds:
            root = args.out / args.study / label.replace(" ", "_").replace(",", "") / f"seed{seed}"
            cli = lightning_cli(
                ["fit", "--config", config, f"--model.init_from={ce_checkpoint}", f"--seed_everything={seed}",
                 "--trainer.default_root_dir", str(root), *QUIET, *options, *args.fit_option]
            )  # fmt: skip
            best = Path(cli.trainer.checkpoint_callback.best_model_path)
            scores = test_metrics(config, best, root, "--model.init_from=null", *options)
            rows[f"{label}, seed {seed}, beam 5"] = scores
            runs.append(scores)
            if args.greedy:
                rows[f"{label}, seed {seed}, greedy"] = greedy_metrics(best)
                greedy_runs.append(rows[f"{label}, seed {seed}, greedy"])
            print(
                f"[evidence] {label}, seed {seed}: {json.dumps({k: scores[k] for k in COLUMNS})}", flush=True
            )
        summaries.append(spread_row(f"{label}, beam 5", runs, COLUMNS))
        if greedy_runs:
            summaries.append(spread_row(f"{label}, greedy", greedy_runs, COLUMNS))
    lines = metrics_table("model, test decoding", rows, COLUMNS) + summaries
    command = "python -m experiments.reward_finetuning_synthetic " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    block = "\n".join(
        [
            f"### {TITLES[args.study]}, synthetic test split (250 images)",
            "",
            f"- Command: `{command.strip()}`, starting from `{ce_checkpoint}`",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"{time.perf_counter() - started:.0f} s on a 2-core CPU",
            "- Configs: "
            + ", ".join(sorted({f"`{config}`" for _, config, _ in runs_of_study}))
            + (f"; options {' '.join(args.fit_option)}" if args.fit_option else "")
            + "; the seeds change the order of the training images and the sampled captions; each run's best"
            " epoch by its config's validation metric is tested with beam 5"
            + (" and with greedy decoding" if args.greedy else ""),
            "",
            *lines,
        ]
    )
    print(block)
    if args.write:
        from benchmarks.bench_captioner import write_markdown

        write_markdown(args.write, args.key or f"rewards-{args.study}", block)


if __name__ == "__main__":
    main()
