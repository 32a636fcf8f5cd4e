"""The trainer service: labelled examples from Kafka, signed model snapshots to Redis."""
