"""Calibration input, token chunks and average attention keys on tiny random Qwen2 models."""
import gzip
import itertools
import json

import datasets
import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from router_upcycling.init import (
    CalibrationDataError,
    average_attention_keys,
    calibration_chunks,
    head_keys_from_kv,
    init_routers_from_attention,
    read_documents,
    router_weights_from_attention,
)
from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2, train_tokenizer

CALIBRATION_TOKENS = 200
SEQ_LENGTH = 32  # 200 tokens: six full chunks and one of 8


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module", params=[8, 2], ids=["mha", "gqa"])
def dense_model(request, tmp_path_factory, tokenizer):
    folder = make_dense_qwen2(str(tmp_path_factory.mktemp("dense")), tokenizer=tokenizer, num_heads=8, num_kv_heads=request.param)
    return Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_chunks_append_eos_keep_last_partial_chunk(tokenizer):
    documents = ["The quick brown fox.", "12 + 30 = 42", "import torch"]
    stream = [token for text in documents for token in encode(tokenizer, text) + [tokenizer.eos_token_id]]
    chunks = list(calibration_chunks(documents, tokenizer, max_tokens=10_000, seq_length=4))
    assert [token for chunk in chunks for token in chunk] == stream
    assert all(len(chunk) == 4 for chunk in chunks[:-1]) and 0 < len(chunks[-1]) <= 4
    assert len(stream) % 4 and len(chunks[-1]) == len(stream) % 4


def test_chunks_stop_at_max_tokens(tokenizer):
    documents = ["The quick brown fox.", "12 + 30 = 42", "import torch"]
    stream = [token for text in documents for token in encode(tokenizer, text) + [tokenizer.eos_token_id]]
    chunks = list(calibration_chunks(documents, tokenizer, max_tokens=len(stream) - 3, seq_length=5))
    assert [token for chunk in chunks for token in chunk] == stream[:-3]
    endless = list(calibration_chunks(itertools.repeat("hello world"), tokenizer, max_tokens=50, seq_length=8))
    assert [len(chunk) for chunk in endless] == [8] * 6 + [2]


def test_chunks_reject_bad_lengths(tokenizer):
    with pytest.raises(ValueError):
        calibration_chunks(["text"], tokenizer, max_tokens=0, seq_length=4)


def reference_average_keys(model, chunks):
    """Mean over all tokens of k_proj(input_layernorm(h_l)), h_l the input of block l, from output_hidden_states."""
    layers = model.model.layers
    key_sums, num_tokens = [0.0] * len(layers), 0
    with torch.no_grad():
        for chunk in chunks:
            hidden_states = model(torch.tensor([chunk]), output_hidden_states=True).hidden_states
            for index, layer in enumerate(layers):
                keys = layer.self_attn.k_proj(layer.input_layernorm(hidden_states[index]))  # [1, S, H_kv * d_h]
                key_sums[index] = key_sums[index] + keys.double().sum(dim=(0, 1))
            num_tokens += len(chunk)
    kv_heads = model.config.num_key_value_heads
    return torch.stack(key_sums).div(num_tokens).view(len(layers), kv_heads, -1).float()


def test_average_keys_match_direct_computation_and_ignore_batch_size(dense_model):
    model, tokenizer = dense_model
    documents = SAMPLE_TEXT * 10
    averages = [
        average_attention_keys(model, tokenizer, documents, CALIBRATION_TOKENS, SEQ_LENGTH, batch_size=batch, progress=False)
        for batch in (1, 2, 3)
    ]
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert averages[0].shape == (layers, kv_heads, 64 // 8) and averages[0].dtype == torch.float32
    assert not averages[0].requires_grad
    torch.testing.assert_close(averages[1], averages[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(averages[2], averages[0], rtol=0, atol=1e-6)
    chunks = list(calibration_chunks(documents, tokenizer, CALIBRATION_TOKENS, SEQ_LENGTH))
    assert sum(map(len, chunks)) == CALIBRATION_TOKENS and len(chunks[-1]) == CALIBRATION_TOKENS % SEQ_LENGTH
    torch.testing.assert_close(averages[0], reference_average_keys(model, chunks), rtol=0, atol=1e-5)


def test_routers_from_calibrated_model(dense_model):
    model, tokenizer = dense_model
    avg_kv_keys = average_attention_keys(model, tokenizer, SAMPLE_TEXT, 64, 16, progress=False)
    routers = init_routers_from_attention(model, avg_kv_keys, num_routers=4, num_experts=8)
    assert len(routers) == model.config.num_hidden_layers
    for layer, (query_weight, keys) in zip(model.model.layers, routers):
        assert query_weight.shape == (4, 16, 64) and keys.shape == (8, 16)
        assert query_weight.dtype == keys.dtype == torch.float32
    expected_query, expected_keys, _ = router_weights_from_attention(
        model.model.layers[1].self_attn.q_proj.weight.detach(), head_keys_from_kv(avg_kv_keys[1], 8), 8, 4, 8
    )
    assert torch.equal(routers[1][0], expected_query) and torch.equal(routers[1][1], expected_keys)


def test_calibration_restores_training_mode(dense_model):
    model, tokenizer = dense_model
    model.train()
    average_attention_keys(model, tokenizer, SAMPLE_TEXT, 16, 8, progress=False)
    assert model.training
    model.eval()


def test_calibration_without_tokens_is_an_error(dense_model):
    model, tokenizer = dense_model
    with pytest.raises(CalibrationDataError):
        average_attention_keys(model, tokenizer, [], 16, 8, progress=False)


def write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: text, "id": index}) + "\n" for index, text in enumerate(texts)))
    return path


def test_reads_jsonl_gz_txt_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "a.jsonl", ["first", "second"])
    compressed = tmp_path / "b.jsonl.gz"
    with gzip.open(compressed, "wt", encoding="utf-8") as stream:
        stream.write(json.dumps({"content": "zipped"}) + "\n\n")
    text = tmp_path / "c.txt"
    text.write_text("line one\nline two\n")
    assert list(read_documents(jsonl)) == ["first", "second"]
    assert list(read_documents([compressed], json_key="content")) == ["zipped"]
    assert list(read_documents([str(text), jsonl])) == ["line one\nline two\n", "first", "second"]

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["d1", "d2", "d3"]}).save_to_disk(str(saved))
    assert list(read_documents(saved)) == ["d1", "d2", "d3"]
    saved_dict = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t1"]})}).save_to_disk(str(saved_dict))
    assert list(read_documents(saved_dict)) == ["t1"]

    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "0.jsonl", ["j1", "j2"])
    pq.write_table(pa.table({"text": ["p1", "p2"]}), folder / "1.parquet")
    (folder / "README.md").write_text("not calibration data")
    assert list(read_documents(folder)) == ["j1", "j2", "p1", "p2"]


def test_empty_documents_are_skipped(tmp_path):
    assert list(read_documents(write_jsonl(tmp_path / "a.jsonl", ["", "kept", ""]))) == ["kept"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.jsonl", "", "empty.jsonl: no calibration documents"),
        ("empty.txt", "", "empty.txt: no calibration documents"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": broken\n', "bad.jsonl:2: not a JSON object"),
        ("nokey.jsonl", '{"text": "ok"}\n{"body": "x"}\n', "nokey.jsonl:2: no string field 'text'"),
        ("data.csv", "text\nrow\n", "data.csv: unknown calibration file format"),
        ("latin1.txt", b"caf\xe9", "latin1.txt: unreadable"),
    ],
)
def test_bad_calibration_files_name_the_path(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CalibrationDataError, match=message):
        list(read_documents(path))


def test_missing_paths_and_empty_folders_are_errors(tmp_path):
    with pytest.raises(CalibrationDataError, match="missing.jsonl: no such calibration file"):
        read_documents([tmp_path / "missing.jsonl"])  # raised before any reading
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(CalibrationDataError, match="empty_folder: a folder with no dataset"):
        list(read_documents(tmp_path / "empty_folder"))
    with pytest.raises(CalibrationDataError, match="no calibration files given"):
        read_documents([])
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(CalibrationDataError, match="no column 'text'"):
        list(read_documents(tmp_path / "saved"))
    datasets.Dataset.from_dict({"text": [1, 2]}).save_to_disk(str(tmp_path / "numbers"))
    with pytest.raises(CalibrationDataError, match="numbers: field 'text' holds int, not text"):
        list(read_documents(tmp_path / "numbers"))
