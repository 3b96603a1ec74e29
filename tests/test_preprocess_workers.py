"""tools/preprocess_data.py --workers 2 stopped mid-run by SIGINT (Ctrl-C reaches the whole process group) or
SIGTERM (to the group, or to the command alone): one line on a line of its own, 128 + the signal, no staging
folder, and no tokenizer worker left, not even one the pool would fork to replace a stopped one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from router_upcycling.cli import stopped_message
from router_upcycling.testing import SAMPLE_TEXT, train_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny tokenizer and a corpus that takes it some seconds to tokenize."""
    root = tmp_path_factory.mktemp("preprocess_workers")
    train_tokenizer().save_pretrained(str(root / "tokenizer"))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{SAMPLE_TEXT[i % len(SAMPLE_TEXT)]} {i}"}) + "\n"
                              for i in range(100_000)))
    return root


def session_processes(session: int):
    """The processes of a session: pool workers leave their process group, not their session."""
    alive = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except (OSError, psutil.Error):
            pass
    return alive


@pytest.mark.parametrize("target, signum", [pytest.param("group", signal.SIGINT, id="group-SIGINT"),
                                            pytest.param("group", signal.SIGTERM, id="group-SIGTERM"),
                                            pytest.param("command", signal.SIGTERM, id="command-SIGTERM")])
def test_preprocess_workers_stopped_leave_no_process(inputs, tmp_path, target, signum):
    output = tmp_path / "output"
    output.mkdir()
    command = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(inputs / "corpus.jsonl"),
               "--tokenizer-model", str(inputs / "tokenizer"), "--output-prefix", str(output / "data"),
               "--workers", "2", "--log-interval", "100"]
    # stderr to a file: a worker left alive would hold a pipe open and keep communicate() waiting
    with open(tmp_path / "stderr", "w") as stderr_file:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr_file, start_new_session=True)
    try:
        def tokenizing():  # the workers are up and the first documents are in the staging folder
            staged = [path for folder in output.glob(".preprocess-*") for path in folder.glob("*.bin")]
            return any(path.stat().st_size for path in staged) and len(psutil.Process(process.pid).children()) == 2

        deadline = time.monotonic() + 120
        while not tokenizing():
            assert process.poll() is None, f"finished before it could be stopped: {(tmp_path / 'stderr').read_text()}"
            assert time.monotonic() < deadline, "never started tokenizing"
            time.sleep(0.02)
        if target == "group":
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        process.wait(timeout=60)
        deadline = time.monotonic() + 5
        while session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = session_processes(process.pid)
        assert not left, f"processes left behind: {[p.cmdline() for p in left]}"
    finally:
        for leftover in session_processes(process.pid):
            leftover.kill()
    stderr = (tmp_path / "stderr").read_text()
    assert process.returncode == 128 + signum, stderr[-3000:]
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("tokenizing")] == [stopped_message(signum)], stderr[-3000:]
    assert stopped_message(signum) in stderr.split("\n")  # on a line of its own, not after the progress bar
    assert os.listdir(output) == []
