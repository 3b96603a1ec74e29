"""Shared by the tests of the HF `mor` model and exporter: upcycled tensors from a tiny dense Qwen2, and
loading export folders in a fresh interpreter where this project's package cannot be imported."""
import json
import os
import subprocess
import sys
import textwrap
from typing import Optional

import torch
from safetensors.torch import load_file



def moe_block(router: str, num_experts: int = 4, topk: int = 2, num_routers: int = 4, hidden_size: int = 64, aggregation: str = "sum") -> dict:
    """The "moe" block of router_upcycling.json for a tiny model."""
    moe = {"num_experts": num_experts, "topk": 1 if router == "switch" else topk, "router": router, "router_scale": 1.0}
    if router == "mor":
        moe.update(
            num_routers=num_routers,
            router_dim=hidden_size // num_routers,
            num_keys=max(num_routers, num_experts),
            aggregation=aggregation,
        )
    return moe


def dense_config(dense_dir: str) -> dict:
    with open(os.path.join(dense_dir, "config.json")) as file:
        return json.load(file)


def upcycled_tensors(dense_dir: str, moe: dict, seed: int = 0, expert_noise: float = 0.0, router_std: float = 0.3) -> dict[str, torch.Tensor]:
    """`mor`-named tensors of the dense model upcycled: every expert a copy of the dense FFN (plus optional
    noise, different per expert), random routers."""
    generator = torch.Generator().manual_seed(seed)
    dense = load_file(os.path.join(dense_dir, "model.safetensors"))
    config = dense_config(dense_dir)
    hidden, num_experts = config["hidden_size"], moe["num_experts"]
    tensors = {name: tensor for name, tensor in dense.items() if ".mlp." not in name}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp."
        gate_up = torch.cat([dense[prefix + "gate_proj.weight"], dense[prefix + "up_proj.weight"]])  # [2I, d]
        down = dense[prefix + "down_proj.weight"]  # [d, I]
        gate_up = gate_up.expand(num_experts, *gate_up.shape).clone()
        down = down.expand(num_experts, *down.shape).clone()
        gate_up += expert_noise * torch.randn(gate_up.shape, generator=generator)
        down += expert_noise * torch.randn(down.shape, generator=generator)
        tensors[prefix + "experts.gate_up_proj"] = gate_up
        tensors[prefix + "experts.down_proj"] = down
        for name, shape in router_shapes(moe, hidden).items():
            tensors[prefix + "gate." + name] = router_std * torch.randn(shape, generator=generator)
    return tensors


def router_shapes(moe: dict, hidden: int) -> dict[str, tuple]:
    if moe["router"] == "mor":
        return {"query_weight": (moe["num_routers"], moe["router_dim"], hidden), "keys": (moe["num_keys"], moe["router_dim"])}
    if moe["router"] == "mlp":
        return {"fc1.weight": (hidden, hidden), "fc2.weight": (moe["num_experts"], hidden)}
    if moe["router"] == "locmoe":
        return {}  # GrAP has no parameters
    return {"weight": (moe["num_experts"], hidden)}


FRESH_LOADER = textwrap.dedent(
    """
    import sys

    class BlockProjectPackage:
        # the export must load with transformers alone, as on a machine without this project
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "router_upcycling":
                raise ImportError("router_upcycling is blocked in this interpreter")

    sys.meta_path.insert(0, BlockProjectPackage())
    import torch
    from transformers import AutoModelForCausalLM

    folders, input_ids, output = sys.argv[1:-2], torch.load(sys.argv[-2]), sys.argv[-1]
    logits = {}
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        assert "router_upcycling" not in sys.modules
        with torch.no_grad():
            logits[folder] = model(input_ids).logits
    torch.save(logits, output)
    """
)


def logits_in_fresh_interpreter(folders: list[str], input_ids: torch.Tensor, work_dir: str, env: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Load each folder with AutoModelForCausalLM(trust_remote_code=True) in `python -I`, run from a temp cwd
    with the project's package blocked; return the logits of `input_ids` per folder."""
    script = os.path.join(work_dir, "load_fresh.py")
    inputs, output = os.path.join(work_dir, "input_ids.pt"), os.path.join(work_dir, "logits.pt")
    with open(script, "w") as file:
        file.write(FRESH_LOADER)
    torch.save(input_ids, inputs)
    run_env = {**os.environ, "HF_HOME": os.path.join(work_dir, "hf_home"), "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-I", script, *folders, inputs, output], cwd=work_dir, env=run_env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output)
