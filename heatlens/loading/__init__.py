"""What comes in: images (upright RGB, size-checked), models (by name or checkpoint, with their
labels) and the preprocessing presets that turn images into the models' inputs."""
