"""`python -m experiments.bench`: step time, tokens/s, MFU, memory and compile time.

One small module per benchmark (train, decode, attention check, hardware
ceilings, kernel profile), selected with `--only`; `__main__` prints one table.
See BENCHMARKS.md for the commands and the measured numbers.
"""
