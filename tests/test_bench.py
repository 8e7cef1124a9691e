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


def test_profile_step_script(tmp_path):
    """benchmarks/profile_step.py runs end to end on CPU (no CUDA kernels to group there) and keeps its options."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "profile_step.py"
    out = tmp_path / "p.json"
    subprocess.run([sys.executable, str(script), "--preset", "tiny", "--engine", "eager", "--frames", "3",
                    "--profile-frames", "1", "--inductor", "coordinate_descent_tuning=true", "--json", str(out)],
                   check=True, capture_output=True, timeout=300)
    r = json.loads(out.read_text())
    assert r["timing"]["ms_per_frame"] > 0 and r["inductor"] == ["coordinate_descent_tuning=true"]
    assert r["replay"]["wall_ms_per_frame"] > 0 and r["launch"]["kernels_per_frame"] == 0  # CPU: no CUDA kernels
    bad = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--inductor", "no_such_option=1"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "no option 'no_such_option'" in bad.stderr


def test_gemv_forms_script(tmp_path):
    """benchmarks/gemv_forms.py runs its forms (compiled ones included) on CPU and they compute the same product."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "gemv_forms.py"
    out = tmp_path / "g.json"
    subprocess.run([sys.executable, str(script), "--shapes", "48x1024", "--forms", "matmul,sum/512,silu sum",
                    "--calls", "2", "--json", str(out)], check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [r["form"] for r in rows] == ["matmul", "sum/512", "silu sum"]
    assert all(r["us"] > 0 and r["max_abs_err"] < 1e-4 for r in rows)


def test_kernel_kinds():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("profile_step", Path(__file__).parent.parent / "benchmarks" / "profile_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.kernel_kind("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT") == "matmul"
    assert mod.kernel_kind("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16") == "attention"
    assert mod.kernel_kind("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy") == "inductor"
    assert mod.kernel_kind("void at::native::sbtopk::gatherTopK<float>") == "other"
