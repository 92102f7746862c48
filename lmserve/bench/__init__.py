"""Benchmarks: offline throughput, single-stream latency, and a streaming load generator for OpenAI-compatible
servers, with vLLM's metric names (metrics.py holds the arithmetic, free of I/O)."""
