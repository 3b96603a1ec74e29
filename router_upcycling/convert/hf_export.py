"""Hugging Face side of export: write a `mor` folder (remote code) or the family's stock MoE folder (Qwen2-MoE).

Both writers take every model weight in the `mor` on-disk naming of docs/checkpoint-format.md
(fused experts `mlp.experts.gate_up_proj` [N, 2I, d] and `mlp.experts.down_proj` [N, d, I], routers
under `mlp.gate.`), check names and shapes against the model they describe, and write a complete folder
into a temporary directory beside the destination that is renamed into place at the end.

Shape legend
    N  experts    I  expert intermediate size    d  hidden size    R  routers    d_r  router dim    K  keys
"""
import json
import os
import shutil
from typing import Callable, Optional, Union

import torch
from safetensors.torch import save_file
from tqdm import tqdm
import transformers
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase
from transformers.utils.hub import convert_file_size_to_int

import router_upcycling.mor as router_math
from router_upcycling.outputs import readable_by_all, staged_output
from router_upcycling.hf import configuration_mor, modeling_mor
from router_upcycling.hf.configuration_mor import MoRRouterConfig
from router_upcycling.settings.architecture import Architecture, ArchitectureError
from router_upcycling.settings.export import ExportError, stock_gate_refusal
from router_upcycling.settings.families import Family, family_named
from router_upcycling.settings.moe import MoESettings
from router_upcycling.settings.routers import resolve

# Keys of the dense config.json that describe the file rather than the architecture.
DENSE_CONFIG_KEYS_NOT_CARRIED = ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype", "_name_or_path")


def mor_auto_map(family: Family) -> dict:
    """config.json's auto_map of a `mor` folder: the family's classes in the files copied beside the weights."""
    prefix = family.mor_prefix
    return {"AutoConfig": f"configuration_mor.{prefix}MoRConfig", "AutoModel": f"modeling_mor.{prefix}MoRModel",
            "AutoModelForCausalLM": f"modeling_mor.{prefix}MoRForCausalLM"}


def mor_causal_lm_class(family: Family) -> type:
    return getattr(modeling_mor, f"{family.mor_prefix}MoRForCausalLM")
ROUTER_PREFIX = "mlp.gate."


# ---------------------------------------------------------------- configs


def _moe_config_kwargs(hf_config: dict, arch: Architecture, moe: MoESettings, dtype: torch.dtype) -> dict:
    """Fields of both formats' configs: the dense architecture plus the family's stock MoE fields (N, k, I)."""
    kwargs = {key: value for key, value in hf_config.items() if key not in DENSE_CONFIG_KEYS_NOT_CARRIED}
    kwargs.update(family_named(arch.family).stock.config_fields(arch, moe.num_experts, moe.topk), dtype=dtype)
    return kwargs


def router_config_fields(arch: Architecture, moe: MoESettings) -> dict:
    """The router fields of a `mor` config (its HF gate, and a Mixture-of-Routers' sizes)."""
    fields = dict(router_type=moe.spec.hf_gate, router_scale=float(moe.router_scale))
    if moe.spec.mixture:
        fields.update(num_routers=moe.num_routers, router_dim=moe.router_dim(arch), num_router_keys=moe.num_keys,
                      router_aggregation=moe.aggregation, router_query_norm=moe.query_norm)
    return fields


def source_architecture(hf_config: dict) -> Architecture:
    try:
        return Architecture.from_hf_config(hf_config)
    except ArchitectureError as err:
        raise ExportError(str(err)) from None


def mor_config(hf_config: dict, moe: MoESettings, dtype: torch.dtype) -> MoRRouterConfig:
    """The `mor` config of an export (qwen2_mor, qwen3_mor, llama_mor): the dense architecture + the family's stock MoE
    fields + the MoE settings of the checkpoint metadata."""
    arch = source_architecture(hf_config)
    family = family_named(arch.family)
    config_class = getattr(configuration_mor, f"{family.mor_prefix}MoRConfig")
    try:
        config = config_class(**_moe_config_kwargs(hf_config, arch, moe, dtype), **router_config_fields(arch, moe))
    except (ValueError, TypeError) as error:
        raise ExportError(f"invalid MoE settings: {error}") from error
    config.architectures = [mor_causal_lm_class(family).__name__]
    config.auto_map = mor_auto_map(family)
    return config


def stock_config(hf_config: dict, moe: MoESettings, dtype: torch.dtype):
    """The family's stock MoE config of an export (linear gate, no shared expert)."""
    arch = source_architecture(hf_config)
    stock = family_named(arch.family).stock
    config = getattr(transformers, stock.config_class)(**_moe_config_kwargs(hf_config, arch, moe, dtype))
    config.architectures = [stock.architecture]
    return config


# ---------------------------------------------------------------- tensors


def expected_mor_shapes(config: MoRRouterConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a `mor` folder holds, read off the model itself (built on the meta device)."""
    with torch.device("meta"):
        model = getattr(modeling_mor, config.architectures[0])(config)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def check_mor_tensors(tensors: dict[str, torch.Tensor], config: MoRRouterConfig) -> None:
    """Raise ExportError unless `tensors` has exactly the names and shapes of the `mor` model `config` describes."""
    expected = expected_mor_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"tensors do not match a {config.router_type} model: missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    wrong = [f"{name} {tuple(tensors[name].shape)} (expected {tuple(shape)})" for name, shape in expected.items() if tensors[name].shape != shape]
    if wrong:
        raise ExportError(f"tensor shapes do not match the configuration: {_few(wrong)}")


def _few(items: list, limit: int = 3) -> str:
    if not items:
        return "none"
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def mixture_linear_gate(router: dict[str, torch.Tensor], moe: MoESettings) -> torch.Tensor:
    """The Mixture-of-Routers' folded gate G = scale * K @ sum_r W_r [N, d] (method.md part 3)."""
    return router_math.fold_to_linear_gate(router["query_weight"].float(), router["keys"].float(), moe.num_experts,
                                           moe.aggregation, float(moe.router_scale))


def weight_linear_gate(router: dict[str, torch.Tensor], moe: MoESettings) -> torch.Tensor:
    """A linear router's gate is its weight [N, d]."""
    return router["weight"]


def folded_gate(tensors: dict[str, torch.Tensor], layer: int, moe: MoESettings, family: Family) -> torch.Tensor:
    """The linear gate [N, d] that routes as layer `layer`'s router does, or ExportError if there is none."""
    refusal = stock_gate_refusal(moe, family)
    if refusal:
        raise ExportError(refusal)
    prefix = f"model.layers.{layer}.{ROUTER_PREFIX}"
    router = {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
    return resolve(moe.spec.linear_gate)(router, moe)


def stock_tensors(tensors: dict[str, torch.Tensor], arch: Architecture, moe: MoESettings) -> dict[str, torch.Tensor]:
    """`mor` tensors -> the per-expert on-disk layout of the family's published MoE checkpoints.

    Fused experts split into per-expert gate [I, d], up [I, d] and down [d, I] projections; the router becomes the
    linear gate [N, d]; the stock model's tensors an upcycled model has no use for are zeros (Qwen2-MoE's shared
    expert of size 0), so loading is complete.
    """
    family = family_named(arch.family)
    stock = family.stock
    out = {name: tensor for name, tensor in tensors.items() if ".mlp." not in name}
    intermediate = arch.ffn_hidden_size
    for layer in range(arch.num_layers):
        source = f"model.layers.{layer}.mlp."
        block = f"model.layers.{layer}.{stock.block}"
        gate_up = tensors[source + "experts.gate_up_proj"]  # [N, 2I, d]
        down = tensors[source + "experts.down_proj"]  # [N, d, I]
        for expert in range(moe.num_experts):
            out[block + stock.expert_gate.format(expert=expert)] = gate_up[expert, :intermediate]
            out[block + stock.expert_up.format(expert=expert)] = gate_up[expert, intermediate:]
            out[block + stock.expert_down.format(expert=expert)] = down[expert]
        out[block + stock.gate] = folded_gate(tensors, layer, moe, family)
        for name, shape in stock.zero_tensors(arch.hidden_size).items():
            out[block + name] = torch.zeros(shape)
    return out


# ---------------------------------------------------------------- files


def write_safetensors(
    tensors: dict[str, torch.Tensor],
    folder: str,
    dtype: torch.dtype,
    max_shard_size: Union[int, str] = "5GB",
    keep_float32: Callable[[str], bool] = lambda name: False,
) -> None:
    """Write `tensors` cast to `dtype` (float32 where `keep_float32(name)`) as one file or as shards plus an index."""
    target_dtypes = {name: torch.float32 if keep_float32(name) else dtype for name in tensors}
    shards = _plan_shards(tensors, target_dtypes, convert_file_size_to_int(max_shard_size))
    if len(shards) == 1:
        filenames = ["model.safetensors"]
    else:
        filenames = [f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors" for index in range(len(shards))]
    for filename, names in tqdm(list(zip(filenames, shards)), desc="writing safetensors", unit="file", disable=None):
        # clone: per-expert views share storage, which safetensors refuses to write
        shard = {name: tensors[name].detach().to("cpu", target_dtypes[name]).contiguous().clone() for name in names}
        save_file(shard, os.path.join(folder, filename), metadata={"format": "pt"})
        readable_by_all(os.path.join(folder, filename))  # safetensors writes 0600; the folder's other files follow the umask
    if len(shards) > 1:
        total_size = sum(tensors[name].numel() * target_dtypes[name].itemsize for name in tensors)
        weight_map = {name: filename for filename, names in zip(filenames, shards) for name in names}
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as file:
            json.dump(index, file, indent=2)


def _plan_shards(tensors: dict[str, torch.Tensor], target_dtypes: dict[str, torch.dtype], max_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut greedily into groups of at most max_bytes (a larger tensor gets its own group)."""
    shards, current, current_bytes = [], [], 0
    for name, tensor in tensors.items():
        size = tensor.numel() * target_dtypes[name].itemsize
        if current and current_bytes + size > max_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def read_tokenizer(tokenizer_dir: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read a tokenizer from {tokenizer_dir}: {error}") from error


def write_generation_config(config, tokenizer_dir: str, folder: str) -> None:
    """The source's generation_config.json when the tokenizer folder has one, else one built from the config."""
    if os.path.isfile(os.path.join(tokenizer_dir, "generation_config.json")):
        generation_config = GenerationConfig.from_pretrained(tokenizer_dir)
    else:
        generation_config = GenerationConfig.from_model_config(config)
    generation_config.save_pretrained(folder)


def copy_mor_code(folder: str) -> None:
    """The config and modeling files, and the REAL router math as `mor.py` (the package's hf/mor.py is a shim)."""
    shutil.copyfile(configuration_mor.__file__, os.path.join(folder, "configuration_mor.py"))
    shutil.copyfile(modeling_mor.__file__, os.path.join(folder, "modeling_mor.py"))
    shutil.copyfile(router_math.__file__, os.path.join(folder, "mor.py"))


def calibration_figure(card: dict) -> str:
    """The calibration tokens the average keys were taken over, and the count asked for when the text ran out first."""
    if "calibration" not in card:
        return "unknown"
    calibration = card["calibration"]
    if calibration is None:
        return "none (router not initialised from attention)"
    used, requested = calibration.get("tokens", "unknown"), calibration.get("requested_tokens")
    if requested is None or requested == used:
        return str(used)
    return f"{used} ({requested} asked for: the calibration text ran out)"


def model_card(card: dict, moe: MoESettings, arch: Architecture, dtype: torch.dtype, remote_code: bool) -> str:
    """README.md: where the model comes from, its router and how it was initialised and trained.

    `card` holds the checkpoint metadata: `source_model`, `calibration` ({"tokens": ..., "requested_tokens": ...}
    or None when no router was calibrated) and `training` ({"iteration": ..., "consumed_tokens": ...}); absent
    entries read "unknown".
    """
    family = family_named(arch.family)
    training = card.get("training") or {}
    rows = [
        ("source model", card.get("source_model", "unknown")),
        ("experts (N)", moe.num_experts),
        ("experts per token (k)", moe.topk),
        ("router", moe.router),
    ]
    if moe.spec.mixture:
        init = (card.get("calibration") or {}).get("router_init")
        rows += [
            *([("router init", init)] if init else []),
            ("routers (R)", moe.num_routers),
            ("router dim (d_r)", moe.router_dim(arch)),
            ("expert keys (K)", moe.num_keys),
            ("aggregation", moe.aggregation),
            ("router scale", moe.router_scale),
            *([("query norm", "in the routers (each head RMS-normalised as the attention does)")] if moe.query_norm else []),
        ]
    rows += [
        ("calibration tokens", calibration_figure(card)),
        ("training iterations", training.get("iteration", "unknown")),
        ("training tokens", training.get("consumed_tokens", "unknown")),
        ("dtype", str(dtype).replace("torch.", "")),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    loading = (
        f"AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # {mor_causal_lm_class(family).__name__}"
        if remote_code
        else f"AutoModelForCausalLM.from_pretrained(path)  # stock {family.stock.architecture}"
    )
    return (
        "---\nlibrary_name: transformers\ntags:\n- mixture-of-experts\n- router-upcycling\n---\n\n"
        "# Router Upcycling mixture-of-experts model\n\n"
        f"A {family.display} model upcycled to a mixture of experts (Router Upcycling, arXiv 2509.00679): every FFN copied "
        "into N experts, routers initialised from the attention heads, then trained with megatron-core.\n\n"
        f"| setting | value |\n|---|---|\n{table}\n\n"
        f"Load with transformers:\n\n```python\nfrom transformers import AutoModelForCausalLM\nmodel = {loading}\n```\n"
    )


def _write_common(folder: str, config, tokenizer: PreTrainedTokenizerBase, tokenizer_dir: str, card: dict,
                  moe: MoESettings, arch: Architecture, dtype: torch.dtype, remote_code: bool) -> None:
    config.save_pretrained(folder)
    write_generation_config(config, tokenizer_dir, folder)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "README.md"), "w") as file:
        file.write(model_card(card, moe, arch, dtype, remote_code))


# ---------------------------------------------------------------- writers


def write_mor_folder(
    tensors: dict[str, torch.Tensor],
    hf_config: dict,
    moe: MoESettings,
    tokenizer_dir: str,
    output_dir: str,
    dtype: torch.dtype = torch.bfloat16,
    card: Optional[dict] = None,
    force: bool = False,
    max_shard_size: Union[int, str] = "5GB",
) -> str:
    """Write a self-contained `mor` folder (loads with `trust_remote_code=True`); returns its path.

    Args:
        tensors: every weight in the `mor` naming of docs/checkpoint-format.md.
        hf_config: the dense source model's config.json as a dict.
        moe: the MoE settings of router_upcycling.json.
        tokenizer_dir: folder with the source tokenizer (and optionally its generation_config.json).
        output_dir: destination; replaced only with `force`, and only after everything is written.
        dtype: torch.bfloat16 or torch.float32 for the weights; router weights stay float32.
        card: checkpoint metadata for the model card (source_model, calibration, training).
        max_shard_size: largest safetensors file, e.g. "5GB" or a byte count.
    """
    arch = source_architecture(hf_config)
    config = mor_config(hf_config, moe, dtype)
    check_mor_tensors(tensors, config)
    tokenizer = read_tokenizer(tokenizer_dir)
    with staged_output(output_dir, force) as folder:
        write_safetensors(tensors, folder, dtype, max_shard_size, keep_float32=lambda name: f".{ROUTER_PREFIX}" in name)
        _write_common(folder, config, tokenizer, tokenizer_dir, card or {}, moe, arch, dtype, remote_code=True)
        copy_mor_code(folder)
    return os.path.abspath(output_dir)


def write_stock_folder(
    tensors: dict[str, torch.Tensor],
    hf_config: dict,
    moe: MoESettings,
    tokenizer_dir: str,
    output_dir: str,
    dtype: torch.dtype = torch.bfloat16,
    card: Optional[dict] = None,
    force: bool = False,
    max_shard_size: Union[int, str] = "5GB",
) -> str:
    """Write the family's stock MoE folder (Qwen2-MoE, Qwen3-MoE or Mixtral; no remote code); returns its path.

    Same arguments as `write_mor_folder`. The router must fold to a linear gate (`linear`, `switch` as top-1
    linear, `mor` with `sum` aggregation and one key per expert); otherwise ExportError says why.
    """
    arch = source_architecture(hf_config)
    check_mor_tensors(tensors, mor_config(hf_config, moe, dtype))
    config = stock_config(hf_config, moe, dtype)
    weights = stock_tensors(tensors, arch, moe)
    tokenizer = read_tokenizer(tokenizer_dir)
    with staged_output(output_dir, force) as folder:
        write_safetensors(weights, folder, dtype, max_shard_size)
        _write_common(folder, config, tokenizer, tokenizer_dir, card or {}, moe, arch, dtype, remote_code=False)
    return os.path.abspath(output_dir)
