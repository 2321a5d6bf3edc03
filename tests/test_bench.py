"""`eva-repro bench` at quick size: one suite end to end through the CLI, its JSON result."""

import json

from eva_repro import cli


def test_model_suite_quick_writes_its_json_with_a_measured_peak(tmp_path, capsys):
    assert cli.main(["bench", "--suite", "model", "--quick", "--output_dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "model.json").read_text())
    assert result["suite"] == "model" and result["wall_s"] > 0
    assert result["compute_dtype"] in ("float32", "bfloat16 autocast")  # CPU or CUDA
    assert result["matmul_peak_gflops"] > 1  # measured in the same run, not a constant
    tiny = result["presets"][0]
    assert tiny["preset"] == "tiny" and tiny["shape"] == "256x4096" and not tiny["compiled"]
    assert tiny["samples_per_s"] > 0 and 0 < tiny["fraction_of_peak"] < 2
    assert '"suite": "model"' in capsys.readouterr().out
