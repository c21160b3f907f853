"""A small stand-in for the seed README's lin_reg.py: least-squares fit of petal width on
petal length over the dataset given as the first argument (the dial-out example hashes this
file and iris.csv; the test guest never runs it)."""

import csv
import sys


def fit(rows: list[dict[str, str]]) -> tuple[float, float]:
    xs = [float(r["petal_length"]) for r in rows]
    ys = [float(r["petal_width"]) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


if __name__ == "__main__":
    with open(sys.argv[1] if len(sys.argv) > 1 else "iris.csv", newline="") as f:
        slope, intercept = fit(list(csv.DictReader(f)))
    print(f"petal_width = {slope:.3f} * petal_length + {intercept:.3f}")
