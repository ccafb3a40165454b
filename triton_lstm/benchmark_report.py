"""What the benchmark harness (``benchmark.py``) makes of its rows: ``summary.md`` (µs per time step of
each provider and the speedup over cuDNN), the README's speed table (``benchmarks/update_readme.py``) and
the plots; rows as ``results.csv`` holds them (strings, the columns of ``benchmark.COLUMNS``)."""

from __future__ import annotations

import csv
from pathlib import Path

from triton_lstm.benchmark_cases import DEFAULT_PROVIDERS, PROVIDERS, SPEEDUP_PAIRS, Case


def per_step_us(row) -> float:
    return float(row["ms"]) * 1e3 / int(row["T"])


def summary_markdown(rows, timing: str) -> str:
    """Markdown: µs per step of each provider and speedup of triton_lstm over cuDNN, per mode, dtype, shape."""
    by_key = {}
    for row in rows:
        key = (row["mode"], row["dtype"], row["T"], row["B"], row["I"], row["H"], row["layers"], row["bidirectional"])
        by_key.setdefault(key, {})[row["provider"]] = per_step_us(row)
    device = rows[0]["device"] if rows else "?"
    providers = providers_in(rows)
    lines = [f"Device: {device}. µs per time step ({timing}); speedup = cuDNN time / triton_lstm time (for the GRU "
             "rows: cudnn_gru / triton_gru).", "",
             "| mode | dtype | T | B | I | H | layers | bidir | " + " | ".join(providers) + " | speedup vs cuDNN |",
             "|" + "---|" * (9 + len(providers))]
    for key, values in by_key.items():
        cells = [f"{values[p]:.1f}" if p in values else "-" for p in providers]
        speedups = [f"{values[theirs] / values[ours]:.2f}x" for ours, theirs in SPEEDUP_PAIRS if ours in values and theirs in values]
        speedup = " / ".join(speedups) or "-"
        lines.append("| " + " | ".join([*map(str, key), *cells, speedup]) + " |")
    return "\n".join(lines) + "\n"


def providers_in(rows) -> list[str]:
    """The default providers, and any other that has rows, in PROVIDERS' order."""
    present = {row["provider"] for row in rows}
    return [p for p in PROVIDERS if p in DEFAULT_PROVIDERS or p in present]


def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


def speed_table(rows) -> str:
    """The README's speed table from a results CSV: per shape, µs per time step of triton_lstm and of
    cuDNN measured in the same run, the speedup, and the peak memory of a bf16 forward+backward."""
    by_key = {}
    for row in rows:
        case = (int(row["T"]), int(row["B"]), int(row["I"]), int(row["H"]), int(row["layers"]), row["bidirectional"] == "True")
        by_key.setdefault(case, {})[(row["mode"], row["dtype"], row["provider"])] = row
    columns = [("fwd", "bf16"), ("fwdbwd", "bf16"), ("fwd", "fp32")]
    present = [c for c in columns if any((*c, "triton_lstm") in values for values in by_key.values())]
    header = ["shape (T, B, I, H)"] + [f"{'fwd+bwd' if m == 'fwdbwd' else m} {d}: ours / cuDNN µs per step" for m, d in present]
    header.append("peak MiB fwd+bwd bf16: ours / cuDNN")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (T, B, I, H, layers, bidirectional), values in by_key.items():
        label = f"{T}, {B}, {I}, {H}" + (f", {layers} layers" if layers > 1 else "") + (", bidirectional" if bidirectional else "")
        cells = [label]
        for mode, dtype in present:
            ours, theirs = values.get((mode, dtype, "triton_lstm")), values.get((mode, dtype, "cudnn"))
            if ours and theirs:
                cells.append(f"{per_step_us(ours):.1f} / {per_step_us(theirs):.1f} ({float(theirs['ms']) / float(ours['ms']):.2f}×)")
            else:
                cells.append("-")
        ours, theirs = values.get(("fwdbwd", "bf16", "triton_lstm")), values.get(("fwdbwd", "bf16", "cudnn"))
        cells.append(f"{float(ours['peak_mb']):.0f} / {float(theirs['peak_mb']):.0f}" if ours and theirs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(rows, folder: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'triton-lstm[bench]'): no plots, the CSV is written.")
        return []
    written = []
    for mode, dtype in dict.fromkeys((row["mode"], row["dtype"]) for row in rows):
        subset = [row for row in rows if row["mode"] == mode and row["dtype"] == dtype]
        labels = list(dict.fromkeys(Case(int(r["T"]), int(r["B"]), int(r["I"]), int(r["H"]), int(r["layers"]), r["bidirectional"] == "True").label for r in subset))
        providers = providers_in(rows)
        per_provider = {p: {} for p in providers}
        for row in subset:
            case = Case(int(row["T"]), int(row["B"]), int(row["I"]), int(row["H"]), int(row["layers"]), row["bidirectional"] == "True")
            per_provider[row["provider"]][case.label] = per_step_us(row)
        figure, (left, right) = plt.subplots(1, 2, figsize=(max(10, 0.7 * len(labels) + 6), 5))
        width = 0.8 / len(providers)
        positions = range(len(labels))
        for index, provider in enumerate(providers):
            values = [per_provider[provider].get(label, float("nan")) for label in labels]
            left.bar([p + index * width for p in positions], values, width, label=provider)
        left.set_yscale("log")
        left.set_ylabel("µs per time step")
        left.set_title(f"{mode} {dtype}: time per step")
        left.set_xticks([p + width for p in positions], labels, rotation=60, ha="right", fontsize=7)
        left.legend()
        for provider in ("triton_lstm", "cell_loop"):
            speedups = [per_provider["cudnn"][label] / per_provider[provider][label]
                        if label in per_provider["cudnn"] and label in per_provider[provider] else float("nan") for label in labels]
            right.plot(list(positions), speedups, marker="o", label=provider)
        right.axhline(1.0, color="gray", linewidth=0.8)
        right.set_yscale("log")
        right.set_ylabel("speedup over cuDNN (×)")
        right.set_title(f"{mode} {dtype}: speedup over cuDNN")
        right.set_xticks(list(positions), labels, rotation=60, ha="right", fontsize=7)
        right.legend()
        figure.suptitle(rows[0]["device"])
        figure.tight_layout()
        path = folder / f"{mode}_{dtype}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written
