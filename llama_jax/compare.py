"""One table for several runs: the config fields in which they differ, and their final
and best metrics from `metrics.jsonl`.

    python -m llama_jax.compare runs/lr_sweep/*  [--metrics=loss,eval_loss] [--sort=eval_loss] [--average_over=seed]

For each metric: `final` is its last logged value; for `eval_*` metrics also `best`
over the evaluations after step 0 (a PPO run's step-0 evaluation is of the policy it
started from): lowest for losses, perplexities, KL, BCE, violation and refusal rates and
the rejected answers' rewards, highest otherwise; standard errors (`*_se`) get none.
`--sort` orders by `best` where there is one, else by `final`, best first. `status` is
`finished` (final_metrics.json written) or `unfinished` (running, stopped or failed). A
directory without `metrics.jsonl` (a run that failed before logging) is left out with a
note; rows are named by the directory, with as much of its path as tells runs apart.
`--average_over=seed` gives one row per setting instead: each metric's mean +- its
standard error over the runs whose configs differ only in those fields, each read at the
fewest steps any of them has run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

DEFAULT_METRICS = ("loss", "eval_loss")


class CompareError(ValueError):
    pass


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"a.b": value} (lists as JSON text, so that they compare and print)."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d) if isinstance(d, list) else d}


def load_run(workdir: str) -> dict:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise CompareError(f"{workdir}: no metrics.jsonl (not a run directory, or the run has not logged yet)")
    with open(path) as f:
        lines = f.read().splitlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno == len(lines):  # a run killed mid-write: its last line may be cut
                break
            raise CompareError(f"{path}:{lineno}: not a JSON line") from None
    config = {}
    if os.path.exists(os.path.join(workdir, "config.json")):
        with open(os.path.join(workdir, "config.json")) as f:
            config = flatten(json.load(f))
    finished = os.path.exists(os.path.join(workdir, "final_metrics.json"))
    return {"name": os.path.normpath(workdir), "rows": rows, "config": config,
            "status": "finished" if finished else "unfinished"}


def higher_is_better(metric: str) -> bool:
    return not any(w in metric for w in ("loss", "perplexity", "nonfinite", "kl", "violation", "refusal", "bce",
                                         "rejected"))


def summarize(run: dict, metrics: list[str], upto: int | None = None) -> dict[str, Any]:
    """The run's last value of each metric (and best, for evaluations), from its rows up to
    step `upto` (all of them by default)."""
    rows = [r for r in run["rows"] if upto is None or r.get("step", 0) <= upto]
    out: dict[str, Any] = {"step": max((r.get("step", 0) for r in rows), default=0), "status": run["status"]}
    for m in metrics:
        logged = [r for r in rows if isinstance(r.get(m), (int, float)) and math.isfinite(r[m])]
        out[m] = logged[-1][m] if logged else None
        if m.startswith("eval_") and not m.endswith("_se"):
            pick = max if higher_is_better(m) else min
            trained = [r[m] for r in logged if r.get("step", 0) > 0]
            out[f"best {m}"] = pick(trained) if trained else None
    return out


def _labels(paths: list[str]) -> list[str]:
    """Each path's last component, or as many of its last components as tell it apart."""
    parts = [p.split(os.sep) for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = [os.sep.join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return paths


def differing_fields(runs: list[dict]) -> list[str]:
    keys = sorted(set().union(*(r["config"] for r in runs)))
    return [k for k in keys if len({json.dumps(r["config"].get(k), sort_keys=True) for r in runs}) > 1]


def averaged(runs: list[dict], summaries: list[dict], over: list[str], metrics: list[str],
             notes: list | None = None) -> tuple[list[dict], list[dict]]:
    """Runs whose configs differ only in the fields `over` (e.g. seed) as one row each:
    `runs` (the number of runs), `status` (how many finished), `step` (the fewest), and
    each metric's mean +- its standard error over the runs that logged it (`(k of n)`
    where fewer than all did), all read at that step (a run still going, or stopped,
    is not averaged with others further on: the spread would be training progress, not
    the seeds'). The summaries keep the mean (to sort by) and the text."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        key = json.dumps({k: v for k, v in r["config"].items() if k not in over}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)
    out_runs, out_summaries = [], []
    for members in groups.values():
        names = [runs[i]["name"] for i in members]
        name = ", ".join(names) if len(", ".join(names)) <= 40 else f"{names[0]} and {len(names) - 1} more"
        out_runs.append({"name": name, "config": runs[members[0]]["config"], "rows": []})
        step = min(summaries[i]["step"] for i in members)
        summary: dict[str, Any] = {"runs": len(members), "step": step,
                                   "status": f"{sum(summaries[i]['status'] == 'finished' for i in members)}/"
                                             f"{len(members)} finished"}
        at = {i: summaries[i] if summaries[i]["step"] == step else summarize(runs[i], metrics, upto=step)
              for i in members}
        if notes is not None and any(summaries[i]["step"] != step for i in members):
            short = [runs[i]["name"] for i in members if summaries[i]["step"] == step]
            notes.append(f"{name}: every run read at step {step}, where {', '.join(short)} "
                         f"{'is' if len(short) == 1 else 'are'} (the others ran further)")
        for key in summaries[members[0]]:
            if key in ("step", "status"):
                continue
            values = [at[i].get(key) for i in members if at[i].get(key) is not None]
            summary[key] = _Mean(values, len(members)) if values else None
        out_summaries.append(summary)
    return out_runs, out_summaries


class _Mean(float):
    """A mean that prints with its standard error over the runs (and how many of them
    logged the metric, where not all did)."""

    def __new__(cls, values: list[float], n: int):
        mean = float(sum(values) / len(values))
        self = super().__new__(cls, mean)
        k = len(values)
        se = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1) / k) if k > 1 else None
        self.text = f"{mean:.4g}" + (f" +- {se:.2g}" if se is not None else "") + (f" ({k} of {n})" if k < n else "")
        return self


def table(workdirs: list[str], metrics: list[str] | None = None, sort: str | None = None, notes=None,
          average_over: list[str] | None = None) -> str:
    """The table; `notes` (a list) gets a line for each directory left out (no
    metrics.jsonl: a run that failed before it logged). With none left, a CompareError.
    `average_over` (["seed"]): one row per setting, averaged over the runs that differ
    only in those fields (`averaged`)."""
    runs, skipped = [], []
    for w in workdirs:
        try:
            runs.append(load_run(w))
        except CompareError as e:
            if os.path.exists(os.path.join(w, "metrics.jsonl")) or len(workdirs) == 1:
                raise  # a malformed file is an error, not a run to leave out
            skipped.append(str(e))
    if not runs:
        raise CompareError("; ".join(skipped))
    if notes is not None:
        notes += [f"left out {s}" for s in skipped]
    for run, label in zip(runs, _labels([r["name"] for r in runs])):
        run["name"] = label
    seen = {k for r in runs for row in r["rows"] for k in row}
    unknown = [m for m in metrics or [] if m not in seen]
    if unknown:  # a misspelt metric would be a column of dashes
        raise CompareError(f"--metrics: {unknown} logged by none of the runs; they log {sorted(seen - {'step'})}")
    if metrics is None:
        metrics = [m for m in DEFAULT_METRICS if m in seen] + sorted(
            k for k in seen if k.startswith("eval_") and k not in DEFAULT_METRICS)
    fields = differing_fields(runs) if len(runs) > 1 else []
    summaries = [summarize(r, metrics) for r in runs]
    if average_over:
        missing = [f for f in average_over if not any(f in r["config"] for r in runs)]
        if missing:
            raise CompareError(f"--average_over: {missing} in no run's config.json (fields are dotted: "
                               "optimizer.learning_rate)")
        runs, summaries = averaged(runs, summaries, average_over, metrics, notes)
        fields = [f for f in fields if f not in average_over]
    if sort:
        key = f"best {sort}" if f"best {sort}" in summaries[0] else sort
        numeric = sorted(k for k in summaries[0] if k not in ("status", "runs"))
        if key not in numeric:
            raise CompareError(f"--sort={sort}: not one of the metric columns {numeric}")
        sign = -1.0 if higher_is_better(sort) else 1.0

        def value(i):  # the best where the run has one, else the final value
            v = summaries[i][key]
            return summaries[i].get(sort) if v is None else v

        order = sorted(range(len(runs)), key=lambda i: (value(i) is None, sign * (value(i) or 0.0)))
        runs, summaries = [runs[i] for i in order], [summaries[i] for i in order]
    columns = ["run", *fields, *summaries[0].keys()]
    cells = [[r["name"], *(_fmt(r["config"].get(f)) for f in fields), *(_fmt(v) for v in s.values())]
             for r, s in zip(runs, summaries)]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, _Mean):
        return v.text
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--metrics", default="", help="comma-separated (default: loss, eval_loss and every eval_*)")
    parser.add_argument("--sort", default="", help="a metric to sort by, best first (by its best value after step 0 "
                        "for eval_* metrics, else its final one)")
    parser.add_argument("--average_over", default="", metavar="FIELDS",
                        help="comma-separated config fields (e.g. seed): one row per setting, each metric's mean +- "
                             "its standard error over the runs that differ only in them")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] or None
    over = [f.strip() for f in args.average_over.split(",") if f.strip()] or None
    notes: list[str] = []
    try:
        print(table(args.workdirs, metrics, args.sort or None, notes, average_over=over))
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
