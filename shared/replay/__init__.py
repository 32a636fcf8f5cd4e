"""Replay: run a recorded stream through the join, the learner and the metrics in event time."""
