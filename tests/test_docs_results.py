"""The transfer-setting ablation tables of docs/reference.md are the per-seed results stored in
docs/results/transfer_ablation.csv, summarised as mean ± sample std (a table edited by hand, or
results replaced without the table, fails here)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"baseline": "Baseline (MoE + linear heads)", "tsp": "+ TSP (no DPM)", "ssm": "SSM (TSP + DPM)",
          "dpm-random": "SSM, DPM random init", "dpm-frozen": "SSM, DPM (prior, frozen)",
          "dpm-nodual": "SSM, DPM without dual (B = Aᵀ)"}
#: the bold heading that opens each setting's table in docs/reference.md
HEADINGS = {"default": "**Default setting**", "few-shot": "**Few-shot expressions**",
            "unseen": "**Unseen expression classes**", "frozen-visual": "**Vision weights frozen**"}


def _mean_std(values: list[float]) -> str:
    v = [100 * x for x in values]
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return f"{m:.1f} ± {sd:.1f}"


def _rows() -> list[dict[str, str]]:
    with open(ROOT / "docs" / "results" / "transfer_ablation.csv", newline="") as f:
        return list(csv.DictReader(f))


def _table_line(doc: str, setting: str, label: str) -> str:
    start = doc.index(HEADINGS[setting])
    table = doc[start:].split("\n\n")[1]  # the paragraph after the heading's sentence is the table
    lines = [ln for ln in table.splitlines() if ln.startswith(f"| {label} |")]
    assert len(lines) == 1, (setting, label, table[:300])
    return lines[0]


@pytest.mark.parametrize("setting", list(HEADINGS))
def test_docs_tables_are_the_stored_results(setting):
    doc = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    rows = [r for r in _rows() if r["setting"] == setting and r["unseen_loss"] in ("", "seen")]
    assert {r["config"] for r in rows} == set(LABELS)
    # the table's columns after "model | seeds", in order
    metrics = (["uar", "war", "seen_uar", "unseen_uar", "among_unseen_uar", "ausuc", "au_f1", "au_auc"]
               if setting == "unseen" else ["uar", "war", "au_f1", "au_auc"])
    for config, label in LABELS.items():
        rs = [r for r in rows if r["config"] == config]
        assert sorted(int(r["seed"]) for r in rs) == [0, 1, 2]
        cells = [c.strip() for c in _table_line(doc, setting, label).strip("|").split("|")]
        assert cells[1] == "3" and len(cells) == 2 + len(metrics), cells
        for m, cell in zip(metrics, cells[2:]):
            assert cell == _mean_std([float(r[m]) for r in rs]), (setting, config, m, cells)
