"""The non-digit detector of `digitjax/detector.py` (a logistic regression) and variants of it
(a one-hidden-layer MLP, fewer features), measured: a head on what a trained model computes
for an image (the hidden layer, the calibrated logits and their logsumexp, each conv layer's
mean and max activation), fitted on `detector.fitting_images` (MNIST training digits, plain,
augmented as `--preset robust` augments and drawn as users' images, and digits printed as the
non-digits' letters are, against the generated non-digits of the training kinds), and
thresholded so that 1% or 2.5% (the shipped detector's share) of augmented held-out MNIST
training digits are flagged; every image scored by its mean over five views (itself and its
one-pixel shifts), as classifiers score images near the threshold. The model itself is
untouched, so its digits' accuracy and calibration are too.

Reports, for `uncertain_rate.py`'s images (`--per-kind` of each kind, `--seed`), the share
flagged by the detector alone and together with the model's own "not sure" (top calibrated
probability below 0.95) or no digit found: held-out and training non-digit kinds,
Fashion-MNIST test photos and Adwaita's icons (real images: report only, nothing is to be
chosen on them), users' digits per kind, and MNIST test.

    python benchmarks/non_digit_head.py --checkpoint digitjax/assets/model [--hidden 64]
        [--no-conv-stats] [--no-drawn-digits] [--no-printed-digits] [--false-alarms 0.01,0.02]
        [--pixel-cnn alone|combined] [--mahalanobis hidden|conv|both] [--seed 0]

The images, features and logistic fit are digitjax.detector's own; this script adds the MLP,
the 1% threshold and the per-group report, and a second network: a small CNN of its own
trained on the same images' pixels to tell digits from non-digits (`--pixel-cnn`), scored
alone or added to the head's score (each standardized on the held-out digits); or a
density-like feature fitted on digits alone (`--mahalanobis`): the log of the smallest
Mahalanobis distance of an image's hidden layer or conv statistics to the ten class means of
the fitting digits (one shared covariance), added to the head's features.
"""

import argparse
import dataclasses
import functools
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from uncertain_rate import fashion_files, icon_files

from digitjax import detector
from digitjax.augment import augment
from digitjax.checkpoint import restore_model
from digitjax.config import Config
from digitjax.data import load_dataset
from digitjax.inference.classifier import DEFAULT_MIN_CONFIDENCE, NUM_DIGITS
from digitjax.inference.parallel import available_cores, start_pool
from digitjax.inference.preprocess import preprocess_file
from digitjax.model import CNN, conv_impls_for
from digitjax.synthetic import non_digits, user_digits
from digitjax.weights import steady_scores


@dataclasses.dataclass
class Head:
    """A fitted head: the logistic regression (`params` None: `kernel`, `bias` as
    digitjax.detector fits them) or the MLP (on standardized features)."""

    kernel: np.ndarray | None = None
    bias: float = 0.0
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    params: dict | None = None

    def scores(self, features: np.ndarray) -> np.ndarray:
        if self.params is None:
            return features @ self.kernel + self.bias
        x = jnp.asarray((features - self.mean) / self.scale)
        hidden = jax.nn.relu(x @ self.params["hidden"] + self.params["hidden_bias"])
        return np.asarray(hidden @ self.params["out"] + self.params["out_bias"])


def fit_mlp(digits: np.ndarray, others: np.ndarray, hidden: int) -> Head:
    """As detector.fit_logistic (class-balanced logistic loss, Adam, minibatches of 8,192),
    with a ReLU layer of `hidden` units first."""
    x = np.concatenate([digits, others])
    y = jnp.asarray(np.concatenate([np.zeros(len(digits)), np.ones(len(others))]), jnp.float32)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    x_standard = jnp.asarray((x - mean) / scale)
    width = x.shape[1]
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "hidden": jax.random.normal(k1, (width, hidden)) / np.sqrt(width),
        "hidden_bias": jnp.zeros(hidden),
        "out": jax.random.normal(k2, (hidden,)) / np.sqrt(hidden),
        "out_bias": jnp.zeros(()),
    }
    other_weight = len(digits) / len(others)
    optimizer = optax.adam(detector.LEARNING_RATE)

    def loss(params: dict, idx: jax.Array) -> jax.Array:
        h = jax.nn.relu(x_standard[idx] @ params["hidden"] + params["hidden_bias"])
        losses = optax.sigmoid_binary_cross_entropy(h @ params["out"] + params["out_bias"], y[idx])
        decay = (params["hidden"] ** 2).sum() + (params["out"] ** 2).sum()
        return (losses * jnp.where(y[idx] > 0, other_weight, 1.0)).mean() + 1e-4 * decay

    @jax.jit
    def step(params: dict, state: optax.OptState, idx: jax.Array) -> tuple:
        updates, state = optimizer.update(jax.grad(loss)(params, idx), state, params)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    rng = np.random.default_rng(0)
    for _ in range(detector.STEPS):
        idx = jnp.asarray(rng.integers(0, len(x), detector.MINIBATCH))
        params, state = step(params, state, idx)
    return Head(mean=mean, scale=scale, params=params)


PIXEL_CNN_CHANNELS, PIXEL_CNN_DENSE = (16, 32), 64
PIXEL_CNN_STEPS, PIXEL_CNN_BATCH, PIXEL_CNN_LEARNING_RATE = 3000, 256, 2e-3


def fit_pixel_cnn(digits: np.ndarray, others: np.ndarray):
    """A CNN of its own scoring `others` above `digits` from their pixels (class-balanced
    logistic loss, AdamW with a cosine decay, each batch augmented as `--preset robust`
    augments): fn(images) -> scores."""
    cnn = CNN(PIXEL_CNN_CHANNELS, PIXEL_CNN_DENSE, 1, nnx.Rngs(0))
    graphdef, params = nnx.split(cnn, nnx.Param)
    x = jnp.asarray(np.concatenate([digits, others]))
    y = jnp.asarray(np.concatenate([np.zeros(len(digits)), np.ones(len(others))]), jnp.float32)
    other_weight = len(digits) / len(others)
    schedule = optax.cosine_decay_schedule(PIXEL_CNN_LEARNING_RATE, PIXEL_CNN_STEPS)
    optimizer = optax.adamw(schedule, weight_decay=1e-4)
    config = Config.from_flags({}, "robust")
    training_impls = conv_impls_for(jax.default_backend(), True, len(PIXEL_CNN_CHANNELS))

    def loss(params: nnx.State, images: jax.Array, labels: jax.Array) -> jax.Array:
        scores = nnx.merge(graphdef, params)(images, training_impls)[:, 0]
        losses = optax.sigmoid_binary_cross_entropy(scores, labels)
        return (losses * jnp.where(labels > 0, other_weight, 1.0)).mean()

    @jax.jit
    def step(params: nnx.State, state: optax.OptState, key: jax.Array, idx: jax.Array) -> tuple:
        grads = jax.grad(loss)(params, augment(key, x[idx], config), y[idx])
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    rng = np.random.default_rng(0)
    for key in jax.random.split(jax.random.key(0), PIXEL_CNN_STEPS):
        params, state = step(
            params, state, key, jnp.asarray(rng.integers(0, len(x), PIXEL_CNN_BATCH))
        )

    scores = jax.jit(lambda images: nnx.merge(graphdef, params)(images)[:, 0])
    return functools.partial(detector.in_batches, scores)


def mahalanobis_fn(fitting: np.ndarray, columns: np.ndarray, logits: slice):
    """fn(features) -> (N, 1): the log of the smallest Mahalanobis distance of `columns` of
    each row to the ten class means of `fitting`'s rows (classes by their top logit; a digit
    misread is rare enough not to matter), under their shared covariance, shrunk by 0.1% of its
    mean variance so that it inverts."""
    x = fitting[:, columns].astype(np.float64)
    classes = fitting[:, logits].argmax(1)
    means = np.stack([x[classes == c].mean(0) for c in range(NUM_DIGITS)])
    centred = x - means[classes]
    covariance = centred.T @ centred / len(x)
    covariance += 1e-3 * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    precision = np.linalg.inv(covariance)

    def fn(features: np.ndarray) -> np.ndarray:
        y = features[:, columns].astype(np.float64)
        distances = np.stack([(((y - m) @ precision) * (y - m)).sum(1) for m in means], 1)
        return np.log(distances.min(1) + 1e-6).astype(np.float32)[:, None]

    return fn


def preprocessed(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The images as `predict` sees them, and whether a digit was found in each."""
    with start_pool(available_cores()) as pool:
        arrays = list(pool.map(preprocess_file, paths, chunksize=16))
    found = np.array([a is not None for a in arrays])
    blank = np.zeros((28, 28), np.float32)
    return np.stack([blank if a is None else np.asarray(a, np.float32) for a in arrays]), found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("digitjax/assets/model"))
    parser.add_argument("--hidden", type=int, default=0, help="0: logistic regression")
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-conv-stats", action="store_true")
    parser.add_argument(
        "--false-alarms", default=f"0.01,{detector.FALSE_ALARMS}", help="thresholds to report"
    )
    parser.add_argument(
        "--no-drawn-digits", action="store_true", help="fit without digits drawn as users' images"
    )
    parser.add_argument("--no-printed-digits", action="store_true", help="fit without them")
    parser.add_argument(
        "--pixel-cnn", choices=("alone", "combined"), help="score with a CNN on the pixels"
    )
    parser.add_argument(
        "--mahalanobis",
        choices=("hidden", "conv", "both"),
        help="add the Mahalanobis distance of these features to the digits' class means",
    )
    args = parser.parse_args()
    model = restore_model(args.checkpoint)
    all_features = detector.features_fn(model)
    # The hidden layer, the logits and their logsumexp come first; the conv statistics last.
    kept = model.config.dense + NUM_DIGITS + 1 if args.no_conv_stats else None

    logits = slice(model.config.dense, model.config.dense + NUM_DIGITS)
    fit_digits, fit_others, held_digits = detector.fitting_images(
        drawn_count=0 if args.no_drawn_digits else None,
        printed_count=0 if args.no_printed_digits else None,
    )
    fit_digit_values = all_features(fit_digits)
    distances = []
    if args.mahalanobis:
        width = model.config.dense
        column_sets = {
            "hidden": np.arange(width),
            "conv": np.arange(width + NUM_DIGITS + 1, fit_digit_values.shape[1]),
        }
        names = column_sets if args.mahalanobis == "both" else [args.mahalanobis]
        distances = [mahalanobis_fn(fit_digit_values, column_sets[n], logits) for n in names]

    def head_features(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The head's features of images whose `all_features` are `values`, and their top
        calibrated probability."""
        tops = np.asarray(jax.nn.softmax(values[:, logits])).max(axis=1)
        return np.concatenate([values[:, :kept], *(d(values) for d in distances)], 1), tops

    def features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return head_features(all_features(images))

    digit_features = head_features(fit_digit_values)
    other_features = features(fit_others)[0]
    if args.hidden:
        head = fit_mlp(digit_features[0], other_features, args.hidden)
    else:
        head = Head(*detector.fit_logistic(digit_features[0], other_features, 0))

    def head_scores(images: np.ndarray) -> np.ndarray:
        return head.scores(features(images)[0])

    # Every image scored by its mean over it and its one-pixel shifts: what classifiers score
    # near the threshold (weights.steady_scores), where alone it can change a flag.
    held_scores = steady_scores(head_scores(held_digits), held_digits, head_scores, np.inf)

    with tempfile.TemporaryDirectory() as folder:
        samples = non_digits.generate(Path(folder) / "non_digits", args.per_kind, args.seed)
        digits = user_digits.generate(Path(folder) / "digits", args.per_kind, args.seed)
        samples += [(path, f"user: {kind}") for path, _, kind in digits]
        samples += [(path, "fashion") for path, _ in fashion_files(Path(folder) / "f", 1000)]
        samples += [(path, "icon") for path, _ in icon_files()]
        images, found = preprocessed([path for path, _ in samples])
    kinds = np.array([kind for _, kind in samples])
    image_features, tops = features(images)
    scores = steady_scores(head.scores(image_features), images, head_scores, np.inf)
    test_images = detector.normalized(load_dataset("mnist").split("test")[0])
    test_features, test_tops = features(test_images)
    test_scores = steady_scores(head.scores(test_features), test_images, head_scores, np.inf)
    if args.pixel_cnn:
        pixel_scores = fit_pixel_cnn(fit_digits, fit_others)
        pixel = [
            steady_scores(pixel_scores(x), x, pixel_scores, np.inf)
            for x in (held_digits, images, test_images)
        ]
        if args.pixel_cnn == "alone":
            held_scores, scores, test_scores = pixel
        else:  # each score standardized on the held-out digits, then added
            held_scores, scores, test_scores = [
                (h - held_scores.mean()) / held_scores.std()
                + (c - pixel[0].mean()) / pixel[0].std()
                for h, c in zip([held_scores, scores, test_scores], pixel)
            ]
    groups = {
        "held-out non-digits": np.isin(kinds, non_digits.HELD_OUT_KINDS),
        "training non-digits": np.isin(kinds, non_digits.TRAINING_KINDS),
        "Fashion-MNIST test": kinds == "fashion",
        "Adwaita icons": kinds == "icon",
        "user digits": np.char.startswith(kinds, "user: "),
        **{f"user: {kind}": kinds == f"user: {kind}" for kind in user_digits.KINDS},
        **{f"held out: {kind}": kinds == kind for kind in non_digits.HELD_OUT_KINDS},
    }
    print(
        f"head: {'MLP, ' + str(args.hidden) + ' hidden' if args.hidden else 'logistic'}"
        + (f", pixel CNN {args.pixel_cnn}" if args.pixel_cnn else "")
        + (f", Mahalanobis distance of {args.mahalanobis}" if args.mahalanobis else "")
    )
    for false_alarms in map(float, args.false_alarms.split(",")):
        threshold = np.quantile(held_scores, 1 - false_alarms)
        flagged = scores > threshold
        with_model = flagged | ~found | (tops < DEFAULT_MIN_CONFIDENCE)
        print(f"\nthreshold: {100 * false_alarms:g}% of augmented held-out MNIST training digits")
        print("| group | detector, or no digit found | also the model's not sure |")
        print("| --- | --- | --- |")
        for name, mask in groups.items():
            alone = (flagged | ~found)[mask].mean()
            print(f"| {name} | {100 * alone:.1f}% | {100 * with_model[mask].mean():.1f}% |")
        test_alone = test_scores > threshold
        test_both = test_alone | (test_tops < DEFAULT_MIN_CONFIDENCE)
        print(f"| MNIST test | {100 * test_alone.mean():.2f}% | {100 * test_both.mean():.2f}% |")


if __name__ == "__main__":
    main()
