from setuptools import find_packages, setup

# torch is pinned to the CPU build installed first by `make setup`; a looser range would let pip
# pull a multi-GB CUDA build. megatron-core 0.17+ needs Python >= 3.12.
setup(
    name="router_upcycling",
    version="0.1.0",
    description="Router Upcycling (Mixture-of-Routers) for Megatron: dense Qwen -> MoE, train, export, evaluate",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["router_upcycling", "router_upcycling.*"]),
    package_data={"router_upcycling": ["eval/tasks/*.yaml"]},
    install_requires=[
        "torch==2.13.0",
        "megatron-core>=0.16.1,<0.17",
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
        "test": ["pytest>=8", "lm-eval[hf]==0.4.13", "matplotlib>=3.8", "pyarrow>=15"],
        "gpu": ["transformer-engine[pytorch]>=2.0"],
    },
)
