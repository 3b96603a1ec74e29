"""upcycle then verify on tiny random Qwen2 models: the MoE computes the dense model's logits."""
import json
import os

import pytest
import torch

from router_upcycling.convert.upcycle import CalibrationSettings, upcycle
from router_upcycling.convert.verify import load_megatron_model, verify
from router_upcycling.settings.moe import MoESettings
from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2
from router_upcycling.text import read_documents, token_chunks


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXT))
    return str(path)


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {
        "mha_tied": make_dense_qwen2(str(root / "mha_tied"), num_heads=8, num_kv_heads=8, tied=True, seed=1),
        "gqa_untied": make_dense_qwen2(str(root / "gqa_untied"), num_heads=8, num_kv_heads=2, tied=False, seed=2),
        "gqa_tied": make_dense_qwen2(str(root / "gqa_tied"), num_heads=8, num_kv_heads=4, tied=True, seed=3),
    }


CASES = [
    ("mha_tied", MoESettings(router="mor", num_experts=4, topk=2, num_routers=4)),
    ("gqa_untied", MoESettings(router="mor", num_experts=4, topk=2, num_routers=8, aggregation="max")),
    ("gqa_tied", MoESettings(router="mor", num_experts=8, topk=2, num_routers=2)),
    ("mha_tied", MoESettings(router="mor", num_experts=4, topk=1, num_routers=16)),
    ("gqa_untied", MoESettings(router="linear", num_experts=4, topk=2)),
    ("mha_tied", MoESettings(router="mlp", num_experts=4, topk=2)),
    ("gqa_tied", MoESettings(router="switch", num_experts=4)),
    ("gqa_untied", MoESettings(router="locmoe", num_experts=4, topk=2)),
    ("mha_tied", MoESettings(router="locmoe", num_experts=8, topk=1)),
]


@pytest.mark.parametrize("model_name,moe", CASES, ids=lambda c: c if isinstance(c, str) else f"{c.router}-R{c.num_routers}-N{c.num_experts}-k{c.topk}-{c.aggregation}")
def test_upcycled_model_computes_dense_logits(tmp_path, dense_models, calib_file, model_name, moe):
    calib = CalibrationSettings(files=[calib_file], tokens=200, seq_length=16)
    checkpoint = upcycle(dense_models[model_name], str(tmp_path / "moe"), moe, calib, dtype="fp32", progress=False)
    report = verify(dense_models[model_name], checkpoint)
    assert report.max_abs_diff <= 1e-4
    assert report.top1_agreement == 1.0
    metadata = json.loads(open(os.path.join(checkpoint, "router_upcycling.json")).read())
    assert metadata["moe"]["router"] == moe.router and metadata["hf_config"]["num_hidden_layers"] == 2
    assert os.path.isfile(os.path.join(checkpoint, "tokenizer", "tokenizer.json"))


def test_mor_router_weights_come_from_attention(tmp_path, dense_models, calib_file):
    """The checkpoint's router queries are the dense q_proj head blocks (grouped), keys are finite and distinct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    moe = MoESettings(router="mor", num_experts=8, topk=2, num_routers=8)
    calib = CalibrationSettings(files=[calib_file], tokens=300, seq_length=32)
    checkpoint = upcycle(dense_models["mha_tied"], str(tmp_path / "moe"), moe, calib, dtype="fp32", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(dense_models["mha_tied"])
    available = sum(map(len, token_chunks(read_documents(calib_file), tokenizer, 10**9, 32)))
    assert available < 300  # the one-page calibration file runs out: the checkpoint records what was used
    metadata = json.loads(open(os.path.join(checkpoint, "router_upcycling.json")).read())
    assert metadata["calibration"] == {"tokens": available, "requested_tokens": 300, "seq_length": 32, "files": [calib_file],
                                       "router_init": "paper"}  # MHA: auto means the paper's init
    model, _ = load_megatron_model(checkpoint)
    dense = AutoModelForCausalLM.from_pretrained(dense_models["mha_tied"], dtype=torch.float32)
    for layer in range(2):
        router = model.decoder.layers[layer].mlp.router
        q_rows = dense.model.layers[layer].self_attn.q_proj.weight.detach()  # [H*d_h, d]
        head_dim = q_rows.shape[0] // 8
        assert router.query_weight.dtype == torch.float32 and router.query_weight.shape == (8, head_dim, 64)
        stored = {tuple(block.flatten()[:4].tolist()) for block in router.query_weight}
        heads = {tuple(q_rows[h * head_dim:(h + 1) * head_dim].flatten()[:4].tolist()) for h in range(8)}
        assert stored == heads
        assert torch.isfinite(router.keys).all() and torch.unique(router.keys, dim=0).shape[0] == 8


def test_bf16_checkpoint_holds_the_bf16_dense_model(tmp_path, dense_models, calib_file):
    """A bf16 checkpoint of an fp32 model is exactly the bf16-rounded dense model (verify rounds likewise)."""
    moe = MoESettings(router="linear", num_experts=4, topk=2)
    checkpoint = upcycle(dense_models["gqa_untied"], str(tmp_path / "moe"), moe, CalibrationSettings(), dtype="bf16", progress=False)
    report = verify(dense_models["gqa_untied"], checkpoint)
    assert report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0


def test_sharded_safetensors_input(tmp_path, dense_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = str(tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(dense_models["gqa_untied"]).save_pretrained(sharded, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(dense_models["gqa_untied"]).save_pretrained(sharded)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    checkpoint = upcycle(sharded, str(tmp_path / "moe"), MoESettings(router="linear", num_experts=4), CalibrationSettings(),
                         dtype="fp32", progress=False)
    assert verify(sharded, checkpoint).max_abs_diff <= 1e-4


def test_experts_that_start_with_identical_keys_are_named_and_counted(tmp_path, dense_models, calib_file, caplog):
    """R < N duplicates every key: expert i and i + R hold the same key in every layer (docs/method.md part 2)."""
    calib = CalibrationSettings(files=[calib_file], tokens=200, seq_length=16)
    with caplog.at_level("WARNING", logger="router_upcycling.upcycle"):
        checkpoint = upcycle(dense_models["mha_tied"], str(tmp_path / "moe"), MoESettings(num_experts=8, num_routers=4),
                             calib, dtype="fp32", progress=False)
    warnings = [r.getMessage() for r in caplog.records if "identical keys" in r.getMessage()]
    assert warnings[0].startswith("layer 0: experts 0, 4; 1, 5; 2, 6; 3, 7 hold identical keys") and len(warnings) == 2
    metadata = json.loads(open(os.path.join(checkpoint, "router_upcycling.json")).read())
    assert metadata["tied_experts"] == [8, 8]
    untied = upcycle(dense_models["mha_tied"], str(tmp_path / "untied"), MoESettings(num_experts=8, num_routers=8), calib,
                     dtype="fp32", progress=False)
    assert json.loads(open(os.path.join(untied, "router_upcycling.json")).read())["tied_experts"] == [0, 0]


def test_qk_norm_sides_apply_to_qk_norm_models_only(tmp_path, dense_models, calib_file):
    from router_upcycling.errors import SettingError

    calib = CalibrationSettings(files=[calib_file], tokens=200, seq_length=16, qk_norm="after")
    with pytest.raises(SettingError, match="applies to routers initialised from the attention of QK-norm models"):
        upcycle(dense_models["mha_tied"], str(tmp_path / "moe"), MoESettings(num_experts=4), calib, progress=False)
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize("init", ["paper", "query", "perturb"])
def test_router_inits_on_grouped_query_attention_and_their_stock_fold(tmp_path, dense_models, calib_file, init):
    """8 heads on 2 KV heads, 4 routers of 2 heads: the paper's keys tie experts whose heads share KV groups; the query
    and perturb inits start every expert apart. All three stay a sum over one key per expert, so the stock export's
    linear gate gives exactly the logits of the `mor` export's Mixture-of-Routers."""
    from transformers import AutoModelForCausalLM

    from router_upcycling.convert.export import export

    calib = CalibrationSettings(files=[calib_file], tokens=200, seq_length=16, router_init=init)
    checkpoint = upcycle(dense_models["gqa_untied"], str(tmp_path / "moe"), MoESettings(num_experts=4, num_routers=4),
                         calib, dtype="fp32", progress=False)
    metadata = json.loads(open(os.path.join(checkpoint, "router_upcycling.json")).read())
    assert metadata["calibration"]["router_init"] == init
    assert (sum(metadata["tied_experts"]) > 0) == (init == "paper"), metadata["tied_experts"]
    logits = {}
    for fmt in ("mor", "stock"):
        model = AutoModelForCausalLM.from_pretrained(export(checkpoint, str(tmp_path / fmt), fmt, dtype="fp32"),
                                                     trust_remote_code=True, dtype=torch.float32)
        with torch.no_grad():
            out = model(torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(0)), output_router_logits=True)
        logits[fmt] = torch.stack(out.router_logits)
    torch.testing.assert_close(logits["stock"], logits["mor"], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def qwen3_dense(tmp_path_factory):
    from router_upcycling.testing import Geometry, make_dense_model

    return make_dense_model(str(tmp_path_factory.mktemp("qwen3")), Geometry("qwen3", 64, 8, 2, 16, tied=True), seed=4)


def test_query_norm_inside_the_routers(tmp_path, qwen3_dense, calib_file):
    """`--router-qk-norm inside` on a QK-norm model (8 heads on 2 KV heads, d_h 16, one head per router): the routers
    hold the raw W_q and the attention's q_norm weight, and score q_norm(W_q x) exactly as the attention forms its
    queries against keys from the norm's output; the model still computes the dense logits; the `mor` export routes
    alike, and the stock export, which a linear gate cannot express, is refused in one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from router_upcycling.convert.export import export
    from router_upcycling.init import average_attention_keys
    from router_upcycling.settings.export import ExportError

    calib = CalibrationSettings(files=[calib_file], tokens=200, seq_length=16, qk_norm="inside")
    moe = MoESettings(num_experts=8, num_routers=8, query_norm=True)
    checkpoint = upcycle(qwen3_dense, str(tmp_path / "moe"), moe, calib, dtype="fp32", progress=False)
    metadata = json.loads(open(os.path.join(checkpoint, "router_upcycling.json")).read())
    assert metadata["moe"]["query_norm"] is True
    assert metadata["calibration"]["qk_norm"] == "inside" and metadata["calibration"]["router_init"] == "query"
    assert metadata["tied_experts"] == [0, 0]
    assert verify(qwen3_dense, checkpoint).max_abs_diff <= 1e-4

    dense = AutoModelForCausalLM.from_pretrained(qwen3_dense, dtype=torch.float32)
    queries_after_norm = average_attention_keys(  # the keys of the `query` init, from q_norm's output
        dense, AutoTokenizer.from_pretrained(qwen3_dense), read_documents(calib_file), 200, 16, progress=False,
        after_norm=True, projection="q").keys
    model, _ = load_megatron_model(checkpoint)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    for layer in range(2):
        attention = dense.model.layers[layer].self_attn
        router = model.decoder.layers[layer].mlp.router
        torch.testing.assert_close(router.query_weight.detach().reshape(128, 64), attention.q_proj.weight.detach())
        torch.testing.assert_close(router.query_norm_weight.detach(), attention.q_norm.weight.detach())
        torch.testing.assert_close(router.keys.detach(), queries_after_norm[layer])
        with torch.no_grad():
            heads = attention.q_norm(attention.q_proj(x).view(5, 8, 16))  # [T, H, d_h], the attention's queries
        expected = heads.sum(1) @ queries_after_norm[layer].t()  # sum over routers of q_r . k_j
        logits = router.gating(x)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        logits.sum().backward()  # the copied norm weight is a router parameter that trains
        assert router.query_norm_weight.grad.abs().sum() > 0

    hf = AutoModelForCausalLM.from_pretrained(export(checkpoint, str(tmp_path / "mor"), "mor", dtype="fp32"),
                                              trust_remote_code=True, dtype=torch.float32)
    assert hf.config.router_query_norm is True
    with torch.no_grad():
        gate = hf.model.layers[1].mlp.gate
        torch.testing.assert_close(gate.expert_logits(x), model.decoder.layers[1].mlp.router.gating(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ExportError, match="normalise each head of their queries"):
        export(checkpoint, str(tmp_path / "stock"), "stock", dtype="fp32")
    assert not (tmp_path / "stock").exists()


def test_query_norm_inside_needs_qk_norm_and_whole_heads(tmp_path, dense_models, qwen3_dense, calib_file):
    from router_upcycling.errors import SettingError

    calib = CalibrationSettings(files=[calib_file], tokens=200, seq_length=16, qk_norm="inside")
    with pytest.raises(SettingError, match="needs a model with query/key norms"):
        upcycle(dense_models["gqa_untied"], str(tmp_path / "a"), MoESettings(num_experts=4, query_norm=True), calib, progress=False)
    with pytest.raises(SettingError, match="16 does not give each router whole heads of the 8.*router counts that work: 1, 2, 4, 8"):
        upcycle(qwen3_dense, str(tmp_path / "b"), MoESettings(num_experts=8, num_routers=16, query_norm=True), calib,
                progress=False)
    with pytest.raises(SettingError, match="go together"):
        upcycle(qwen3_dense, str(tmp_path / "c"), MoESettings(num_experts=8), calib, progress=False)
    assert not any(tmp_path.iterdir())
