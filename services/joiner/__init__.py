"""The joiner service: impressions and clicks from Kafka, labelled examples to Kafka."""
