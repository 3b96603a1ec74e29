"""Qwen3 (QK-norm, head dim 128 whatever the hidden size) and Llama 3 (llama3 RoPE scaling) geometries: upcycle,
verify at the long sequence, export to mor and to Qwen3-MoE / Mixtral, load with transformers alone."""
import pytest

from families import convert_and_check

GEOMETRIES = ["Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B", "Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B"]


@pytest.mark.parametrize("name", GEOMETRIES)
def test_published_qwen3_and_llama_geometry_converts_both_ways(name, tmp_path):
    metadata = convert_and_check(name, tmp_path)
    assert metadata["mor"]["calibration"].get("qk_norm") == ("before" if name.startswith("Qwen3") else None)
