"""Text documents -> EOS-joined token chunks -> batches (router_upcycling.text): input formats, errors, chunking."""
import gzip
import itertools
import json

import datasets
import pytest

from router_upcycling.testing import train_tokenizer
from router_upcycling.text import TextDataError, equal_length_batches, read_documents, token_chunks


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_chunks_append_eos_keep_last_partial_chunk(tokenizer):
    documents = ["The quick brown fox.", "12 + 30 = 42", "import torch"]
    stream = [token for text in documents for token in encode(tokenizer, text) + [tokenizer.eos_token_id]]
    seq = next(n for n in (4, 3, 5, 6, 7) if len(stream) % n)  # a length that leaves a partial last chunk
    chunks = list(token_chunks(documents, tokenizer, max_tokens=10_000, seq_length=seq))
    assert [token for chunk in chunks for token in chunk] == stream
    assert all(len(chunk) == seq for chunk in chunks[:-1]) and 0 < len(chunks[-1]) < seq
    assert len(chunks[-1]) == len(stream) % seq


def test_chunks_stop_at_max_tokens(tokenizer):
    documents = ["The quick brown fox.", "12 + 30 = 42", "import torch"]
    stream = [token for text in documents for token in encode(tokenizer, text) + [tokenizer.eos_token_id]]
    chunks = list(token_chunks(documents, tokenizer, max_tokens=len(stream) - 3, seq_length=5))
    assert [token for chunk in chunks for token in chunk] == stream[:-3]
    endless = list(token_chunks(itertools.repeat("hello world"), tokenizer, max_tokens=50, seq_length=8))
    assert [len(chunk) for chunk in endless] == [8] * 6 + [2]


def test_chunks_reject_bad_lengths(tokenizer):
    with pytest.raises(ValueError):
        token_chunks(["text"], tokenizer, max_tokens=0, seq_length=4)


def test_batches_hold_equal_length_chunks_without_padding():
    chunks = [[1, 2, 3]] * 5 + [[4]]
    batches = list(equal_length_batches(chunks, batch_size=2))
    assert [[len(chunk) for chunk in batch] for batch in batches] == [[3, 3], [3, 3], [3], [1]]
    assert [chunk for batch in batches for chunk in batch] == chunks


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
    (folder / "README.md").write_text("not a document")
    assert list(read_documents(folder)) == ["j1", "j2", "p1", "p2"]


def test_empty_documents_are_skipped(tmp_path):
    assert list(read_documents(write_jsonl(tmp_path / "a.jsonl", ["", "kept", ""]))) == ["kept"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.jsonl", "", "empty.jsonl: no documents"),
        ("empty.txt", "", "empty.txt: no documents"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": broken\n', "bad.jsonl:2: not a JSON object"),
        ("nokey.jsonl", '{"text": "ok"}\n{"body": "x"}\n', "nokey.jsonl:2: no string field 'text'"),
        ("data.csv", "text\nrow\n", "data.csv: unknown file format"),
        ("latin1.txt", b"caf\xe9", "latin1.txt: unreadable"),
    ],
)
def test_bad_files_name_the_path(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TextDataError, match=message):
        list(read_documents(path))


def test_missing_paths_and_empty_folders_are_errors(tmp_path):
    with pytest.raises(TextDataError, match="missing.jsonl: no such file"):
        read_documents([tmp_path / "missing.jsonl"])  # raised before any reading
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(TextDataError, match="empty_folder: a folder with no dataset"):
        list(read_documents(tmp_path / "empty_folder"))
    with pytest.raises(TextDataError, match="no document files given"):
        read_documents([])
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(TextDataError, match="no column 'text'"):
        list(read_documents(tmp_path / "saved"))
    datasets.Dataset.from_dict({"text": [1, 2]}).save_to_disk(str(tmp_path / "numbers"))
    with pytest.raises(TextDataError, match="numbers: field 'text' holds int, not text"):
        list(read_documents(tmp_path / "numbers"))
