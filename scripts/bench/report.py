"""Figures and how they are reported: median [min-max] of the repetitions beside the baseline
of the same run, their ratio, the target and pass/fail; the table and the JSON document."""

from __future__ import annotations

import operator
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(samples: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(samples: Sequence[float], digits: int = 3) -> dict[str, Any]:
    return {
        "median": round(statistics.median(samples), digits),
        "min": round(min(samples), digits),
        "max": round(max(samples), digits),
        "n": len(samples),
    }


def ratios(values: Sequence[float], baselines: Sequence[float]) -> list[float]:
    return [v / b for v, b in zip(values, baselines, strict=True)]


_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}


@dataclass
class Figure:
    """One line of the table: per-repetition values, baselines and their ratios."""

    key: str
    label: str
    unit: str
    values: list[float]
    baseline: list[float] | None = None
    baseline_label: str = ""
    target: tuple[str, str, float] | None = None  # ("ratio" | "value", op, limit)
    note: str = ""
    passed_override: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratios(self) -> list[float] | None:
        """Each repetition's value over its own baseline."""
        return None if self.baseline is None else ratios(self.values, self.baseline)

    def passed(self) -> bool | None:
        if self.passed_override is not None and self.target is None:
            return self.passed_override
        if self.target is None:
            return None
        on, op, limit = self.target
        series = self.ratios if on == "ratio" else self.values
        if not series:
            return False
        ok = _OPS[op](statistics.median(series), limit)
        if self.passed_override is not None:
            ok = ok and self.passed_override
        return ok

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"label": self.label, "unit": self.unit}
        doc["value"] = summary(self.values)
        if self.baseline is not None:
            doc["baseline"] = {"label": self.baseline_label, **summary(self.baseline)}
        if self.ratios is not None:
            doc["ratio"] = summary(self.ratios)
        if self.target is not None:
            on, op, limit = self.target
            doc["target"] = {"on": on, "op": op, "limit": limit, "text": f"{on} {op} {limit:g}"}
        doc["pass"] = self.passed()
        if self.note:
            doc["note"] = self.note
        doc.update(self.extra)
        return doc


def fmt(stat: dict[str, Any], unit: str) -> str:
    digits = 0 if abs(stat["median"]) >= 1000 else (1 if abs(stat["median"]) >= 10 else 2)

    def one(x: float) -> str:
        return f"{x:,.{digits}f}"

    return f"{one(stat['median'])} [{one(stat['min'])}-{one(stat['max'])}] {unit}"


def table(figures: Iterable[Figure]) -> str:
    rows = [
        ("figure", "value median [min-max]", "baseline median [min-max]", "ratio", "target", "pass")
    ]
    for f in figures:
        doc = f.as_json()
        ratio = doc.get("ratio")
        target = doc.get("target", {}).get("text", "-")
        passed = doc["pass"]
        rows.append(
            (
                f.label,
                fmt(doc["value"], f.unit),
                fmt(doc["baseline"], f.unit) if "baseline" in doc else "-",
                f"{ratio['median']:.2f} [{ratio['min']:.2f}-{ratio['max']:.2f}]" if ratio else "-",
                target,
                "-" if passed is None else ("PASS" if passed else "FAIL"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
