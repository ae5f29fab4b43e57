"""The synthetic, verifiable reasoning task of posttrain: see data/task.py."""
