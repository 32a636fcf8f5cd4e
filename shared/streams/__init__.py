"""Recorded event streams: the file format, importers and the synthetic generator."""
