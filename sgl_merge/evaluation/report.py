"""Accuracy with 95% confidence intervals, paired differences, tokens used, and the plot.

Intervals are percentile bootstraps over problems (samples of one problem are averaged first, so
a problem counts once); differences between methods are paired (the same problems, the same
traces), which is what makes a small gain detectable.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP = 2000
MERGE_METHODS = ("merge", "merge-conf", "merge-keep")  # uniform, confidence-weighted, most confident only
LABELS = {"vote": "majority vote@k", "merge": "ThinkMerge@k", "merge-conf": "ThinkMerge@k, confidence-weighted",
          "merge-keep": "ThinkMerge@k, most confident half", "parathink": "parathink@k (KV join of the paths)"}
COLORS = {"vote": "tab:blue", "merge": "tab:red", "merge-conf": "tab:orange", "merge-keep": "tab:green",
          "parathink": "tab:purple"}


def _per_problem(records: list[dict], value) -> np.ndarray:
    """One number per problem: `value(record)` averaged over the problem's samples."""
    by_problem: dict[int, list[float]] = {}
    for rec in records:
        by_problem.setdefault(rec["problem"], []).append(float(value(rec)))
    return np.array([np.mean(v) for _, v in sorted(by_problem.items())])


def bootstrap_ci(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values`."""
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(BOOTSTRAP, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def _columns(records: list[dict], ks: list[int]) -> dict[str, tuple[int, object, object]]:
    """name -> (k, per-record correctness, per-record tokens generated) for every method present."""
    first = records[0]
    cols = {}
    if "answers" in first:
        cols["single"] = (1, lambda r: np.mean([a["correct"] for a in r["answers"]]),
                          lambda r: np.mean([t + a["tokens"] for t, a in zip(r["thinking_tokens"], r["answers"])]))
    for k in ks:
        if "vote" in first:
            cols[f"vote@{k}"] = (k, lambda r, k=k: r["vote"][str(k)]["correct"],
                                 lambda r, k=k: sum(r["thinking_tokens"][:k]) + sum(a["tokens"] for a in r["answers"][:k]))
        for method in MERGE_METHODS:
            if method in first:
                # every member decodes every answer token, so the answer counts once per member (an
                # agent's records count their own total)
                cols[f"{method}@{k}"] = (k, lambda r, k=k, m=method: r[m][str(k)]["correct"],
                                         lambda r, k=k, m=method: r[m][str(k)].get("total_tokens")
                                         or sum(r["thinking_tokens"][:k])
                                         + len(r[m][str(k)].get("members", range(k))) * r[m][str(k)]["tokens"])
        if "parathink" in first:  # one answer, read over the k paths (a ParaThinker's own, or the traces)
            cols[f"parathink@{k}"] = (k, lambda r, k=k: r["parathink"][str(k)]["correct"],
                                      lambda r, k=k: sum(r.get("path_tokens", r["thinking_tokens"])[:k])
                                      + r["parathink"][str(k)]["tokens"])
    return cols


def summarize(records: list[dict], ks: list[int]) -> dict:
    """The table rows and the paired comparisons, as plain data (it goes to summary.json)."""
    if not records:
        return {"problems": 0, "rows": [], "paired": []}
    cols = _columns(records, ks)
    scores = {name: _per_problem(records, fn) for name, (_, fn, _) in cols.items()}
    rows = []
    for name, (k, _, tokens) in cols.items():
        lo, hi = bootstrap_ci(scores[name])
        rows.append({"method": name.split("@")[0], "k": k, "name": name, "accuracy": float(scores[name].mean()),
                     "ci95": [lo, hi], "tokens_per_problem": float(_per_problem(records, tokens).mean())})
    paired = []
    for k in ks:
        for a, b in ((f"merge@{k}", "single"), (f"merge@{k}", f"vote@{k}"), (f"merge-conf@{k}", f"merge@{k}"),
                     (f"merge-keep@{k}", f"merge@{k}"), (f"parathink@{k}", f"merge@{k}")):
            if a in scores and b in scores:
                diff = scores[a] - scores[b]
                lo, hi = bootstrap_ci(diff)
                paired.append({"comparison": f"{a} - {b}", "difference": float(diff.mean()), "ci95": [lo, hi],
                               "excludes_zero": bool(lo > 0 or hi < 0)})
    return {"problems": len(scores[next(iter(scores))]), "samples": len(records), "rows": rows, "paired": paired}


def format_table(summary: dict) -> str:
    lines = [f"{summary['problems']} problems, {summary['samples']} runs",
             f"{'method':<12} {'accuracy':>9}  {'95% CI':<17} {'tokens/problem':>14}"]
    for r in summary["rows"]:
        lo, hi = r["ci95"]
        lines.append(f"{r['name']:<12} {r['accuracy']:>9.3f}  [{lo:.3f}, {hi:.3f}]    {r['tokens_per_problem']:>14.1f}")
    if summary["paired"]:
        lines.append("")
        lines.append(f"{'paired difference':<26} {'mean':>7}  95% CI")
        for p in summary["paired"]:
            lo, hi = p["ci95"]
            mark = "  (excludes 0)" if p["excludes_zero"] else ""
            lines.append(f"{p['comparison']:<26} {p['difference']:>+7.3f}  [{lo:+.3f}, {hi:+.3f}]{mark}")
    return "\n".join(lines)


def plot(summary: dict, path, title: str) -> None:
    """Accuracy vs k, one line per method (single trace is k = 1 of both), with 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    single = [r for r in rows if r["method"] == "single"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, color in COLORS.items():
        pts = single + [r for r in rows if r["method"] == method]
        if len(pts) <= len(single):
            continue
        ks = [r["k"] for r in pts]
        acc = [r["accuracy"] for r in pts]
        err = [[a - r["ci95"][0] for a, r in zip(acc, pts)], [r["ci95"][1] - a for a, r in zip(acc, pts)]]
        # dashed: the confidence-weighted line often lies right on the uniform one
        ax.errorbar(ks, acc, yerr=err, marker="o", capsize=3, color=color, label=LABELS[method],
                    linestyle="--" if method == "merge-conf" else "-")
    if single:
        ax.axhline(single[0]["accuracy"], color="gray", linestyle="--", linewidth=1, label="single trace")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["k"] for r in rows}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("k (traces)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
