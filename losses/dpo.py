"""Preference losses on whole sequences: DPO (and its cDPO / IPO / hinge variants), SimPO, ORPO, KTO (unpaired),
Bradley-Terry RM.

Every function takes per-sequence numbers (B,) that the caller computed by summing (or averaging) token
log-probs over exactly the completion tokens, chosen and rejected as SEPARATE arguments (no "first half of the
batch is chosen" convention to get wrong), and returns UNREDUCED losses (B,): the caller takes the mean.

This file imports only torch: nothing here needs a shared helper. Shapes: B batch.
"""

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
):
    """Direct Preference Optimization loss and its cDPO, IPO and hinge variants, per pair.

    Objective, with the implicit reward margin
        d = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))
    loss_type="sigmoid" (DPO):      L = -log sigmoid(beta * d)
        with label_smoothing = eps > 0 (cDPO, a label flipped with probability eps):
                                    L = -(1 - eps) * log sigmoid(beta * d) - eps * log sigmoid(-beta * d)
    loss_type="ipo":                L = (d - 1 / (2 * beta))^2
    loss_type="hinge":              L = max(0, 1 - beta * d)

    Papers:
        DPO: Rafailov et al. 2023, arXiv 2305.18290, eq. 7.
        cDPO: Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (technical note).
        IPO: Azar et al. 2023, arXiv 2310.12036, eq. 17 (there tau = beta here).
        hinge: SLiC-HF (Zhao et al. 2023, arXiv 2305.10425) calibration loss, in the reference-normalised form
               of RSO (Liu et al. 2023, arXiv 2309.06657), which is also DPO eq. 7 with the sigmoid swapped
               for a hinge.

    Args:
        policy_chosen_logps:   (B,) log pi(y_chosen | x), summed over the chosen completion's tokens.
        policy_rejected_logps: (B,) the same for the rejected completion.
        ref_chosen_logps:      (B,) log ref(y_chosen | x) over EXACTLY the same tokens as the policy's.
        ref_rejected_logps:    (B,) the same for the rejected completion.
        beta:            > 0, strength of the implicit KL regularisation (tau in IPO).
        loss_type:       "sigmoid", "ipo" or "hinge".
        label_smoothing: eps in [0, 0.5), only for "sigmoid" (0 = plain DPO). A ValueError for the other loss
                         types instead of silently ignoring it (libraries disagree here: the same value changes
                         one library's loss and not another's).

    Returns:
        losses (B,): unreduced, differentiable.
        chosen_rewards (B,):   beta * (log pi(y_c) - log ref(y_c)), detached (the implicit reward, for
                               logging).
        rejected_rewards (B,): beta * (log pi(y_r) - log ref(y_r)), detached.

    Value at initialisation (policy == reference, so d = 0):
        sigmoid: ln 2 = 0.6931 for every pair, with or without label smoothing, and NOT 0 (STYLE "DPO
                 reference").
        ipo: 1 / (4 beta^2) (25 at beta = 0.1).  hinge: 1.

    Differs from the paper:
        1. IPO: eq. 17 is stated on sequence log-likelihoods; the IPO authors' experiments use per-token
           AVERAGE log-probs. This function uses whatever it is given: pass sums or averages, the caller
           chooses.
        2. hinge: SLiC-HF uses no reference model and a margin delta; here the margin is 1 on beta * d, as
           in RSO.
        3. The losses are not averaged over the batch; the caller does that (and can weight pairs).
    """
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if loss_type not in ("sigmoid", "ipo", "hinge"):
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; expected 'sigmoid', 'ipo' or 'hinge'")
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(f"dpo_loss: label_smoothing applies only to loss_type='sigmoid', not {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,) log pi/ref on the chosen completion
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,) the same on the rejected one
    d = chosen_logratios - rejected_logratios  # (B,) the margin in DPO eq. 7, before beta

    if loss_type == "sigmoid":
        # F.logsigmoid, never torch.log(torch.sigmoid(.)): the latter underflows to log(0) = -inf for
        # beta * d below about -100 in fp32, while logsigmoid stays finite.
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    elif loss_type == "ipo":
        # A regression of the margin onto 1 / (2 beta): unlike the sigmoid loss it stops pushing once the
        # margin is reached, which is IPO's point (DPO can drive d to infinity on deterministic preferences).
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * d)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, beta=2.0, gamma=0.5):
    """SimPO: reference-free preference loss on length-normalised log-likelihoods with a target margin.

    Objective:
        L = -log sigmoid(beta * (avg_c - avg_r) - gamma)
    where avg = (1 / |y|) * sum_t log pi(y_t | x, y_<t) is the per-token AVERAGE log-prob of a completion.

    Paper: Meng, Xia & Chen 2024, arXiv 2405.14734, the SimPO objective (eq. 6).

    Args:
        policy_chosen_avg_logps:   (B,) average token log-prob of the chosen completion (sum / number of
                                   tokens).
        policy_rejected_avg_logps: (B,) the same for the rejected completion.
        beta:  reward scale (the paper uses about 2 to 10).
        gamma: the target reward margin, an ABSOLUTE margin as in the paper's formula. (TRL's SimPO instead
               takes gamma_beta_ratio = gamma / beta; gamma here = that ratio * beta.)

    Returns:
        losses (B,), unreduced.

    Value at initialisation: there is no reference model; when avg_c == avg_r the loss is
        -log sigmoid(-gamma) = log(1 + e^gamma), 0.974 at gamma = 0.5 (ln 2 only when gamma = 0).

    Averaging the log-probs is the caller's job: pass averages, not sums.
    """
    margin = beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma  # (B,)
    return -F.logsigmoid(margin)


def reward_model_loss(chosen_scores, rejected_scores):
    """Bradley-Terry pairwise loss for a scalar reward model.

    Objective:
        L = -log sigmoid(r(x, y_c) - r(x, y_r))
    i.e. the negative log-likelihood that the chosen completion wins under the Bradley-Terry model
    P(y_c > y_r) = sigmoid(r_c - r_r).

    Paper: InstructGPT (Ouyang et al. 2022, arXiv 2203.02155), eq. 1; Bradley & Terry 1952.

    Args:
        chosen_scores:   (B,) the reward model's scalar score of each chosen completion (usually read at its
                         last real token).
        rejected_scores: (B,) the same for the rejected completion.

    Returns:
        losses (B,), unreduced.

    Value at initialisation: ln 2 = 0.6931 whenever the two scores are equal (e.g. a freshly zeroed
    score head).

    Differs from the paper:
        1. InstructGPT trains on all K-choose-2 pairs of a prompt as one batch element and divides by
           K-choose-2; here each pair is one row and the caller averages over rows.
    """
    return -F.logsigmoid(chosen_scores - rejected_scores)  # (B,)


def kto_loss(policy_logps, ref_logps, desirable, kl_ref_point, beta=0.1, desirable_weight=1.0,
             undesirable_weight=1.0):
    """KTO: a prospect-theory loss on UNPAIRED completions, each labelled desirable or undesirable.

    Objective, per completion y of prompt x, with the implied reward r = log pi(y|x) - log ref(y|x) and the
    reference point z0 (an estimate of KL(pi || ref), detached):
        desirable:    loss = lambda_D * (1 - sigmoid(beta * (r - z0)))
        undesirable:  loss = lambda_U * (1 - sigmoid(beta * (z0 - r)))
    (the paper's lambda_y - v(x, y)). A desirable completion gains by rising above the reference point, an
    undesirable one by falling below it; z0 keeps the policy from gaining by moving every completion at once.

    Paper: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv 2402.01306,
    eq. 8 (the KTO loss) and Sec. 4.1 (z0 estimated on the batch, not back-propagated).

    Args:
        policy_logps, ref_logps: (B,) summed completion log-probs under the policy and the frozen reference.
        desirable:     (B,) bool, True for a desirable completion.
        kl_ref_point:  0-dim tensor z0 >= 0 (detached inside); the paper's estimate is the mean of
                       r over mismatched (x, y') pairs of the batch, clamped at 0.
        beta:          the reward scale; desirable_weight, undesirable_weight: lambda_D, lambda_U.

    Returns:
        losses (B,) and the implied rewards beta * r (B,), detached.

    Value at initialisation (policy == reference, z0 = 0): r = 0, so each loss is lambda_y / 2.

    Differs from the paper:
        1. Returns per-completion losses; average them yourself (the paper: the mean over the batch).
    """
    r = policy_logps - ref_logps  # (B,)
    z0 = kl_ref_point.detach()
    loss_d = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))  # (B,)
    loss_u = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))  # (B,)
    return torch.where(desirable, loss_d, loss_u), (beta * r).detach()


def orpo_loss(chosen_avg_logps, rejected_avg_logps, lam=0.1):
    """ORPO: supervised fine-tuning on the chosen completion plus a log odds-ratio penalty, no reference model.

    Objective, per pair, with p = exp(average per-token log-prob) of a completion and odds(y) = p / (1 - p):
        loss = -log p_chosen_avg  -  lam * log sigmoid( log odds(y_chosen) - log odds(y_rejected) )
    where -log p_chosen_avg = -chosen_avg_logps is the per-token NLL of the chosen completion (the SFT term).

    Paper: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    arXiv 2403.07691, eq. 6-8; lam = 0.1 in most of its experiments.

    Args:
        chosen_avg_logps, rejected_avg_logps: (B,) per-token AVERAGE log-probs (sum / number of completion
            tokens) under the policy, each < 0.
        lam: weight of the odds-ratio term.

    Returns:
        losses (B,) and the log odds ratio (B,), detached.

    Value on hand-worked numbers: p_chosen = 1/2, p_rejected = 1/4 give odds 1 and 1/3, log odds ratio ln 3,
    and loss = ln 2 + lam * ln(4/3). When chosen and rejected are equally likely (as at initialisation, for two
    completions of equal length and average log-prob) the odds term is lam * ln 2 and the rest is the NLL.

    Differs from the paper:
        1. log(1 - p) is computed as log(-expm1(log p)), exact even where p is close to 1.
    """
    def log_odds(avg):
        return avg - torch.log(-torch.expm1(avg))  # log p - log(1 - p), (B,)

    ratio = log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps)  # (B,)
    return -chosen_avg_logps - lam * F.logsigmoid(ratio), ratio.detach()
