"""Evaluation and analysis of a real `mor` export (remote code): upcycle -> export -> eval / analyze."""
import json
import math
import subprocess
import sys

from router_upcycling.convert.export import export
from router_upcycling.convert.upcycle import CalibrationSettings, upcycle
from router_upcycling.eval.sample_data import write_sample_mirror
from router_upcycling.settings.moe import MoESettings
from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2


def test_eval_and_analyze_a_mor_export(tmp_path):
    make_dense_qwen2(str(tmp_path / "dense"), num_heads=8, num_kv_heads=2, seed=31)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXT))
    moe = MoESettings(router="mor", num_experts=4, topk=2, num_routers=8)
    checkpoint = upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"), moe,
                         CalibrationSettings(files=[str(calib)], tokens=256, seq_length=32), dtype="fp32", progress=False)
    folder = export(checkpoint, str(tmp_path / "hf"), "mor", dtype="fp32")
    write_sample_mirror(str(tmp_path / "mirror"), rows_per_split=6)

    result = subprocess.run([sys.executable, "-m", "router_upcycling.eval", "--model", folder, "--tasks", "copa,nq_open",
                             "--data-dir", str(tmp_path / "mirror"), "--limit", "4", "--gen-max-tokens", "4",
                             "--output", str(tmp_path / "results.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["tasks"]) == {"copa", "nq_open"} and results["tasks"]["copa"]["n"] == 4

    result = subprocess.run([sys.executable, "-m", "router_upcycling.analyze", "load", "--model", folder,
                             "--data", str(calib), "--output", str(tmp_path / "load")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    load = json.loads((tmp_path / "load" / "load.json").read_text())
    assert (tmp_path / "load" / "load.png").is_file() and load

    result = subprocess.run([sys.executable, "-m", "router_upcycling.analyze", "health", "--model", folder,
                             "--data", str(calib), "--output", str(tmp_path / "health")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    health = json.loads((tmp_path / "health" / "health.json").read_text())
    assert health["layers"] == [0, 1] and (tmp_path / "health" / "health.png").is_file()
    for layer in health["routing_health"]:  # step 0: routers straight from the attention heads
        assert 0.25 <= layer["max_share"] <= 1 and 0 <= layer["dead_experts"] <= 4 and 0.5 <= layer["top1_weight"] <= 1
        assert layer["logit_std"] > 0 and 0 <= layer["entropy"] <= math.log(4)
