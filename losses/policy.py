"""On-policy RL losses on per-token log-probs: the clipped policy loss (PPO / GRPO / DAPO / Dr. GRPO), its
sequence-level (GSPO) and clipped-weight (CISPO) variants, truncated importance-sampling weights for the
sampler / trainer mismatch, the KL penalty estimators k1 / k2 / k3, the clipped value loss, and the entropy of
the policy.

All tensors are response-only, shape (B, T), with a 0/1 mask that is 1 on generated tokens up to and including
EOS. Padded positions may hold anything finite; they never change a result.
Shapes: B batch, T time, V vocab.
"""

import torch

# One import from this package, on purpose: every loss here reduces with the same masked_mean, defined once in
# common.py (two drifting copies of "mean over what" is the classic GRPO bug). Copying this
# file out on its own? Paste masked_mean from losses/common.py (a dozen lines, torch only) in place of this
# import.
from .common import masked_mean

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def aggregate_loss(loss_tok, mask, loss_agg="token_mean", norm_len=None):
    """Reduce per-token losses (B, T) to one number by a NAMED rule; every on-policy term uses the same one.

    Objective (n_b = number of valid tokens of sequence b; the means over sequences skip rows with n_b = 0):
        "token_mean":              sum_{b,t} l / sum_b n_b                    (DAPO; also PPO's E_t)
        "seq_mean_token_mean":     mean_b (sum_t l / n_b)                     (GRPO paper, eq. 3)
        "seq_mean_token_sum":      mean_b (sum_t l)
        "seq_mean_token_sum_norm": mean_b (sum_t l / norm_len)                (Dr. GRPO)

    GRPO's eq. 3 puts its KL term inside the same 1/|o_i| sum as the clipped surrogate, so a KL (or value)
    term added to policy_loss should be reduced with this function and the same loss_agg: reduced any other
    way, its weight relative to the surrogate changes with the lengths of the completions in a batch.

    Args:
        loss_tok: (B, T) per-token losses; padded positions may hold anything finite.
        mask:     (B, T) 1 on tokens that count.
        loss_agg: one of LOSS_AGGS.
        norm_len: the constant of "seq_mean_token_sum_norm". Dr. GRPO divides by a fixed budget, the
                  generation limit (max_new_tokens); None falls back to T, the padded width of THIS batch,
                  which changes from batch to batch and is then no constant at all.

    Returns:
        0-dim tensor.
    """
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"aggregate_loss: unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGGS}")
    if loss_agg == "token_mean":
        return masked_mean(loss_tok, mask)
    m = mask.to(loss_tok.dtype)  # (B, T)
    n_tokens = m.sum(-1)  # (B,)
    seq_sum = loss_tok.masked_fill(m == 0, 0.0).sum(-1)  # (B,) per-sequence token sum, padding excluded
    if loss_agg == "seq_mean_token_mean":
        per_seq = seq_sum / n_tokens.clamp(min=1)  # (B,)
    elif loss_agg == "seq_mean_token_sum":
        per_seq = seq_sum  # (B,)
    else:
        per_seq = seq_sum / (loss_tok.size(-1) if norm_len is None else norm_len)  # (B,)
    return masked_mean(per_seq, n_tokens > 0)  # mean over the sequences that have a valid token


def policy_loss(
    logps,
    old_logps,
    advantages,
    mask,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    loss_agg="token_mean",
    norm_len=None,
    weights=None,
):
    """Clipped surrogate policy loss (PPO), with asymmetric clip (DAPO), dual clip, and a NAMED aggregation.

    Objective, per valid token (b, t), with ratio = exp(logps - old_logps) and A the advantage:
        l = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
        dual clip c (only where A < 0):  l = min(l, -c * A)
    then one of (n_b = number of valid tokens of sequence b; means over sequences with n_b > 0):
        "token_mean":              sum_{b,t} l / sum_b n_b                    (DAPO; also PPO's E_t)
        "seq_mean_token_mean":     mean_b (sum_t l / n_b)                     (GRPO paper)
        "seq_mean_token_sum":      mean_b (sum_t l)
        "seq_mean_token_sum_norm": mean_b (sum_t l / norm_len)                (Dr. GRPO)
    (aggregate_loss below does this last step; reduce any extra term with it too.)

    Papers:
        PPO: Schulman et al. 2017, arXiv 1707.06347, eq. 7 (L^CLIP).
        Asymmetric clip ("clip-higher") and token-mean: DAPO, Yu et al. 2025, arXiv 2503.14476, Sec. 3.1, 3.3.
        Dual clip: Ye et al. 2019, arXiv 1912.09729, eq. 5.
        Sequence-mean-token-mean: GRPO, Shao et al. 2024 (DeepSeekMath), arXiv 2402.03300, eq. 3.
        Constant normaliser: Dr. GRPO, Liu et al. 2025, arXiv 2503.20783, Fig. 1 (the Dr. GRPO objective).

    Args:
        logps:      (B, T) log pi_theta(token), WITH gradient (from token_logprobs of the current model).
        old_logps:  (B, T) log pi_old(token) of the policy that sampled the batch (detached inside).
        advantages: (B, T) per token (PPO + GAE) or (B,) per sequence (GRPO, RLOO), broadcast over T. Detached
                    inside: advantages are constants of the update.
        mask:       (B, T) 1 on tokens that count, 0 on padding / prompt / tool output.
        clip_low, clip_high: the ratio band is [1 - clip_low, 1 + clip_high]. Equal values = PPO; DAPO uses
                    clip_low = 0.2, clip_high = 0.28 so that unlikely tokens with A > 0 can grow more.
        dual_clip:  None, or c > 1: for A < 0 the loss of a token is capped at -c * A (= c * |A|), so a token
                    the new policy made far MORE likely (ratio >> 1) cannot produce an unbounded push. Same
                    rule as verl's clip_ratio_c (default 3 there).
        loss_agg:   one of LOSS_AGGS, see above. This is the most argued detail of GRPO: a per-sequence
                    mean gives each token of a short completion more weight than one of a long completion.
        norm_len:   the constant of "seq_mean_token_sum_norm". None means T, the PADDED length of this batch,
                    which changes with padding; pass the generation budget (max_new_tokens) to make it a true
                    constant.
        weights:    None, or (B, T) constant per-token weights of the loss (e.g. tis_weights, for the
                    sampler / trainer mismatch), detached inside.

    Returns:
        loss: 0-dim tensor to minimise.
        metrics: dict of detached 0-dim tensors (no .item(), so no GPU sync here), each a mean over valid
                 tokens:
            "clip_frac":      fraction of tokens where the CLIPPED term is the active one, i.e. ratio > 1 +
                              clip_high with A > 0, or ratio < 1 - clip_low with A < 0. These are exactly the
                              tokens whose gradient the clip zeroes. Tokens outside the band on the harmless
                              side are not counted.
            "dual_clip_frac": fraction of tokens (A < 0) where the dual-clip cap is active; 0 when dual_clip
                              is None.
            "approx_kl":      k3 estimate of KL(pi_old || pi_theta) from the sampled tokens: ratio - 1 -
                              log(ratio), unbiased under pi_old and >= 0 per token (Schulman, "Approximating
                              KL divergence").
            "ratio_mean":     mean ratio.

    Value at initialisation (logps == old_logps: the first minibatch of a rollout batch's first pass): ratio =
    1 exactly, the loss is minus the aggregated advantage (about 0 for group-centred advantages, yet the
    gradient is not 0), clip_frac = 0 and approx_kl = 0.

    Differs from the paper:
        1. PPO eq. 7 is an objective to maximise; this returns its negative, a loss to minimise.
        2. clip_low / clip_high are separate (DAPO); PPO has one epsilon. Equal values reproduce PPO exactly.
        3. No KL or entropy term inside: GRPO eq. 3 adds -beta * D_KL per token inside its 1/|o_i| sum; add
           beta * aggregate_loss(kl_penalty(logps, ref_logps, mask=mask), mask, loss_agg, norm_len) to this
           loss yourself if you want it (DAPO and Dr. GRPO drop it).
        4. The sequence-level modes average over sequences with at least one valid token, so a fully masked
           row (a filtered sample) changes nothing; the papers' 1/G assumes every row is real.
        5. Dr. GRPO's constant is the generation budget; norm_len=None falls back to the padded length T.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"policy_loss: dual_clip must be > 1 (or None), got {dual_clip}")

    valid = mask.bool()  # (B, T)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1): one advantage per sequence, same for all its tokens
    # Zero the padded slots BEFORE exp(): a junk log-prob of +1e4 there would make exp() inf, and although the
    # mask would drop it from the forward sum, its backward would be 0 * inf = NaN and poison every parameter.
    adv = advantages.detach().expand_as(logps).masked_fill(~valid, 0.0)  # (B, T)
    log_ratio = (logps - old_logps.detach()).masked_fill(~valid, 0.0)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T), exactly 1 where logps == old_logps

    loss_unclipped = -adv * ratio  # (B, T)
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    # max of the two LOSSES = min of the two objectives (the pessimistic bound of PPO eq. 7). Where the
    # clipped term wins, its ratio is a constant (clamp has zero slope outside the band), so that token gets
    # no gradient.
    loss_tok = torch.maximum(loss_unclipped, loss_clipped)  # (B, T)

    dual_active = torch.zeros_like(valid)  # (B, T) bool
    if dual_clip is not None:
        # For A < 0 the PPO loss -ratio * A grows without bound as ratio grows (the clip only bounds ratio
        # from BELOW for A < 0). Cap it at -c * A; capped tokens get zero gradient, like clipped ones.
        cap = -dual_clip * adv  # (B, T), positive where A < 0
        dual_active = (adv < 0) & (loss_tok > cap)  # (B, T)
        loss_tok = torch.where(adv < 0, torch.minimum(loss_tok, cap), loss_tok)  # (B, T)

    if weights is not None:
        loss_tok = loss_tok * weights.detach()  # (B, T)
    loss = aggregate_loss(loss_tok, mask, loss_agg, norm_len)

    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((loss_clipped > loss_unclipped).to(loss_tok.dtype), mask),
            "dual_clip_frac": masked_mean(dual_active.to(loss_tok.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),  # = ratio - 1 - log ratio
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def gspo_loss(logps, old_logps, advantages, mask, clip_low=3e-4, clip_high=4e-4):
    """GSPO: the clipped surrogate on ONE importance ratio per sequence, the geometric mean of its tokens'.

    Objective, per sequence b with n_b valid tokens and advantage A_b:
        s_b = exp( (1 / n_b) * sum_t (logps - old_logps) )               the length-normalised sequence ratio
        l_b = -min(s_b * A_b, clip(s_b, 1 - clip_low, 1 + clip_high) * A_b)
        loss = mean_b l_b                                                 (over sequences with n_b > 0)
    Its gradient, where the clip is not active: -A_b * s_b * (1 / n_b) * sum_t grad log pi(y_{b,t}): every token
    of a sequence moves with the same weight, unlike the token ratios of policy_loss, each clipped alone.

    Paper: Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071, eq. 5-7; the clip range
    of its experiments is 3e-4 / 4e-4 (Sec. 5.1), the defaults here: a sequence ratio is an average of
    log-ratios and moves far less than a token ratio, so PPO's 0.2 would never clip.

    Args:
        logps, old_logps: (B, T) as in policy_loss (old_logps detached inside).
        advantages:       (B,) one per sequence (GRPO's group-normalised rewards); detached inside.
        mask:             (B, T) 1 on tokens that count.
        clip_low, clip_high: the band [1 - clip_low, 1 + clip_high] of the sequence ratio.

    Returns:
        loss: 0-dim tensor; metrics: dict of detached 0-dim tensors, means over sequences: "clip_frac" (share of
        sequences whose clipped term is active), "ratio_mean" (mean s_b), "approx_kl" (token-level k3 of
        KL(pi_old || pi), as policy_loss logs it).

    Value at initialisation (logps == old_logps): s_b = 1 exactly, the loss is -mean_b A_b, clip_frac 0.

    Differs from the paper:
        1. A loss to minimise (the paper's objective, negated); the mean is over sequences with a valid token.
        2. The sequence ratio is computed in log space and masked before exp, so padding never overflows.
    """
    valid = mask.bool()  # (B, T)
    n = valid.sum(-1)  # (B,)
    log_ratio = (logps - old_logps.detach()).masked_fill(~valid, 0.0)  # (B, T)
    seq_log_ratio = log_ratio.sum(-1) / n.clamp(min=1)  # (B,) mean token log-ratio
    ratio = torch.exp(seq_log_ratio)  # (B,)
    adv = advantages.detach()  # (B,)
    loss_unclipped = -adv * ratio  # (B,)
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # (B,)
    loss_seq = torch.maximum(loss_unclipped, loss_clipped)  # (B,)
    rows = n > 0  # (B,)
    loss = masked_mean(loss_seq, rows)
    with torch.no_grad():
        metrics = {"clip_frac": masked_mean((loss_clipped > loss_unclipped).to(loss_seq.dtype), rows),
                   "ratio_mean": masked_mean(ratio, rows),
                   "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask)}
    return loss, metrics


def cispo_loss(logps, old_logps, advantages, mask, clip_high=0.28, loss_agg="token_mean", norm_len=None,
               weights=None):
    """CISPO: REINFORCE on every token, weighted by its importance ratio clipped from above and detached.

    Objective, per valid token, with r = exp(logps - old_logps):
        l = -sg(min(r, 1 + clip_high)) * A * logps                         sg = stop-gradient (detach)
    then aggregate_loss(l, mask, loss_agg, norm_len). Its gradient is -min(r, 1 + clip_high) * A * grad logps
    on EVERY token: where PPO's clip would zero a token's gradient (r > 1 + eps with A > 0), CISPO keeps it,
    with a bounded weight. That matters for rare tokens, which are the first to leave the band.

    Paper: MiniMax-M1, Chen et al. 2025, arXiv 2506.13585, eq. 4-5 ("CISPO"); the paper sets no lower bound on
    the weight (a large eps_low) and tunes only eps_high; 0.28 is DAPO's clip-higher value, a common choice.

    Args: as policy_loss; advantages (B, T) or (B,); clip_high: the weight's cap is 1 + clip_high; weights:
    None or (B, T) extra constant per-token weights (tis_weights).

    Returns: loss (0-dim); metrics: "clip_frac" (share of tokens whose weight was capped), "ratio_mean",
    "approx_kl" (k3 of KL(pi_old || pi)).

    Value at initialisation (logps == old_logps): every weight is 1, so the loss is -agg(A * logps) (not 0:
    the log-probs are negative) and its gradient is exactly the REINFORCE / policy_loss gradient -A grad logp.

    Differs from the paper:
        1. No lower bound at all (the paper: a lower bound set too low to matter).
        2. Aggregated with any of LOSS_AGGS (the paper: a token mean over the batch, "token_mean" here).
    """
    valid = mask.bool()  # (B, T)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1)
    adv = advantages.detach().expand_as(logps).masked_fill(~valid, 0.0)  # (B, T)
    log_ratio = (logps.detach() - old_logps.detach()).masked_fill(~valid, 0.0)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    weight = torch.clamp(ratio, max=1.0 + clip_high)  # (B, T), a constant of the update
    loss_tok = -weight * adv * logps.masked_fill(~valid, 0.0)  # (B, T)
    if weights is not None:
        loss_tok = loss_tok * weights.detach()  # (B, T)
    loss = aggregate_loss(loss_tok, mask, loss_agg, norm_len)
    with torch.no_grad():
        metrics = {"clip_frac": masked_mean((ratio > 1.0 + clip_high).to(loss_tok.dtype), mask),
                   "ratio_mean": masked_mean(ratio, mask),
                   "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask)}
    return loss, metrics


def tis_weights(old_logps, sampler_logps, mask, cap=2.0):
    """Truncated importance-sampling weights for the mismatch between the sampler and the trainer.

    Objective, per valid token: w = min(exp(old_logps - sampler_logps), cap), detached; 0 on padding.
    The rollout engine (a KV-cache decode, often in lower precision, or another library) and the trainer's
    forward compute slightly different distributions; the samples come from the sampler's, the gradient is
    taken of the trainer's. Multiplying each token's loss by w corrects the expectation, and the cap bounds
    the variance of tokens the sampler found far less likely than the trainer does.

    Paper: Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (Fengyao's
    blog; truncated importance sampling, TIS), as TRL's vllm_importance_sampling_correction applies it.

    Args:
        old_logps:     (B, T) the trainer's log-probs of the sampled tokens before the update.
        sampler_logps: (B, T) the sampler's own log-probs of the same tokens.
        mask:          (B, T) 1 on tokens that count.
        cap:           C > 0, the truncation.

    Returns:
        weights (B, T) and metrics: "tis_weight_mean", "tis_clip_frac" (share of tokens capped),
        "tis_log_ratio_max" (largest |old - sampler| log-ratio: how far apart the two are).

    Value when sampler and trainer agree (old_logps == sampler_logps): every weight is exactly 1.
    """
    valid = mask.bool()  # (B, T)
    log_ratio = (old_logps - sampler_logps).detach().masked_fill(~valid, 0.0)  # (B, T)
    raw = torch.exp(log_ratio)  # (B, T)
    weights = torch.clamp(raw, max=cap).masked_fill(~valid, 0.0)  # (B, T)
    metrics = {"tis_weight_mean": masked_mean(weights, mask),
               "tis_clip_frac": masked_mean((raw > cap).to(weights.dtype), mask),
               "tis_log_ratio_max": log_ratio.abs().max() if valid.any() else log_ratio.new_zeros(())}
    return weights, metrics


def kl_penalty(logps, ref_logps, kind="k3", mask=None):
    """Per-token estimate of the KL between the policy and a reference, from tokens sampled by the policy.

    Objective, with x ~ pi (the tokens in the batch) and log_r = ref_logps - logps = log(ref(x) / pi(x)):
        k1 = -log_r = logps - ref_logps                    (unbiased for KL(pi || ref); can be negative)
        k2 = log_r^2 / 2                                    (biased, low variance, >= 0)
        k3 = exp(log_r) - log_r - 1                         (unbiased for KL(pi || ref), low variance, >= 0)

    Paper: John Schulman, "Approximating KL divergence" (2020 blog note, joschu.net/blog/kl-approx.html);
    k3 is DeepSeekMath's estimator (arXiv 2402.03300, eq. 4).

    k1 and k3 estimate the same value (k2 approximates it), but they are not interchangeable as training
    signals. Where the estimate goes decides which gradient you get (x sampled from the current pi; the
    sampling itself is not differentiated):
        In the LOSS, E[grad k(x)]:
            k1: E_pi[grad log pi(x)] = 0. As a loss it does nothing in expectation.
            k2: E_pi[(log pi - log ref) grad log pi] = grad KL(pi || ref): the reverse-KL gradient.
            k3: E_pi[(1 - ref/pi) grad log pi] = -sum_x ref(x) grad log pi(x) = grad KL(ref || pi): the
                FORWARD-KL gradient, although its value estimates KL(pi || ref). This is what GRPO's in-loss
                k3 term optimises.
        In the REWARD (r - beta * k(x), then a policy gradient, PPO / RLHF style), E[k(x) grad log pi(x)]:
            k1: E_pi[(log pi - log ref) grad log pi] = grad KL(pi || ref), exactly: the reverse KL.
            k2, k3: no KL's gradient. Near the reference they are second order in log_r, so the penalty has
                almost no pull; further away the direction can be wrong outright (on a small categorical,
                enumerated exactly, k3 in the reward gave a gradient pointing away from that of the true
                KL). Use k1 in the reward.

    Args:
        logps:     (B, T) log pi(token), with gradient if used as a loss.
        ref_logps: (B, T) log ref(token) on the same tokens, same temperature; detached inside.
        kind:      "k1", "k2" or "k3".
        mask:      optional (B, T), 1 on tokens that count. Positions where it is 0 are set to 0 in BOTH
                   inputs before the estimator, so they give exactly 0 and no gradient. Pass it: at padding
                   the policy's log-prob of the pad token can be -1e4 while the reference's is a filler 0,
                   and k3's exp(1e4) = inf there turns the backward pass into 0 * inf = NaN, even though the
                   forward value is masked away later.

    Returns:
        (B, T), unreduced: reduce with masked_mean(kl, mask), or aggregate_loss(kl, mask, loss_agg) next to
        policy_loss so that both terms are weighted alike.

    Value at initialisation (policy == reference): exactly 0 for all three kinds, everywhere.

    Differs from the paper:
        1. The note defines k1..k3 with r = p(x)/q(x) for x ~ q, which here is q = pi and p = ref.
    """
    if mask is not None:
        valid = mask.bool()  # (B, T)
        logps = logps.masked_fill(~valid, 0.0)  # (B, T)
        ref_logps = ref_logps.masked_fill(~valid, 0.0)  # (B, T)
    log_r = ref_logps.detach() - logps  # (B, T) log(ref / pi) at the sampled tokens
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        # exp(log_r) - 1 - log_r, written with expm1 so that small log_r keeps its precision (the value is
        # second order in log_r, and exp(log_r) - 1 would cancel away most of the digits).
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl_penalty: unknown kind {kind!r}; expected 'k1', 'k2' or 'k3'")


def value_loss(values, old_values, returns, mask, clip=0.2, loss_agg="token_mean", norm_len=None):
    """Clipped value-function loss of PPO implementations, masked token mean.

    Objective, per valid token:
        V_clip = old_values + clip(values - old_values, -clip, +clip)
        l = 0.5 * max((values - returns)^2, (V_clip - returns)^2)
    then L = aggregate_loss(l, mask, loss_agg, norm_len): by default the masked mean over valid tokens.

    Paper: PPO (Schulman et al. 2017, arXiv 1707.06347) eq. 9 has the unclipped (V - V_target)^2; the
    clipped form comes from OpenAI baselines' ppo2 and is studied in Engstrom et al. 2020, arXiv 2005.12729
    ("value function clipping"). The max makes it pessimistic, like the policy clip: it never rewards a value
    that moved further than `clip` from old_values.

    Args:
        values:     (B, T) V_theta(s_t) from the value model, with gradient.
        old_values: (B, T) the values at rollout time (detached inside).
        returns:    (B, T) regression targets, e.g. advantages + old_values from gae() (detached inside).
        mask:       (B, T) 1 on tokens that count.
        clip:       the value clip range (in reward units, not a ratio). verl / OpenRLHF use 0.5, TRL 0.2.
        loss_agg, norm_len: as in aggregate_loss. Use the policy loss's, as verl does, so that the value
                    term and the surrogate weigh tokens alike.

    Returns:
        0-dim tensor.

    Value at initialisation (values == old_values): both terms coincide, so
        L = 0.5 * masked_mean((values - returns)^2).

    Differs from the paper:
        1. The clipped term and the 0.5 factor are the implementations' (see above), not PPO eq. 9.
    """
    valid = mask.bool()  # (B, T)
    # Zero padded slots first so a junk value there (say 1e30) cannot overflow in the square.
    values = values.masked_fill(~valid, 0.0)  # (B, T)
    old_values = old_values.detach().masked_fill(~valid, 0.0)  # (B, T)
    returns = returns.detach().masked_fill(~valid, 0.0)  # (B, T)
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)  # (B, T)
    loss_tok = 0.5 * torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2)  # (B, T)
    return aggregate_loss(loss_tok, mask, loss_agg, norm_len)


def entropy_from_logits(logits):
    """Entropy of the categorical distribution at every position, in fp32.

    Objective:
        H[b, t] = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v * z_v,     z = logits[b, t]

    Paper: none (definition). Used as a diagnostic (RL tends to collapse the entropy early) or a bonus term.

    Args:
        logits: (B, T, V), any float dtype; divide by the sampling temperature first if you want the entropy
                of the distribution the sampler used.

    Returns:
        (B, T) fp32, each value in [0, ln V].

    Value at initialisation: ln V for uniform logits.
    """
    logits = logits.float()  # (B, T, V)
    p = torch.softmax(logits, dim=-1)  # (B, T, V)
    # The logsumexp form never takes log(p), so it stays finite when some p underflow to 0. The masked_fill
    # keeps entries with p == 0 at exactly 0 * 0 even when their logit is -inf (a masked vocabulary entry),
    # where p * z would be 0 * -inf = NaN.
    z = logits.masked_fill(p == 0, 0.0)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (p * z).sum(-1)  # (B, T)
