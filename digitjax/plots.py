"""PNG figures: training curves and the evaluation report (matplotlib, imported only here)."""

import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from digitjax.config import UserError  # noqa: E402
from digitjax.evaluate import Metrics  # noqa: E402
from digitjax.outputs import write_file  # noqa: E402
from digitjax.render import percent  # noqa: E402


def plot_curves(history: list[dict], curve: list[dict], path: Path) -> None:
    """Training loss and accuracy per chunk (a tenth of an epoch) as lines, test figures per
    epoch as points."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    chunk_epochs = [r["epoch"] for r in curve]
    epochs = [r["epoch"] for r in history]
    loss_ax.plot(
        chunk_epochs, [r["train_loss"] for r in curve], "-", label="train (smoothed labels)"
    )
    loss_ax.plot(epochs, [r["test_loss"] for r in history], "o-", label="test")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    acc_ax.plot(chunk_epochs, [100 * r["train_accuracy"] for r in curve], "-", label="train")
    acc_ax.plot(epochs, [100 * r["test_accuracy"] for r in history], "o-", label="test")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_evaluation(
    metrics: Metrics, images: np.ndarray, labels: np.ndarray, path: Path, max_errors: int = 36
) -> None:
    """Confusion matrix, reliability diagram and a grid of misclassified digits (true ->
    predicted)."""
    fig = plt.figure(figsize=(20, 6.5))
    draw_confusion(fig.add_subplot(1, 3, 1), metrics)
    plot_reliability(fig.add_subplot(1, 3, 2), metrics)
    draw_misclassified(fig, metrics, images, labels, max_errors, left=0.68, title_x=0.83)
    _save(fig, path)


def confusion_figure(metrics: Metrics) -> Figure:
    """The confusion matrix alone (TensorBoard's image of it)."""
    fig = plt.figure(figsize=(7, 6.5))
    draw_confusion(fig.add_subplot(1, 1, 1), metrics)
    fig.tight_layout()
    return fig


def misclassified_figure(
    metrics: Metrics, images: np.ndarray, labels: np.ndarray, max_errors: int = 36
) -> Figure:
    """The grid of misclassified digits alone (TensorBoard's image of it)."""
    fig = plt.figure(figsize=(7, 6.5))
    draw_misclassified(fig, metrics, images, labels, max_errors, left=0.05, title_x=0.5)
    return fig


def draw_confusion(ax: Axes, metrics: Metrics) -> None:
    """Counts of [true, predicted] classes, each cell labelled."""
    ax.imshow(metrics.confusion, cmap="Blues")
    ticks = range(len(metrics.class_names))
    ax.set(
        xticks=ticks,
        yticks=ticks,
        xlabel="predicted",
        ylabel="true",
        title=f"Confusion matrix (accuracy {100 * metrics.accuracy:.2f}%)",
    )
    ax.set_xticklabels(metrics.class_names, rotation=45, ha="right")
    ax.set_yticklabels(metrics.class_names)
    threshold = metrics.confusion.max() / 2
    for (true, pred), count in np.ndenumerate(metrics.confusion):
        if count:
            ax.text(
                pred,
                true,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > threshold else "black",
            )


def draw_misclassified(
    fig: Figure,
    metrics: Metrics,
    images: np.ndarray,
    labels: np.ndarray,
    max_errors: int,
    left: float,
    title_x: float,
) -> None:
    """The first `max_errors` misclassified digits, captioned true→predicted, in a square grid
    from `left` to the figure's right edge: one image of them all on one axes (an axes per
    digit took ~30 ms each to make: most of the second a training run spent on its figures)."""
    misclassified = np.flatnonzero(metrics.predictions != labels)
    wrong = misclassified[:max_errors]
    side = max(1, int(np.ceil(np.sqrt(len(wrong)))))
    size, gap, caption = images.shape[1], 4, 12  # pixels: a digit, between digits, its caption
    cell_width, cell_height = size + gap, caption + size + gap
    mosaic = np.full((side * cell_height, side * cell_width), np.nan)  # NaN: background
    ax = fig.add_axes((left, 0.03, 0.98 - left, 0.88))
    for i, index in enumerate(wrong):
        top, column = (i // side) * cell_height + caption, (i % side) * cell_width
        mosaic[top : top + size, column : column + size] = images[index]
        ax.text(
            column + size / 2,
            top - 1,
            f"{metrics.class_names[labels[index]]}→"
            f"{metrics.class_names[metrics.predictions[index]]}",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.imshow(mosaic, cmap=matplotlib.colormaps["gray"].with_extremes(bad="white"))
    ax.axis("off")
    fig.suptitle(
        f"{len(misclassified)} misclassified; first {len(wrong)} shown as true→predicted",
        x=title_x,
    )


def plot_reliability(ax: Axes, metrics: Metrics) -> None:
    """Accuracy against confidence per bin (a calibrated model follows the diagonal), with
    each bin's share of the images on a log scale behind."""
    diagram = metrics.reliability
    edges, width = diagram.edges, 1 / len(diagram.counts)
    shown = diagram.counts > 0
    share_ax = ax.twinx()
    share_ax.bar(
        edges[:-1],
        diagram.counts / diagram.counts.sum(),
        width,
        align="edge",
        color="0.85",
        zorder=0,
    )
    share_ax.set(yscale="log", ylabel="share of images (log)")
    ax.set_zorder(share_ax.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot([0, 1], [0, 1], "--", color="0.5", label="perfectly calibrated")
    ax.bar(
        edges[:-1][shown],
        diagram.accuracy[shown],
        width,
        align="edge",
        alpha=0.8,
        edgecolor="black",
        label="accuracy",
    )
    ax.plot(
        diagram.confidence[shown],
        diagram.accuracy[shown],
        "o",
        color="C3",
        ms=4,
        label="accuracy at mean confidence",
    )
    temperature = metrics.temperature
    temperature = "no temperature" if temperature is None else f"temperature {temperature:.3f}"
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence (top probability)",
        ylabel="accuracy",
        title=f"Reliability: ECE {100 * metrics.ece:.2f}% ({temperature}; "
        f"{100 * metrics.uncalibrated_ece:.2f}% without)",
    )
    ax.legend(loc="upper left", fontsize=8)


def plot_predictions(predictions: list, seen: dict, path: Path, max_images: int = 24) -> None:
    """Each input (the preview `predict_files` kept of it: a stream cannot be read again)
    beside the 28x28 digit the model saw, titled with the prediction."""
    shown = [p for p in predictions if Path(p.name) in seen][:max_images]
    columns = 4
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(
        rows, 2 * columns, figsize=(2 * columns * 1.4, rows * 1.6), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for i, prediction in enumerate(shown):
        original_ax, digit_ax = (
            axes[i // columns, 2 * (i % columns)],
            axes[i // columns, 2 * (i % columns) + 1],
        )
        image = seen[Path(prediction.name)]
        original_ax.imshow(image.preview, cmap="gray", vmin=0, vmax=255)
        # Plain text: a `$` in a file name is no maths markup; bytes that are not UTF-8 show as �.
        name = os.fsencode(Path(prediction.name).name).decode(errors="replace")
        original_ax.set_title(name[:18], fontsize=6, parse_math=False)
        digit_ax.imshow(image.digit, cmap="gray", vmin=0, vmax=1)
        answer = {"digit": "", "not_sure": "?", "not_a_digit": " not a digit"}[prediction.verdict]
        answer = answer if prediction.digit is None else f"{prediction.digit}{answer}"
        # A non-digit's confidence is its top digit's, which would read as sure it is none.
        sure = "" if prediction.verdict == "not_a_digit" else f" ({percent(prediction.confidence)})"
        digit_ax.set_title(f"{answer.strip()}{sure}", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def check_format(flag: str, path: Path) -> None:
    """Raises UserError unless matplotlib writes the format that `path`'s suffix names (PNG
    without one): checked before the work, which the figure comes after."""
    formats = FigureCanvasBase.get_supported_filetypes()
    if _format(path) not in formats:
        raise UserError(
            f"{flag} {path}: cannot write .{_format(path)} figures; "
            f"name a .png file (or .{', .'.join(sorted(set(formats) - {'png'}))})"
        )


def _format(path: Path) -> str:
    return path.suffix[1:].lower() or "png"


def _save(fig: Figure, path: Path) -> None:
    image = io.BytesIO()
    fig.savefig(image, format=_format(path), dpi=110)
    plt.close(fig)
    write_file(path, image.getvalue())
