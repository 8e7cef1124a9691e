"""`csm bench` runs end to end on a tiny random model, and its transformers run decodes the same codes."""

from __future__ import annotations

import json

import pytest

from csm.cli import main


@pytest.mark.parametrize("fuse", [True, False])
def test_bench_tiny_matches_transformers(tmp_path, fuse):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--preset", "tiny", "--frames", "4", "--batch-sizes", "1,2", "--no-codec", "--threads", "1",
               "--json", str(out)] + ([] if fuse else ["--no-fuse"]))
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["fused_projections"] is fuse
    ours = r["ours"]
    assert ours["frames"] == 4 and ours["ms_per_frame"] > 0 and ours["prefill_ms"] > 0 and ours["sampled_ms_per_frame"] > 0
    assert set(ours["batches"]) == {"1", "2"} and all(v["frames_per_s"] > 0 for v in ours["batches"].values())
    assert r["transformers"]["same_codes"] is True and r["speedup_vs_transformers"] > 0
