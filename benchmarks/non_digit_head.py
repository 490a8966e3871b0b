"""A non-digit detector on the frozen features of a trained model (an experiment, not in
digitjax): a logistic regression or a one-hidden-layer MLP on what the model computes for an
image (the hidden layer, the calibrated logits and their logsumexp, each conv layer's mean and
max activation), fitted to tell MNIST training digits (half of them augmented as
`--preset robust` augments) from the generated non-digits of the training kinds, and
thresholded so that 0.5% or 1% of augmented held-out MNIST training digits are flagged. The
model itself is untouched, so its digits' accuracy and calibration are too.

Reports, for `uncertain_rate.py`'s images (`--per-kind` of each kind, `--seed`), the share
flagged by the detector alone and together with the model's own "not sure" (top calibrated
probability below 0.95) or no digit found: held-out and training non-digit kinds,
Fashion-MNIST test photos (report only: nothing is chosen on them), users' digits per kind,
and MNIST test.

    python benchmarks/non_digit_head.py --checkpoint digitjax/assets/model [--hidden 64]
"""

import argparse
import dataclasses
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from uncertain_rate import fashion_files

from digitjax.augment import augment
from digitjax.checkpoint import restore_model
from digitjax.config import Config
from digitjax.data import load_dataset
from digitjax.inference.classifier import DEFAULT_MIN_CONFIDENCE
from digitjax.inference.parallel import available_cores, start_pool
from digitjax.inference.preprocess import preprocess_file
from digitjax.model import max_pool_2x2
from digitjax.synthetic import non_digits, user_digits
from digitjax.weights import NUM_POOLS

BATCH = 2000


def features_fn(checkpoint: Path, conv_stats: bool = True):
    """fn(images (N, 28, 28) in [0, 1]) -> (features, top calibrated probability)."""
    model = restore_model(checkpoint)
    cnn = nnx.merge(model.graphdef, model.params)
    temperature = model.temperature or 1.0

    @jax.jit
    def features(images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x, pooled = images[..., None], []
        for i, conv in enumerate(cnn.convs):
            x = jax.nn.relu(conv(x))
            x = max_pool_2x2(x) if i < NUM_POOLS else x
            pooled += [x.mean((1, 2)), x.max((1, 2))]
        hidden = jax.nn.relu(cnn.hidden(x.reshape(x.shape[0], -1)))
        logits = cnn.logits(hidden) / temperature
        energy = jax.nn.logsumexp(logits, -1, keepdims=True)
        top = jax.nn.softmax(logits).max(-1)
        return jnp.concatenate([hidden, logits, energy, *(pooled if conv_stats else [])], -1), top

    def in_batches(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = [features(jnp.asarray(images[i : i + BATCH])) for i in range(0, len(images), BATCH)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return in_batches


def augmented(images: np.ndarray, seed: int) -> np.ndarray:
    config = Config.from_flags({}, "robust")
    augment_batch = jax.jit(lambda key, batch: augment(key, batch, config))
    keys = jax.random.split(jax.random.key(seed), -(-len(images) // BATCH))
    return np.concatenate(
        [augment_batch(k, images[i * BATCH : (i + 1) * BATCH]) for i, k in enumerate(keys)]
    )


@dataclasses.dataclass
class Head:
    mean: np.ndarray
    scale: np.ndarray
    params: dict

    def scores(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(
            head_scores(self.params, jnp.asarray((features - self.mean) / self.scale))
        )


def head_scores(params: dict, x: jax.Array) -> jax.Array:
    if "hidden" in params:
        x = jax.nn.relu(x @ params["hidden"] + params["hidden_bias"])
    return x @ params["out"] + params["out_bias"]


def fit_head(digits: np.ndarray, others: np.ndarray, hidden: int, steps: int = 1500) -> Head:
    """Class-balanced logistic loss, Adam, minibatches of 8,192."""
    x = np.concatenate([digits, others])
    y = np.concatenate([np.zeros(len(digits)), np.ones(len(others))]).astype(np.float32)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    x = jnp.asarray((x - mean) / scale)
    width = x.shape[1]
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"out": jnp.zeros(hidden or width), "out_bias": jnp.zeros(())}
    if hidden:
        params |= {
            "hidden": jax.random.normal(k1, (width, hidden)) / np.sqrt(width),
            "hidden_bias": jnp.zeros(hidden),
            "out": jax.random.normal(k2, (hidden,)) / np.sqrt(hidden),
        }
    other_weight = len(digits) / len(others)
    optimizer = optax.adam(3e-3)

    def loss(params: dict, xb: jax.Array, yb: jax.Array) -> jax.Array:
        losses = optax.sigmoid_binary_cross_entropy(head_scores(params, xb), yb)
        decay = sum((params[k] ** 2).sum() for k in ("hidden", "out") if k in params)
        return (losses * jnp.where(yb > 0, other_weight, 1.0)).mean() + 1e-4 * decay

    @jax.jit
    def step(params: dict, state: optax.OptState, idx: jax.Array) -> tuple:
        grads = jax.grad(loss)(params, x[idx], jnp.asarray(y)[idx])
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        params, state = step(params, state, jnp.asarray(rng.integers(0, len(x), 8192)))
    return Head(mean, scale, params)


def preprocessed(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The images as `predict` sees them, and whether a digit was found in each."""
    with start_pool(available_cores()) as pool:
        arrays = list(pool.map(preprocess_file, paths, chunksize=16))
    found = np.array([a is not None for a in arrays])
    blank = np.zeros((28, 28), np.float32)
    return np.stack([blank if a is None else np.asarray(a, np.float32) for a in arrays]), found


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("digitjax/assets/model"))
    parser.add_argument("--hidden", type=int, default=0, help="0: logistic regression")
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-conv-stats", action="store_true")
    args = parser.parse_args()
    features = features_fn(args.checkpoint, not args.no_conv_stats)

    mnist = load_dataset("mnist")
    train_digits = mnist.split("train")[0].astype(np.float32) / 255
    order = np.random.default_rng(0).permutation(len(train_digits))
    fit_digits, held_digits = train_digits[order[:50_000]], train_digits[order[50_000:]]
    others = non_digits.training_set(10_000).astype(np.float32) / 255
    fit_others = np.concatenate([others] + [augmented(others, 10 + c) for c in range(3)])
    head = fit_head(
        features(np.concatenate([fit_digits, augmented(fit_digits, 1)]))[0],
        features(fit_others)[0],
        args.hidden,
    )
    held_scores = head.scores(features(augmented(held_digits, 2))[0])

    with tempfile.TemporaryDirectory() as folder:
        samples = non_digits.generate(Path(folder) / "non_digits", args.per_kind, args.seed)
        digits = user_digits.generate(Path(folder) / "digits", args.per_kind, args.seed)
        samples += [(path, f"user: {kind}") for path, _, kind in digits]
        samples += [(path, "fashion") for path, _ in fashion_files(Path(folder) / "f", 1000)]
        images, found = preprocessed([path for path, _ in samples])
    kinds = np.array([kind for _, kind in samples])
    image_features, tops = features(images)
    scores = head.scores(image_features)
    test_features, test_tops = features(mnist.split("test")[0].astype(np.float32) / 255)
    test_scores = head.scores(test_features)
    groups = {
        "held-out non-digits": np.isin(kinds, non_digits.HELD_OUT_KINDS),
        "training non-digits": np.isin(kinds, non_digits.TRAINING_KINDS),
        "Fashion-MNIST test": kinds == "fashion",
        "user digits": np.char.startswith(kinds, "user: "),
        **{f"user: {kind}": kinds == f"user: {kind}" for kind in user_digits.KINDS},
        **{f"held out: {kind}": kinds == kind for kind in non_digits.HELD_OUT_KINDS},
    }
    print(f"head: {'MLP, ' + str(args.hidden) + ' hidden' if args.hidden else 'logistic'}")
    for false_alarms in (0.005, 0.01):
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
