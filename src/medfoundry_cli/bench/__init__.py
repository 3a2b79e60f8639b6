"""Benchmarks: training-step throughput, MFU, memory and data-pipeline speed (``medfoundry bench``)."""
