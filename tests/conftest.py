"""Shared test settings.

The models in these tests are tiny, so a second torch thread buys nothing; worse, when other processes share
the cores, idle-spinning OpenMP threads can slow every matmul down tenfold. One thread keeps the suite's time
predictable on any machine.
"""
import torch

torch.set_num_threads(1)
