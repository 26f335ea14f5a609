"""The README's learning-curve tables agree with the curve files committed under docs/results/curves.

Each committed file is one run's ``curves/curves.json`` (scripts/learning_curves.py), kept in
``docs/results/curves/<scale>/<group>_s<training seed>/``. The README's numbers are computed from them by
``curves_summary`` (what scripts/summarise_curves.py prints): a cell rounded or edited by hand, a table left
behind after a rerun, or a committed run that the table does not list fails here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from guided_diffusion.experiments.curves_summary import groups_in_folder, load_group, summarise

ROOT = Path(__file__).resolve().parent.parent
CURVES = ROOT / "docs" / "results" / "curves"
README = ROOT / "README.md"
NUMBER = re.compile(r"[-+]?\d+\.\d+")
# README column header -> curves metric
COLUMNS = {"unh. Dice": "test.dice", "pooled Dice": "test.dice_pooled", "pixel AUPRC": "test.auprc",
           "image acc.": "test.image_accuracy", "unh. recall": "test.image_recall", "loss": "test.loss"}


def committed_groups(scale: str) -> dict[str, list[str]]:
    """group label -> its committed run folders (``<label>_s<seed>``) at ``scale`` (e.g. "32px")."""
    return groups_in_folder(str(CURVES / scale))


def readme_table(first_columns: tuple[str, str]) -> tuple[list[str], dict[str, list[str]]]:
    """The README table whose header starts with ``first_columns``: (header cells, label -> row cells);
    a row's label is the first word of its first cell."""
    lines = README.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if tuple(cells[:2]) == first_columns:
            rows = {}
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                row_cells = [c.strip() for c in row.strip().strip("|").split("|")]
                rows[row_cells[0].split()[0]] = row_cells
            return cells, rows
    raise AssertionError(f"README.md has no table with the header {' | '.join(first_columns)}")


def assert_printed(text: str, value: float, where: str) -> None:
    """``text`` is ``value`` rounded to the digits it shows (bold marks allowed)."""
    match = NUMBER.search(text)
    assert match, f"{where}: no number in {text!r}"
    digits = len(match.group().split(".")[1])
    assert abs(float(match.group()) - value) <= 0.5 * 10.0 ** -digits + 1e-12, (
        f"{where}: README shows {match.group()}, the committed curves give {value:.6f}")


def stat_at(summary: dict, label: str, step: int, metric: str) -> dict:
    row = next((s for s in summary[label]["steps"] if s["step"] == step), None)
    assert row is not None, f"{label}: the committed curves have no evaluation at step {step}"
    return row["metrics"][metric]


@pytest.fixture(scope="module")
def summary_32px() -> dict:
    return summarise({label: load_group(label, dirs)
                      for label, dirs in committed_groups("32px").items()})


def test_every_committed_32px_group_is_a_row_of_the_quality_table(summary_32px):
    header, rows = readme_table(("network", "training seeds"))
    missing = sorted(set(summary_32px) - set(rows))
    assert not missing, f"committed curves without a row in the README's quality table: {missing}"


def test_the_quality_table_matches_the_committed_curves_at_4000_steps(summary_32px):
    header, rows = readme_table(("network", "training seeds"))
    for label, group in summary_32px.items():
        cells = rows[label]
        seeds = [int(s) for s in re.findall(r"\d+", cells[1])]
        assert seeds == group["seeds"], (
            f"{label}: README lists training seeds {seeds}, committed {group['seeds']}")
        for column, metric in COLUMNS.items():
            if column not in header:
                continue
            text, stat = cells[header.index(column)], stat_at(summary_32px, label, 4000, metric)
            assert stat["n"] == len(seeds), (
                f"{label}, {column}: {stat['n']} of {len(seeds)} runs have a value")
            numbers = NUMBER.findall(text)
            where = f"README quality table, {label}, {column}"
            assert_printed(numbers[0], stat["mean"], where + " (mean)")
            if len(seeds) > 1:
                assert len(numbers) == 2 and "±" in text, f"{where}: expected 'mean ± std', got {text!r}"
                assert_printed(numbers[1], stat["std"], where + " (sample std)")
            else:
                assert len(numbers) == 1, f"{where}: one training seed has no spread, got {text!r}"


def test_the_64px_table_matches_the_committed_curves():
    """One README row per committed 64 px run (``<label>_s<seed>``: the runs differ in their steps, so
    their rows are not averaged), each cell its run's value at the row's steps."""
    runs = {os.path.basename(d): (label, d) for label, dirs in committed_groups("64px").items() for d in dirs}
    header, rows = readme_table(("run", "steps"))
    assert set(runs) <= set(rows), f"64 px curves without a README row: {sorted(set(runs) - set(rows))}"
    for name, (label, run_dir) in runs.items():
        summary = summarise({name: load_group(label, [run_dir])})
        cells = rows[name]
        steps = [int(s.replace(",", "")) for s in re.findall(r"[\d,]+\d", cells[1])]
        assert steps, f"README 64 px table, {name}: no steps in {cells[1]!r}"
        for column, metric in COLUMNS.items():
            if column not in header:
                continue
            parts = cells[header.index(column)].split("/")
            where = f"README 64 px table, {name}, {column}"
            if metric == "test.loss":  # one value: the last step's
                assert_printed(parts[-1], stat_at(summary, name, steps[-1], metric)["mean"], where)
                continue
            assert len(parts) == len(steps), f"{where}: {len(parts)} values for {len(steps)} steps"
            for step, part in zip(steps, parts):
                assert_printed(part, stat_at(summary, name, step, metric)["mean"], f"{where}, step {step}")


def test_a_hand_edited_cell_is_caught():
    with pytest.raises(AssertionError, match="README shows 0.482"):
        assert_printed("**0.482**", 0.48099, "cell")
    assert_printed("**0.481**", 0.48099, "cell")
