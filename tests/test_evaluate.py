import numpy as np
import pytest

from digitjax.evaluate import compute_metrics


def test_compute_metrics_on_a_hand_worked_example():
    # Three classes, four examples: two right (0, 2), one 1 taken for 0, one 2 taken for 1.
    logits = np.log(
        np.array(
            [
                [0.7, 0.2, 0.1],  # true 0, predicted 0
                [0.6, 0.3, 0.1],  # true 1, predicted 0
                [0.1, 0.1, 0.8],  # true 2, predicted 2
                [0.2, 0.5, 0.3],  # true 2, predicted 1
            ]
        )
    )
    labels = np.array([0, 1, 2, 2])
    metrics = compute_metrics(logits, labels, ("a", "b", "c"))
    assert metrics.accuracy == 0.5
    expected_loss = -np.mean(np.log([0.7, 0.3, 0.8, 0.3]))
    assert metrics.loss == pytest.approx(expected_loss, rel=1e-12)
    np.testing.assert_array_equal(metrics.confusion, [[1, 0, 0], [1, 0, 0], [0, 1, 1]])
    np.testing.assert_allclose(metrics.precision, [0.5, 0.0, 1.0])
    np.testing.assert_allclose(metrics.recall, [1.0, 0.0, 0.5])
    np.testing.assert_allclose(metrics.f1, [2 / 3, 0.0, 2 / 3])
    report = metrics.to_dict()
    assert report["per_class"]["c"] == {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    assert report["num_examples"] == 4


def test_the_misclassified_figure_shows_the_first_errors_captioned():
    """The grid of misclassified digits: each wrong image once, in order, under its
    true→predicted caption, and none of the right ones."""
    from digitjax.plots import misclassified_figure

    labels = np.array([0, 1, 2, 2, 1])
    logits = np.eye(3)[[0, 0, 2, 1, 0]]  # images 1, 3 and 4 wrong
    metrics = compute_metrics(logits, labels, ("a", "b", "c"))
    images = np.stack([np.full((28, 28), 10 * (i + 1), np.uint8) for i in range(5)])
    figure = misclassified_figure(metrics, images, labels, max_errors=2)
    [ax] = figure.axes
    assert [text.get_text() for text in ax.texts] == ["b→a", "c→b"]
    assert figure.get_suptitle() == "3 misclassified; first 2 shown as true→predicted"
    shown = np.ma.masked_invalid(ax.get_images()[0].get_array())
    assert sorted(np.unique(shown.compressed())) == [20, 40]  # images 1 and 3, nothing else
    assert (shown == 20).sum() == (shown == 40).sum() == 28 * 28
