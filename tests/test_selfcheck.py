"""`python -m router_upcycling.selfcheck` on the CPU as a cluster user runs it on a GPU node: under torchrun (as the
sbatch file's launch.sh starts it), the same stages and the same report, a failing parity check that turns the exit
status non-zero, and bad input as one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

STAGE_LINES = ("| 2 processes: the one-process stages first", "| parity: model logits fp32", "| calibration: 2,048 tokens",
               "| throughput: mor (1 process)", "| throughput: linear (1 process)", "| throughput: mor (2 processes)",
               "| throughput: linear (2 processes)", "| wrote")


def selfcheck(*args):
    return subprocess.run([sys.executable, "-m", "router_upcycling.selfcheck", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """Two CPU processes: rank 0's child runs the one-process command (parity, calibration, steps on one process),
    then both ranks time the steps together; one report holds everything."""
    output = tmp_path_factory.mktemp("selfcheck") / "report"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "router_upcycling.selfcheck",
                             "--device", "cpu", "--size", "tiny", "--steps", "1", "--warmup", "0", "--peak-flops", "1e12",
                             "--output", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output, result.stdout


def test_cpu_run_reports_parity_and_speed(cpu_run):
    output, stdout = cpu_run
    report = json.loads((output / "selfcheck.json").read_text())
    assert report["ok"] and report["parity_ok"]
    assert 0 <= report["parity_max_abs_diff"] < 1e-4  # float32 on the CPU against float32 on the CPU
    assert 0 < report["parity_max_abs_diff_bf16"] < 0.5  # bf16 really ran, within its tolerance
    results = {(c["name"], c["dtype"]): c["result"] for c in report["parity"]}
    for name in ("router logits", "router top-2 probabilities", "model logits", "verify"):
        assert results[(name, "fp32")] == "OK"
    assert results[("router logits", "bf16")] == results[("model logits", "bf16")] == "OK"
    assert results[("TE layers", "bf16")] == "skipped"  # Transformer Engine needs CUDA

    assert report["tokens_per_sec"] > 0 and report["tflops_per_gpu"] > 0 and 0 < report["mfu"] < 1
    assert report["mor_over_linear"] > 0 and report["peak_memory_mb"] > 0
    assert report["grouped_gemm_off_over_on"] is None and report["calibration_tokens_per_sec"] > 0
    assert report["device"]["type"] == "cpu" and report["size"] == "tiny"
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["megatron_core"]
    assert report["command"].startswith("torchrun [2 processes] -m router_upcycling.selfcheck --device cpu")
    assert [run["world_size"] for run in report["throughput"]] == [1, 2] and report["throughput_world_size"] == 2
    run = report["throughput"][1]
    assert [c["name"] for c in run["configurations"]] == ["mor", "linear"]
    # the recipe's options, less the CUDA-only ones
    assert run["options"]["bf16"] and run["options"]["use_distributed_optimizer"] and run["options"]["overlap_grad_reduce"]
    assert run["options"]["transformer_impl"] == "local" and not run["options"]["moe_grouped_gemm"]

    table = (output / "selfcheck.md").read_text()
    assert "parity passed" in table and "| model logits | bf16 |" in table
    assert "| mor | 1 |" in table and "| linear | 2 |" in table
    assert "MoR / linear step time" in table and "the paper's 41,943,040 tokens" in table
    for line in STAGE_LINES:
        assert line in stdout, stdout


def test_a_failing_parity_check_exits_non_zero(tmp_path, monkeypatch, capsys):
    """A router whose keys changed sign on the device: the router checks fail (the model's logits cannot show it:
    upcycled experts are identical), the report says so, and the exit status is 1."""
    from router_upcycling.selfcheck import cli, parity

    load = parity.device_model

    def with_wrong_router(*args, **kwargs):
        model = load(*args, **kwargs)
        with torch.no_grad():
            model.decoder.layers[0].mlp.router.keys.neg_()
        return model

    monkeypatch.setattr(parity, "device_model", with_wrong_router)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--stages", "parity", "--output", str(tmp_path / "report")])
    assert stopped.value.code == 1
    report = json.loads((tmp_path / "report" / "selfcheck.json").read_text())
    results = {(c["name"], c["dtype"]): c["result"] for c in report["parity"]}
    assert not report["ok"] and report["parity_ok"] is False
    assert results[("router logits", "fp32")] == results[("router logits", "bf16")] == "FAIL"
    assert results[("model logits", "fp32")] == "OK"
    assert "parity FAILED" in (tmp_path / "report" / "selfcheck.md").read_text()
    assert "parity FAILED" in capsys.readouterr().out


def test_bad_input_is_one_line(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    assert_user_error(selfcheck("--output", existing), "exists", "--force")
    assert_user_error(selfcheck("--size", "7b", "--output", tmp_path / "a"), "--size", "7b")
    assert_user_error(selfcheck("--steps", 0, "--output", tmp_path / "b"), "--steps")
    if not torch.cuda.is_available():
        assert_user_error(selfcheck("--device", "cuda", "--output", tmp_path / "c"), "--device cuda", "no CUDA device")
    assert sorted(os.listdir(tmp_path)) == ["existing"]


def test_help_explains_every_flag():
    result = selfcheck("--help")
    for flag in ("--output", "--force", "--device", "--size", "--steps", "--warmup", "--stages", "--peak-flops"):
        assert flag in result.stdout



def test_configurations_that_do_not_fit_together_are_timed_one_after_the_other(monkeypatch):
    """On a GPU the recipe's MoR and linear models may not both fit in memory: building the second runs out of memory,
    and each is then built, timed and freed in turn (here the out-of-memory error is raised for the second model)."""
    from router_upcycling.mcore.parallel import initialize_distributed
    from router_upcycling.selfcheck import speed
    from router_upcycling.selfcheck.sizes import SIZES

    initialize_distributed(seed=0)
    built = []
    original_init = speed.TimedConfiguration.__init__

    def first_fits_alone(self, *args, **kwargs):
        if built:  # a model is alive: the second one does not fit beside it
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        original_init(self, *args, **kwargs)
        built.append(self)
        original_release = self.release

        def release():
            built.remove(self)
            original_release()

        self.release = release

    monkeypatch.setattr(speed.TimedConfiguration, "__init__", first_fits_alone)
    lines = []
    run = speed.throughput(SIZES["tiny"], steps=2, warmup=0, peak_flops=None, report=lines.append)
    assert not run["interleaved"] and any("timed on its own" in note for note in run["notes"])
    assert [c["name"] for c in run["configurations"]] == ["mor", "linear"]
    assert all(len(c["step_times_s"]) == 2 for c in run["configurations"]) and run["mor_over_linear"] > 0
    assert any("timed apart" in line for line in lines)
