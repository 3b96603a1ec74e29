"""The paper's numbers as transcribed: each average the paper prints equals the mean of the task scores we hold.

The paper averaged unrounded scores: the printed two-decimal scores (OBQA and COPA are exact at their precision)
are each within 0.005 of them, and the printed average within 0.005 of its own mean, so the two agree to 0.01.
"""
import pytest

TOLERANCE = 0.01 + 1e-9

from router_upcycling.eval.report import PAPER_RESULTS, PAPER_TABLES, score_column

# What the paper prints besides the task scores: Table 1's group rows (Understanding, Reasoning, Knowledge,
# Average), and the Average row of Tables 2-4.
PRINTED_TABLE_1 = {
    "scratch": (32.90, 37.91, 32.55, 34.76), "vanilla": (49.40, 49.61, 35.14, 43.78),
    "switch": (25.60, 27.17, 25.44, 26.17), "locmoe": (44.80, 44.95, 35.35, 41.08),
    "mlp": (46.30, 48.67, 33.14, 41.98), "mor": (50.80, 51.86, 37.31, 45.83),
}
PRINTED_AVERAGES = {
    "8x1.8b-vanilla": 46.58, "8x1.8b-mor": 48.24, "16x0.5b-vanilla": 40.78, "16x0.5b-mor": 42.45,
    "r2": 42.05, "r4": 36.74, "r16": 29.90, "r32": 43.90, "max": 44.60,
}


@pytest.mark.parametrize("run", sorted(PRINTED_TABLE_1))
def test_table_1_group_averages_match_the_paper(run):
    column = score_column(PAPER_RESULTS[run])
    computed = tuple(column[group] for group in ("understanding", "reasoning", "knowledge", "average"))
    assert computed == pytest.approx(PRINTED_TABLE_1[run], abs=TOLERANCE)


@pytest.mark.parametrize("run", sorted(PRINTED_AVERAGES))
def test_printed_averages_of_tables_2_to_4_match(run):
    assert score_column(PAPER_RESULTS[run])["average"] == pytest.approx(PRINTED_AVERAGES[run], abs=TOLERANCE)


def test_every_run_of_the_tables_has_ten_scores_and_repeated_columns_agree():
    runs = {run for _, columns in PAPER_TABLES.values() for run, _ in columns}
    assert runs == set(PAPER_RESULTS) and all(len(scores) == 10 for scores in PAPER_RESULTS.values())
    # Table 2's 8x0.5B columns, Table 3's vanilla and R=N=8, Table 4's summation are Table 1's runs
    assert [run for run, _ in PAPER_TABLES[1][1]] == ["scratch", "vanilla", "switch", "locmoe", "mlp", "mor"]
    assert [len(columns) for _, columns in PAPER_TABLES.values()] == [6, 6, 6, 2]
