"""Images the project generates: users' digit images of known label, and images that hold no digit
(for tests, benchmarks and teaching a model to refuse non-digits). Drawn with pillow and numpy."""
