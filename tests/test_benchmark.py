"""The ingest benchmark runs both paths and reports them side by side (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from tlray.bench import ingest as benchmark

pytestmark = pytest.mark.ray


def test_ingest_benchmark_reports_both_paths(ray_cluster):
    results = benchmark.ingest({"tiny": (8, 3, 600)}, batch_size=64, repeats=1)
    (r,) = results
    assert r.case == "tiny" and r.rows == 600
    assert min(r.plain_img_s, r.ray_img_s, r.ray_cached_img_s, r.ray_first_pass_img_s) > 0
    assert r.ratio == pytest.approx(r.ray_img_s / r.plain_img_s)
    assert r.cached_ratio == pytest.approx(r.ray_cached_img_s / r.plain_img_s)
    table = benchmark.format_ingest(results)
    assert "tiny" in table and "ratio" in table
    assert json.loads(benchmark.ingest_json(results))[0]["rows"] == 600
