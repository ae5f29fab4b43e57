"""Process reward model: binary cross-entropy on the score read at each step's end token.

Shapes: B batch, S steps.
"""

import torch.nn.functional as F

# One import from this package, on purpose: every loss here reduces with the same masked_mean, defined once in
# common.py. Copying this file out on its own? Paste masked_mean from losses/common.py (a dozen lines, torch
# only) in place of this import.
from .common import masked_mean


def prm_loss(step_logits, step_labels, step_mask, balance=False):
    """Binary cross-entropy of a process reward model's per-step logits, masked mean over steps.

    Objective, for each valid step s with label y in [0, 1] and logit z:
        l = -(y * log sigmoid(z) + (1 - y) * log sigmoid(-z))
        L = masked mean of l over valid steps.

    Papers: Lightman et al. 2023, "Let's Verify Step by Step", arXiv 2305.20050 (a PRM predicts the
    correctness of every step); Math-Shepherd, Wang et al. 2023, arXiv 2312.08935 (the same per-step
    cross-entropy, with hard or soft labels estimated from rollouts).

    Args:
        step_logits: (B, S) the PRM's logit at each step's END token, gathered by the caller from the score
                     head's (B, T) output. NOTE: no causal shift here, the score at a step's last token judges
                     that step: PRM scoring is the one exception to the causal shift.
        step_labels: (B, S) 1 for a correct step, 0 for a wrong one; soft labels in [0, 1] are fine.
        step_mask:   (B, S) 1 for real steps, 0 for padding steps (their logits and labels are ignored).
        balance:     False: the mean over all valid steps. True: right and wrong steps weigh half each, i.e.
                     L = (mean of l over right steps + mean of l over wrong steps) / 2 (a soft label y counts
                     y towards the right class and 1 - y towards the wrong one). When most steps are right
                     (85% is typical of a decent policy's samples), the plain mean is met by a PRM that calls
                     nearly everything right; balancing makes a missed mistake cost as much as a false alarm.

    Returns:
        0-dim fp32 tensor.

    Value at initialisation: ln 2 = 0.6931 with a zero-initialised score head (all logits 0), whatever
    the labels, balanced or not.

    Differs from the paper:
        1. Lightman et al. train the LM itself to emit a positive / negative / neutral token after each step;
           here a scalar head with binary (or soft) labels, so a "neutral" label must be mapped to 0 or 1 by
           the caller.
        2. balance=True is a class-balanced cross-entropy; the papers train on the plain mean.
    """
    valid = step_mask.bool()  # (B, S)
    # Zero the padded logits first: masked_fill sends exactly zero gradient to those slots, so no junk there
    # (a label of -100 or inf, a logit of 1e30) can turn into 0 * inf = NaN on the way back. The junk values
    # of the forward pass are dropped by masked_mean.
    logits = step_logits.float().masked_fill(~valid, 0.0)  # (B, S)
    labels = step_labels.float()  # (B, S)
    # with_logits: computed from the logit directly (log-sum-exp form), never log(sigmoid(z)), which
    # underflows.
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (B, S)
    if not balance:
        return masked_mean(bce, step_mask)
    m = step_mask.float()  # (B, S)
    right, wrong = labels.masked_fill(~valid, 0.0) * m, (1 - labels).masked_fill(~valid, 0.0) * m  # (B, S) each
    # each class's weights sum to 1/2 (to 1 if the other class is absent from the batch), so the weights sum to 1
    w = right / right.sum().clamp(min=1e-12) + wrong / wrong.sum().clamp(min=1e-12)  # (B, S)
    return (w * bce).sum() / w.sum().clamp(min=1e-12)
