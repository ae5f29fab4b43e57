"""Advantage estimators: group-relative (GRPO, Dr. GRPO), leave-one-out (RLOO), GAE (PPO), process
supervision (DeepSeekMath step rewards spread over tokens) and outcome plus process (PRIME).

Advantages are constants of the policy update, so every function here detaches its inputs and returns tensors
without gradient. This file imports only torch: nothing here needs a shared helper.
Shapes: B batch, T time, G group size, S steps.
"""

import torch


def _check_groups(batch_size, group_size, name):
    # Both conditions are silent killers: a ragged last group would be normalised together with the wrong
    # rows, and a group of one has no baseline (its advantage is identically 0) and no defined unbiased std.
    if group_size < 2:
        raise ValueError(f"{name}: group_size must be >= 2 (a group of one has no baseline and no std), "
                         f"got {group_size}")
    if batch_size % group_size != 0:
        raise ValueError(f"{name}: batch size {batch_size} is not a multiple of group_size {group_size}")


def group_advantages(rewards, group_size, scale_by_std=True, eps=1e-6):
    """Group-relative advantages of GRPO: each reward minus its group's mean, optionally over the group's std.

    Objective, for output i of a group of G outputs of the same prompt:
        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)      scale_by_std=True   (GRPO)
        A_i =  r_i - mean(r_group)                              scale_by_std=False  (Dr. GRPO)
    std is the UNBIASED sample std (divides by G - 1), torch.std's default. So G = 2 with rewards {1, 0} gives
    +-0.5 / 0.7071 = +-0.7071, not +-1; with the biased std it would be +-1.

    Papers: GRPO outcome supervision, Shao et al. 2024 (DeepSeekMath), arXiv 2402.03300, Sec. 4.1.2;
    Dr. GRPO, Liu et al. 2025, arXiv 2503.20783, Fig. 1 (drops the std, which over-weights groups that are
    almost all right or all wrong).

    Args:
        rewards:      (B,) one scalar reward per completion; the G completions of one prompt are CONSECUTIVE
                      rows (rows 0..G-1 are prompt 0, rows G..2G-1 prompt 1, ...).
        group_size:   G >= 2; B must be a multiple of G (ValueError otherwise, saying which).
        scale_by_std: True for GRPO, False for Dr. GRPO.
        eps:          added to the std (not the variance). verl uses 1e-6, TRL 1e-4, OpenRLHF 1e-9.

    Returns:
        (B,) fp32 advantages, detached. They sum to 0 within each group. A group whose rewards are all equal
        gets EXACTLY 0 (never NaN, never 1e-11 from rounding in the mean): it carries no learning signal, and
        a loss of 0 with a gradient norm of 0 then means every group was like that.

    Differs from the paper:
        1. eps in the denominator; the paper divides by std(r) alone, undefined for a group of equal rewards.
        2. The paper does not say which std; we use the unbiased one (torch.std's default).
    """
    _check_groups(rewards.size(0), group_size, "group_advantages")
    r = rewards.detach().float().reshape(-1, group_size)  # (B/G, G)
    centered = r - r.mean(dim=-1, keepdim=True)  # (B/G, G)
    # Equal rewards need not give r - mean = 0 after rounding: in fp32 three rewards of 0.9 have a mean 6e-8
    # off, and (6e-8) / (0 + 1e-6) is a spurious advantage of 0.06 for a group with no signal. Zero such
    # groups.
    all_equal = (r == r[:, :1]).all(dim=-1, keepdim=True)  # (B/G, 1)
    centered = centered.masked_fill(all_equal, 0.0)  # (B/G, G)
    if scale_by_std:
        centered = centered / (r.std(dim=-1, keepdim=True) + eps)  # (B/G, G), unbiased std
    return centered.reshape(-1)  # (B,)


def rloo_advantages(rewards, group_size):
    """REINFORCE Leave-One-Out advantages: each reward minus the mean of the OTHER G - 1 rewards of its group.

    Objective:
        A_i = r_i - (1 / (G - 1)) * sum_{j != i} r_j  =  G / (G - 1) * (r_i - mean(r_group))
    The baseline of sample i does not depend on sample i, so the policy gradient stays unbiased.

    Paper: Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!" (ICLR DeepRLStructPred
    workshop); for LLMs, Ahmadian et al. 2024, arXiv 2402.14740 (the RLOO estimator).

    Args:
        rewards:    (B,) scalar rewards, groups of G consecutive rows (see group_advantages).
        group_size: G >= 2 (ValueError otherwise), B a multiple of G.

    Returns:
        (B,) fp32, detached; sums to 0 within each group; exactly 0 for a group of equal rewards.

    The paper's k samples are our G.
    """
    _check_groups(rewards.size(0), group_size, "rloo_advantages")
    r = rewards.detach().float().reshape(-1, group_size)  # (B/G, G)
    baseline = (r.sum(dim=-1, keepdim=True) - r) / (group_size - 1)  # (B/G, G) mean of the other G - 1
    adv = r - baseline  # (B/G, G)
    all_equal = (r == r[:, :1]).all(dim=-1, keepdim=True)  # (B/G, 1), see group_advantages
    return adv.masked_fill(all_equal, 0.0).reshape(-1)  # (B,)


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized Advantage Estimation over the valid tokens of each sequence, skipping masked positions.

    Objective, over the valid tokens t_1 < t_2 < ... < t_n of a sequence (masked positions do not exist
    for it):
        delta_k = r_{t_k} + gamma * V_{t_{k+1}} - V_{t_k},        V_{t_{n+1}} = 0 (the episode ends at t_n)
        A_k     = delta_k + gamma * lam * A_{k+1},                A_{n+1} = 0
        returns = A + V
    i.e. A_k = sum_l (gamma * lam)^l * delta_{k+l}.

    Paper: Schulman et al. 2015, arXiv 1506.02438, eq. 16 (the recursion is PPO's truncated form,
    arXiv 1707.06347, eqs. 11-12).

    Why "skip", concretely: a masked position (padding, or a tool/observation token in a
    multi-turn rollout) has no action of the policy, so its reward and value are ignored and the carry (the
    next valid value and the next valid advantage) passes straight through it to the previous valid token,
    with no extra discount. A huge junk value at a masked slot therefore changes nothing, and nothing after
    the last valid token leaks into the sequence: the bootstrap value after the last valid token is 0.

    Args:
        rewards: (B, T) per-token rewards (e.g. the outcome score on the last valid token, minus beta * k1
                 KL).
        values:  (B, T) V(s_t) from the value model at rollout time.
        mask:    (B, T) 1 on the tokens that are actions of the policy.
        gamma:   discount (1.0 is usual for LLMs: the episode is one response).
        lam:     GAE lambda (0.95 as TRL PPO; verl and OpenRLHF default to 1.0).

    Returns:
        advantages (B, T), returns (B, T): fp32, detached, 0 at masked positions.

    With gamma = lam = 1 and values = 0, A_t is the reward-to-go.

    Differs from the paper:
        1. The paper's time steps are all real; here masked positions are removed from the time axis.
        2. No truncation bootstrap: the sequence is assumed to end at its last valid token.
    """
    rewards = rewards.detach().float()
    values = values.detach().float()
    valid = mask.bool()  # (B, T)
    # Clean the masked slots once so no junk (even inf) can reach the arithmetic below.
    rewards = rewards.masked_fill(~valid, 0.0)  # (B, T)
    values = values.masked_fill(~valid, 0.0)  # (B, T)

    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = rewards.new_zeros(B)  # (B,) V of the next VALID token; 0 after the last one
    next_adv = rewards.new_zeros(B)  # (B,) A of the next VALID token; 0 after the last one
    # A backward loop over T (small for us); every step is vectorised over B.
    for t in reversed(range(T)):
        m = valid[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        adv_t = delta + gamma * lam * next_adv  # (B,)
        advantages[:, t] = adv_t.masked_fill(~m, 0.0)
        # At a masked position the carry passes through unchanged, so the previous valid token sees the next
        # valid token's value and advantage, exactly as if the masked position were not there.
        next_value = torch.where(m, values[:, t], next_value)  # (B,)
        next_adv = torch.where(m, adv_t, next_adv)  # (B,)
    returns = (advantages + values).masked_fill(~valid, 0.0)  # (B, T)
    return advantages, returns


def process_advantages(step_rewards, step_ends, step_mask, group_size, seq_len, eps=1e-6):
    """Token advantages from step rewards, DeepSeekMath process supervision: normalise per group, then sum the
    normalised rewards of every step that ends at or after the token.

    Objective, for a group of G outputs with valid step rewards R = {r_i^(j)} (all steps of all G outputs):
        r~_i^(j) = (r_i^(j) - mean(R)) / (std(R) + eps)
        A_i[t]   = sum over steps j of output i with end_i^(j) >= t of r~_i^(j)
    std is the UNBIASED std over the valid steps of the group (divide by |R| - 1), as in group_advantages.
    Tokens after the last step end get 0.

    Paper: Shao et al. 2024 (DeepSeekMath), arXiv 2402.03300, Sec. 4.1.3 "Process Supervision RL with GRPO".

    Args:
        step_rewards: (B, S) reward of each step (e.g. a PRM's score at the step's end token).
        step_ends:    (B, S) long, index in the completion (0..seq_len-1) of each step's LAST token.
        step_mask:    (B, S) 1 for real steps, 0 for padding steps (whose reward and end index are ignored).
        group_size:   G >= 2; groups are G consecutive rows, B a multiple of G.
        seq_len:      T, the completion length of the returned advantages.
        eps:          added to the std (1e-6, as group_advantages).

    Returns:
        (B, T) fp32, detached. A group whose valid step rewards are all equal (or that has a single valid
        step) gets exactly 0 everywhere.

    Differs from the paper:
        1. eps in the denominator and exact zeros for a constant group; the paper divides by std(R) alone.
        2. The paper does not say which std; we use the unbiased one (torch.std's default).
    """
    B, S = step_rewards.shape
    _check_groups(B, group_size, "process_advantages")
    valid = step_mask.bool()  # (B, S)
    bad_end = ((step_ends < 0) | (step_ends >= seq_len)) & valid  # (B, S)
    if bool(bad_end.any()):
        raise ValueError(f"process_advantages: a valid step ends outside the completion [0, {seq_len})")

    # --- normalise all valid steps of a group together: view each group's G*S slots as one row
    r = step_rewards.detach().float().masked_fill(~valid, 0.0)  # (B, S)
    r_g = r.reshape(-1, group_size * S)  # (B/G, G*S)
    valid_g = valid.reshape(-1, group_size * S)  # (B/G, G*S)
    n = valid_g.sum(dim=-1, keepdim=True)  # (B/G, 1) number of valid steps in the group
    mean = r_g.sum(dim=-1, keepdim=True) / n.clamp(min=1)  # (B/G, 1)
    centered = (r_g - mean).masked_fill(~valid_g, 0.0)  # (B/G, G*S)
    std = (centered.pow(2).sum(dim=-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()  # (B/G, 1) unbiased
    normed = centered / (std + eps)  # (B/G, G*S)
    # Exact zeros for a group whose valid rewards are all equal (see group_advantages for why).
    big = torch.finfo(r_g.dtype).max
    lo = r_g.masked_fill(~valid_g, big).amin(dim=-1, keepdim=True)  # (B/G, 1)
    hi = r_g.masked_fill(~valid_g, -big).amax(dim=-1, keepdim=True)  # (B/G, 1)
    normed = normed.masked_fill(lo == hi, 0.0).reshape(B, S)  # (B, S)

    # --- spread over tokens: put each step's normalised reward on its end token, then a REVERSE cumulative
    # sum gives at token t the sum over all steps ending at or after t.
    ends = step_ends.long().masked_fill(~valid, 0)  # (B, S); padding steps add 0 at index 0
    at_end = normed.new_zeros(B, seq_len)  # (B, T)
    at_end.scatter_add_(1, ends, normed.masked_fill(~valid, 0.0))  # (B, T)
    return at_end.flip(-1).cumsum(dim=-1).flip(-1)  # (B, T)


def outcome_process_advantages(outcome_adv, process_adv, mask, process_coef):
    """Outcome plus process: the outcome's group advantage on every token of a completion, plus process_coef
    times the process advantage re-centred on each completion's own token mean.

    Objective, for completion i with valid tokens t = 1..n_i:
        A_i[t] = A_i^out + c * (P_i[t] - (1 / n_i) * sum_s P_i[s])
    where A^out is an outcome advantage (e.g. group_advantages of the verifier's 0/1) and P a process
    advantage (e.g. process_advantages of step rewards), each normalised on its own before they meet.

    What the centring buys: the token mean of A_i is exactly A_i^out, for any c. Which completion of a group
    is better is then decided by the outcome alone, and the process term only moves credit between the tokens
    of one completion (a wrong solution's right early steps are blamed less than its slip). So a finished right
    solution never gets a lower mean advantage than a wrong or cut-off one of its group, however the process
    rewards are biased: a frozen scorer that likes long, unfinished or wrong-but-plausible completions cannot
    outvote the verifier.

    Paper: PRIME, Cui et al. 2025, arXiv 2502.01456, Sec. 3.3: outcome and process returns computed separately,
    each with its own (leave-one-out) baseline, and added.

    Args:
        outcome_adv:  (B,) one advantage per completion.
        process_adv:  (B, T) per-token advantages; masked positions are ignored.
        mask:         (B, T) 1 on completion tokens.
        process_coef: c >= 0, the weight of the process term.

    Returns:
        (B, T) fp32, detached, 0 at masked positions. With process_coef = 0, or a process advantage that is
        constant along each completion, every token gets its completion's outcome advantage.

    Differs from the paper:
        1. PRIME adds the process return as it is; we subtract each completion's mean of it first, which is
           what makes the ordering above hold. The cost: the process term says nothing about which of two
           completions is better, only where within one the credit goes.
        2. Group-normalised baselines (GRPO) for both terms where PRIME uses leave-one-out ones.
    """
    if process_coef < 0:
        raise ValueError(f"outcome_process_advantages: process_coef must be >= 0, got {process_coef}")
    m = mask.detach().float()  # (B, T)
    p = process_adv.detach().float() * m  # (B, T)
    row_mean = p.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
    centred = (p - row_mean) * m  # (B, T)
    return (outcome_adv.detach().float()[:, None] + process_coef * centred) * m  # (B, T)


def overlong_penalty(lengths, max_len, buffer):
    """DAPO's soft overlong punishment: a reward term for completion length, 0 until the last `buffer` tokens
    of the budget, then falling linearly to -1 at the budget, -1 beyond it.

    Objective, with L = max_len (the generation budget) and the buffer L_c:
        0                          if |y| <= L - L_c
        ((L - L_c) - |y|) / L_c    if L - L_c < |y| <= L
        -1                         if |y| > L
    added to the task reward before the group normalisation: long completions cost a little, cut-off ones
    most, instead of every cut-off one scoring 0 like a plain wrong answer.

    Paper: DAPO, Yu et al. 2025, arXiv 2503.14476, eq. 13 (Sec. 3.4, "Overlong Reward Shaping").

    Args:
        lengths: (B,) completion lengths in tokens (EOS included).
        max_len: L; buffer: L_c, 0 < L_c <= L.

    Returns:
        (B,) float penalties in [-1, 0].
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong_penalty: need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    lengths = lengths.to(torch.float32)
    soft = ((max_len - buffer) - lengths) / buffer  # (B,)
    return torch.where(lengths <= max_len - buffer, torch.zeros_like(lengths), soft.clamp(min=-1.0))
