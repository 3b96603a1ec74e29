from setuptools import find_packages, setup

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
