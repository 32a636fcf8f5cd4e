"""Evaluation metrics for click-through-rate models: log loss, normalised entropy, exact AUC."""
