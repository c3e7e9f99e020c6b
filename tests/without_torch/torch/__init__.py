"""Stands in for torch in the processes the tests start (tests/run_helpers.py, cpu_env).

tensorboardX imports torch whenever it is installed (the `hf` extra installs it for
tests/test_hf_*.py), 2-3 s of every training process's start, though nothing the project
runs uses it: without it, the processes start as they do for users without the extra.
"""

raise ImportError("torch is left out of the processes the tests start (tests/run_helpers.py)")
