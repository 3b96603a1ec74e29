"""A small multi-domain corpus built from text every Python installation has, so the demo needs no download.

Three domains, each a stand-in for one of the paper's data domains (Code, Book/Wiki, Math):

- ``code``:  the standard library's own Python source, one document per top-level function or class
  (module-level code is left out), with its docstrings removed so the two text domains do not overlap;
- ``prose``: the standard library's docstrings (module, class and function), read with ``ast``, those
  of at least ``MIN_DOCSTRING_CHARS`` characters: English technical prose;
- ``math``:  generated arithmetic, a few correct equations per document (``17 + 25 = 42``,
  ``(9 - 4) * 6 = 30``, ``84 / 7 = 12``, ``3 ** 4 = 81``), seeded.

Determinism: the standard library's files are listed sorted by path, shuffled by a seeded generator
and read until a character budget per domain is met; every other choice uses the same seed. The
corpus is the same on every run with the same Python version and seed (the standard library's
content differs between Python versions).

Held-out slice: per domain, documents are held out before training ever sees them, up to
``heldout_chars`` characters; they serve the evaluation and the routing analysis. The rest, mixed,
is the training set (one JSON object per line, ``{"text": ..., "domain": ...}``).

Order of the training set: the domains are interleaved by characters (``interleave_domains``), so that every
stretch of consecutive documents holds each domain in proportion to its size. Training's ``--split`` cuts the
file by document count, and the validation split is its last few percent: a plain shuffle made that tail a
random draw of about 136 documents whose lengths differ fourteenfold between domains (math ~110 characters,
code ~1,500), and it came out 72% math tokens against 57% in training, the easiest domain, which put the
validation loss about 0.5 nats below the training loss.
"""
import ast
import json
import os
import random
import sysconfig
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

DOMAINS = ("code", "prose", "math")
MIN_DOCSTRING_CHARS = 200
MIN_CODE_CHARS = 200
VALID_PERCENT = 2  # training's validation split, the last 2% of the training file's documents (--split 98,2,0)
MAX_DOCUMENT_CHARS = 4000  # longer definitions are cut: a few huge classes would otherwise dominate the code budget


class CorpusError(ValueError):
    """The standard library could not supply the requested amount of text."""


@dataclass(frozen=True)
class CorpusSizes:
    """Characters per domain: in the training set and held out for evaluation and analysis."""

    train_chars: int = 600_000
    heldout_chars: int = 40_000


def stdlib_python_files(stdlib_dir: str) -> List[str]:
    """Every .py file of the standard library (no site-packages), sorted by path."""
    files = []
    for root, dirs, names in os.walk(stdlib_dir):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(root, name) for name in names if name.endswith(".py")]
    return sorted(files)


def parse_module(path: str) -> Tuple[str, ast.Module]:
    """(source, tree), or ("", empty module) for files that are not valid UTF-8 Python of this version."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        return source, ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return "", ast.Module(body=[], type_ignores=[])


def docstring_nodes(tree: ast.Module) -> Iterator[ast.AST]:
    """The module, class and function nodes that can carry a docstring."""
    yield tree
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node


def docstring_line_ranges(tree: ast.Module) -> List[Tuple[int, int]]:
    """1-based inclusive line ranges of every docstring expression in the file."""
    ranges = []
    for node in docstring_nodes(tree):
        body = getattr(node, "body", [])
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            ranges.append((body[0].lineno, body[0].end_lineno))
    return ranges


def code_documents(source: str, tree: ast.Module) -> Iterator[str]:
    """Each top-level function or class of the file, its docstring lines dropped."""
    lines = source.splitlines()
    dropped = {line for start, end in docstring_line_ranges(tree) for line in range(start, end + 1)}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            kept = [lines[i - 1] for i in range(start, node.end_lineno + 1) if i not in dropped]
            text = "\n".join(kept).strip("\n")[:MAX_DOCUMENT_CHARS]
            if len(text) >= MIN_CODE_CHARS:
                yield text + "\n"


def prose_documents(tree: ast.Module) -> Iterator[str]:
    """Docstrings of the file that are long enough to be prose rather than a one-line summary."""
    for node in docstring_nodes(tree):
        text = ast.get_docstring(node, clean=True)
        if text and len(text) >= MIN_DOCSTRING_CHARS:
            yield text[:MAX_DOCUMENT_CHARS]


def arithmetic_equation(rng: random.Random) -> str:
    """One correct equation with small integers; division is exact."""
    kind = rng.choice(("add", "sub", "mul", "div", "pow", "paren"))
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if kind == "add":
        return f"{a} + {b} = {a + b}"
    if kind == "sub":
        return f"{a} - {b} = {a - b}"
    if kind == "mul":
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        return f"{a} * {b} = {a * b}"
    if kind == "div":
        b, quotient = rng.randint(1, 12), rng.randint(0, 30)
        return f"{b * quotient} / {b} = {quotient}"
    if kind == "pow":
        base, exponent = rng.randint(2, 9), rng.randint(2, 4)
        return f"{base} ** {exponent} = {base ** exponent}"
    c = rng.randint(1, 9)
    return f"({a} - {b}) * {c} = {(a - b) * c}"


def math_documents(rng: random.Random) -> Iterator[str]:
    """An endless stream of documents of 4 to 12 equations, one per line."""
    while True:
        yield "\n".join(arithmetic_equation(rng) for _ in range(rng.randint(4, 12))) + "\n"


def stdlib_documents(files: Sequence[str], rng: random.Random) -> Iterator[Tuple[str, str]]:
    """(domain, text) pairs from the standard library, files in a seeded shuffle of their sorted order."""
    order = list(files)
    rng.shuffle(order)
    for path in order:
        source, tree = parse_module(path)
        for text in code_documents(source, tree):
            yield "code", text
        for text in prose_documents(tree):
            yield "prose", text


def take_chars(documents: Iterator[str], budget: int) -> List[str]:
    """Documents from the stream until their lengths reach budget characters."""
    taken, total = [], 0
    for text in documents:
        if total >= budget:
            break
        taken.append(text)
        total += len(text)
    return taken


def collect_domains(sizes: CorpusSizes, seed: int, stdlib_dir: str) -> Dict[str, List[str]]:
    """Documents per domain, each domain filled to train_chars + heldout_chars characters."""
    wanted = sizes.train_chars + sizes.heldout_chars
    documents: Dict[str, List[str]] = {"code": [], "prose": []}
    filled = {"code": 0, "prose": 0}
    for domain, text in stdlib_documents(stdlib_python_files(stdlib_dir), random.Random(seed)):
        if filled[domain] < wanted:
            documents[domain].append(text)
            filled[domain] += len(text)
        if min(filled.values()) >= wanted:
            break
    for domain, count in filled.items():
        if count < wanted:
            raise CorpusError(f"the standard library at {stdlib_dir} gave only {count} characters of {domain}, "
                              f"{wanted} wanted: lower the corpus size")
    documents["math"] = take_chars(math_documents(random.Random(seed + 1)), wanted)
    return documents


def split_heldout(documents: List[str], heldout_chars: int) -> Tuple[List[str], List[str]]:
    """(train, heldout): the last documents, up to heldout_chars characters, are held out."""
    heldout, total = [], 0
    while documents[:-1] and total < heldout_chars:
        heldout.insert(0, documents[-1])
        total += len(documents[-1])
        documents = documents[:-1]
    return documents, heldout


def interleave_domains(by_domain: Dict[str, List[str]], rng: random.Random) -> List[dict]:
    """Training rows of every domain in one list where any run of consecutive rows holds each domain's characters
    in proportion: each domain's documents are shuffled, then all are ordered by the middle of their character span
    as a fraction of their domain's characters."""
    keyed = []
    for order, (domain, texts) in enumerate(by_domain.items()):
        texts = list(texts)
        rng.shuffle(texts)
        total, start = sum(map(len, texts)), 0
        for text in texts:
            keyed.append(((start + len(text) / 2) / total, order, {"text": text, "domain": domain}))
            start += len(text)
    return [row for _, _, row in sorted(keyed, key=lambda item: item[:2])]


def write_jsonl(path: str, rows: List[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_corpus(output_dir: str, sizes: CorpusSizes = CorpusSizes(), seed: int = 0,
                 stdlib_dir: str = sysconfig.get_paths()["stdlib"]) -> Dict[str, Dict[str, int]]:
    """Write OUTPUT/train.jsonl and OUTPUT/heldout/{domain}.jsonl into an existing folder; return the statistics.

    Statistics: per domain, documents and characters of the train and held-out parts.
    """
    by_domain = collect_domains(sizes, seed, stdlib_dir)
    train, stats = {}, {}
    os.makedirs(os.path.join(output_dir, "heldout"), exist_ok=True)
    for domain in DOMAINS:
        train[domain], heldout = split_heldout(by_domain[domain], sizes.heldout_chars)
        write_jsonl(os.path.join(output_dir, "heldout", f"{domain}.jsonl"), [{"text": text} for text in heldout])
        stats[domain] = {"train_documents": len(train[domain]), "train_chars": sum(map(len, train[domain])),
                         "heldout_documents": len(heldout), "heldout_chars": sum(map(len, heldout))}
    write_jsonl(os.path.join(output_dir, "train.jsonl"), interleave_domains(train, random.Random(seed + 2)))
    with open(os.path.join(output_dir, "stats.json"), "w") as f:
        json.dump({"seed": seed, "stdlib": stdlib_dir, "domains": stats}, f, indent=2)
    return stats
