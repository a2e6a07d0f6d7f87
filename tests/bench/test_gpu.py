"""The prepared GPU check runs on the CPU with small sizes, so that it never rots."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from bench import gpu

pytestmark = pytest.mark.slow  # runs the whole prepared GPU check on the CPU


def test_gpu_check_runs_on_the_cpu_and_reports_every_part(tmp_path):
    results_path = tmp_path / "gpu.json"
    status = gpu.main(["--device", "cpu", "--small", "--results", str(results_path)])
    results = json.loads(results_path.read_text())
    assert status == 0
    # correctness: every check model at every batch, bit-identical on the CPU
    models = {row["model"] for row in results["correctness"]}
    assert len(models) == len(gpu.check_models(small=True))
    assert {row["batch"] for row in results["correctness"]} == set(gpu.CHECK_BATCHES)
    assert all(row["identical"] and row["ok"] for row in results["correctness"])
    assert [row["requested"] for row in results["devices"]] == ["auto", "cpu"]
    assert results["threads"]["mismatches"] == 0
    rows = results["speed"][0]["rows"]
    assert [row["batch"] for row in rows] == list(gpu.SMALL_BATCHES)
    assert all(row["bnnserve"] > 0 and row["cpu engine"] > 0 for row in rows)
    assert results["speed"][0]["profile"]["bnnserve"]["kernels"] > 0
    markdown = gpu.render_markdown(results)
    assert markdown.startswith("## GPU path\n") and "Device: **cpu**" in markdown


def test_docs_section_is_replaced_not_duplicated(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Inference engine\n\nkept\n\n## GPU path\n\nold\n")
    gpu.write_docs_section("## GPU path\n\nnew\n", docs, title=gpu.SECTION)
    text = docs.read_text()
    assert "kept" in text and "new" in text and "old" not in text
    assert text.count("## GPU path") == 1
