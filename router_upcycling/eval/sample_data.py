"""Tiny offline inputs for smoke-testing the evaluation suite and the analyses without the hub.

`write_sample_mirror` writes a mirror in the layout of router_upcycling.eval.tasks (same paths,
the hub datasets' own field layouts) with a few unique, made-up rows per split. A tiny model to
evaluate is router_upcycling.testing.make_tiny_qwen2_moe.
"""
import json
from pathlib import Path
from typing import Callable, Dict

from router_upcycling.eval.tasks import SUITE, all_mirror_files

_THINGS = ["the sun", "a magnet", "rain", "a seed", "ice", "a battery", "the moon", "a plant", "sound", "light",
           "a river", "copper", "wind", "a shadow", "sand", "steam", "a lens", "coal", "a bird", "glass"]
_VERBS = ["heats", "attracts", "feeds", "grows into", "melts into", "powers", "pulls", "needs", "travels through",
          "bends", "carves", "conducts", "moves", "follows", "covers", "rises over", "focuses", "burns near",
          "flies over", "reflects"]


def _thing(i: int) -> str:
    return _THINGS[i % len(_THINGS)]


def _choices(i: int, count: int) -> Dict[str, list]:
    return {"text": [f"{_thing(i + j)} {j}" for j in range(count)], "label": list("ABCD")[:count]}


def _openbookqa(i: int) -> dict:
    return {"id": f"obqa-{i}", "question_stem": f"Question {i}: what {_VERBS[i % 20]} {_thing(i + 3)}?",
            "choices": _choices(i, 4), "answerKey": "ABCD"[i % 4]}


def _openbookqa_additional(i: int) -> dict:
    return {**_openbookqa(i), "fact1": f"{_thing(i)} {_VERBS[i % 20]} {_thing(i + 1)}", "humanScore": 1.0,
            "clarity": 2.0, "turkIdAnonymized": f"turk{i}"}


def _arc(i: int) -> dict:
    return {"id": f"arc-{i}", "question": f"Which of these {_VERBS[i % 20]} {_thing(i + 5)} (case {i})?",
            "choices": _choices(i, 4), "answerKey": "ABCD"[i % 4]}


def _hellaswag(i: int) -> dict:
    return {"ind": i, "activity_label": f"Activity {i}", "ctx_a": f"A person looks at {_thing(i)}.",
            "ctx_b": "then they", "ctx": f"A person looks at {_thing(i)}. then they",
            "endings": [f"{_VERBS[(i + j) % 20]} {_thing(i + j)} [step {j}]." for j in range(4)],
            "source_id": f"src-{i}", "split": "val", "split_type": "indomain", "label": str(i % 4)}


def _winogrande(i: int) -> dict:
    return {"sentence": f"{_thing(i).capitalize()} {_VERBS[i % 20]} _ more than {_thing(i + 2)} in case {i}.",
            "option1": _thing(i + 7), "option2": _thing(i + 8), "answer": "12"[i % 2]}


def _boolq(i: int) -> dict:
    return {"question": f"does {_thing(i)} {_VERBS[i % 20]} {_thing(i + 1)} in case {i}",
            "passage": f"In case {i}, {_thing(i)} {_VERBS[i % 20]} {_thing(i + 1)}.", "idx": i, "label": i % 2}


def _copa(i: int) -> dict:
    return {"premise": f"{_thing(i).capitalize()} {_VERBS[i % 20]} {_thing(i + 4)} ({i}).",
            "choice1": f"{_thing(i + 1).capitalize()} fell.", "choice2": f"{_thing(i + 2).capitalize()} rose.",
            "question": ("cause", "effect")[i % 2], "idx": i, "label": i % 2}


def _nq_open(i: int) -> dict:
    return {"question": f"who {_VERBS[i % 20]} {_thing(i)} in story {i}", "answer": [_thing(i + 1), f"answer {i}"]}


def _trivia_qa(i: int) -> dict:
    alias = _thing(i + 2)
    return {
        "question": f"Which thing {_VERBS[i % 20]} {_thing(i)} in quiz {i}", "question_id": f"tqa_{i}",
        "question_source": "http://www.example.org/",
        "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
        "search_results": {"description": [], "filename": [], "rank": [], "title": [], "url": [], "search_context": []},
        "answer": {"aliases": [alias, f"{alias} {i}"], "normalized_aliases": [alias, f"{alias} {i}"],
                   "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "",
                   "normalized_value": alias, "type": "WikipediaEntity", "value": alias},
    }


ROW_MAKERS: Dict[tuple, Callable[[int], dict]] = {
    ("allenai/openbookqa", "main"): _openbookqa,
    ("allenai/openbookqa", "additional"): _openbookqa_additional,
    ("allenai/ai2_arc", "ARC-Challenge"): _arc,
    ("allenai/ai2_arc", "ARC-Easy"): _arc,
    ("Rowan/hellaswag", None): _hellaswag,
    ("allenai/winogrande", "winogrande_xl"): _winogrande,
    ("aps/super_glue", "boolq"): _boolq,
    ("aps/super_glue", "copa"): _copa,
    ("google-research-datasets/nq_open", None): _nq_open,
    ("mandarjoshi/trivia_qa", "rc.nocontext"): _trivia_qa,
}


def write_sample_mirror(data_dir: str, rows_per_split: int = 12, include_fewshot: bool = True) -> Path:
    """Write made-up rows for every mirror file of the ten tasks; returns the mirror folder.

    Each split gets rows with different indices so no row repeats across splits.
    """
    root = Path(data_dir)
    for split_number, file in enumerate(all_mirror_files(SUITE, include_fewshot)):
        make_row = ROW_MAKERS[(file.hub_path, file.config)]
        path = root / file.relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        first = 1000 * split_number
        with open(path, "w") as handle:
            for i in range(first, first + rows_per_split):
                handle.write(json.dumps(make_row(i)) + "\n")
    return root
