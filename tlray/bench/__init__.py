"""Benchmarks, each against a baseline measured in the same run: Ray Data ingest, the training
loop, whole sweeps."""
