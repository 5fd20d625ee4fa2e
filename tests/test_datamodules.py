"""Every corpus end to end on small files in its distributed format: `clipcap features`, then the
datamodule, then training from the shipped configs.

The fixture writes each corpus as it is distributed (Karpathy JSON, COCO captions JSON, nocaps, Concadia,
the Conceptual Captions TSV and webdataset shards) around tiny images drawn by the synthetic world, some of
them corrupt, truncated or missing, and extracts features with the tiny world's CLIP.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from clipcap.commands.features import build_datamodule
from clipcap.commands.features import main as features_main
from clipcap.features import FeatureCache, FeatureCacheMismatch
from clipcap.synthetic.scenes import generate_scene, render_scene
from clipcap.training import CaptionModule
from clipcap.training.cli import lightning_cli

REPO = Path(__file__).resolve().parents[1]
COCO_KARPATHY = REPO / "lightning_configs" / "data" / "coco_karpathy.yaml"
SYNTHETIC_CE = REPO / "lightning_configs" / "synthetic" / "ce.yaml"


def draw(path: Path, index: int, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    render_scene(generate_scene("corpora", index), 48).save(path, format=fmt)


def png_bytes(index: int) -> bytes:
    buffer = io.BytesIO()
    render_scene(generate_scene("corpora", index), 48).save(buffer, format="PNG")
    return buffer.getvalue()


def write_corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image")


def write_truncated(path: Path, index: int) -> None:
    buffer = io.BytesIO()
    render_scene(generate_scene("corpora", index), 48).save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])


def karpathy_item(filename: str, split: str, captions: list[str], filepath: str | None, cocoid: int | None):
    item: dict[str, Any] = {
        "filename": filename,
        "imgid": 0,
        "split": split,
        "sentids": list(range(len(captions))),
        "sentences": [
            {"raw": c, "tokens": c.split(), "imgid": 0, "sentid": i} for i, c in enumerate(captions)
        ],
    }
    if filepath is not None:
        item["filepath"] = filepath
    if cocoid is not None:
        item["cocoid"] = cocoid
    return item


def write_coco_karpathy(root: Path) -> dict[str, Any]:
    specs = [  # cocoid, split, folder, captions, how the image file is written
        (101, "train", "train2014", ["a red circle.", "a shape."], "ok"),
        (102, "train", "train2014", ["a blue star.", "   "], "ok"),
        (103, "restval", "val2014", ["a green cross."], "ok"),
        (104, "train", "train2014", ["a broken file."], "corrupt"),
        (105, "val", "val2014", ["a pink square.", "shapes."], "ok"),
        (106, "val", "val2014", ["a missing image."], "missing"),
        (107, "test", "val2014", ["a yellow triangle."], "truncated"),
        (108, "test", "val2014", ["an orange disc.", "a disc."], "ok"),
    ]
    items = []
    for index, (cocoid, split, folder, captions, how) in enumerate(specs):
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        path = root / "images" / folder / filename
        if how == "ok":
            draw(path, index, "JPEG")
        elif how == "corrupt":
            write_corrupt(path)
        elif how == "truncated":
            write_truncated(path, index)
        items.append(karpathy_item(filename, split, captions, folder, cocoid))
    annotation = root / "dataset_coco.json"
    annotation.write_text(json.dumps({"images": items, "dataset": "coco"}))
    return {
        "class_path": "clipcap.training.CocoKarpathy",
        "init_args": {"annotation_file": str(annotation), "image_dir": str(root / "images")},
    }


def write_flickr(root: Path) -> dict[str, Any]:
    items = []
    for index, (photo, split) in enumerate(
        [("1000", "train"), ("1001", "train"), ("1002", "val"), ("1003", "test")]
    ):
        draw(root / "images" / f"{photo}.jpg", 20 + index, "JPEG")
        items.append(karpathy_item(f"{photo}.jpg", split, [f"photo {photo}.", "a picture."], None, None))
    annotation = root / "dataset_flickr30k.json"
    annotation.write_text(json.dumps({"images": items, "dataset": "flickr30k"}))
    return {
        "class_path": "clipcap.training.Flickr30k",
        "init_args": {"annotation_file": str(annotation), "image_dir": str(root / "images")},
    }


def coco_style(images: list[dict[str, Any]], captions: list[tuple[int, str]]) -> dict[str, Any]:
    annotations = [
        {"image_id": image_id, "id": 900 + i, "caption": c} for i, (image_id, c) in enumerate(captions)
    ]
    return {"images": images, "annotations": annotations}


def write_coco_captions(root: Path) -> dict[str, Any]:
    files, dirs = {}, {}
    for split, ids in (("train", [11, 12, 13]), ("val", [21, 22])):
        folder = root / f"{split}2014"
        for image_id in ids:
            draw(folder / f"COCO_{split}2014_{image_id:012d}.jpg", image_id, "JPEG")
        images = [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg"} for i in ids]
        # Unsorted, with a varying number of captions per image.
        captions = [
            (ids[-1], "last one."),
            (ids[0], "first one."),
            (ids[-1], "last again."),
            (ids[1], "middle."),
        ]
        files[split] = str(root / f"captions_{split}2014.json")
        Path(files[split]).write_text(json.dumps(coco_style(images, captions)))
        dirs[split] = str(folder)
    return {
        "class_path": "clipcap.training.CocoCaptions",
        "init_args": {"annotation_files": files, "image_dirs": dirs, "predict_split": "val"},
    }


def write_nocaps(root: Path) -> dict[str, Any]:
    domains = {31: "in-domain", 32: "near-domain", 33: "out-domain", 34: "out-domain"}
    images = [{"id": i, "file_name": f"{i}.jpg", "domain": d} for i, d in domains.items()]
    for image_id in domains:
        draw(root / "val" / f"{image_id}.jpg", image_id, "JPEG")
    captions = [(34, "d."), (31, "a."), (33, "c."), (31, "a2."), (32, "b."), (34, "d2."), (34, "d3.")]
    (root / "val.json").write_text(json.dumps(coco_style(images, captions)))
    test_images = [{"id": 41, "file_name": "41.jpg", "domain": "in-domain"}]
    draw(root / "test" / "41.jpg", 41, "JPEG")
    (root / "test.json").write_text(json.dumps({"images": test_images}))
    return {
        "class_path": "clipcap.training.NoCaps",
        "init_args": {
            "annotation_files": {"val": str(root / "val.json"), "test": str(root / "test.json")},
            "image_dirs": {"val": str(root / "val"), "test": str(root / "test")},
        },
    }


def write_concadia(root: Path) -> dict[str, Any]:
    items = []
    for index, split in enumerate(["train", "train", "val", "test"]):
        filename = f"wiki_{index}.png"
        draw(root / "images" / filename, 50 + index)
        items.append(
            {
                "filename": filename,
                "article_id": index,
                "split": split,
                "caption": {"raw": f"caption {index}.", "tokens": []},
                "description": {"raw": f"description {index}.", "tokens": []},
                "context": {"raw": "context.", "tokens": []},
            }
        )
    (root / "wiki_split.json").write_text(json.dumps({"images": items}))
    return {
        "class_path": "clipcap.training.Concadia",
        "init_args": {"annotation_file": str(root / "wiki_split.json"), "image_dir": str(root / "images")},
    }


def write_conceptual_tsv(root: Path) -> dict[str, Any]:
    files, dirs = {}, {}
    for split, rows in (("train", 4), ("val", 2)):
        lines = []
        for row in range(rows):
            caption = "caf\xe9 shapes".encode("latin-1") if row == 1 else f"shapes number {row}".encode()
            lines.append(caption + b"\thttp://example.invalid/" + str(row).encode() + b".jpg\n")
            if row != 2:  # row 2 was never downloaded (a dead link)
                draw(root / split / f"{row:08d}.jpg", 60 + row, "JPEG")
        files[split] = str(root / f"{split}.tsv")
        Path(files[split]).write_bytes(b"".join(lines))
        dirs[split] = str(root / split)
    return {
        "class_path": "clipcap.training.ConceptualCaptions",
        "init_args": {"tsv_files": files, "image_dirs": dirs, "predict_split": "val"},
    }


def write_conceptual_shards(root: Path) -> dict[str, Any]:
    shards = {}
    for split, keys in (("train", ["000000000", "000000001", "000000002"]), ("val", ["000010000"])):
        folder = root / split
        folder.mkdir(parents=True)
        with tarfile.open(folder / "00000.tar", "w") as tar:
            for number, key in enumerate(keys):
                members = {f"{key}.txt": f"shard caption {key}.".encode(), f"{key}.json": b"{}"}
                if number != 1:  # the downloader failed on this one: caption but no image
                    members[f"{key}.png"] = png_bytes(70 + number)
                for name, payload in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards[split] = str(folder)
    return {
        "class_path": "clipcap.training.ConceptualCaptions",
        "init_args": {"shards": shards, "predict_split": "val"},
    }


WRITERS = {
    "coco_karpathy": write_coco_karpathy,
    "coco_captions": write_coco_captions,
    "flickr30k": write_flickr,
    "nocaps": write_nocaps,
    "concadia": write_concadia,
    "conceptual_tsv": write_conceptual_tsv,
    "conceptual_shards": write_conceptual_shards,
}


@pytest.fixture(scope="session")
def corpora(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each corpus written and extracted: name → data-only config file."""
    configs = {}
    for name, writer in WRITERS.items():
        root = tmp_path_factory.mktemp(name)
        data = writer(root / "raw")
        data["init_args"]["features_dir"] = str(root / "features")
        data["init_args"]["clip_model"] = str(tiny_world / "clip")
        data["init_args"]["batch_size"] = 4
        config = root / "data.yaml"
        config.write_text(yaml.safe_dump({"data": data}))
        features_main(["--config", str(config), "--batch_size", "2", "--no_progress"])
        configs[name] = config
    return configs


def summary(config: Path) -> dict[str, Any]:
    datamodule = build_datamodule(["--config", str(config)])
    return json.loads((datamodule.features_dir / "summary.json").read_text())


def test_coco_karpathy_summary_names_skipped_files_and_counts_dropped_captions(corpora) -> None:
    splits = summary(corpora["coco_karpathy"])["splits"]
    assert splits["train"]["images"] == 4 and splits["train"]["extracted"] == 3  # restval joined train
    assert splits["train"]["dropped_empty_captions"] == 1
    assert splits["train"]["captions"] == 4  # of the extracted images: 2 + 1 + 1
    reasons = {row["image_id"]: row["reason"] for split in splits.values() for row in split["skipped"]}
    assert set(reasons) == {"104", "106", "107"}
    assert "not found" in reasons["106"]
    assert reasons["104"] == "not an image" and reasons["107"].startswith("truncated")
    assert all(row["source"].endswith(".jpg") for split in splits.values() for row in split["skipped"])


def test_the_summary_records_what_the_readers_counted(corpora) -> None:
    tsv = summary(corpora["conceptual_tsv"])["splits"]["train"]
    assert tsv["annotations"] == {
        "images_not_downloaded": 1,
        "images_without_captions": 0,
        "lines_with_invalid_utf8": 1,
        "rows_with_several_image_files": 0,
    }
    assert [row["reason"] for row in tsv["skipped"]] == ["file not found"]  # the dead link, row 2
    shards = summary(corpora["conceptual_shards"])["splits"]["train"]
    assert shards["annotations"]["samples_without_image"] == 1 and shards["images"] == 2
    assert summary(corpora["coco_karpathy"])["splits"]["train"]["annotations"] == {
        "images_without_captions": 0,
        "repeated_images": 0,
    }


def test_datamodule_serves_only_extracted_images(corpora) -> None:
    datamodule = build_datamodule(["--config", str(corpora["coco_karpathy"])])
    datamodule.setup("fit")
    assert [e.image_id for e in datamodule.split("train").images] == ["101", "102", "103"]
    assert datamodule.split("train").images[1].references == ("a blue star.",)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.clip_features.shape[1] == datamodule.clip_dim and batch.captions


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_corpus_loads_from_its_cache(corpora, name: str) -> None:
    datamodule = build_datamodule(["--config", str(corpora[name])])
    for split in datamodule.splits_available:
        served = datamodule.split(split)
        assert served.images, split
        cache = FeatureCache.open(datamodule.feature_folder(split))
        assert [e.image_id for e in served.images] == [
            i for i in cache.image_ids if i in {e.image_id for e in served.images}
        ]
        loader = datamodule.predict_dataloader() if split == datamodule.predict_split else None
        if loader is not None:
            assert len(next(iter(loader)).image_ids) >= 1


def test_corpus_specific_facts(corpora) -> None:
    nocaps = build_datamodule(["--config", str(corpora["nocaps"]), "--data.init_args.domains=[out-domain]"])
    assert [e.image_id for e in nocaps.split("val").images] == ["33", "34"]
    assert nocaps.split("val").images[1].references == ("d.", "d2.", "d3.")
    assert nocaps.split("test").images == []  # domain filter: the test image is in-domain
    everything = build_datamodule(["--config", str(corpora["nocaps"])])
    assert everything.split("test").images[0].references == ()

    descriptions = build_datamodule(
        ["--config", str(corpora["concadia"]), "--data.init_args.reference=description"]
    )
    assert descriptions.split("val").images[0].references == ("description 2.",)

    tsv = summary(corpora["conceptual_tsv"])["splits"]["train"]
    assert tsv["images"] == 4 and tsv["extracted"] == 3
    assert [row["image_id"] for row in tsv["skipped"]] == ["00000002"]
    cc = build_datamodule(["--config", str(corpora["conceptual_tsv"])])
    assert "caf\ufffd shapes" in cc.split("train").images[1].references

    shards = build_datamodule(["--config", str(corpora["conceptual_shards"])])
    assert [e.image_id for e in shards.split("train").images] == ["000000000", "000000002"]


def test_labelled_subset_and_unlabelled_pool(corpora) -> None:
    config = str(corpora["coco_karpathy"])
    labelled = build_datamodule(
        ["--config", config, "--data.init_args.labelled_images=2", "--data.init_args.subset_seed=3"]
    )
    again = build_datamodule(
        ["--config", config, "--data.init_args.labelled_images=2", "--data.init_args.subset_seed=3"]
    )
    chosen = [e.image_id for e in labelled.split("train").images]
    assert len(chosen) == 2 and chosen == [e.image_id for e in again.split("train").images]
    pool = build_datamodule(["--config", config, "--data.init_args.unlabelled=true"])
    pool.setup("fit")
    batch = next(iter(pool.train_dataloader()))
    assert batch.captions is None and len(pool.train_dataloader().dataset) == 3
    assert pool.split("val").images[0].references  # validation keeps its references


def test_an_unlabelled_pool_with_its_labelled_anchor(corpora) -> None:
    """Jin (2023)'s stage 2: the pool is the images outside the labelled subset, and each batch can carry
    labelled pairs of that subset beside it."""
    config = str(corpora["coco_karpathy"])
    options = ["--data.init_args.labelled_images=1", "--data.init_args.subset_seed=3"]
    labelled = build_datamodule(["--config", config, *options]).split("train").images
    stage2 = build_datamodule(
        ["--config", config, *options, "--data.init_args.unlabelled=true",
         "--data.init_args.anchor_batch_size=2", "--data.init_args.batch_size=8"],
    )  # fmt: skip
    stage2.setup("fit")
    train = stage2.split("train")
    assert [e.image_id for e in train.labelled] == [e.image_id for e in labelled]
    assert {e.image_id for e in train.images}.isdisjoint(e.image_id for e in labelled)
    assert len(train.images) == 2 and not any(e.references for e in train.images)
    loaders = stage2.train_dataloader()
    images, anchor = next(iter(loaders["images"])), next(iter(loaders["anchor"]))
    assert images.captions is None and len(images) == 2
    assert len(anchor) == min(2, len(labelled[0].references)) and set(anchor.image_ids) == {
        labelled[0].image_id
    }
    assert all(caption in labelled[0].references for caption in anchor.captions)
    with pytest.raises(ValueError, match="anchor_batch_size"):
        build_datamodule(["--config", config, "--data.init_args.anchor_batch_size=2"])
    with pytest.raises(ValueError, match="pool is empty"):
        build_datamodule(
            ["--config", config, "--data.init_args.labelled_images=3", "--data.init_args.unlabelled=true"]
        ).split("train")


def test_features_are_refused_for_another_clip(corpora, tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    other = tmp_path / "other_clip"
    datamodule = build_datamodule(["--config", str(corpora["flickr30k"])])
    original = CLIPModel.from_pretrained(datamodule.clip_model)
    torch.manual_seed(1)
    CLIPModel(CLIPConfig.from_dict(original.config.to_dict())).save_pretrained(other)
    for name in ("preprocessor_config.json",):
        (other / name).write_bytes((Path(datamodule.clip_model) / name).read_bytes())
    refused = build_datamodule(
        ["--config", str(corpora["flickr30k"]), f"--data.init_args.clip_model={other}"]
    )
    with pytest.raises(FeatureCacheMismatch, match="vision_weights_sha1"):
        refused.split("train")


def test_missing_features_say_how_to_extract(tiny_world: Path, tmp_path: Path) -> None:
    from clipcap.training import Flickr30k

    datamodule = Flickr30k(annotation_file="x.json", image_dir="x", features_dir=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="clipcap features"):
        _ = datamodule.clip_dim
    with pytest.raises(ValueError, match="features_dir"):
        _ = Flickr30k(annotation_file="x.json", image_dir="x").features_dir


# -------------------------------------------------------------------------------- the shipped configs

LM_OVERRIDE = "--model.captioner.init_args.language_model.init_args.pretrained=synthetic:lm"
QUICK = ["--trainer.precision=32-true", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]


def data_overrides(fixture_config: Path) -> list[str]:
    """Options pointing a shipped config's data at a fixture: its paths, CLIP and batch size only, so
    every other option of the shipped config is still parsed and used."""
    init_args = yaml.safe_load(fixture_config.read_text())["data"]["init_args"]
    return [
        f"--data.init_args.{key}={value if isinstance(value, str) else json.dumps(value)}"
        for key, value in init_args.items()
    ]


def shipped(config: str) -> list[str]:
    """``--config`` options of a shipped config, after its dataset's config for a COCO one (which holds only
    what it changes, as the README runs them)."""
    base = ["--config", str(COCO_KARPATHY)] if config.startswith("lightning_configs/coco/") else []
    return [*base, "--config", str(REPO / config)]


def fit_shipped_config(config: str, fixture: Path, tmp_path: Path, *options: str):
    """One fast_dev_run step of a shipped config with its data pointed at a fixture (the tiny LM, one
    process, no pinned memory); every other option of the config is used as shipped."""
    return lightning_cli(
        ["fit", *shipped(config), LM_OVERRIDE, *data_overrides(fixture), *QUICK,
         "--data.init_args.num_workers=0", "--data.init_args.pin_memory=false", *options,
         "--trainer.fast_dev_run=true", "--trainer.default_root_dir", str(tmp_path)]
    )  # fmt: skip


def test_coco_config_trains_on_the_fixture(corpora, tmp_path: Path) -> None:
    cli = fit_shipped_config("lightning_configs/coco/ce.yaml", corpora["coco_karpathy"], tmp_path)
    assert cli.trainer.state.finished
    assert isinstance(cli.model, CaptionModule)
    assert cli.model.captioner.prefix_length == 10


def test_coco_discritune_config_trains_on_the_fixture(corpora, tmp_path: Path) -> None:
    cli = fit_shipped_config("lightning_configs/coco/discritune.yaml", corpora["coco_karpathy"], tmp_path)
    assert cli.trainer.state.finished
    assert type(cli.model.objective).__name__ == "DiscriTune"
    assert isinstance(cli.model.optimizer_factory(torch.nn.Linear(1, 1).parameters()), torch.optim.Adam)


@pytest.mark.parametrize(
    ("name", "objective"),
    [("scst_cider", "SCST"), ("scst_clip_s", "SCST"), ("discritune_grpo", "PolicyGradient"),
     ("cider_retrieval", "PolicyGradient")],
)  # fmt: skip
def test_coco_reward_configs_train_on_the_fixture(name: str, objective: str, corpora, tmp_path: Path) -> None:
    cli = fit_shipped_config(
        f"lightning_configs/coco/{name}.yaml", corpora["coco_karpathy"], tmp_path,
        "--model.objective.init_args.rollout.max_new_tokens=6",
    )  # fmt: skip
    assert cli.trainer.state.finished and int(cli.model.skipped_steps) == 0
    assert type(cli.model.objective).__name__ == objective


def test_conceptual_discritune_config_trains_on_the_fixture(corpora, tmp_path: Path) -> None:
    cli = fit_shipped_config(
        "lightning_configs/conceptual/discritune.yaml", corpora["conceptual_shards"], tmp_path
    )
    assert cli.trainer.state.finished
    assert type(cli.model.objective).__name__ == "DiscriTune"
    assert cli.model.decoding.num_beams == 5  # the fixture sets the batch size


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_coco_two_stage_configs_train_on_the_fixture(stage: str, corpora, tmp_path: Path) -> None:
    cli = fit_shipped_config(
        f"lightning_configs/coco/two_stage_10k_{stage}.yaml",
        corpora["coco_karpathy"],
        tmp_path,
        "--data.init_args.labelled_images=1",
        "--model.captioner.init_args.max_caption_tokens=8",
    )
    assert cli.trainer.state.finished
    objective = type(cli.model.objective).__name__
    assert objective == {"stage1": "CrossEntropy", "stage2": "GumbelClip"}[stage]
    train = cli.datamodule.split("train")
    if stage == "stage1":
        assert len(train.images) == 1
    else:  # the pool is the other two images; the labelled one is the anchor
        assert len(train.images) == 2 and len(train.labelled) == 1


@pytest.mark.parametrize("count", [100, 1000])
def test_the_label_sweep_overlays(count: int, corpora, tmp_path: Path) -> None:
    cli = lightning_cli(
        ["fit", *shipped("lightning_configs/coco/two_stage_10k_stage1.yaml"),
         "--config", str(REPO / f"lightning_configs/coco/labels_{count}.yaml"), LM_OVERRIDE,
         *data_overrides(corpora["coco_karpathy"]), "--trainer.default_root_dir", str(tmp_path)],
        run=False,
    )  # fmt: skip
    assert cli.datamodule.labelled_images == count
    assert cli.trainer.max_epochs == 10 and cli.datamodule.restval_as_train  # the rest is stage 1's


DATA_CONFIGS = sorted((REPO / "lightning_configs" / "data").glob("*.yaml"))


def test_a_coco_config_alone_names_its_dataset_config(capsys: pytest.CaptureFixture) -> None:
    """A COCO config holds only what it changes: given alone, the command says which config goes first
    (jsonargparse would quietly take the abstract CaptionDataModule and fail on an unrelated option)."""
    from clipcap.commands import main

    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(REPO / "lightning_configs/coco/discritune.yaml")])
    assert stopped.value.code == 1
    assert "--config lightning_configs/data/coco_karpathy.yaml --config" in capsys.readouterr().err


def test_every_coco_config_reuses_the_karpathy_data_config() -> None:
    """The Karpathy data block lives in one file; no COCO config repeats any of its settings."""
    base = yaml.safe_load(COCO_KARPATHY.read_text())["data"]
    for config in sorted((REPO / "lightning_configs" / "coco").glob("*.yaml")):
        data = yaml.safe_load(config.read_text()).get("data") or {}
        assert "class_path" not in data, config
        repeated = {k for k, v in (data.get("init_args") or {}).items() if base["init_args"].get(k) == v}
        assert not repeated, (config, repeated)


@pytest.mark.parametrize("config", DATA_CONFIGS, ids=[c.stem for c in DATA_CONFIGS])
def test_data_configs_compose_with_a_training_config(config: Path, corpora, tmp_path: Path) -> None:
    shipped = yaml.safe_load(config.read_text())["data"]
    cli = lightning_cli(
        ["fit", "--config", str(SYNTHETIC_CE), "--config", str(config), *data_overrides(corpora[config.stem]),
         "--trainer.default_root_dir", str(tmp_path)],
        run=False,
    )  # fmt: skip
    assert type(cli.datamodule).__name__ == shipped["class_path"].rsplit(".", 1)[1]
    assert cli.model.captioner.clip_dim == cli.datamodule.clip_dim
    assert cli.datamodule.predict_split == shipped["init_args"].get("predict_split", "test")
    assert cli.datamodule.split(cli.datamodule.predict_split).images


@pytest.mark.parametrize(
    ("config", "options"),
    [
        ("llama2_lora_ce.yaml", []),
        ("llama2_lora_discritune.yaml", []),
        ("llama2_lora_gumbel_clip.yaml",
         ["--data.init_args.labelled_images=2", "--data.init_args.anchor_batch_size=2",
          "--model.objective.init_args.rollout.max_new_tokens=4"]),
    ],
)  # fmt: skip
def test_llama2_lora_configs_train_a_tiny_llama_on_the_fixture(
    config: str, options: list[str], corpora, llama_folder: Path, tmp_path: Path
) -> None:
    """The LLaMA-2 configs as shipped (fp16 or bf16 weights, LoRA on the family's default targets,
    checkpointing) on a tiny LLaMA: only the mapper and the adapters train."""
    cli = fit_shipped_config(
        f"lightning_configs/coco/{config}", corpora["coco_karpathy"], tmp_path,
        f"--model.captioner.init_args.language_model.init_args.pretrained={llama_folder}", *options,
    )  # fmt: skip
    assert cli.trainer.state.finished
    lm = cli.model.captioner.lm
    assert lm.lora is not None and lm.dtype in (torch.float16, torch.bfloat16)
    trainable = [name for name, p in cli.model.named_parameters() if p.requires_grad]
    assert all(".mapper." in f".{name}" or "lora_" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable if "lora_A" in name} == {"q_proj", "v_proj"}


def test_every_shipped_config_is_exercised() -> None:
    tested = {
        SYNTHETIC_CE,
        REPO / "lightning_configs/coco/ce.yaml",
        REPO / "lightning_configs/coco/discritune.yaml",
        *(
            REPO / f"lightning_configs/coco/{name}.yaml"
            for name in ("scst_cider", "scst_clip_s", "discritune_grpo", "cider_retrieval")
        ),
        REPO / "lightning_configs/conceptual/discritune.yaml",
        REPO / "lightning_configs/coco/two_stage_10k_stage1.yaml",
        REPO / "lightning_configs/coco/two_stage_10k_stage2.yaml",
        REPO / "lightning_configs/coco/labels_100.yaml",
        REPO / "lightning_configs/coco/labels_1000.yaml",
        *(
            REPO / f"lightning_configs/coco/llama2_lora_{name}.yaml"
            for name in ("ce", "discritune", "gumbel_clip")
        ),
        REPO / "lightning_configs/coco/blip_discritune.yaml",  # test_blip trains it on the tiny world
        REPO / "lightning_configs/coco/llama2_fsdp_ce.yaml",  # test_distributed builds its FSDP trainer
        *DATA_CONFIGS,
    }
    synthetic = set((REPO / "lightning_configs" / "synthetic").glob("*.yaml"))  # test_training parses these
    assert set((REPO / "lightning_configs").rglob("*.yaml")) <= tested | synthetic


def test_grid_features_train_the_transformer_mapper(corpora, tmp_path: Path) -> None:
    grid_dir = tmp_path / "grid_features"
    override = f"--data.init_args.features_dir={grid_dir}"
    features_main(["--config", str(corpora["flickr30k"]), "--grid", "--no_progress", override])
    datamodule = build_datamodule(
        ["--config", str(corpora["flickr30k"]), override, "--data.init_args.grid_features=true"]
    )
    served = datamodule.split("train")
    assert served.clip_features("1000").shape == served.features.grid.shape[1:]
    cli = lightning_cli(
        ["fit", "--config", str(SYNTHETIC_CE), "--data=clipcap.training.Flickr30k",
         *data_overrides(corpora["flickr30k"]), override,
         "--data.init_args.grid_features=true", "--model.captioner.init_args.mapper=TransformerMapper",
         "--model.captioner.init_args.mapper.num_layers=1", "--model.captioner.init_args.mapper.num_heads=4",
         "--trainer.fast_dev_run=true", "--trainer.default_root_dir", str(tmp_path), *QUICK]
    )  # fmt: skip
    assert cli.trainer.state.finished
    no_grid = build_datamodule(["--config", str(corpora["flickr30k"]), "--data.init_args.grid_features=true"])
    with pytest.raises(ValueError, match="--grid"):
        no_grid.split("train")


def test_bf16_extraction_is_accepted_by_training_and_is_not_the_fp32_cache(corpora, tmp_path: Path) -> None:
    override = f"--data.init_args.features_dir={tmp_path / 'bf16'}"
    config = str(corpora["concadia"])
    features_main(["--config", config, "--dtype", "bfloat16", "--no_progress", override])
    datamodule = build_datamodule(
        ["--config", config, override]
    )  # clip_model is set: the fingerprint is checked
    bf16 = datamodule.split("train").features.get("wiki_0.png")
    fp32 = build_datamodule(["--config", config]).split("train").features.get("wiki_0.png")
    assert not (bf16 == fp32).all() and abs(bf16 - fp32).max() < 0.1 * abs(fp32).max()
    reports = features_main(["--config", config, "--splits", "train", "--no_progress", override])
    assert (reports["train"].complete, reports["train"].extracted) == (True, 2)
    refreshed = build_datamodule(["--config", config, override]).split("train").features.get("wiki_0.png")
    assert (refreshed == fp32).all(), "an fp32 run must not take the bf16 cache as up to date"


def test_malformed_annotations_stop_extraction_with_one_message(tiny_world: Path, tmp_path: Path) -> None:
    annotation = tmp_path / "dataset_flickr30k.json"
    annotation.write_text(json.dumps({"images": [{"filename": "1.jpg", "imgid": 0, "split": "train"}]}))
    config = tmp_path / "data.yaml"
    data = {
        "class_path": "clipcap.training.Flickr30k",
        "init_args": {
            "annotation_file": str(annotation),
            "image_dir": str(tmp_path),
            "features_dir": str(tmp_path / "features"),
            "clip_model": str(tiny_world / "clip"),
        },
    }
    config.write_text(yaml.safe_dump({"data": data}))
    with pytest.raises((ValueError, OSError)) as stopped:
        features_main(["--config", str(config), "--no_progress"])
    message = str(stopped.value)
    assert "dataset_flickr30k.json" in message and "images[0]" in message and "sentences" in message
    assert not (tmp_path / "features" / "train").exists()


MISSING_FOLDER_OVERRIDES = {
    "coco_karpathy": "image_dir",
    "flickr30k": "image_dir",
    "coco_captions": "image_dirs",
    "nocaps": "image_dirs",
    "concadia": "image_dir",
    "conceptual_tsv": "image_dirs",
}


@pytest.mark.parametrize("name", sorted(MISSING_FOLDER_OVERRIDES))
def test_a_missing_image_folder_stops_extraction(corpora, name: str, tmp_path: Path) -> None:
    """It used to give exit 0, every image "file not found" and an empty cache."""
    missing = tmp_path / "not-downloaded"
    key = MISSING_FOLDER_OVERRIDES[name]
    value = (
        str(missing)
        if key == "image_dir"
        else json.dumps(dict.fromkeys(("train", "val", "test"), str(missing)))
    )
    datamodule = build_datamodule(["--config", str(corpora[name])])
    if key == "image_dirs":  # only the splits the corpus has
        value = json.dumps(dict.fromkeys(datamodule.splits_available, str(missing)))
    overrides = [f"--data.init_args.{key}={value}", f"--data.init_args.features_dir={tmp_path / 'features'}"]
    with pytest.raises((ValueError, OSError)) as stopped:
        features_main(["--config", str(corpora[name]), "--no_progress", *overrides])
    message = str(stopped.value)
    assert f"{missing}" in message and "does not exist" in message, message
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").rglob("features.npy"))


def test_an_image_downloaded_later_is_extracted_by_a_plain_rerun(corpora, tmp_path: Path) -> None:
    """Conceptual Captions row 2 was a dead link; once it is downloaded, a rerun without --force must
    extract it (the cache used to count as up to date because its image ids had not changed)."""
    import shutil

    datamodule = build_datamodule(["--config", str(corpora["conceptual_tsv"])])
    raw = tmp_path / "raw"
    shutil.copytree(Path(datamodule.image_dirs["train"]).parent, raw)
    overrides = [
        f"--data.init_args.tsv_files={json.dumps({s: str(raw / f'{s}.tsv') for s in ('train', 'val')})}",
        f"--data.init_args.image_dirs={json.dumps({s: str(raw / s) for s in ('train', 'val')})}",
        f"--data.init_args.features_dir={tmp_path / 'features'}",
    ]
    arguments = ["--config", str(corpora["conceptual_tsv"]), "--splits", "train", "--no_progress", *overrides]
    first = features_main(arguments)["train"]
    assert (first.extracted, [row["image_id"] for row in first.skipped]) == (3, ["00000002"])
    cache_file = tmp_path / "features" / "train" / "features.npy"
    written = cache_file.stat().st_ino
    again = features_main(arguments)["train"]
    assert again.extracted == 3 and cache_file.stat().st_ino == written  # up to date: the cache is kept
    draw(raw / "train" / "00000002.jpg", 62, "JPEG")
    refreshed = features_main(arguments)["train"]
    assert (refreshed.extracted, refreshed.skipped) == (4, [])
    assert "00000002" in FeatureCache.open(tmp_path / "features" / "train").image_ids


def test_concadia_is_scored_against_captions_and_descriptions(corpora) -> None:
    datamodule = build_datamodule(["--config", str(corpora["concadia"])])
    sets = datamodule.reference_sets("val")
    assert sets == {"caption": [("caption 2.",)], "description": [("description 2.",)]}
    single = build_datamodule(["--config", str(corpora["flickr30k"])]).reference_sets("val")
    assert single == {"": [("photo 1002.", "a picture.")]}


def test_the_loaders_pin_memory_step_reaches_the_batch_and_its_anchor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch's ``pin_memory`` passes an unknown object through as it is, so a ``CaptionBatch`` would never be
    pinned; it has its own ``pin_memory``, which the loader calls (pinning itself needs CUDA: here a clone
    stands in for it, and tests/test_gpu.py checks real pinning on a GPU)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from clipcap.data.batch import CaptionBatch

    pinned: list[torch.Tensor] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.clone()) or pinned[-1])
    anchor = CaptionBatch(image_ids=["a"], clip_features=torch.ones(1, 4), captions=["x"])
    batch = CaptionBatch(image_ids=["0", "1"], clip_features=torch.zeros(2, 4), anchor=anchor)
    result = pin_memory({"images": batch, "anchor": anchor})
    assert result["images"].clip_features is pinned[1] and result["images"].anchor.clip_features is pinned[0]
    assert result["anchor"].clip_features is pinned[2]
    assert result["images"].image_ids == ["0", "1"] and batch.clip_features is not pinned[1]
