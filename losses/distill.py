"""Distillation losses on full next-token distributions: token-level KL (forward or reverse) and the
generalized Jensen-Shannon divergence of GKD.

Both take the student's and teacher's logits at the SAME positions (B, T, V) (already shifted by the caller:
the logits that predict the completion tokens) and a (B, T) mask, and return a masked token mean.
Shapes: B batch, T time, V vocab.
"""

import math

import torch

# One import from this package, on purpose: every loss here reduces with the same masked_mean, defined once in
# common.py. Copying this file out on its own? Paste masked_mean from losses/common.py (a dozen lines, torch
# only) in place of this import.
from .common import masked_mean


def _kl(logp, logq):
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last axis, from log-probs. (B, T, V) -> (B, T)."""
    p = logp.exp()  # (B, T, V)
    # Where p_v = 0 (a teacher that puts -inf on a vocabulary entry) the term is 0 by convention, but
    # p * (log p - log q) would be 0 * -inf = NaN. Zeroing the difference there keeps value and gradient
    # finite.
    diff = (logp - logq).masked_fill(p == 0, 0.0)  # (B, T, V)
    return (p * diff).sum(dim=-1)  # (B, T)


def kl_distill_loss(student_logits, teacher_logits, mask, direction="forward", temperature=1.0):
    """Token-level KL between teacher and student next-token distributions, masked mean over tokens.

    Objective, with p_T = softmax(teacher_logits / tau), p_S = softmax(student_logits / tau) at each position:
        direction="forward": KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)   (mode-covering; Hinton KD)
        direction="reverse": KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)   (mode-seeking; GKD beta=1)
        L = masked mean over valid tokens.

    Papers: Hinton, Vinyals & Dean 2015, arXiv 1503.02531 (soft targets at temperature tau); token-level
    forward and reverse KL for LMs as in GKD (Agarwal et al. 2023, arXiv 2306.13649, Sec. 2) and MiniLLM
    (Gu et al. 2023, arXiv 2306.08543).

    Args:
        student_logits: (B, T, V), with gradient.
        teacher_logits: (B, T, V), same positions and vocabulary; detached inside (the teacher is frozen).
        mask:           (B, T) 1 on tokens that count.
        direction:      "forward" = KL(teacher || student), "reverse" = KL(student || teacher).
        temperature:    tau > 0 divides BOTH logits before the softmax.

    Returns:
        0-dim fp32 tensor, >= 0.

    Value at initialisation (student == teacher): exactly 0 in both directions.

    Differs from the paper:
        1. NO tau^2 factor. Hinton et al. multiply the soft-target loss by tau^2 so that its gradient keeps
           the same scale as a hard-label loss when tau changes; we add no hard-label term and default to
           tau = 1, where the factor is 1. If you mix this with sft_loss at tau != 1, multiply by
           temperature ** 2 yourself.
        2. Hinton et al. write the soft-target loss as a cross-entropy; forward KL differs from it by the
           teacher's entropy, a constant, so the gradients are identical and the value is 0 at a perfect
           match.
        3. MiniLLM optimises a SEQUENCE-level reverse KL with a policy gradient; this is the per-token reverse
           KL over the full vocabulary at the given positions (exact, no sampling over the vocabulary).
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"kl_distill_loss: unknown direction {direction!r}; expected 'forward' or 'reverse'")
    # fp32 softmax; temperature divides the logits, not the log-probs.
    student_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    teacher_logp = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # (B, T, V)
    if direction == "forward":
        kl = _kl(teacher_logp, student_logp)  # (B, T)
    else:
        kl = _kl(student_logp, teacher_logp)  # (B, T)
    return masked_mean(kl, mask)


def generalized_jsd_loss(student_logits, teacher_logits, mask, beta=0.5, temperature=1.0):
    """Generalized Jensen-Shannon divergence of GKD between teacher and student, masked mean over tokens.

    Objective, at each position, with p_T, p_S the tempered softmaxes as in kl_distill_loss:
        M      = beta * p_T + (1 - beta) * p_S                   (mixed in PROBABILITY space)
        JSD_b  = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)          for 0 < beta < 1
        JSD_0  = KL(p_T || p_S)   (forward KL),   JSD_1 = KL(p_S || p_T)   (reverse KL)
        L = masked mean over valid tokens.

    Paper: Agarwal et al. 2023 (GKD, "On-Policy Distillation of Language Models"), arXiv 2306.13649, eq. 1.

    Why the endpoints are special-cased: plugging beta = 0 or 1 into the formula gives
    M = p_S or M = p_T and a divergence of exactly 0, not a KL. Near the endpoints the formula behaves like
    beta * KL(p_T || p_S) (beta -> 0) and (1 - beta) * KL(p_S || p_T) (beta -> 1): the DIRECTION of the
    gradient approaches forward / reverse KL while its SIZE vanishes. GKD reads beta = 0 / 1 as forward /
    reverse KL, so we return those exactly at the endpoints, as TRL's GKDTrainer does. NOTE: this is a
    discontinuity; beta = 1e-6 gives a loss about 1e-6 times the forward KL (verl-recipe#151 hit it with beta
    clamped to 1 - 1e-6).

    Args:
        student_logits: (B, T, V), with gradient.
        teacher_logits: (B, T, V), detached inside.
        mask:           (B, T) 1 on tokens that count.
        beta:           in [0, 1]; the teacher's weight in the mixture. 0.5 gives the symmetric JSD.
        temperature:    tau > 0 divides both logits (no tau^2 factor, see kl_distill_loss).

    Returns:
        0-dim fp32 tensor, >= 0. For 0 < beta < 1 it is at most the binary entropy
        -beta ln beta - (1 - beta) ln(1 - beta), i.e. ln 2 at beta = 0.5.

    Value at initialisation (student == teacher): exactly 0 for every beta.

    The paper's on-policy mixing (lambda, student-generated sequences) is the caller's choice of which
    sequences to score, not part of this loss.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd_loss: beta must be in [0, 1], got {beta}")
    student_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    teacher_logp = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # (B, T, V)
    if beta == 0.0:
        jsd = _kl(teacher_logp, student_logp)  # (B, T) forward KL
    elif beta == 1.0:
        jsd = _kl(student_logp, teacher_logp)  # (B, T) reverse KL
    else:
        # log M = log(beta * p_T + (1 - beta) * p_S), computed stably from log-probs. Mixing the LOG-probs
        # instead would be a geometric mean, a different (unnormalised) distribution (TRL #2202).
        log_m = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log(1.0 - beta))  # (B,T,V)
        jsd = beta * _kl(teacher_logp, log_m) + (1.0 - beta) * _kl(student_logp, log_m)  # (B, T)
    return masked_mean(jsd, mask)


def token_reverse_kl_pg_loss(student_logps, teacher_logps, mask):
    """Token-level on-policy distillation: a policy gradient whose per-token advantage is the negative
    reverse-KL sample, on completions the STUDENT sampled.

    Objective, per valid token t of a student sample y (no gradient through the advantage):
        A_t = -(log p_student(y_t) - log p_teacher(y_t))
        loss = mean_t ( -A_t * log p_student(y_t) )       (a token mean over the batch)
    Its expected gradient, over y ~ p_student, is sum_y p(y) (log p(y) - log q(y)) grad log p(y) =
    grad KL(p_student || p_teacher): the reverse KL's gradient, from one sampled token per position and the
    teacher's log-prob of that token alone, which scales to any vocabulary. generalized_jsd_loss with
    beta = 1 (the onpolicy mode) computes the same KL exactly, summed over the whole vocabulary, from both
    models' full logits.

    Paper: Agarwal et al. 2023 (GKD, arXiv 2306.13649) for on-policy distillation; the per-token reverse-KL
    advantage is the Qwen3 recipe (Qwen3 technical report, arXiv 2505.09388) and Thinking Machines' "On-Policy
    Distillation" (2025).

    Args:
        student_logps: (B, T) log p_student of the sampled tokens, WITH gradient.
        teacher_logps: (B, T) log p_teacher of the same tokens (detached inside).
        mask:          (B, T) 1 on tokens that count.

    Returns:
        loss (0-dim) and the mean per-token reverse-KL sample log p_s - log p_t (a k1 estimate of
        KL(student || teacher)), detached.

    Value at initialisation, were the student the teacher: every advantage is 0, so loss = 0 with zero
    gradient.

    Differs from the papers:
        1. No discount over future tokens (the advantage is the token's own KL sample), as in the Thinking
           Machines recipe; no clipping (each batch is used once, fresh from the student).
    """
    adv = -(student_logps.detach() - teacher_logps.detach())  # (B, T)
    loss = masked_mean(-adv * student_logps, mask)
    return loss, masked_mean(-adv, mask).detach()
