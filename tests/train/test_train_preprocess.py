"""tools/preprocess_data.py and router_upcycling.preprocess: text -> megatron-core indexed datasets."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from router_upcycling.outputs import OutputExistsError
from router_upcycling.preprocess import PreprocessConfig, PreprocessError, preprocess
from router_upcycling.testing import SAMPLE_TEXT, train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI = REPO_ROOT / "tools" / "preprocess_data.py"
DOCUMENTS = SAMPLE_TEXT + ["", "Ünïcödé text — with 漢字 and emoji 🙂.", "a"] + [f"document {i}: " + "fox " * (i % 7) for i in range(200)]
NON_EMPTY = [text for text in DOCUMENTS if text]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer().save_pretrained(path)
    return str(path)


def write_jsonl(path: Path, documents=DOCUMENTS, key="text") -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(documents):
            f.write(json.dumps({key: text, "id": i}, ensure_ascii=False) + "\n")
    return path


def run(tokenizer_dir, inputs, prefix, **kwargs):
    config = PreprocessConfig(inputs=[str(p) for p in inputs], tokenizer=tokenizer_dir, output_prefix=str(prefix),
                              show_progress=False, **kwargs)
    return preprocess(config)


def read_sequences(prefix) -> list:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    numpy.testing.assert_array_equal(dataset.document_indices, numpy.arange(len(dataset) + 1))
    return [dataset[i].tolist() for i in range(len(dataset))]


def output_bytes(prefix) -> tuple:
    return tuple(Path(f"{prefix}{suffix}").read_bytes() for suffix in (".bin", ".idx"))


def test_round_trip_one_sequence_per_document_with_eod(tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    summary, = run(tokenizer_dir, [write_jsonl(tmp_path / "docs.jsonl")], tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in NON_EMPTY]
    prefix = tmp_path / "out_text_document"
    assert read_sequences(prefix) == expected
    assert IndexedDataset(str(prefix)).index.dtype == numpy.uint16  # vocabulary < 65500, as Megatron-LM picks
    assert (summary.documents, summary.skipped_empty, summary.tokens) == (len(NON_EMPTY), 1, sum(map(len, expected)))
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl", "out_text_document.bin", "out_text_document.idx"]


def test_no_append_eod_and_several_keys(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "title": t.upper()}) for t in NON_EMPTY[:5]) + "\n")
    run(tokenizer_dir, [path], tmp_path / "out", json_keys=["text", "title"], append_eod=False)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for key, texts in (("text", NON_EMPTY[:5]), ("title", [t.upper() for t in NON_EMPTY[:5]])):
        assert read_sequences(tmp_path / f"out_{key}_document") == [tokenizer(t)["input_ids"] for t in texts]


def test_every_input_format_gives_the_same_files(tokenizer_dir, tmp_path):
    import datasets
    import pyarrow
    import pyarrow.parquet

    run(tokenizer_dir, [write_jsonl(tmp_path / "docs.jsonl")], tmp_path / "jsonl")
    reference = output_bytes(tmp_path / "jsonl_text_document")

    run(tokenizer_dir, [write_jsonl(tmp_path / "docs.jsonl.gz")], tmp_path / "gz")
    table = pyarrow.table({"text": DOCUMENTS, "id": list(range(len(DOCUMENTS)))})
    pyarrow.parquet.write_table(table, tmp_path / "docs.parquet", row_group_size=50)
    run(tokenizer_dir, [tmp_path / "docs.parquet"], tmp_path / "parquet")
    datasets.Dataset.from_dict({"text": DOCUMENTS}).save_to_disk(str(tmp_path / "saved"))
    run(tokenizer_dir, [tmp_path / "saved"], tmp_path / "saved")
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", DOCUMENTS[:100])
    pyarrow.parquet.write_table(pyarrow.table({"text": DOCUMENTS[100:]}), folder / "part-1.parquet")
    run(tokenizer_dir, [folder], tmp_path / "folder")
    for name in ("gz", "parquet", "saved", "folder"):
        assert output_bytes(tmp_path / f"{name}_text_document") == reference, name

    run(tokenizer_dir, [tmp_path / "docs.parquet", tmp_path / "docs.jsonl"], tmp_path / "two")
    assert read_sequences(tmp_path / "two_text_document") == 2 * read_sequences(tmp_path / "jsonl_text_document")


def test_output_does_not_depend_on_workers(tokenizer_dir, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS * 3)  # several batches per worker, in flight at once
    run(tokenizer_dir, [path], tmp_path / "one", workers=1)
    run(tokenizer_dir, [path], tmp_path / "two", workers=2)
    assert output_bytes(tmp_path / "one_text_document") == output_bytes(tmp_path / "two_text_document")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"text": "unterminated', "malformed JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"body": "no text key"}', "no key 'text'"),
        ('{"text": 42}', "'text' is int, expected a string"),
    ],
)
def test_bad_line_names_file_and_line_and_writes_nothing(tokenizer_dir, tmp_path, bad_line, message):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t}) for t in DOCUMENTS[:150]]
    lines.insert(130, bad_line)  # past the first batches, so some documents were already written
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PreprocessError, match=f"^{path}:131: {message}"):
        run(tokenizer_dir, [path], tmp_path / "out", workers=2)
    assert os.listdir(tmp_path) == ["docs.jsonl"]


def test_bad_parquet_value_and_missing_column(tokenizer_dir, tmp_path):
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({"text": ["fine", None]}), tmp_path / "nulls.parquet")
    with pytest.raises(PreprocessError, match="nulls.parquet: row 2: 'text' is NoneType"):
        run(tokenizer_dir, [tmp_path / "nulls.parquet"], tmp_path / "out")
    with pytest.raises(PreprocessError, match=r"no column 'body' \(columns: text\)"):
        run(tokenizer_dir, [tmp_path / "nulls.parquet"], tmp_path / "out", json_keys=["body"])
    with pytest.raises(PreprocessError, match="input not found"):
        run(tokenizer_dir, [tmp_path / "missing.jsonl"], tmp_path / "out")
    assert os.listdir(tmp_path) == ["nulls.parquet"]


def test_existing_outputs_need_force(tokenizer_dir, tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", DOCUMENTS[:3])
    run(tokenizer_dir, [small], tmp_path / "out")
    before = output_bytes(tmp_path / "out_text_document")
    bigger = write_jsonl(tmp_path / "bigger.jsonl", DOCUMENTS[:20])
    with pytest.raises(OutputExistsError, match="out_text_document.bin exists; pass --force"):
        run(tokenizer_dir, [bigger], tmp_path / "out")
    assert output_bytes(tmp_path / "out_text_document") == before
    run(tokenizer_dir, [bigger], tmp_path / "out", force=True)
    assert len(read_sequences(tmp_path / "out_text_document")) == len([t for t in DOCUMENTS[:20] if t])


def cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_writes_files_then_refuses_to_overwrite(tokenizer_dir, tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS[:10])
    args = ["--input", "docs.jsonl", "--tokenizer", tokenizer_dir, "--output-prefix", "out", "--workers", "2"]
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote out_text_document.bin/.idx: 9 documents" in done.stdout
    assert "tok/s" in done.stderr  # the progress bar
    refused = cli(*args, cwd=tmp_path)
    assert refused.returncode != 0
    assert refused.returncode == 2
    assert refused.stderr.strip() == f"error: output {tmp_path / 'out_text_document.bin'} exists; pass --force to replace it"


def test_cli_malformed_line_is_one_line_error(tokenizer_dir, tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n\n{"text": "broken}\n')
    done = cli("--input", "docs.jsonl", "--tokenizer", tokenizer_dir, "--output-prefix", "out", "--no-progress", cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == ["error: docs.jsonl:3: malformed JSON at column 10: Unterminated string starting at"]
    assert os.listdir(tmp_path) == ["docs.jsonl"]


def test_an_input_without_text_is_not_written_as_an_empty_dataset(tokenizer_dir, tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", documents=["", ""])
    with pytest.raises(PreprocessError, match="--input holds no document with text under --json-keys text \\(2 empty\\): "
                                              "refusing to write an empty dataset"):
        run(tokenizer_dir, [empty], tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl"]


def test_an_output_prefix_that_names_a_folder_is_refused(tokenizer_dir, tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl")
    with pytest.raises(PreprocessError, match=f"--output-prefix {tmp_path}/ names a folder, not a file-name prefix: "
                                              f"give e.g. {tmp_path}/corpus \\(writes {tmp_path}/corpus_text_document"):
        run(tokenizer_dir, [docs], f"{tmp_path}/")
    (tmp_path / "file").write_text("")
    with pytest.raises(PreprocessError, match=f"--output-prefix {tmp_path}/file/corpus: {tmp_path}/file is a file"):
        run(tokenizer_dir, [docs], tmp_path / "file" / "corpus")
