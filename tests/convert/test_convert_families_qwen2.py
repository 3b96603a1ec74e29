"""Qwen1.5 and Qwen2.5 geometries (multi-head and grouped-query attention, 12, 14, 16 and 28 heads): upcycle,
verify at the long sequence, export to mor and Qwen2-MoE, load with transformers alone."""
import pytest

from families import convert_and_check

GEOMETRIES = ["Qwen1.5-0.5B", "Qwen1.5-1.8B", "Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-3B", "Qwen2.5-7B"]


@pytest.mark.parametrize("name", GEOMETRIES)
def test_published_qwen2_geometry_converts_both_ways(name, tmp_path):
    metadata = convert_and_check(name, tmp_path)
    assert metadata["mor"]["moe"]["router_dim"] == {"Qwen1.5-0.5B": 128, "Qwen1.5-1.8B": 256, "Qwen2.5-0.5B": 112,
                                                    "Qwen2.5-1.5B": 192, "Qwen2.5-3B": 256, "Qwen2.5-7B": 448}[name]
