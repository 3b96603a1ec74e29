"""Every user-facing command fails the same way on a bad path: one `error:` line on stderr, exit status 2, no
traceback -- and it says so before importing the heavy libraries, so a refusal is immediate. The heavy libraries
are blocked in the command's interpreter: a command that imported one before checking its input would crash."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "megatron", "lm_eval")
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, os, sys

    BLOCKED = set(os.environ["BLOCKED_MODULES"].split(","))

    class Blocked(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # finding a module is allowed (importlib.util.find_spec locates lm-eval's task folder); importing it is not
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, self)

        def create_module(self, spec):
            raise ImportError(f"{spec.name} is blocked: the command imported it before checking its input")

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Blocked())
    """
)


def tool(name):
    return [sys.executable, str(REPO / "tools" / name)]


def module(name):
    return [sys.executable, "-m", name]


MISSING = "/nonexistent/router-upcycling-test"
# (command line, fragment of the one error line, modules blocked while it runs)
CASES = {
    "upcycle": (tool("convert_checkpoint.py") + ["upcycle", "--hf-model", MISSING, "--output", "{tmp}/out"],
                "model folder not found", HEAVY),
    "verify": (tool("convert_checkpoint.py") + ["verify", "--hf-model", MISSING, "--checkpoint", MISSING],
               "model folder not found", HEAVY),
    "export": (tool("convert_checkpoint.py") + ["export", "--checkpoint", MISSING, "--output", "{tmp}/out", "--format", "mor"],
               "checkpoint folder not found", HEAVY),
    "preprocess": (tool("preprocess_data.py") + ["--input", MISSING, "--tokenizer-model", MISSING, "--output-prefix", "{tmp}/d"],
                   "input not found", HEAVY),
    "train": (module("router_upcycling.train") + ["--pretrained-checkpoint", MISSING, "--data-path", MISSING, "--train-iters", "1"],
              "checkpoint folder not found", HEAVY),
    "eval": (module("router_upcycling.eval") + ["--model", MISSING], "not a Hugging Face model folder", HEAVY),
    "analyze": (module("router_upcycling.analyze") + ["load", "--model", MISSING, "--data", MISSING, "--output", "{tmp}/a"],
                "not a Hugging Face model folder", HEAVY),
    "compare_results": (tool("compare_results.py") + [MISSING + ".json"], "not found", HEAVY),
    "mirror_eval_data": (tool("mirror_eval_data.py") + ["--output", "{tmp}", "--tasks", "obqa"], "exists; pass --force", HEAVY),
    "paper_matrix": (tool("paper_matrix.py") + ["--runs", "mor", "--dense-model", f"Qwen1.5-0.5B={MISSING}",
                                                "--calib-data", MISSING, "--data-path", MISSING, "--output-root", "{tmp}/runs",
                                                "--eval-data-dir", MISSING, "--routing-domain", f"a={MISSING}"],
                     MISSING, HEAVY),
    "paper_tables": (tool("paper_tables.py") + ["--output-root", MISSING, "--output", "{tmp}/t"], "not a folder", HEAVY),
    "selfcheck": (module("router_upcycling.selfcheck") + ["--output", "{tmp}", "--device", "cpu"], "exists; pass --force",
                  ("transformers", "megatron", "lm_eval")),
    "bad flag": (tool("convert_checkpoint.py") + ["upcycle", "--hf-model", MISSING, "--output", "x", "--num-experts", "many"],
                 "invalid int value", HEAVY),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_path_is_one_line_and_status_2_before_any_heavy_import(name, tmp_path):
    argv, fragment, blocked = CASES[name]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "BLOCKED_MODULES": ",".join(blocked)}
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([part.format(tmp=work) for part in argv], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert os.listdir(work) == [], "a refused command left files behind"
