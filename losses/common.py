"""The three helpers every loss in losses/ shares: IGNORE_INDEX, the log-prob function, masked_mean.

This file imports only torch. The other files in losses/ take at most `masked_mean` or `IGNORE_INDEX`
from this one (see the note at the top of each). Shapes: B batch, T time, V vocab.
"""

import torch

# The label value that means "no loss on this position" (prompt tokens, padding). It is the default of
# torch.nn.functional.cross_entropy, so HF-style labels work unchanged.
IGNORE_INDEX = -100


def gather_logprobs(logits, targets):
    """Log-probability of each target token under the logits at the SAME position (no shift), in fp32.

    Objective (not a loss; the building block of every one):
        out[b, t] = log softmax(logits[b, t])[targets[b, t]]
                  = logits[b, t, targets[b, t]] - logsumexp_v logits[b, t, v]

    Paper: none; this is the definition of a categorical log-likelihood.

    Args:
        logits:  (B, T, V) any float dtype. NOTE: divide by the sampling temperature first if the result must
                 match the distribution the sampler drew from.
        targets: (B, T) long, valid token ids in [0, V). Positions you do not care about still need a valid id
                 (e.g. the pad id); mask the result afterwards instead of putting IGNORE_INDEX here.

    Returns:
        (B, T) fp32 log-probabilities, all <= 0.

    Value at initialisation: log(1/V) for every position when the logits are all equal.

    The sampler calls this directly on one decode step's logits; full-sequence callers go through
    token_logprobs (which adds the causal shift) or rollout.completion_logps.
    """
    # fp32 before the softmax: in bf16 a log-prob near 0 has only ~3 significant digits, which is enough to
    # make a PPO ratio visibly differ from 1 before any update.
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)


def token_logprobs(logits, ids):
    """Per-token log-probs of a sequence under a causal LM: logits[:, t] scores ids[:, t + 1], in fp32.

    Objective:
        out[b, t] = log p(ids[b, t + 1] | ids[b, :t + 1]) = gather_logprobs(logits[:, :-1], ids[:, 1:])[b, t]

    Paper: none; the standard causal shift. Getting it wrong (logits[t] scored against ids[t]) is the classic
    off-by-one of hand-written DPO and PPO code: the model is then trained to copy its input.

    Args:
        logits: (B, T, V) the model's output for input ids (B, T). Divide by the sampling temperature first
                where the log-probs must match the sampler's distribution.
        ids:    (B, T) long, the same ids that were fed to the model.

    Returns:
        (B, T - 1) fp32. Column t is the log-prob of token t + 1; the first token has no log-prob (nothing
        predicts it) and the last logit predicts nothing we have. Shift masks the same way: mask[:, 1:].

    Value at initialisation: log(1/V) everywhere for uniform logits.
    """
    return gather_logprobs(logits[:, :-1], ids[:, 1:])  # (B, T-1, V), (B, T-1) -> (B, T-1)


def masked_mean(x, mask, dim=None):
    """Mean of x over the positions where mask is 1; 0 (not NaN) when the mask is all zeros.

    Objective:
        sum(x * mask) / max(sum(mask), 1)       over all elements (dim=None) or along `dim`

    Paper: none. This is the ONE reduction every loss here uses, so "mean over what?" has one answer.

    Args:
        x:    any shape, float.
        mask: same shape as x, 1 where x counts, 0 elsewhere; bool or float. It is a 0/1 mask, not a
              weight: the denominator is clamped at 1, which is exact for 0/1 masks and turns
              an all-zero mask into 0 / 1 = 0 instead of 0 / 0 = NaN.
        dim:  None for one scalar over everything, or an int to reduce one axis (e.g. dim=-1 on (B, T) gives
              a per-sequence mean of shape (B,)).

    Returns:
        0-dim tensor (dim=None) or x with `dim` removed.

    verl adds 1e-8 to the denominator instead of clamping; clamping keeps the result exact.
    """
    mask = mask.to(x.dtype)
    # Zero the masked entries before multiplying: padded slots may hold huge values, inf or NaN, and
    # inf * 0 = NaN would leak into the sum. masked_fill also sends exactly zero gradient to those slots.
    x = x.masked_fill(mask == 0, 0.0)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)  # x with `dim` removed
