"""The HF exporter: `mor` folders load with transformers alone and reproduce the dense model, stock Qwen2-MoE
folders agree with them, and bad input is refused without touching anything (CPU, float32 unless noted)."""
import json
import os

import pytest

from router_upcycling.outputs import OutputExistsError
import torch
from hf_test_support import dense_config, logits_in_fresh_interpreter, moe_block, upcycled_tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from router_upcycling.convert.hf_export import ExportError, write_mor_folder, write_stock_folder
from router_upcycling.errors import SettingError
from router_upcycling.settings.moe import MoESettings
from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2

SEQUENCE = 16
ROUTERS = {
    "mor": dict(router="mor"),
    "mor-max": dict(router="mor", aggregation="max"),
    "mor-multikey-R16-N8": dict(router="mor", num_routers=16, num_experts=8),
    "mor-R2-N4": dict(router="mor", num_routers=2),
    "linear": dict(router="linear"),
    "switch": dict(router="switch"),
    "mlp": dict(router="mlp"),
    "locmoe": dict(router="locmoe"),
}
FOLDABLE = ["mor", "mor-R2-N4", "linear", "switch"]
NOT_FOLDABLE = {"mor-max": "aggregation", "mor-multikey-R16-N8": "keys each", "mlp": "'mlp' router", "locmoe": "ReLU is not linear"}


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory):
    """Two tiny dense Qwen2 models: multi-head attention with tied embeddings, grouped-query without."""
    root = tmp_path_factory.mktemp("dense")
    return {
        "mha-tied": make_dense_qwen2(str(root / "mha-tied"), seed=1, tied=True),
        "gqa-untied": make_dense_qwen2(str(root / "gqa-untied"), seed=2, num_kv_heads=2, tied=False),
    }


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(1, 400, (2, SEQUENCE), generator=torch.Generator().manual_seed(0))


def export(kind: str, dense_dir: str, output_dir, moe: dict, dtype=torch.float32, **kwargs) -> str:
    tensors = kwargs.pop("tensors", None) or upcycled_tensors(dense_dir, moe, expert_noise=kwargs.pop("expert_noise", 0.0))
    writer = write_mor_folder if kind == "mor" else write_stock_folder
    return writer(tensors, dense_config(dense_dir), MoESettings.from_dict(moe), dense_dir, str(output_dir), dtype=dtype, **kwargs)


def dense_logits(dense_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)(input_ids).logits


def load(folder: str, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs)


def test_mor_exports_reproduce_dense_in_fresh_interpreter(dense_models, input_ids, tmp_path):
    """Experts are copies of the dense FFN and top-k weights sum to 1: every router gives the dense function."""
    folders = {}
    for dense_name, dense_dir in dense_models.items():
        for router_name, router in ROUTERS.items():
            folders[(dense_name, router_name)] = export("mor", dense_dir, tmp_path / f"{dense_name}-{router_name}", moe_block(**router))
    logits = logits_in_fresh_interpreter(list(folders.values()), input_ids, str(tmp_path))
    for (dense_name, router_name), folder in folders.items():
        expected = dense_logits(dense_models[dense_name], input_ids)
        torch.testing.assert_close(logits[folder], expected, atol=1e-4, rtol=0, msg=f"{dense_name} {router_name}")


def test_mor_folder_is_self_contained(dense_models, tmp_path):
    folder = export("mor", dense_models["mha-tied"], tmp_path / "mor", moe_block("mor"), card={"source_model": "tiny", "calibration": {"tokens": 1234}, "training": {"iteration": 56}})
    for name in ("config.json", "configuration_mor.py", "modeling_mor.py", "mor.py", "model.safetensors", "generation_config.json", "README.md"):
        assert os.path.isfile(os.path.join(folder, name)), name
    with open(os.path.join(folder, "mor.py")) as file:
        assert "def mor_expert_logits" in file.read()  # the real router math, not the package's shim
    with open(os.path.join(folder, "config.json")) as file:
        config = json.load(file)
    assert config["model_type"] == "qwen2_mor" and config["auto_map"]["AutoModelForCausalLM"] == "modeling_mor.Qwen2MoRForCausalLM"
    assert config["shared_expert_intermediate_size"] == 0 and config["norm_topk_prob"] is True
    with open(os.path.join(folder, "README.md")) as file:
        card = file.read()
    assert "| source model | tiny |" in card and "| calibration tokens | 1234 |" in card and "| training iterations | 56 |" in card
    assert "| routers (R) | 4 |" in card
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: os.stat(os.path.join(folder, name)).st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask), modes  # safetensors alone would write 0600


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the stock model's empty shared expert
@pytest.mark.parametrize("router_name", FOLDABLE)
@pytest.mark.parametrize("dense_name", ["mha-tied", "gqa-untied"])
def test_qwen2_moe_export_matches_mor_export(dense_models, input_ids, tmp_path, dense_name, router_name):
    """Experts perturbed differently, random routers: the folded stock checkpoint computes the same logits."""
    dense_dir, moe = dense_models[dense_name], moe_block(**ROUTERS[router_name])
    tensors = upcycled_tensors(dense_dir, moe, seed=3, expert_noise=0.05)
    mor_model = load(export("mor", dense_dir, tmp_path / "mor", moe, tensors=tensors), dtype=torch.float32)
    stock_model, info = AutoModelForCausalLM.from_pretrained(
        export("qwen2_moe", dense_dir, tmp_path / "stock", moe, tensors=tensors), dtype=torch.float32, output_loading_info=True
    )
    assert type(stock_model).__name__ == "Qwen2MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        mor_logits, stock_logits = mor_model(input_ids).logits, stock_model(input_ids).logits
    assert (mor_logits - dense_logits(dense_dir, input_ids)).abs().max() > 1e-2  # the perturbation is visible
    torch.testing.assert_close(stock_logits, mor_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("router_name", list(NOT_FOLDABLE))
def test_routers_without_linear_form_refuse_qwen2_moe(dense_models, tmp_path, router_name):
    with pytest.raises(ExportError, match=NOT_FOLDABLE[router_name]):
        export("qwen2_moe", dense_models["mha-tied"], tmp_path / "stock", moe_block(**ROUTERS[router_name]))
    assert os.listdir(tmp_path) == []


def test_generate_with_cache_equals_without(dense_models, tmp_path):
    dense_dir = dense_models["gqa-untied"]
    model = load(export("mor", dense_dir, tmp_path / "mor", moe_block("mor"), expert_noise=0.05), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "mor")
    prompt = tokenizer(SAMPLE_TEXT[0], return_tensors="pt")
    cached = model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape[1] == prompt["input_ids"].shape[1] + 8
    assert torch.equal(cached, uncached)


def test_tokenizer_round_trips(dense_models, tmp_path):
    dense_dir = dense_models["mha-tied"]
    folder = export("mor", dense_dir, tmp_path / "mor", moe_block("linear"))
    source, exported = AutoTokenizer.from_pretrained(dense_dir), AutoTokenizer.from_pretrained(folder)
    for text in SAMPLE_TEXT:
        ids = exported(text)["input_ids"]
        assert ids == source(text)["input_ids"] and exported.decode(ids) == text
    assert exported.eos_token == source.eos_token and exported.pad_token == source.pad_token


def test_sharded_export_loads(dense_models, input_ids, tmp_path):
    dense_dir, moe = dense_models["gqa-untied"], moe_block("mor")
    tensors = upcycled_tensors(dense_dir, moe, seed=4, expert_noise=0.05)
    whole = export("mor", dense_dir, tmp_path / "whole", moe, tensors=tensors)
    sharded = export("mor", dense_dir, tmp_path / "sharded", moe, tensors=tensors, max_shard_size="200KB")
    with open(os.path.join(sharded, "model.safetensors.index.json")) as file:
        shard_files = set(json.load(file)["weight_map"].values())
    assert len(shard_files) > 1 and all(os.path.isfile(os.path.join(sharded, name)) for name in shard_files)
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
    with torch.no_grad():
        expected = load(whole, dtype=torch.float32)(input_ids).logits
        torch.testing.assert_close(load(sharded, dtype=torch.float32)(input_ids).logits, expected, atol=0, rtol=0)


def test_existing_output_is_refused_untouched_and_replaced_with_force(dense_models, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="exists; pass --force"):
        export("mor", dense_models["mha-tied"], output, moe_block("mor"))
    assert os.listdir(output) == ["keep.txt"] and (output / "keep.txt").read_text() == "precious"
    export("mor", dense_models["mha-tied"], output, moe_block("mor"), force=True)
    assert "config.json" in os.listdir(output) and "keep.txt" not in os.listdir(output)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging or retired folders left behind


def drop(tensors: dict, name: str) -> dict:
    return {key: value for key, value in tensors.items() if key != name}


def reshape(tensors: dict, name: str) -> dict:
    return {**tensors, name: tensors[name][:-1]}


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda t, c, d: (drop(t, "model.layers.1.mlp.gate.keys"), c, d), "missing model.layers.1.mlp.gate.keys"),
        (lambda t, c, d: ({**t, "lm_head.weight": t["model.embed_tokens.weight"]}, c, d), "unexpected lm_head.weight"),
        (lambda t, c, d: (reshape(t, "model.layers.0.mlp.experts.down_proj"), c, d), "shapes"),
        (lambda t, c, d: (t, {**c, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, d), "^unsupported architecture GPT2LMHeadModel"),
        (lambda t, c, d: (t, c, "/nonexistent/tokenizer"), "tokenizer"),
    ],
    ids=["missing-tensor", "tied-lm-head", "wrong-shape", "unsupported-family", "no-tokenizer"],
)
def test_bad_input_is_refused_and_writes_nothing(dense_models, tmp_path, spoil, message):
    dense_dir, moe = dense_models["mha-tied"], moe_block("mor")
    tensors, config, tokenizer_dir = spoil(upcycled_tensors(dense_dir, moe), dense_config(dense_dir), dense_dir)
    assert_refused(tensors, config, moe, tokenizer_dir, tmp_path, message)


@pytest.mark.parametrize(
    "moe_change, message",
    [({"router": "gru"}, "router 'gru' is not a router"), ({"aggregation": "mean"}, "aggregation 'mean' is not")],
    ids=["unknown-router", "unknown-aggregation"],
)
def test_bad_moe_settings_are_refused_before_any_writer(moe_change, message):
    with pytest.raises(SettingError, match=message):
        MoESettings.from_dict({**moe_block("mor"), **moe_change})


def assert_refused(tensors, config, moe, tokenizer_dir, tmp_path, message):
    output = tmp_path / "exports"
    with pytest.raises(ExportError, match=message):
        write_mor_folder(tensors, config, MoESettings.from_dict(moe), tokenizer_dir, str(output / "mor"), dtype=torch.float32)
    assert not output.exists() or os.listdir(output) == []


def test_bf16_export_routes_like_float32(dense_models, tmp_path):
    dense_dir, moe = dense_models["gqa-untied"], moe_block("mor")
    tensors = upcycled_tensors(dense_dir, moe, seed=5, expert_noise=0.05)
    models = {
        dtype: load(export("mor", dense_dir, tmp_path / str(dtype), moe, dtype=dtype, tensors=tensors))
        for dtype in (torch.float32, torch.bfloat16)
    }
    assert models[torch.bfloat16].model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert models[torch.bfloat16].model.layers[0].mlp.gate.query_weight.dtype == torch.float32
    input_ids = torch.randint(1, 400, (8, 64), generator=torch.Generator().manual_seed(1))
    chosen = {}
    with torch.no_grad():
        for dtype, model in models.items():
            router_logits = model(input_ids, output_router_logits=True).router_logits
            chosen[dtype] = [logits.topk(moe["topk"], dim=-1).indices.sort(dim=-1).values for logits in router_logits]
    agreement = torch.cat([(a == b).all(-1) for a, b in zip(chosen[torch.float32], chosen[torch.bfloat16])]).float().mean()
    assert agreement >= 0.99, agreement


def test_lm_eval_scores_mor_export(dense_models, tmp_path):
    """lm-eval's `--model hf` path (HFLM with trust_remote_code) scores and generates with the export."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    dense_dir = dense_models["mha-tied"]
    folder = export("mor", dense_dir, tmp_path / "mor", moe_block("mor"))
    lm = HFLM(pretrained=folder, trust_remote_code=True, device="cpu", batch_size=2, dtype="float32")
    requests = [
        Instance("loglikelihood", {}, ("The quick brown fox", " jumps over the lazy dog."), 0),
        Instance("loglikelihood", {}, ("12 + 30 =", " 42"), 1),
    ]
    scores = lm.loglikelihood(requests)
    dense = HFLM(pretrained=dense_dir, device="cpu", batch_size=2, dtype="float32").loglikelihood(requests)
    for (logprob, _), (dense_logprob, _) in zip(scores, dense):
        assert logprob == pytest.approx(dense_logprob, abs=1e-3)
    generated = lm.generate_until([Instance("generate_until", {}, ("def add(a, b):", {"until": ["\n\n"], "max_gen_toks": 8}), 0)])
    assert len(generated) == 1 and isinstance(generated[0], str)
