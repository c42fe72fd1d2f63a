"""Benchmarks of nbankd against nbank and the hardware: `python bench/run.py`."""
