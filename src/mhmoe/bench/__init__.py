"""Benchmarks of the layers and of training steps: every implementation is checked against the reference loop
before it is timed. The command line is `mhmoe bench layer|train`; the scripts in benchmarks/ use these modules.
Results (scripts, JSON, tables) live in benchmarks/, never in timed tests."""
