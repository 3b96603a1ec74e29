"""scripts/slurm/pretrain_cpu_smoke.sbatch trains for real on a one-node Slurm started by the test.

Data preprocessed with tools/preprocess_data.py, a tiny model upcycled with tools/convert_checkpoint.py,
the job submitted with sbatch and waited for: the same path a user takes on a cluster.
"""
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slurm_cluster import REPO_ROOT, slurm_cluster, slurm_env  # noqa: E402,F401

from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2  # noqa: E402


def test_cpu_smoke_sbatch_trains_and_checkpoints(slurm_cluster, tmp_path):  # noqa: F811
    dense = make_dense_qwen2(str(tmp_path / "dense"), num_heads=8, num_kv_heads=4, seed=21)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{t} ({i})"}) + "\n" for i in range(60) for t in SAMPLE_TEXT))
    tools = REPO_ROOT / "tools"
    for argv in (
        ["preprocess_data.py", "--input", corpus, "--tokenizer", dense, "--output-prefix", tmp_path / "data", "--no-progress"],
        ["convert_checkpoint.py", "upcycle", "--hf-model", dense, "--output", tmp_path / "moe", "--num-experts", "4",
         "--calib-data", corpus, "--calib-tokens", "512", "--calib-seq-length", "64", "--dtype", "fp32"],
    ):
        result = subprocess.run([sys.executable, tools / argv[0], *map(str, argv[1:])], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    save = tmp_path / "run"
    env = {"DATA_PREFIX": str(tmp_path / "data_text_document"), "PRETRAINED_CKPT": str(tmp_path / "moe"), "SAVE_DIR": str(save)}
    log_path = tmp_path / "job.log"
    job = subprocess.run(
        ["sbatch", "--wait", f"--output={log_path}", "scripts/slurm/pretrain_cpu_smoke.sbatch", "--train-iters", "6",
         "--save-interval", "3"],
        capture_output=True, text=True, env=slurm_env(env), cwd=REPO_ROOT, timeout=600,
    )
    log = log_path.read_text() if log_path.exists() else ""
    assert job.returncode == 0, job.stderr + log
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    losses = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in losses if "lm_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], log
    assert "2 data-parallel ranks" in log
