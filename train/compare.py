"""Compare the runs of an MLflow experiment (e.g. a sweep): one row per run with arch, params,
MACs per pixel, training time, steps, images/s, training TFLOP/s (and MFU, given the peak it is a
fraction of), best validation PSNR/SSIM and LIVE1 PSNR/SSIM/PSNR-B per quality (logged by
`train.evaluate --log-mlflow`), as markdown and CSV, plus plots of PSNR against training time and
against parameters. The run of a shipped model (`train.ship`, the MLflow registry's alias
`shipped`) says so.

    python -m train.compare --experiment jpeg-sweep [--out outputs/compare] [--dataset live1_gray] [--peak-tflops 790]
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
import time
from pathlib import Path

from data_pipeline.errors import UserError, command
from data_pipeline.images import atomic_write_bytes, check_output_folder
from runtime.metrics import metrics
from runtime.mlflow_store import latency_metric, resolve_tracking_uri, shipped_runs

QUALITIES = (10, 20, 30, 40)
SILENT_S = 600  # a RUNNING run that has logged nothing for this long is said to be silent
EVALUATED = re.compile(r"(.+)_model_psnr_q\d+")  # train.evaluate --log-mlflow's metric names


def _best_val(client, run_id: str) -> tuple[float | None, float | None]:
    """(best validation PSNR, SSIM at that validation)."""
    psnr = client.get_metric_history(run_id, "val_psnr")
    if not psnr:
        return None, None
    best = max(psnr, key=lambda m: m.value)
    ssim = {m.step: m.value for m in client.get_metric_history(run_id, "val_ssim")}
    return best.value, ssim.get(best.step)


def _after_start(history: list) -> list:
    """A metric's log windows without the first, which includes the start-up (all of it if one)."""
    return sorted(history, key=lambda h: h.step)[1:] or history


def _mean(history: list) -> float | None:
    return sum(h.value for h in history) / len(history) if history else None


def _status(run, history) -> str:
    """MLflow keeps a killed run (kill -9, the OOM killer, a lost node) RUNNING for ever: a running
    run says how long it has logged nothing, once that is SILENT_S or more."""
    if run.info.status != "RUNNING":
        return run.info.status
    silent = time.time() - max([h.timestamp for h in history] + [run.info.start_time]) / 1000
    if silent < SILENT_S:
        return "RUNNING"
    return f"RUNNING? (nothing logged for {silent / 3600:.1f} h: killed?)" if silent >= 3600 else \
        f"RUNNING? (nothing logged for {silent / 60:.0f} min: killed?)"


def collect(experiment: str, dataset: str = "live1_gray") -> tuple[list[dict], dict]:
    """Rows for the runs of `experiment` (newest first) and the JPEG baseline found on them."""
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(create=False))
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(experiment) is None:
        names = sorted(e.name for e in client.search_experiments() if e.name != "Default")  # MLflow's own, empty
        there = f" (it holds {', '.join(map(repr, names))}: --experiment NAME)" if names else " (it holds none yet)"
        raise UserError(f"no MLflow experiment {experiment!r} in {mlflow.get_tracking_uri()}{there}")
    rows, jpeg, shipped = [], {}, shipped_runs(client)
    for run in mlflow.search_runs(experiment_names=[experiment], output_format="list"):
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        history = client.get_metric_history(run.info.run_id, "images_per_s")
        finish = client.get_metric_history(run.info.run_id, "total_wall_time_s")  # logged at the last step
        best_psnr, best_ssim = _best_val(client, run.info.run_id)
        curve = val_curve(client, run.info.run_id)
        row = {"run": run.info.run_name, "run_id": run.info.run_id, "shipped_as": " ".join(shipped.get(run.info.run_id, [])),
               "status": _status(run, history), "arch": p.get("model.arch"),
               "grid_point": t.get("grid_point", ""), "params_m": float(p["params"]) / 1e6 if "params" in p else None,
               "macs_per_pixel_k": float(p["macs_per_pixel"]) / 1e3 if "macs_per_pixel" in p else None,
               "train_time_min": m["total_wall_time_s"] / 60 if "total_wall_time_s" in m else None,
               "steps": max(h.step for h in finish or history) if finish or history else None,
               "images_per_s": _mean(_after_start(history)),
               "train_tflops": _mean(_after_start(client.get_metric_history(run.info.run_id, "train_tflops"))),
               "world_size": t.get("world_size"), "best_val_psnr": best_psnr, "best_val_ssim": best_ssim, "curve": curve,
               # serve_bench / to_trt logged on the checkpoint: torch eager fp32, one 512x512 image
               "cpu_ms_512": m.get(latency_metric("torch fp32", "cpu", 1, 512, 512)),
               "gpu_ms_512": m.get(latency_metric("torch fp32", "cuda", 1, 512, 512)), "device_name": t.get("device_name", ""),
               "evaluated_on": {match.group(1) for key in m if (match := EVALUATED.fullmatch(key))}}
        for q in QUALITIES:
            for metric in (m.name for m in metrics()):
                row[f"{metric}_q{q}"] = m.get(f"{dataset}_model_{metric}_q{q}")
                if f"{dataset}_jpeg_{metric}_q{q}" in m:
                    jpeg[f"{metric}_q{q}"] = m[f"{dataset}_jpeg_{metric}_q{q}"]
        rows.append(row)
    return rows, jpeg


def _fmt(v, digits=2) -> str:
    if isinstance(v, float) and abs(v) >= sys.float_info.max:  # MLflow stores an infinite metric as the largest float
        return "inf" if v > 0 else "-inf"
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _escape(text: str) -> str:
    """A table cell as Markdown shows it: a run named 'unet | bs64' would split its row."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict], jpeg: dict, dataset: str, peak_tflops: float | None = None) -> str:
    """The table; with the training device's measured peak (`train.benchmark` prints it), each run's
    training TFLOP/s as a fraction of it: MFU."""
    qs = [q for q in QUALITIES if any(r[f"psnr_q{q}"] is not None for r in rows) or f"psnr_q{q}" in jpeg]
    head = ["run", "arch", "status", "params (M)", "MACs/px (k)", "train min", "steps", "img/s", "TFLOP/s"]
    head += [f"MFU ({peak_tflops:g} TFLOP/s)"] if peak_tflops else []
    head += ["val PSNR", "val SSIM"]
    latency = [(k, label) for k, label in (("cpu_ms_512", "CPU ms 512²"), ("gpu_ms_512", "GPU ms 512²"))
               if any(r[k] is not None for r in rows)]
    head += [label for _, label in latency]
    ms = metrics()
    head += [f"{dataset} q{q} " + " / ".join(m.label for m in ms) for q in qs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(values: dict, q: int) -> str:
        return " / ".join(_fmt(values.get(f"{m.name}_q{q}"), m.digits) for m in ms)

    if jpeg:
        lines.append("| JPEG |" + " - |" * (len(head) - 1 - len(qs)) + " " + " | ".join(cell(jpeg, q) for q in qs) + " |")
    for r in rows:
        name = r["run"] + (f" (shipped as {r['shipped_as']})" if r.get("shipped_as") else "")
        tflops = r.get("train_tflops")
        cells = [name, _fmt(r["arch"]), r["status"], _fmt(r["params_m"], 3), _fmt(r["macs_per_pixel_k"], 1), _fmt(r["train_time_min"], 1),
                 _fmt(r.get("steps")), _fmt(r["images_per_s"], 1), _fmt(tflops, 3)]
        cells += [f"{tflops / peak_tflops:.1%}" if tflops is not None else "-"] if peak_tflops else []
        cells += [_fmt(r["best_val_psnr"]), _fmt(r["best_val_ssim"], 4)]
        cells += [_fmt(r[k], 1) for k, _ in latency]
        cells += [cell(r, q) for q in qs]
        lines.append("| " + " | ".join(_escape(str(c)) for c in cells) + " |")
    return "\n".join(lines)


def val_curve(client, run_id: str) -> list[tuple[float, float]]:
    """[(training minutes, val PSNR)]: minutes summed from the logged step times (each log window
    covers the steps since the previous one), so pauses between resumed sessions do not count."""
    step_times = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "step_time_s"))
    minutes, done, prev = {}, 0.0, 0
    for step, seconds in step_times:
        done += (step - prev) * seconds / 60
        minutes[step], prev = done, step
    curve = []
    for m in sorted(client.get_metric_history(run_id, "val_psnr"), key=lambda m: m.step):
        before = [s for s in minutes if s <= m.step]
        if before:
            curve.append((minutes[max(before)], m.value))
    return curve


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def score(r):
        return r["psnr_q10"] if r["psnr_q10"] is not None else r["best_val_psnr"]

    ylabel = "LIVE1 q10 PSNR (dB)" if any(r["psnr_q10"] is not None for r in rows) else "best validation PSNR (dB)"
    paths = []
    for key, xlabel, name in (("train_time_min", "training time (min)", "psnr_vs_time.png"),
                              ("params_m", "parameters (M)", "psnr_vs_params.png")):
        pts = [(r[key], score(r), r["run"]) for r in rows if r[key] is not None and score(r) is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        for x, y, label in pts:
            ax.scatter(x, y)
            ax.annotate(label, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=xlabel, ylabel=ylabel, xscale="log" if key == "params_m" else "linear")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out / name))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = [r for r in rows if r.get("curve")]
    for i, r in enumerate(curves):  # 10 colours, then dashed, then dotted
        ax.plot(*zip(*r["curve"]), marker=".", label=r["run"], linestyle=("-", "--", ":")[i // 10 % 3])
    ax.set(xlabel="training time (min, summed step times)", ylabel="validation PSNR (dB, held-out training images)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    else:  # no run has validated yet
        ax.text(0.5, 0.5, "no validation yet", transform=ax.transAxes, ha="center")
    paths.append(_save(fig, out / "val_psnr_curves.png"))
    return paths


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="jpeg-sweep")
    ap.add_argument("--dataset", default="live1_gray", help="evaluation dataset whose logged metrics to show")
    ap.add_argument("--out", type=Path, default=Path("outputs/compare"))
    ap.add_argument("--peak-tflops", type=float, help="the training device's measured peak TFLOP/s in the runs' precision "
                    "(train.benchmark prints it): adds each run's MFU")
    args = ap.parse_args(argv)
    if args.peak_tflops is not None and not 0 < args.peak_tflops < math.inf:
        ap.error(f"--peak-tflops must be a positive number, got {args.peak_tflops:g}")
    check_output_folder(args.out)
    rows, jpeg = collect(args.experiment, args.dataset)
    if not rows:
        raise UserError(f"experiment {args.experiment!r} has no runs")
    evaluated = set().union(*(r["evaluated_on"] for r in rows))
    if evaluated and args.dataset not in evaluated:  # a typo would show a table without its test columns
        print(f"note: no run of {args.experiment!r} was evaluated on {args.dataset}; they were on "
              f"{', '.join(sorted(evaluated))} (--dataset NAME)", file=sys.stderr)
    table = markdown(rows, jpeg, args.dataset, args.peak_tflops)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[k for k in rows[0] if k not in ("curve", "evaluated_on")], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(args.out / "compare.md", (table + "\n").encode())
    atomic_write_bytes(args.out / "compare.csv", buf.getvalue().encode())
    figures = plots(rows, args.out)
    print(table)
    print(f"\nwrote {args.out / 'compare.md'}, {args.out / 'compare.csv'}, " + ", ".join(str(f) for f in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
