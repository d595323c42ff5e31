"""A sweep's results: run directories, their metrics.jsonl, a table (CSV, Markdown), a plot.

`python -m tinyllama_jax.sweep summarize --workdir=runs/tiny_lr` writes summary.csv, summary.md
and loss_curves.png into the sweep directory, rows sorted by best eval loss.
"""

import csv
import io
import json
import math
import os
import statistics

from tinyllama_jax.training import metrics

HIGHLIGHT = 3  # the best runs drawn in colour; the rest in grey
RUN_FILE = "sweep_run.json"  # in each run's workdir: bindings, resolved config, launch status


# ----------------------------------------------------------------------------- run directories


def format_value(value):
  """Short and exact: 0.0004 -> '4e-04', 0.95 -> '0.95', 2.0 -> '2', 500 -> '500'."""
  if isinstance(value, float):
    if value != 0 and value == value and abs(value) != float("inf") and not 0.1 <= abs(value) < 1e5:
      for digits in range(17):  # the fewest digits that read back as the same float
        text = f"{value:.{digits}e}"
        if float(text) == value:
          return text
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text
  return str(value)


def latest_checkpoint_step(run_dir):
  """orbax's finished step directories are plain integers; a save cut short is a temporary name."""
  ckpt = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(ckpt):
    return None
  steps = [int(n) for n in os.listdir(ckpt) if n.isdigit() and os.path.isdir(os.path.join(ckpt, n))]
  return max(steps, default=None)


def read_run_file(run_dir):
  path = os.path.join(run_dir, RUN_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def run_row(run_dir):
  """The summary of one run directory, or None when it is not a run (no metrics, no record)."""
  record = read_run_file(run_dir)
  has_metrics = os.path.exists(os.path.join(run_dir, metrics.METRICS_FILE))
  if not record and not has_metrics and not os.path.isdir(os.path.join(run_dir, "tb")):
    return None
  scalars, bad = metrics.read_metrics(run_dir)
  steps_total = record.get("config", {}).get("train", {}).get("steps")
  if steps_total is None and os.path.exists(os.path.join(run_dir, "config.json")):
    with open(os.path.join(run_dir, "config.json")) as f:
      steps_total = json.load(f)["train"]["steps"]
  train = scalars.get("train/loss", [])
  evals = scalars.get("eval/loss", [])
  speed = [v for _, v in scalars.get("perf/tokens_per_s", [])]
  ckpt = latest_checkpoint_step(run_dir)
  finished = ckpt is not None and steps_total is not None and ckpt >= steps_total
  best = min(evals, key=lambda p: p[1]) if evals else (None, None)
  return {
      "run": os.path.basename(run_dir),
      "binding": record.get("binding", {}),
      "status": "finished" if finished else record.get("status", "unknown"),
      "step": max((s for s, _ in train), default=0),
      "steps": steps_total,
      "final_train_loss": train[-1][1] if train else None,
      "final_eval_loss": evals[-1][1] if evals else None,
      "best_eval_loss": best[1],
      "best_eval_step": best[0],
      # the median: the first interval of a (re)started run carries its warm-up
      "tokens_per_s": statistics.median(speed) if speed else None,
      "unreadable_records": bad,
      # tb/ alone: trained before runs wrote metrics.jsonl; its losses are not read
      "no_metrics": not has_metrics and ckpt is not None,
      "curves": {"train/loss": train, "eval/loss": evals},
      "tasks": task_scores(scalars),
  }


def task_scores(scalars):
  """The last value of each lm-eval task's headline metric (train.eval_tasks): tasks/average,
  and per task acc_norm where it has one, else acc, else all its metrics."""
  by_task = {}
  for name, points in scalars.items():
    parts = name.split("/")
    if parts[0] == "tasks" and points:
      by_task.setdefault(parts[1] if len(parts) == 3 else "", {})[name] = points[-1][1]
  out = {}
  for task, values in sorted(by_task.items()):
    headline = [n for n in (f"tasks/{task}/acc_norm", f"tasks/{task}/acc") if n in values][:1]
    out.update({n: values[n] for n in (headline or sorted(values))})
  return out


def collect(workdir):
  if not os.path.isdir(workdir):
    raise ValueError(f"sweep directory {workdir!r} does not exist or is not a directory: pass the "
                     "--workdir of the sweep")
  rows = [r for d in sorted(os.listdir(workdir)) if os.path.isdir(os.path.join(workdir, d))
          for r in [run_row(os.path.join(workdir, d))] if r is not None]
  if not rows:
    raise ValueError(f"{workdir!r} holds no runs (no subdirectory with {RUN_FILE}, "
                     f"{metrics.METRICS_FILE} or tb/): "
                     "pass the --workdir of the sweep")
  # Best eval loss first; runs with no eval yet at the end, in name order.
  rows.sort(key=lambda r: (r["best_eval_loss"] is None or math.isnan(r["best_eval_loss"]),
                           r["best_eval_loss"] or 0.0, r["run"]))
  return rows


def binding_keys(rows):
  keys = []
  for row in rows:
    keys += [k for k in row["binding"] if k not in keys]
  return keys


def table(rows):
  """(header, rows of raw values): the CSV's content; the Markdown formats the same cells."""
  keys = binding_keys(rows)
  tasks = sorted({n for r in rows for n in r.get("tasks", {})})
  header = ["run", *keys, "status", "step", "steps", "final_train_loss", "final_eval_loss",
            "best_eval_loss", "best_eval_step", "tokens_per_s", *tasks]
  body = [[r["run"], *[r["binding"].get(k, "") for k in keys], r["status"], r["step"],
           r["steps"], r["final_train_loss"], r["final_eval_loss"], r["best_eval_loss"],
           r["best_eval_step"], r["tokens_per_s"], *[r.get("tasks", {}).get(n) for n in tasks]]
          for r in rows]
  return header, body


def to_csv(rows):
  header, body = table(rows)
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(header)
  writer.writerows([["" if v is None else v for v in line] for line in body])
  return out.getvalue()


def _cell(value, column):
  if value is None or value == "":
    return "-"
  if column == "tokens_per_s":
    return f"{value:,.0f}"
  if column.endswith("loss") or column.startswith("tasks/"):
    return f"{value:.4f}"
  if isinstance(value, float):
    return format_value(value)
  return str(value)


def to_markdown(rows):
  header, body = table(rows)
  names = {"final_train_loss": "final train loss", "final_eval_loss": "final eval loss",
           "best_eval_loss": "best eval loss",
           "best_eval_step": "at step", "tokens_per_s": "tokens/s"}
  lines = ["| " + " | ".join(names.get(h, h) for h in header) + " |",
           "|" + "|".join("---:" if h not in ("run", "status") else "---" for h in header) + "|"]
  lines += ["| " + " | ".join(_cell(v, h) for v, h in zip(line, header)) + " |" for line in body]
  return "\n".join(lines) + "\n"


def plot(rows, path):
  """Train and eval loss against step, the best runs (by eval loss) in colour, the rest grey."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for panel, tag in zip(axes, ("train/loss", "eval/loss")):
    for rank, row in reversed(list(enumerate(rows))):  # the best drawn last, on top
      points = row["curves"][tag]
      if not points:
        continue
      steps, values = zip(*points)
      best = rank < HIGHLIGHT and row["best_eval_loss"] is not None
      style = dict(color=f"C{rank}", linewidth=2.2, zorder=3) if best else \
          dict(color="0.7", linewidth=1.0, zorder=1)
      label = f"#{rank + 1} {row['run']}" if best else None
      panel.plot(steps, values, marker="o" if tag == "eval/loss" else None, markersize=3,
                 label=label, **style)
    panel.set_title(tag)
    panel.set_xlabel("step")
    panel.set_ylabel("loss")
    panel.grid(alpha=0.3)
  handles, labels = axes[1].get_legend_handles_labels()
  if handles:  # drawn worst first, listed best first
    axes[1].legend(handles[::-1], labels[::-1], fontsize=8, title=f"best {min(HIGHLIGHT, len(rows))} of "
                   f"{len(rows)} (grey: the rest)", title_fontsize=8)
  fig.tight_layout()
  tmp = f"{path}.tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def _write(path, text):
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def summarize(workdir, plot_curves=True):
  """Writes summary.csv, summary.md and loss_curves.png into workdir; prints the Markdown."""
  rows = collect(workdir)
  markdown = to_markdown(rows)
  _write(os.path.join(workdir, "summary.csv"), to_csv(rows))
  _write(os.path.join(workdir, "summary.md"), markdown)
  print(markdown, end="")
  bad = {r["run"]: r["unreadable_records"] for r in rows if r["unreadable_records"]}
  if bad:
    print(f"left out unreadable {metrics.METRICS_FILE} lines (cut-off writes): {bad}")
  old = [r["run"] for r in rows if r["no_metrics"]]
  if old:
    print(f"{len(old)} runs have checkpoints but no {metrics.METRICS_FILE} (trained before runs "
          f"wrote it), so their losses are blank: {', '.join(old)}")
  written = [os.path.join(workdir, n) for n in ("summary.csv", "summary.md")]
  if plot_curves:
    png = os.path.join(workdir, "loss_curves.png")
    try:
      plot(rows, png)
      written.append(png)
    except ImportError:
      print("no loss_curves.png: matplotlib is not installed (pip install 'matplotlib>=3.8'; "
            "--noplot skips the plot)")
  print("wrote " + ", ".join(written))
  return rows
