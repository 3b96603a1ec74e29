"""tools/mirror_eval_data.py where the Hugging Face hub cannot be reached: one line at once, nothing written."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("hub", ["HF_HUB_OFFLINE", "unreachable endpoint"])
def test_mirror_without_the_hub_refuses_in_one_line(tmp_path, hub):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if hub != "HF_HUB_OFFLINE":
        env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")  # the discard port: nothing listens
    output = tmp_path / "mirror"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "mirror_eval_data.py"), "--output", str(output),
                             "--tasks", "copa"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "needs the Hugging Face hub" in result.stderr and "copy --output" in result.stderr
    assert "write_sample_mirror" in result.stderr
    assert os.listdir(tmp_path) == []


def test_mirror_dry_run_needs_no_hub(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "mirror_eval_data.py"), "--output",
                             str(tmp_path / "mirror"), "--tasks", "copa", "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "aps/super_glue" in result.stdout and os.listdir(tmp_path) == []
