"""Whether an image holds a digit, decided from a model's calibrated probabilities alone (the
exported ONNX and StableHLO models give nothing else).

A model trained with `--non-digit-fraction` learned to give an image of no digit about the
same probability for every class, so its top probability is low (0.1 for equal ones); a digit's
is near 1. Three answers, by the top probability p:

- p >= min_confidence: a digit (the argmax);
- NOT_A_DIGIT_BELOW <= p < min_confidence: "not sure" (a digit, maybe: show it with a "?");
- p < NOT_A_DIGIT_BELOW: not a digit.

The thresholds were chosen on the bundled model with `benchmarks/uncertain_rate.py`
(benchmarks/README.md, "Non-digit rejection", has the trade-off table).
"""

import jax.numpy as jnp

DIGIT, NOT_SURE, NOT_A_DIGIT = 0, 1, 2
VERDICTS = ("digit", "not sure", "not a digit")
# A top probability at or above this is an answer (`digitjax predict --min-confidence`).
MIN_CONFIDENCE = 0.95
# A top probability below this is "not a digit".
NOT_A_DIGIT_BELOW = 0.5


def verdicts(
    probabilities: jnp.ndarray,
    min_confidence: float = MIN_CONFIDENCE,
    not_a_digit_below: float = NOT_A_DIGIT_BELOW,
) -> jnp.ndarray:
    """(..., classes) calibrated probabilities -> (...) DIGIT, NOT_SURE or NOT_A_DIGIT."""
    top = jnp.max(probabilities, axis=-1)
    return jnp.where(
        top >= min_confidence, DIGIT, jnp.where(top < not_a_digit_below, NOT_A_DIGIT, NOT_SURE)
    )
