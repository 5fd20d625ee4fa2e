"""The Lightning layer and the CLI, on the tiny synthetic world."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

from clipcap.captioner import ClipCaptioner
from clipcap.data.batch import CaptionBatch
from clipcap.generation import DecodingConfig
from clipcap.lm import PrefixLM
from clipcap.mapper import MLPMapper
from clipcap.objectives import CrossEntropy
from clipcap.training import CaptionModule, SyntheticCaptions
from clipcap.training.cli import lightning_cli

REPO = Path(__file__).resolve().parents[1]
CE_CONFIG = str(REPO / "lightning_configs" / "synthetic" / "ce.yaml")
# Configs of real corpora are exercised on fixture files in test_datamodules.py.
CONFIGS = sorted((REPO / "lightning_configs" / "synthetic").rglob("*.yaml"))


def quick_fit_args(root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", CE_CONFIG,
        "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO)) for c in CONFIGS])
def test_every_config_parses_and_builds(config: Path, tiny_world: Path, tmp_path: Path) -> None:
    # A config that starts from another run's checkpoint (DiscriTune from cross-entropy) is built without it.
    start = ["--model.init_from=null"] if "init_from" in config.read_text() else []
    cli = lightning_cli(
        ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path), *start], run=False
    )
    assert isinstance(cli.model, CaptionModule)
    assert cli.model.captioner.clip_dim == cli.datamodule.clip_dim  # linked, never written twice


def test_fit_fast_dev_run(tiny_world: Path, tmp_path: Path) -> None:
    cli = lightning_cli(
        [
            "fit",
            "--config",
            CE_CONFIG,
            "--trainer.fast_dev_run=true",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    assert cli.trainer.state.finished
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_objective_is_chosen_and_tuned_on_the_command_line(tiny_world: Path, tmp_path: Path) -> None:
    cli = lightning_cli(
        ["fit", "--config", CE_CONFIG, "--trainer.default_root_dir", str(tmp_path),
         "--model.objective=CrossEntropy", "--model.objective.label_smoothing=0.1"],
        run=False,
    )  # fmt: skip
    assert isinstance(cli.model.objective, CrossEntropy)
    assert cli.model.objective.label_smoothing == 0.1


def test_print_config_round_trips(tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["fit", "--config", CE_CONFIG, "--model.objective.label_smoothing=0.2", "--trainer.max_epochs=3"]
    with pytest.raises(SystemExit) as exit_info:
        lightning_cli([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    dumped = tmp_path / "printed.yaml"
    dumped.write_text(printed)
    with pytest.raises(SystemExit):
        lightning_cli(["fit", "--config", str(dumped), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(printed)
    config = yaml.safe_load(printed)
    assert config["model"]["objective"]["init_args"]["label_smoothing"] == 0.2
    assert config["trainer"]["max_epochs"] == 3
    # The OmegaConf interpolation was resolved when parsed.
    assert (
        config["model"]["decoding"]["max_new_tokens"]
        == config["model"]["captioner"]["init_args"]["max_caption_tokens"]
    )


@pytest.mark.parametrize("trainable", [True, False])
def test_checkpoint_round_trip_reproduces_captions(trainable: bool, tiny_world: Path, tmp_path: Path) -> None:
    cli = lightning_cli(
        quick_fit_args(
            tmp_path,
            f"--model.captioner.init_args.language_model.init_args.trainable={str(trainable).lower()}",
        )
    )
    path = cli.trainer.checkpoint_callback.last_model_path
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    lm_keys = [k for k in checkpoint["state_dict"] if k.startswith("captioner.lm.")]
    assert bool(lm_keys) == trainable  # a frozen LM is not copied into checkpoints
    assert any(k.startswith("captioner.mapper.") for k in checkpoint["state_dict"])

    reloaded = CaptionModule.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    features = torch.from_numpy(
        np.stack(
            [
                cli.datamodule.split("val").features.get(r.image_id)
                for r in cli.datamodule.split("val").images[:6]
            ]
        )
    )
    decoding = DecodingConfig(num_beams=3, max_new_tokens=12)
    trained = cli.model.to("cpu")
    assert reloaded.captioner.generate(features, decoding) == trained.captioner.generate(features, decoding)
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, msg=key)


def test_sample_captions_are_logged(tiny_world: Path, tmp_path: Path) -> None:
    cli = lightning_cli(quick_fit_args(tmp_path, "--trainer.logger=true"))
    lines = (Path(cli.trainer.log_dir) / "samples.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert record["epoch"] == 0 and len(record["samples"]) == 3
    assert all(isinstance(s["caption"], str) for s in record["samples"])


def test_cross_entropy_training_learns_the_training_captions(tiny_world: Path) -> None:
    """A few images, one reference each: training lowers the loss and greedy decoding reproduces them."""
    datamodule = SyntheticCaptions(world_dir=str(tiny_world))
    split = datamodule.split("train")
    # The tiny world's CLIP is trained for seconds and maps some scenes to almost the same features; pick
    # the 8 most distinct images, so the test is about the captioner, not about the tiny CLIP.
    everything = torch.nn.functional.normalize(torch.from_numpy(np.array(split.features.features)), dim=-1)
    chosen = [0]
    while len(chosen) < 8:
        similarity = (everything @ everything[chosen].T).max(dim=1).values
        similarity[chosen] = float("inf")
        chosen.append(int(similarity.argmin()))
    index = {image_id: row for row, image_id in enumerate(split.features.image_ids)}
    records = [r for r in split.images if index[r.image_id] in chosen]
    features = torch.from_numpy(np.stack([split.features.get(r.image_id) for r in records]))
    captions = [r.references[0] for r in records]
    torch.manual_seed(0)
    captioner = ClipCaptioner(
        PrefixLM("synthetic:lm", trainable=True),
        functools.partial(MLPMapper, prefix_length=4),
        clip_dim=features.shape[1],
    )
    objective = CrossEntropy()
    optimizer = torch.optim.AdamW(captioner.parameters(), lr=3e-3)
    batch = CaptionBatch([r.image_id for r in records], features, captions)
    losses = []
    for _ in range(150):
        loss = objective(captioner, batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    generated = [texts[0] for texts in captioner.generate(features, DecodingConfig(max_new_tokens=30))]
    matches = sum(g == c for g, c in zip(generated, captions, strict=True))
    assert matches >= 7, list(zip(generated, captions, strict=True))


def test_features_that_do_not_fit_the_mapper_fail_at_start_up(tiny_world: Path, tmp_path: Path) -> None:
    datamodule = SyntheticCaptions(world_dir=str(tiny_world))
    wrong = datamodule.clip_dim + 3
    module = CaptionModule(ClipCaptioner(PrefixLM("synthetic:lm"), clip_dim=wrong), CrossEntropy())
    trainer = pl.Trainer(
        fast_dev_run=True, default_root_dir=tmp_path, logger=False, enable_progress_bar=False
    )
    with pytest.raises(ValueError, match=rf"model.captioner.init_args.clip_dim={wrong}"):
        trainer.fit(module, datamodule=datamodule)


def test_unknown_class_names_the_option(tiny_world: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        lightning_cli(["fit", "--config", CE_CONFIG, "--model.objective=NoSuchObjective"])
    error = capsys.readouterr().err
    assert "objective" in error and "NoSuchObjective" in error


def test_missing_config_file_names_the_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SystemExit):
        lightning_cli(["fit", "--config", str(missing)])
    assert "nope.yaml" in capsys.readouterr().err


def test_missing_language_model_names_the_option(
    tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "no_such_lm"
    with pytest.raises((SystemExit, ValueError, OSError)) as error:
        lightning_cli(
            [
                "fit",
                "--config",
                CE_CONFIG,
                f"--model.captioner.init_args.language_model.init_args.pretrained={missing}",
            ]
        )
    message = str(error.value) + capsys.readouterr().err
    assert "pretrained" in message and str(missing) in message


def test_predict_writes_coco_results(tiny_world: Path, tmp_path: Path) -> None:
    fitted = lightning_cli(quick_fit_args(tmp_path / "fit"))
    checkpoint = fitted.trainer.checkpoint_callback.last_model_path
    out = tmp_path / "predict"
    lightning_cli(
        ["predict", "--config", CE_CONFIG, "--ckpt_path", checkpoint, "--trainer.default_root_dir", str(out),
         "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--model.decoding.max_new_tokens=8"]
    )  # fmt: skip
    rows = json.loads((out / "predictions.json").read_text())
    test_ids = [r.image_id for r in fitted.datamodule.split("test").images]
    assert [row["image_id"] for row in rows] == test_ids
    assert all(isinstance(row["caption"], str) for row in rows)


def test_python_dash_m_clipcap_shows_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clipcap", "fit", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--model.objective" in result.stdout


def test_ckpt_path_last_resumes_the_latest_run_of_the_root_folder(tiny_world: Path, tmp_path: Path) -> None:
    """The shipped configs log to versioned folders; ``--ckpt_path last`` must find the previous version's
    last.ckpt (Lightning alone looks in the new, empty version folder and starts from scratch)."""
    common = ["fit", "--config", CE_CONFIG, "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
              "--trainer.enable_progress_bar=false", "--seed_everything=5"]  # fmt: skip
    straight = lightning_cli(
        [*common, "--trainer.max_epochs=2", "--trainer.default_root_dir", str(tmp_path / "a")]
    )
    stopped_root = str(tmp_path / "b")
    lightning_cli([*common, "--trainer.max_epochs=1", "--trainer.default_root_dir", stopped_root])
    resumed = lightning_cli(
        [*common, "--trainer.max_epochs=2", "--trainer.default_root_dir", stopped_root, "--ckpt_path", "last"]
    )
    first_run = Path(stopped_root) / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert Path(resumed.trainer.ckpt_path) == first_run  # without the resolution: None, and a fresh start
    assert Path(resumed.trainer.log_dir).name == "version_1"
    assert resumed.trainer.global_step == straight.trainer.global_step == 6
    expected = straight.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    with pytest.raises(FileNotFoundError, match=rf"no last\*\.ckpt anywhere under {tmp_path / 'empty'}"):
        lightning_cli([*common, "--trainer.default_root_dir", str(tmp_path / "empty"), "--ckpt_path", "last"])


def test_clipcaps_warmup_schedule_is_transformers_linear_schedule_stepped_every_step(
    tiny_world: Path, tmp_path: Path
) -> None:
    """ClipCap's train.py: get_linear_schedule_with_warmup(warmup 5000, epochs × batches), stepped after
    every optimizer step; the COCO cross-entropy config uses it."""
    from transformers import get_linear_schedule_with_warmup

    from clipcap.training import WarmupLinearDecay

    def rates(scheduler_factory, steps: int) -> list[float]:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
        scheduler = scheduler_factory(optimizer)
        seen = []
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    ours = rates(lambda o: WarmupLinearDecay(o, warmup_steps=7, total_steps=20), 24)
    theirs = rates(
        lambda o: get_linear_schedule_with_warmup(o, num_warmup_steps=7, num_training_steps=20), 24
    )
    assert ours == pytest.approx(theirs, abs=1e-18) and ours[0] == 0.0 and ours[7] == 2e-5 and ours[20] == 0.0
    cli = lightning_cli(
        quick_fit_args(tmp_path, "--model.lr_scheduler=clipcap.training.WarmupLinearDecay",
                       "--model.lr_scheduler.warmup_steps=2", "--trainer.max_epochs=2", "--trainer.limit_val_batches=0")
    )  # fmt: skip
    scheduler = cli.trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step" and scheduler.scheduler.total_steps == 6  # 2 epochs × 3 batches
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.0  # decayed to 0 at the last step
    coco = yaml.safe_load((REPO / "lightning_configs" / "coco" / "ce.yaml").read_text())
    assert coco["model"]["lr_scheduler"]["class_path"] == "clipcap.training.WarmupLinearDecay"
