import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# the recipes and Slurm scripts the package finds at run time (router_upcycling/resources.py): a source checkout
# reads them in place; a built package carries a copy under router_upcycling/_resources/
SHIPPED = ("configs", "scripts/slurm")


class BuildWithResources(build_py):
    """build_py that copies configs/ and scripts/slurm/ into the built package (so `pip install .` has them)."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        for folder in SHIPPED:
            target = Path(self.build_lib) / "router_upcycling" / "_resources" / folder
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(Path(__file__).parent / folder, target)


# torch: any release megatron-core 0.16 works with (>= 2.6), so that `pip install -e .` keeps the CUDA
# build a cluster image already has (NGC PyTorch's 2.x.0a0+... builds included: pip accepts an installed
# pre-release that satisfies the range). `make setup` installs the CPU build torch==2.13.0 first, so the
# range never makes pip fetch a multi-GB CUDA wheel there. megatron-core 0.17+ needs Python >= 3.12.
setup(
    name="router_upcycling",
    version="0.1.0",
    description="Router Upcycling (Mixture-of-Routers) for Megatron: dense Qwen -> MoE, train, export, evaluate",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["router_upcycling", "router_upcycling.*"]),
    package_data={"router_upcycling": ["eval/tasks/*.yaml"]},
    cmdclass={"build_py": BuildWithResources},
    entry_points={"console_scripts": [
        "router-upcycling-convert = router_upcycling.commands.convert:main",
        "router-upcycling-preprocess = router_upcycling.commands.preprocess:main",
        "router-upcycling-train = router_upcycling.train.cli:main",
        "router-upcycling-eval = router_upcycling.eval.__main__:main",
        "router-upcycling-analyze = router_upcycling.analyze.__main__:main",
        "router-upcycling-compare-results = router_upcycling.commands.compare_results:main",
        "router-upcycling-mirror-eval-data = router_upcycling.commands.mirror_eval_data:main",
        "router-upcycling-paper-matrix = router_upcycling.commands.paper_matrix:main",
        "router-upcycling-paper-tables = router_upcycling.commands.paper_tables:main",
        "router-upcycling-selfcheck = router_upcycling.selfcheck.cli:main",
    ]},
    install_requires=[
        "torch>=2.6,<3",
        "megatron-core>=0.16.1,<0.20",
        "transformers>=5.23,<6",
        "tokenizers>=0.23,<0.24",
        "safetensors>=0.4",
        "datasets>=5.2,<6",
        "psutil>=5.9",  # megatron-core's checkpoint writer needs it but does not declare it
        "tqdm>=4.66",
        "pyyaml>=6",
        "numpy>=1.26",
    ],
    extras_require={
        "eval": ["lm-eval[hf]==0.4.13", "matplotlib>=3.8"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "lm-eval[hf]==0.4.13", "matplotlib>=3.8", "pyarrow>=15"],
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # --tensorboard-dir and --wandb-project (W&B runs offline without WANDB_API_KEY)
        "logging": ["tensorboard>=2.16", "wandb>=0.19"],
    },
)
