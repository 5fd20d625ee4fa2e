"""CaptionEvaluation end to end on the tiny world: files written, numbers consistent, DDP equal to one
process; and `clipcap caption` on image files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml

import clipcap
from clipcap.commands.caption import caption_images, checkpoint_test_decoding
from clipcap.generation import DecodingConfig
from clipcap.training import CaptionEvaluation, SyntheticCaptions
from clipcap.training.cli import lightning_cli
from clipcap.training.evaluation import score_captions

REPO = Path(__file__).resolve().parents[1]
CE_CONFIG = str(REPO / "lightning_configs" / "synthetic" / "ce.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false"]


@pytest.fixture(scope="module")
def trained(trained_checkpoint: Path) -> Path:
    return trained_checkpoint


def run_test(checkpoint: Path, root: Path, *extra: str):
    return lightning_cli(
        ["test", "--config", CE_CONFIG, "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(root),
         *QUIET, *extra]
    )  # fmt: skip


class EntryCounter(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if "data-image-id" in values:
            self.ids.append(values["data-image-id"] or "")


def test_test_stage_writes_predictions_metrics_and_report(trained: Path, tmp_path: Path) -> None:
    cli = run_test(trained, tmp_path)
    evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, CaptionEvaluation))
    folder = evaluation.output_folder(cli.trainer, "test")
    test_ids = [entry.image_id for entry in cli.datamodule.split("test").images]

    predictions = json.loads((folder / "predictions.json").read_text())
    assert [row["image_id"] for row in predictions] == test_ids
    assert all(set(row) == {"image_id", "caption"} for row in predictions)

    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["images"] == len(test_ids) and metrics["decoding"]["num_beams"] == 5
    for key in (
        "Bleu_1",
        "Bleu_4",
        "METEOR",
        "ROUGE_L",
        "CIDEr",
        "clip_score",
        "ref_clip_score",
        "ref_compare",
    ):
        assert key in metrics["metrics"], key
        assert cli.trainer.callback_metrics[f"test/{key}"] == pytest.approx(metrics["metrics"][key], rel=1e-5)
    assert 0.0 <= metrics["metrics"]["ref_compare"] <= 1.0

    counter = EntryCounter()
    page = (folder / "report.html").read_text()
    counter.feed(page)
    assert sorted(counter.ids) == sorted(test_ids)
    # What the report evaluates is written at its top.
    about = page[page.index("what this evaluates") : page.index('<section class="summary">')]
    for expected in (
        f"<code>{trained}</code>",
        f"<code>{CE_CONFIG} (as run: {tmp_path / 'config.yaml'})</code>",
        f"synthetic/test, {len(test_ids)} images",
        "beam 5, up to 40 tokens, stop at EOS",
        f"<code>{clipcap.__version__}</code>",
    ):
        assert expected in about, (expected, about)

    # The same captions scored outside the trainer give the same numbers.
    again = score_captions(
        evaluation, cli.datamodule, "test", {r["image_id"]: r["caption"] for r in predictions}
    )
    for key, value in metrics["metrics"].items():
        assert again[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_validation_evaluates_every_n_epochs(tiny_world: Path, tmp_path: Path) -> None:
    cli = lightning_cli(
        ["fit", "--config", CE_CONFIG, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs=2",
         "--trainer.limit_train_batches=2", *QUIET]
    )  # fmt: skip
    evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, CaptionEvaluation))
    assert evaluation.val_every_n_epochs == 2
    written = sorted(path.name for path in (tmp_path / "val").iterdir())
    assert written == ["epoch=1"]  # epoch 0 skipped, sanity check skipped
    assert (tmp_path / "val" / "epoch=1" / "metrics.json").is_file()
    assert not (tmp_path / "val" / "epoch=1" / "report.html").exists()
    assert "val/CIDEr" in cli.trainer.callback_metrics


def test_score_captions_refuses_bad_input(tiny_world: Path) -> None:
    datamodule = SyntheticCaptions(world_dir=str(tiny_world), clip_model="synthetic:clip")
    evaluation = CaptionEvaluation(nlg_metrics=["BLEU"])
    ids = [entry.image_id for entry in datamodule.split("test").images]
    with pytest.raises(ValueError, match="not in the test split"):
        score_captions(evaluation, datamodule, "test", {**dict.fromkeys(ids, "a shape."), "nope": "x"})
    with pytest.raises(ValueError, match="have no caption"):
        score_captions(evaluation, datamodule, "test", dict.fromkeys(ids[1:], "a shape."))


def test_ddp_two_processes_equal_one(trained: Path, tmp_path: Path) -> None:
    """2-process CPU DDP (gloo): the distributed sampler pads 15 images to 16; numbers must not move."""
    from clipcap.synthetic.world import WorldSpec, build_world

    world = build_world(tmp_path / "world15", WorldSpec.from_dict({**vars(WorldSpec.tiny()), "num_test": 15}))
    config = yaml.safe_load(Path(CE_CONFIG).read_text())
    for callback in config["trainer"]["callbacks"]:
        if isinstance(callback, dict) and callback["class_path"].endswith("CaptionEvaluation"):
            callback["init_args"].update(block_size=5, num_distractors=4)  # 15 images: 3 blocks of 5
    small_blocks = tmp_path / "ce_small_blocks.yaml"
    small_blocks.write_text(yaml.safe_dump(config))
    results = {}
    for devices in (1, 2):
        root = tmp_path / f"devices{devices}"
        command = [
            sys.executable, "-m", "clipcap", "test", "--config", str(small_blocks), "--ckpt_path", str(trained),
            "--trainer.default_root_dir", str(root), f"--trainer.devices={devices}", "--trainer.accelerator=cpu",
            "--trainer.strategy=" + ("ddp" if devices > 1 else "auto"), "--data.init_args.eval_batch_size=4",
            *QUIET,
        ]  # fmt: skip
        environment = {**os.environ, "CLIPCAP_WORLD": str(world), "OMP_NUM_THREADS": "1"}
        finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
        assert finished.returncode == 0, finished.stderr[-3000:]
        results[devices] = json.loads((root / "test" / "metrics.json").read_text())
    assert results[2]["images"] == results[1]["images"] == 15
    assert "retrieval_p_at_1" in results[1]["metrics"] and "retrieval_p_at_1_random" in results[1]["metrics"]
    assert results[2]["metrics"].keys() == results[1]["metrics"].keys()
    for key, value in results[1]["metrics"].items():
        assert results[2]["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    one = json.loads((tmp_path / "devices1" / "test" / "predictions.json").read_text())
    two = json.loads((tmp_path / "devices2" / "test" / "predictions.json").read_text())
    assert one == two


def test_caption_command_matches_cached_features(trained: Path, tiny_world: Path) -> None:
    datamodule = SyntheticCaptions(world_dir=str(tiny_world))
    entries = datamodule.split("val").images[:3]
    rows = caption_images(
        str(trained), [entry.image for entry in entries], decoding_overrides={"num_beams": 1}, clip_score=True
    )
    from clipcap.training.module import CaptionModule

    module = CaptionModule.load_from_checkpoint(trained, map_location="cpu", weights_only=True)
    features = torch.stack(
        [torch.from_numpy(datamodule.split("val").features.get(e.image_id)) for e in entries]
    )
    # The checkpoint's CaptionEvaluation recorded its test decoding (beam 5, 40 tokens), which caption uses.
    recorded = checkpoint_test_decoding(torch.load(trained, weights_only=True))
    assert recorded is not None and recorded["num_beams"] == 5
    decoding = DecodingConfig(**{**recorded, "num_beams": 1})
    expected = [texts[0] for texts in module.captioner.generate(features, decoding)]
    assert [row["caption"] for row in rows] == expected
    assert all(0.0 <= row["clip_score"] <= 2.5 for row in rows)


def test_caption_command_captions_the_readable_images_and_names_the_others(
    trained: Path, tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from clipcap.commands.caption import main as caption_main

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    good = SyntheticCaptions(world_dir=str(tiny_world)).split("val").images[0].image
    with pytest.raises(SystemExit) as exit_info:
        caption_main(
            ["--ckpt", str(trained), str(broken), good, "--num_beams", "2", "--stop_at_period", "true"]
        )
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"{good}\t") and len(out.splitlines()) == 1
    assert f"cannot read {broken}: not an image" in err and "1 of 2 images could not be captioned" in err
    assert "decoding: beam 2, up to 40 tokens, stop at EOS or a '.'" in err


def test_a_different_scoring_clip_reads_its_own_features(
    trained: Path, tiny_world: Path, tmp_path: Path
) -> None:
    from transformers import CLIPModel

    from clipcap.commands.features import main as features_main

    other = tmp_path / "other_clip"
    torch.manual_seed(7)
    CLIPModel(CLIPModel.from_pretrained(tiny_world / "clip").config).save_pretrained(other)
    (other / "preprocessor_config.json").write_bytes(
        (tiny_world / "clip" / "preprocessor_config.json").read_bytes()
    )
    features_dir = tmp_path / "other_features"
    features_main(
        ["--config", CE_CONFIG, "--clip", str(other), "--splits", "test", "--no_progress",
         f"--data.init_args.features_dir={features_dir}"]
    )  # fmt: skip
    datamodule = SyntheticCaptions(world_dir=str(tiny_world), clip_model="synthetic:clip")
    ids = [entry.image_id for entry in datamodule.split("test").images]
    captions = dict.fromkeys(ids, "a red circle.")
    default = score_captions(CaptionEvaluation(nlg_metrics=["BLEU"]), datamodule, "test", captions)
    scored = score_captions(
        CaptionEvaluation(
            nlg_metrics=["BLEU"], scoring_clip=str(other), scoring_features_dir=str(features_dir)
        ),
        datamodule,
        "test",
        captions,
    )
    assert scored["Bleu_4"] == default["Bleu_4"]
    assert scored["clip_score"] != pytest.approx(default["clip_score"])
    with pytest.raises(ValueError, match="scoring_features_dir"):
        score_captions(
            CaptionEvaluation(nlg_metrics=["BLEU"], scoring_clip=str(other)), datamodule, "test", captions
        )
