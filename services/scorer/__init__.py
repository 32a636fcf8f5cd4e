"""The scorer service: serve click probabilities over HTTP and log what it served."""
