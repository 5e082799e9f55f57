"""Tables, JSON and plots of evaluation results."""

import json
import os
import platform
from datetime import date


def provenance(argv: list[str]) -> dict:
    """What a published figure needs beside it: the command, the machine and the date."""
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return {"command": "counterpoint " + " ".join(argv),
            "date": date.today().isoformat(),
            "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads{gpu}"}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def format_table(rows: dict[str, dict[str, float | None]], columns: list[str], digits: int = 1) -> str:
    """A Markdown table: one row per configuration, one column per metric."""
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in rows.items():
        cells = ["–" if values.get(c) is None else f"{values[c]:.{digits}f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, ensure_ascii=False)


def plot_bars(rows: dict[str, dict[str, float | None]], columns: list[str], title: str, ylabel: str, path: str) -> None:
    """Grouped bars: one group per column, one bar per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(columns) * max(1, len(rows)) / 3), 4))
    width = 0.8 / max(1, len(rows))
    for i, (name, values) in enumerate(rows.items()):
        xs = [j + i * width for j in range(len(columns))]
        ax.bar(xs, [values.get(c) or 0.0 for c in columns], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))], columns, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
