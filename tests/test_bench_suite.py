"""The benchmark suite's smoke run: every row of the table is measured and written, with positive figures."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_suite():
    return importlib.import_module("benchmarks.bench_suite")


def test_quick_run_writes_every_row_with_positive_figures(
    bench_suite, tiny_world: Path, tmp_path: Path
) -> None:
    markdown = tmp_path / "benchmarks.md"
    markdown.write_text("# Benchmarks\n\n## Results\n")
    bench_suite.main(["--shapes", "small", "--quick", "--batches", "4,8", "--write", str(markdown)])

    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\n## Results\n")
    block = text.split("<!-- bench:suite-cpu -->\n", 1)[1].split("<!-- /bench:suite-cpu -->", 1)[0]
    assert block.startswith("### Benchmark suite, cpu")
    for line in ("- Command: `", "- Date (UTC): ", "- Machine: CPU ", "- Load: 1-minute load average "):
        assert line in block
    assert "| measurement | setting | unit | small |" in block

    rows = {}
    for line in block.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("measurement", "---"):
            rows[(cells[0], cells[1])] = float(cells[3])
    measurements = [measurement for measurement, _ in rows]
    expected = {
        "cross-entropy training": 2,
        "generation, 40 tokens, batch 32": 2,
        "naive generation, 40 tokens": 2,
        "greedy speed-up over naive": 1,
        "beam-5 speed-up over naive": 1,
        "DiscriTune step": 4,  # teacher-forced log π and log π from the rollout
        "DiscriTune batch 4: share beyond rollout + backward": 2,
        "GumbelClip step": 2,
        "feature extraction": 1,
    }
    assert {m: measurements.count(m) for m in expected} == expected
    assert len(rows) == sum(expected.values())
    assert all(value > 0 for value in rows.values()), rows
    assert "ViT-B/32" in block
    assert re.search(r"Target: beam-5 speed-up over naive ≥ 40×: small [\d.]+× \((met|not met)\)", block)
    for how in ("teacher-forced log π", "log π from the rollout"):
        assert re.search(
            rf"share beyond rollout \+ backward < 25 %, {how}: small \d+ % \((met|not met)\)", block
        )
    for split in (
        "DiscriTune step (teacher-forced log π, the default) split by part",
        "DiscriTune step with `log_probs_from_rollout`, split by part",
        "GumbelClip step split by part",
    ):
        assert split in block
    assert "| small | 8 | " in block.split("GumbelClip step split by part", 1)[1]


def test_reward_benchmark_writes_a_row_per_preset_and_the_cider_line(tmp_path: Path) -> None:
    bench_rewards = importlib.import_module("benchmarks.bench_rewards")
    markdown = tmp_path / "benchmarks.md"
    bench_rewards.main(["--shapes", "small", "--batches", "2", "--steps", "1", "--write", str(markdown)])
    block = markdown.read_text().split("<!-- bench:rewards-cpu -->\n", 1)[1].split("<!-- /bench:", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith(("| DiscriTune", "| SCST"))]
    assert [row.split("|")[1].strip() for row in rows] == ["DiscriTune", "SCST"]
    for row in rows:
        seconds = [float(cell.strip().removesuffix(" s")) for cell in row.strip("|").split("|")[4:]]
        assert len(seconds) == 6 and all(value > 0 for value in seconds)
    assert re.search(r"CIDEr-D reward of 100 images × 5 samples .*: \d+\.\d ms", block)


def test_lm_head_benchmark_compares_both_ways_on_equal_logits(tmp_path: Path) -> None:
    bench_lm_head = importlib.import_module("benchmarks.bench_lm_head")
    markdown = tmp_path / "benchmarks.md"
    bench_lm_head.main(["--shapes", "small", "--rounds", "1", "--write", str(markdown)])
    row = next(line for line in markdown.read_text().splitlines() if line.startswith("| small"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert float(cells[1].removesuffix(" s")) > 0 and float(cells[2].removesuffix(" s")) > 0
    assert float(cells[4]) == 0.0  # the same logits either way


def test_mapper_attention_benchmark_compares_both_ways_on_equal_outputs(tmp_path: Path) -> None:
    bench = importlib.import_module("benchmarks.bench_mapper_attention")
    markdown = tmp_path / "benchmarks.md"
    bench.main(["--shapes", "small", "--rounds", "1", "--write", str(markdown)])
    row = next(line for line in markdown.read_text().splitlines() if line.startswith("| small"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert all(float(cells[i].removesuffix(" s")) > 0 for i in (1, 2, 4, 5))
    assert float(cells[6]) < 1e-5  # the same prefix either way


def test_kv_cache_benchmark_times_every_arm_on_equal_captions(tmp_path: Path) -> None:
    bench = importlib.import_module("benchmarks.bench_kv_cache")
    markdown = tmp_path / "benchmarks.md"
    bench.main(
        ["--shapes", "small", "--rounds", "1", "--images", "2", "--tokens", "4", "--write", str(markdown)]
    )
    rows = [line for line in markdown.read_text().splitlines() if line.startswith("| small")]
    assert len(rows) == 4
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[2].removesuffix(" s")) > 0 and float(cells[4].removesuffix(" s")) > 0
        assert cells[7].endswith("yes")  # the in-place cache decodes what the dynamic one does
