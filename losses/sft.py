"""Supervised fine-tuning: next-token cross-entropy on the completion tokens only.

Shapes: B batch, T time, V vocab.
"""

import torch.nn.functional as F

# One import from this package, on purpose: every file in losses/ takes its shared pieces from common.py so
# that each exists exactly once (two drifting copies of a mask convention is a classic post-training bug).
# Copying this file out on its own? Replace the next line with `IGNORE_INDEX = -100`.
from .common import IGNORE_INDEX


def sft_loss(logits, labels, ignore_index=IGNORE_INDEX):
    """Mean negative log-likelihood of the labelled tokens (SFT / pre-training loss).

    Objective:
        L = - (1 / N) * sum_{b, t : labels[b, t+1] != ignore_index} log p(labels[b, t+1] | logits[b, t])
        N = number of such (b, t); L = 0 when N = 0.
    Identical to F.cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=ignore_index) whenever N > 0.

    Paper: maximum likelihood on demonstrations, the SFT step of InstructGPT (Ouyang et al. 2022,
    arXiv 2203.02155, Sec. 3.5); no equation number there.

    Args:
        logits: (B, T, V) model output for input ids (B, T).
        labels: (B, T) long, ALIGNED WITH THE INPUT IDS (HF convention): labels[:, t] is the token at t, or
                ignore_index where no loss is wanted (prompt, padding). The shift happens here.
        ignore_index: label value that contributes nothing, default IGNORE_INDEX = -100.

    Returns:
        0-dim fp32 tensor.

    Value at initialisation: ln V for uniform logits (about 2.89 for V = 18).

    Differs from the paper:
        1. Prompt tokens get no loss (labels = ignore_index there): the common practice, not stated in the
           paper.
        2. NOTE: this is the token mean of THIS call. With gradient accumulation, averaging micro-batch
           means is not the token mean of the whole batch (3 tokens of loss 1 in one micro-batch and 1 of
           loss 5 in the other: the mean of the means is 3, the token mean 2); weight each micro-batch by its
           token count.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t + 1; fp32 for the softmax
    targets = labels[:, 1:]  # (B, T-1): the shifted labels
    # Sum, then divide by the count ourselves: F.cross_entropy's "mean" returns NaN (0 / 0) when every label
    # is ignored, and we want 0 there (a micro-batch of prompts only must not poison the step).
    nll_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),  # (B*(T-1), V)
        targets.reshape(-1),  # (B*(T-1),)
        ignore_index=ignore_index,
        reduction="sum",
    )
    n_tokens = (targets != ignore_index).sum().clamp(min=1)
    return nll_sum / n_tokens
