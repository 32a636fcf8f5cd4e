"""Online learning: the model registry and the progressive learner."""
