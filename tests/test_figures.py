"""The PNG figures say what they show: colour bars, legends, classes, what error bars are."""

from __future__ import annotations

import struct

import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.container import BarContainer

from deepfault_jax import pipeline, report

pytestmark = pytest.mark.usefixtures("model_cache")

K = (1, 3)
REPEATS = 2


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = pipeline.RunConfig(inputs_per_class=4, k=K, random_repeats=REPEATS)
    result = pipeline.run(config, out).to_json()
    with np.load(out / "synthesized.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return result, arrays, out


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def figure_pixels(fig) -> tuple[int, int]:
    w, h = fig.get_size_inches() * fig.dpi
    return round(w), round(h)


def bar_containers(ax) -> list[BarContainer]:
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def examples_inputs(result, arrays, rows):
    """The arguments the run gives :func:`report.plot_examples`, for the largest k."""
    k = max(result["config"]["k"])
    names = [*result["config"]["measures"], "random"]
    tags = {m: f"{m}_k{k}" if m != "random" else f"random_k{k}_r0" for m in names}
    shown = np.unique(arrays["y"], return_index=True)[1][:rows]
    synthesized = {f"{m} k={k}": arrays[f"{tags[m]}__x"][shown] for m in names}
    predictions = {f"{m} k={k}": arrays[f"{tags[m]}__pred"][shown] for m in names}
    return arrays["x_original"][shown], synthesized, arrays["y"][shown], predictions


def test_examples_figure_has_a_colour_bar_and_names_true_and_predicted_classes(
    finished_run, tmp_path
):
    result, arrays, out = finished_run
    originals, synthesized, labels, predictions = examples_inputs(result, arrays, rows=6)
    fig = report._examples_figure(originals, synthesized, labels, predictions)
    names = list(synthesized)
    image_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(image_axes) == 6 * (1 + 2 * len(names))
    # one colour bar, labelled, whose scale covers every difference panel symmetrically
    assert len(colorbars) == 1
    assert "synthesized − original" in colorbars[0].get_ylabel()
    bound = max(np.abs((synthesized[n] - originals).mean(-1)).max() for n in names)
    assert colorbars[0].get_ylim() == pytest.approx((-bound, bound))
    grid = np.asarray(image_axes).reshape(6, 1 + 2 * len(names))
    for i in range(6):
        true = int(labels[i])
        assert f"true class {true}" in grid[i, 0].get_title()
        for j, name in enumerate(names):
            pred = int(predictions[name][i])
            title = grid[i, 1 + 2 * j]
            assert title.get_title() == f"{name}\ntrue {true} → pred {pred}"
            red = mcolors.same_color(title.title.get_color(), "tab:red")
            assert red == (pred != true)
            diff = grid[i, 2 + 2 * j]
            assert "difference" in diff.get_title()
            assert diff.get_images()[0].get_clim() == pytest.approx((-bound, bound))
    suptitle = fig.get_suptitle()
    assert f"k = {max(K)}" in suptitle
    for m in [*result["config"]["measures"], "random"]:
        assert m in suptitle
    assert "true classes " + ", ".join(str(int(c)) for c in labels) in suptitle
    # the public writer draws this figure
    path = report.plot_examples(originals, synthesized, labels, predictions, tmp_path / "e.png")
    assert png_size(path) == figure_pixels(fig)
    assert png_size(out / "examples.png") == figure_pixels(fig)


def test_misclassification_figure_says_its_error_bars_are_the_std_over_the_random_draws(
    finished_run, tmp_path
):
    result, _, out = finished_run
    fig = report._misclassification_figure(result)
    (ax,) = fig.axes
    legend = ax.get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:-1] == [f"{m} (one run)" for m in result["config"]["measures"]]
    assert f"mean of {REPEATS} draws" in labels[-1]
    assert f"error bars: ±1 std (population)\nover the {REPEATS} draws" in labels[-1]
    # the label is what is drawn: the random bars are the mean of the repeats and their
    # error bars the population standard deviation (ddof 0) of the same numbers
    (bars,) = [c for c in bar_containers(ax) if c.get_label() == labels[-1]]
    segments = bars.errorbar.lines[2][0].get_segments()
    for k, rect, seg in zip(sorted(K), bars.patches, segments, strict=True):
        draws = [r["misclassification_rate"] for r in result["random_runs"] if r["k"] == k]
        assert len(draws) == REPEATS
        assert rect.get_height() == pytest.approx(np.mean(draws))
        assert (seg[1, 1] - seg[0, 1]) / 2 == pytest.approx(np.std(draws, ddof=0))
    # the measures' bars carry no error bars
    for c in bar_containers(ax):
        if c is not bars:
            assert c.errorbar is None
    assert ax.get_xlabel() == "suspicious neurons per class (k)"
    assert str(result["selection"]["inputs"]) in ax.get_ylabel()
    path = report.plot_misclassification(result, tmp_path / "m.png")
    assert png_size(path) == png_size(out / "misclassification.png") == figure_pixels(fig)
