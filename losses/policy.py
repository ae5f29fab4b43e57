"""On-policy RL losses on per-token log-probs: the clipped policy loss (PPO / GRPO / DAPO / Dr. GRPO), the KL
penalty estimators k1 / k2 / k3, the clipped value loss, and the entropy of the policy.

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

    loss = aggregate_loss(loss_tok, mask, loss_agg, norm_len)

    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((loss_clipped > loss_unclipped).to(loss_tok.dtype), mask),
            "dual_clip_frac": masked_mean(dual_active.to(loss_tok.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),  # = ratio - 1 - log ratio
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def kl_penalty(logps, ref_logps, kind="k3", mask=None):
    """Per-token estimate of the KL between the policy and a reference, from tokens sampled by the policy.

    Objective, with x ~ pi (the tokens in the batch) and log_r = ref_logps - logps = log(ref(x) / pi(x)):
        k1 = -log_r = logps - ref_logps                    (unbiased for KL(pi || ref); can be negative)
        k2 = log_r^2 / 2                                    (biased, low variance, >= 0)
        k3 = exp(log_r) - log_r - 1                         (unbiased for KL(pi || ref), low variance, >= 0)

    Paper: John Schulman, "Approximating KL divergence" (2020 blog note, joschu.net/blog/kl-approx.html);
    k3 is DeepSeekMath's estimator (arXiv 2402.03300, eq. 4).

    k1 and k3 estimate the same value (k2 approximates it), but they are not interchangeable as training
    signals. Where the estimate goes decides which gradient you get (x sampled from the current pi; the sampling itself is not
    differentiated):
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
