"""Model loading and the project-built tiny model."""
