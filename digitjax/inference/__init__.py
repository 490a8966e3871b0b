"""From a user's image to an answer: preprocessing (on every core), the classifier contract that
checkpoints and exported files implement, predictions, and export."""
