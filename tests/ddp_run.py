"""posttrain.main under test conditions, for tests/test_ddp.py: run alone or as every rank of torchrun.

    python tests/ddp_run.py WRITES_LOG posttrain-flags...
    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_run.py WRITES_LOG posttrain-flags...

Two things differ from `python posttrain.py`, the same in both runs:
  * the verifier calls a completion right iff its text has an even number of characters (a tiny random model
    solves no problem, so a real verifier would give grpo no gradient to compare);
  * every checkpoint save appends "RANK FOLDER" to WRITES_LOG, so the test can tell who wrote.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import posttrain  # noqa: E402

log, argv = sys.argv[1], sys.argv[2:]


def verify(self, prompt, text, finished=True):
    v = real_verify(self, prompt, text, finished)
    return dataclasses.replace(v, correct=len(text) % 2 == 0)


def save_checkpoint(folder, *args, **kwargs):
    with open(log, "a") as f:
        f.write(f"{posttrain.RANK} {os.path.basename(folder)}\n")
    return real_save(folder, *args, **kwargs)


real_verify, posttrain.Task.verify = posttrain.Task.verify, verify
real_save, posttrain.save_checkpoint = posttrain.save_checkpoint, save_checkpoint
posttrain.main(argv)
