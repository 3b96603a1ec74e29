"""The paper's numbers as transcribed: each average the paper prints equals the mean of the task scores we hold.

The paper averaged unrounded scores: the printed two-decimal scores (OBQA and COPA are exact at their precision)
are each within 0.005 of them, and the printed average within 0.005 of its own mean, so the two agree to 0.01.
"""
import pytest

from router_upcycling.eval.report import PAPER_PRINTED_AVERAGES, PAPER_RESULTS, PAPER_TABLES, paper_column, score_column

TOLERANCE = 0.01 + 1e-9


@pytest.mark.parametrize("run", sorted(PAPER_RESULTS))
def test_printed_averages_are_the_means_of_the_task_scores(run):
    computed = score_column(PAPER_RESULTS[run])
    printed = PAPER_PRINTED_AVERAGES[run]
    assert printed and {group: computed[group] for group in printed} == pytest.approx(printed, abs=TOLERANCE)
    assert paper_column(run) == {**computed, **printed}


def test_table_1_prints_every_group_and_tables_2_to_4_the_average():
    for number, (_, columns) in PAPER_TABLES.items():
        for run, _ in columns:
            groups = set(PAPER_PRINTED_AVERAGES[run])
            assert groups == ({"understanding", "reasoning", "knowledge", "average"} if run in dict(PAPER_TABLES[1][1]) else {"average"})


def test_every_run_of_the_tables_has_ten_scores():
    runs = {run for _, columns in PAPER_TABLES.values() for run, _ in columns}
    assert runs == set(PAPER_RESULTS) == set(PAPER_PRINTED_AVERAGES)
    assert all(len(scores) == 10 for scores in PAPER_RESULTS.values())
    assert [run for run, _ in PAPER_TABLES[1][1]] == ["scratch", "vanilla", "switch", "locmoe", "mlp", "mor"]
    assert [len(columns) for _, columns in PAPER_TABLES.values()] == [6, 6, 6, 2]
