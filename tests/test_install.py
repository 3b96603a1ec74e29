"""`pip install .` (not editable) gives a package that works outside the source tree: its recipes and Slurm
scripts travel inside it, and the console scripts are declared."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_an_installed_copy_finds_its_recipes_scripts_and_commands(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    entry_points = next(site.glob("router_upcycling-*.dist-info")) / "entry_points.txt"
    assert "router-upcycling-convert = router_upcycling.commands.convert:main" in entry_points.read_text()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("ROUTER_UPCYCLING_RESOURCES", None)
    probe = ("import router_upcycling, router_upcycling.resources as r; from router_upcycling.paper.recipes import load_recipe; "
             "print(router_upcycling.__file__); print(r.resource_path('scripts/slurm/launch.sh')); "
             "print(load_recipe('mor').upcycle['router']); print(r.source_checkout())")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    package, launch, router, checkout = result.stdout.split()
    assert package.startswith(str(site)) and launch.startswith(str(site)) and Path(launch).is_file()
    assert router == "mor" and checkout == "None"
    help_text = subprocess.run([str(site / "bin" / "router-upcycling-convert"), "upcycle", "--help"], capture_output=True,
                               text=True, env=env, cwd=tmp_path, timeout=120)
    assert help_text.returncode == 0 and "--num-routers" in help_text.stdout, help_text.stderr
