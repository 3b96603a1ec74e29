"""Shared by the per-family conversion tests: every published geometry upcycled with linear and mor routers at 8
routers and 8 experts, verified at the long sequence, exported to `mor` and to its stock MoE, and loaded with
transformers alone in a fresh interpreter."""
import json
import os

import torch
from transformers import AutoModelForCausalLM

from hf_test_support import logits_in_fresh_interpreter
from router_upcycling.convert.export import export
from router_upcycling.convert.upcycle import CalibrationSettings, upcycle
from router_upcycling.convert.verify import verify
from router_upcycling.settings.families import family_named
from router_upcycling.settings.moe import MoESettings
from router_upcycling.testing import PUBLISHED_GEOMETRIES, SAMPLE_TEXT, make_dense_model

DTYPE = "bf16"  # stored weights (halves the bytes written and read); every model is then computed in float32
ROUTERS = {"linear": MoESettings(router="linear", num_experts=8, topk=2),
           "mor": MoESettings(router="mor", num_experts=8, topk=2, num_routers=8)}


def convert_and_check(name: str, root) -> dict:
    """The whole path for one geometry; returns what a test may still want to look at."""
    geometry = PUBLISHED_GEOMETRIES[name]
    # one layer: the geometry (head counts, head dim, RoPE) is what differs; the layer loop is tested at hidden 64
    dense = make_dense_model(str(root / "dense"), geometry, seed=len(name), max_position_embeddings=32768, num_layers=1)
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXT * 10))
    folders, metadata = [], {}
    for router, moe in ROUTERS.items():
        checkpoint = upcycle(dense, str(root / router), moe, CalibrationSettings(files=[str(calib)], tokens=512, seq_length=64),
                             dtype=DTYPE, progress=False)
        # the long sequence (the far positions that show a RoPE mismatch) once per geometry: it is the slow part
        report = verify(dense, checkpoint, long_seq_length=2048 if router == "mor" else 0)
        assert report.batches == ["4 x 32", "1 x 2048"][:2 if router == "mor" else 1], report.batches
        assert report.max_abs_diff < 1e-4 and report.top1_agreement == 1.0, (name, router, report)
        for fmt in ("mor", "stock"):
            folders.append(export(checkpoint, str(root / f"{router}-{fmt}"), fmt, dtype=DTYPE))
        metadata[router] = json.loads((root / router / "router_upcycling.json").read_text())
    # the default router init (auto) starts no two experts with the same keys, on any geometry here
    assert metadata["mor"]["tied_experts"] == [0], metadata["mor"]["tied_experts"]
    stock = family_named(geometry.family).stock.architecture
    for folder in folders[1::2]:
        assert json.loads((root / folder / "config.json").read_text())["architectures"] == [stock]
    input_ids = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # the dense weights rounded as the checkpoint and the exports store them, computed in float32
        expected = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16).float()(input_ids).logits
    logits = logits_in_fresh_interpreter(folders, input_ids, str(root))
    for folder in folders:
        torch.testing.assert_close(logits[folder], expected, atol=1e-4, rtol=0, msg=f"{name} {os.path.basename(folder)}")
    health = step0_health(folders[2], dense)  # the mor export of the mor router
    assert all(layer["tied_choice"] == 0 for layer in health["routing_health"]), health
    return metadata


def step0_health(folder: str, dense: str) -> dict:
    """Routing health of an export on real text (the sample sentences, tokenized by the model's tokenizer)."""
    from transformers import AutoTokenizer

    from router_upcycling.analyze.analyses import routing_health_by_layer
    from router_upcycling.text import token_chunks

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    chunks = list(token_chunks(SAMPLE_TEXT * 20, AutoTokenizer.from_pretrained(dense), 1024, 128))
    return routing_health_by_layer(model, chunks, batch_size=4)
