"""TensorBoard and W&B (offline, no key) receive the same scalars as metrics.jsonl; read back from what they wrote."""
import glob
import itertools
import json
import os
import struct

import pytest

from router_upcycling.routing_stats import HEALTH_KEYS
from training_runs import run, train_flags, train_losses

SCALARS = ("lm_loss", "lr", "grad_norm", "load_balancing_loss", "host_memory_mb")


def wandb_history(run_file: str) -> list:
    """History rows of a W&B offline run file (LevelDB-style log: 32 KiB blocks of CRC, length, type, data)."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    rows, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_tensorboard_and_wandb_get_the_logged_scalars(inputs, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    save, board = tmp_path / "run", tmp_path / "tensorboard"
    flags = train_flags(inputs, save, "--tensorboard-dir", str(board), "--wandb-project", "router-upcycling-test",
                        "--wandb-exp-name", "tiny")
    flags[flags.index("--train-iters") + 1] = "3"
    run(flags)
    losses = train_losses(save)

    events = EventAccumulator(str(board))
    events.Reload()
    for name in SCALARS:
        assert name in events.Tags()["scalars"], events.Tags()
    assert {e.step: e.value for e in events.Scalars("lm_loss")} == pytest.approx(losses, abs=1e-6)
    health = {r["step"]: r["routing_health"] for r in map(json.loads, open(save / "metrics.jsonl")) if "routing_health" in r}
    for layer, name in itertools.product(range(2), HEALTH_KEYS):
        tag = f"routing_health/layer{layer}/{name}"
        assert {e.step: e.value for e in events.Scalars(tag)} == pytest.approx(
            {step: layers[layer][name] for step, layers in health.items()}, abs=1e-6), tag

    [run_file] = glob.glob(os.path.join(save, "wandb", "offline-run-*", "run-*.wandb"))
    history = [row for row in wandb_history(run_file) if "lm_loss" in row]
    assert {row["_step"]: row["lm_loss"] for row in history} == pytest.approx(losses, abs=1e-6)
    assert all(name in history[-1] for name in SCALARS)
    assert history[-1]["routing_health/layer1/top1_weight"] == pytest.approx(health[3][1]["top1_weight"])
