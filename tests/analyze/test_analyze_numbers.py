"""Analyses checked against a direct computation on a tiny stock Qwen2-MoE, plus the CLI and its bad inputs."""
import itertools
import json
import subprocess
import sys

import pytest
import torch

from router_upcycling.analyze import analyses
from router_upcycling.analyze.__main__ import main
from router_upcycling.analyze.inputs import AnalysisError, load_model
from router_upcycling.testing import make_tiny_qwen2_moe
from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2
from router_upcycling.text import read_documents, token_chunks

NUM_EXPERTS, TOP_K, SEQ = 4, 2, 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    make_tiny_qwen2_moe(str(root / "moe"), num_experts=NUM_EXPERTS, top_k=TOP_K)
    make_dense_qwen2(str(root / "dense"))
    (root / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXT[1::2]))
    (root / "prose.txt").write_text(" ".join(SAMPLE_TEXT[0::2]))
    model, tokenizer = load_model(str(root / "moe"), "cpu", "float32")
    return root, model, tokenizer


def chunks_of(tokenizer, path):
    return list(token_chunks(read_documents(str(path)), tokenizer, max_tokens=10_000, seq_length=SEQ))


def moe_inputs(model, chunks):
    """{layer: every token's MoE input [T, d]}, captured by pre-hooks on the MoE blocks (not on the gates)."""
    captured = {layer: [] for layer in range(model.config.num_hidden_layers)}
    handles = [model.model.layers[layer].mlp.register_forward_pre_hook(
        lambda module, args, layer=layer: captured[layer].append(args[0].reshape(-1, args[0].shape[-1])))
        for layer in captured]
    with torch.no_grad():
        for chunk in chunks:  # one sequence at a time: a different batching from the analyses
            model(input_ids=torch.tensor([chunk]))
    for handle in handles:
        handle.remove()
    return {layer: torch.cat(parts) for layer, parts in captured.items()}


def direct_top_k(model, layer, hidden):
    """Softmax over the linear gate's logits, top-k, renormalised: ([T, k] weights, [T, k] index)."""
    probs = torch.softmax(hidden @ model.model.layers[layer].mlp.gate.weight.t(), dim=-1)
    weights, index = probs.topk(TOP_K, dim=-1)
    return weights / weights.sum(-1, keepdim=True), index


def test_analyze_routing_weights_match_a_direct_computation(tiny):
    root, model, tokenizer = tiny
    domains = {"code": chunks_of(tokenizer, root / "code.jsonl"), "prose": chunks_of(tokenizer, root / "prose.txt")}
    result = analyses.routing_weights_by_domain(model, domains, layer=1, batch_size=3)
    for name, chunks in domains.items():
        hidden = moe_inputs(model, chunks)[1]
        weights, index = direct_top_k(model, 1, hidden)
        expected = torch.zeros(len(hidden), NUM_EXPERTS)
        for token, slot in itertools.product(range(len(hidden)), range(TOP_K)):
            expected[token, index[token, slot]] += weights[token, slot]
        assert result["domains"][name]["tokens"] == len(hidden) == sum(len(c) for c in chunks)
        torch.testing.assert_close(torch.tensor(result["domains"][name]["weights"], dtype=torch.float64), expected.mean(0).double(), rtol=1e-5, atol=1e-6)
        assert sum(result["domains"][name]["weights"]) == pytest.approx(1.0)


def test_analyze_load_matches_direct_top_k_counts(tiny):
    root, model, tokenizer = tiny
    chunks = chunks_of(tokenizer, root / "code.jsonl")
    result = analyses.expert_load_by_layer(model, chunks, batch_size=2)
    for position, (layer, hidden) in enumerate(moe_inputs(model, chunks).items()):
        _, index = direct_top_k(model, layer, hidden)
        counts = torch.bincount(index.reshape(-1), minlength=NUM_EXPERTS).double()
        torch.testing.assert_close(torch.tensor(result["share"][position], dtype=torch.float64), counts / counts.sum())


def test_analyze_specialization_matches_expert_calls_and_pairwise_cosines(tiny):
    root, model, tokenizer = tiny
    chunks = chunks_of(tokenizer, root / "code.jsonl")
    result = analyses.expert_similarity_by_layer(model, chunks, batch_size=4)
    assert result["layers"] == [0, 1]
    for position, (layer, hidden) in enumerate(moe_inputs(model, chunks).items()):
        experts = model.model.layers[layer].mlp.experts
        ones = torch.ones(len(hidden), 1)
        with torch.no_grad():  # the model's own expert forward, every token forced to expert e with weight 1
            outputs = [experts(hidden, torch.full((len(hidden), 1), e), ones) for e in range(NUM_EXPERTS)]
        pair_means = [torch.nn.functional.cosine_similarity(outputs[i], outputs[j], dim=-1).mean()
                      for i, j in itertools.combinations(range(NUM_EXPERTS), 2)]
        assert result["mean_cosine_similarity"][position] == pytest.approx(torch.stack(pair_means).mean().item(), abs=1e-5)


def test_analyze_health_matches_a_direct_computation(tiny):
    root, model, tokenizer = tiny
    chunks = chunks_of(tokenizer, root / "prose.txt")
    result = analyses.routing_health_by_layer(model, chunks, batch_size=3)
    assert result["layers"] == [0, 1] and result["tokens"] == sum(map(len, chunks)) and result["topk"] == TOP_K
    for position, (layer, hidden) in enumerate(moe_inputs(model, chunks).items()):
        logits = (hidden @ model.model.layers[layer].mlp.gate.weight.t()).double()
        weights, index = direct_top_k(model, layer, hidden)
        shares = torch.bincount(index.reshape(-1), minlength=NUM_EXPERTS).double() / index.numel()
        mean_probs = torch.softmax(logits, -1).mean(0)
        health = result["routing_health"][position]
        assert health["dead_experts"] == int((shares < 0.1 / NUM_EXPERTS).sum())
        assert health == pytest.approx({
            "max_share": shares.max().item(), "dead_experts": health["dead_experts"],
            "top1_weight": weights.max(-1).values.mean().item(), "logit_std": logits.std(unbiased=False).item(),
            "entropy": -(mean_probs * mean_probs.log()).sum().item(),
            "tied_choice": (weights[:, 0] == weights[:, 1]).double().mean().item(),  # a random gate: no ties
        }, rel=1e-5, abs=1e-12)


def test_analyze_cli_writes_json_and_png(tiny, tmp_path):
    root, _, _ = tiny
    out = tmp_path / "routing"
    main(["routing", "--model", str(root / "moe"), "--domain", f"Code={root / 'code.jsonl'}", "--domain", f"Prose={root / 'prose.txt'}",
          "--layer", "-1", "--seq-length", str(SEQ), "--device", "cpu", "--output", str(out)])
    routing = json.loads((out / "routing.json").read_text())
    assert routing["layer"] == 1 and list(routing["domains"]) == ["Code", "Prose"]
    for command in ("specialization", "load", "health"):
        main([command, "--model", str(root / "moe"), "--data", str(root / "code.jsonl"), "--seq-length", str(SEQ),
              "--device", "cpu", "--output", str(tmp_path / command)])
        assert (tmp_path / command / f"{command}.json").is_file()
    for command in ("routing", "specialization", "load", "health"):
        assert (tmp_path / command / f"{command}.png").read_bytes()[:4] == b"\x89PNG"


def test_analyze_pick_layer_rejects_non_moe_layers(tiny):
    _, model, _ = tiny
    assert analyses.pick_layer(model, None) == 1 and analyses.pick_layer(model, -2) == 0
    with pytest.raises(AnalysisError, match="layer 5 is not an MoE layer"):
        analyses.pick_layer(model, 5)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "router_upcycling.analyze", *args], capture_output=True, text=True)


def run_in_process(capsys, *args):
    """The CLI's main() in this process: it exits with status 2; the line it printed on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_analyze_bad_inputs_fail_with_one_line(tiny, tmp_path, capsys):
    root, _, _ = tiny
    data = str(root / "code.jsonl")
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "config.json").write_text("[]")
    for expected, args in {
        "no MoE layers": ["health", "--model", str(root / "dense"), "--data", data, "--output", str(tmp_path / "b")],
        "not an MoE layer": ["routing", "--model", str(root / "moe"), "--domain", f"X={data}", "--layer", "7", "--output", str(tmp_path / "c")],
        "none.jsonl: no such file": ["health", "--model", str(root / "moe"), "--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "d")],
        "no string field 'text'": ["load", "--model", str(root / "moe"), "--data", str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "e")],
        "NAME=FILE": ["routing", "--model", str(root / "moe"), "--domain", data, "--output", str(tmp_path / "f")],
        "unknown --dtype 'fp8'": ["load", "--model", str(root / "moe"), "--data", data, "--dtype", "fp8", "--output", str(tmp_path / "g")],
        f"--output {tmp_path / 'rows.jsonl' / 'h'}: its parent {tmp_path / 'rows.jsonl'} is a file": [
            "load", "--model", str(root / "moe"), "--data", data, "--output", str(tmp_path / "rows.jsonl" / "h")],
        "must hold a JSON object, not list": ["load", "--model", str(tmp_path / "listed"), "--data", data, "--output", str(tmp_path / "i")],
    }.items():
        message = run_in_process(capsys, *args)
        assert message.startswith("error: ") and expected in message and "\n" not in message, message
    for expected, result in {
        "no config.json": run_cli("load", "--model", str(tmp_path / "nope"), "--data", data, "--output", str(tmp_path / "a")),
        "--force": run_cli("load", "--model", str(root / "moe"), "--data", data, "--output", str(existing)),
    }.items():
        assert result.returncode != 0 and result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert (existing / "keep.txt").read_text() == "mine"
    assert not any((tmp_path / name).exists() for name in "abcdefgi")
