#!/usr/bin/python3
"""Draws the training curve of a `gradctl train` run as a PNG.

    /usr/bin/python3 deploy/digits/plot_history.py OUT/history.jsonl [--png OUT/history.png]

Reads the history `gradctl train` writes (one JSON object per line: "step" records with the
batch's loss, "epoch" records with the test accuracy when the run had a test set) and plots the
training loss per step and the test accuracy per epoch on a second axis. The PNG goes next to
the history unless --png says otherwise; its path is printed.
"""

import argparse
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")  # no display: render to a file only
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def read_history(path):
    """Returns (steps, losses, epoch_steps, epoch_numbers, test_accuracies) from a history file."""
    steps, losses = [], []
    epoch_steps, epochs, accuracies = [], [], []
    with open(path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON object: {error}") from error
            kind = record.get("kind")
            needed = {"step": ("step", "loss"), "epoch": ("epoch", "step")}.get(kind, ())
            missing = [key for key in needed if key not in record]
            if missing:
                raise ValueError(f"{path}:{number}: a {kind!r} record without {missing}")
            # float(): a diverged run writes NaN and the infinities as the strings "NaN",
            # "Infinity" and "-Infinity" (protobuf's JSON mapping), which float() reads.
            if kind == "step":
                steps.append(record["step"])
                losses.append(float(record["loss"]))
            elif kind == "epoch" and "test_accuracy" in record:
                epoch_steps.append(record["step"])
                epochs.append(record["epoch"])
                accuracies.append(float(record["test_accuracy"]))
    if not steps:
        raise ValueError(f"{path}: no \"step\" records")
    return steps, losses, epoch_steps, epochs, accuracies


def plot(history, png):
    steps, losses, epoch_steps, epochs, accuracies = read_history(history)
    figure, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    loss_axis.plot(steps, losses, color="tab:blue", linewidth=0.8, label="training loss (batch)")
    loss_axis.set_yscale("log")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("cross-entropy", color="tab:blue")
    handles = loss_axis.get_lines()
    if accuracies:
        accuracy_axis = loss_axis.twinx()
        handles += accuracy_axis.plot(epoch_steps, accuracies, color="tab:orange", marker="o",
                                      markersize=3, label="test accuracy (epoch end)")
        accuracy_axis.set_ylabel("test accuracy", color="tab:orange")
        accuracy_axis.set_ylim(min(0.9, min(accuracies)), 1.0)
        title = (f"{len(epochs)} epochs, {steps[-1]} steps: "
                 f"test accuracy {accuracies[-1]:.4f}")
    else:
        title = f"{steps[-1]} steps"
    loss_axis.set_title(title)
    loss_axis.legend(handles=handles, loc="center right")
    figure.tight_layout()
    figure.savefig(png)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("history", type=pathlib.Path, help="the history.jsonl of a run")
    parser.add_argument("--png", type=pathlib.Path,
                        help="where to write the plot (default: history.png next to HISTORY)")
    args = parser.parse_args(argv)
    png = args.png or args.history.with_name("history.png")
    try:
        plot(args.history, png)
    except (OSError, ValueError) as error:
        print(f"plot_history: {error}", file=sys.stderr)
        return 1
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
