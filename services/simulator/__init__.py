"""The traffic simulator: closed-loop demo traffic through the scorer and the clicks topic."""
