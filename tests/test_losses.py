"""Closed-form and hand-worked checks of losses/. CPU only, a couple of seconds.

Every expected number here is derived by hand (in the comments) or from a formula written independently of
the code under test (explicit softmax, loops, math.log), never copied from the code's own output.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from losses import (
    IGNORE_INDEX,
    dpo_loss,
    entropy_from_logits,
    gae,
    gather_logprobs,
    generalized_jsd_loss,
    group_advantages,
    kl_distill_loss,
    kl_penalty,
    masked_mean,
    policy_loss,
    prm_loss,
    process_advantages,
    reward_model_loss,
    rloo_advantages,
    sft_loss,
    simpo_loss,
    token_logprobs,
    value_loss,
)

LN2 = math.log(2.0)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _log_sigmoid(x):
    # log sigmoid(x) = -log(1 + e^-x), in plain Python floats
    return -math.log1p(math.exp(-x))


# --------------------------------------------------------------------------------------- common.py


def test_token_logprobs_matches_manual_shifted_gather():
    g = _gen(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    out = token_logprobs(logits, ids)
    assert out.shape == (2, 4)
    for b in range(2):
        for t in range(4):
            z = logits[b, t].double()
            manual = z[ids[b, t + 1]] - torch.log(torch.exp(z).sum())  # logits[:, t] scores ids[:, t + 1]
            assert abs(out[b, t].item() - manual.item()) < 1e-5


def test_gather_logprobs_is_unshifted_and_fp32_for_bf16():
    g = _gen(1)
    logits = (3 * torch.randn(2, 4, 11, generator=g)).to(torch.bfloat16)
    targets = torch.randint(0, 11, (2, 4), generator=g)
    out = gather_logprobs(logits, targets)
    assert out.dtype == torch.float32
    manual = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(out, manual)
    assert token_logprobs(logits, targets).dtype == torch.float32


def test_masked_mean_all_zero_mask_is_zero_not_nan():
    x = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(x, mask).item() == 1.5
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 0.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


# ------------------------------------------------------------------------------------------ sft.py


def test_sft_loss_equals_cross_entropy_on_shifted_labels():
    g = _gen(2)
    logits = torch.randn(3, 6, 9, generator=g)
    labels = torch.randint(0, 9, (3, 6), generator=g)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[2, 4:] = IGNORE_INDEX  # padding
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(sft_loss(logits, labels), expected)


def test_sft_prompt_positions_get_exactly_zero_gradient():
    g = _gen(3)
    logits = torch.randn(2, 6, 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (2, 6), generator=g)
    labels[:, :3] = IGNORE_INDEX  # tokens 0..2 are prompt: logits at positions 0, 1 predict them
    sft_loss(logits, labels).backward()
    assert torch.equal(logits.grad[:, :2], torch.zeros(2, 2, 5))  # predict prompt tokens 1, 2
    assert torch.equal(logits.grad[:, -1], torch.zeros(2, 5))  # the last logit predicts nothing
    assert logits.grad[:, 2:5].abs().sum() > 0  # completion tokens do get gradient


def test_sft_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 4, 5, generator=_gen(4))
    labels = torch.full((1, 4), IGNORE_INDEX)
    assert sft_loss(logits, labels).item() == 0.0


# ------------------------------------------------------------------------------------------ dpo.py


def test_dpo_hand_worked_value():
    # d = (-10 - -11) - (-12 - -11) = 2; beta * d = 0.2; -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139
    losses, chosen_r, rejected_r = dpo_loss(
        torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1
    )
    assert abs(losses.item() - 0.598139) < 1e-6
    assert abs(chosen_r.item() - 0.1) < 1e-6 and abs(rejected_r.item() + 0.1) < 1e-6
    assert not chosen_r.requires_grad


def test_dpo_is_ln2_at_init_with_and_without_smoothing():
    g = _gen(5)
    chosen, rejected = -20 * torch.rand(4, generator=g), -20 * torch.rand(4, generator=g)
    for eps in (0.0, 0.1, 0.3):
        losses, _, _ = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), label_smoothing=eps)
        torch.testing.assert_close(losses, torch.full((4,), LN2))


def test_dpo_variants_match_hand_formulas():
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-10.0, -12.0, -11.0, -11.0))
    beta, d = 0.1, 2.0
    cdpo, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.1)
    assert abs(cdpo.item() - (-0.9 * _log_sigmoid(0.2) - 0.1 * _log_sigmoid(-0.2))) < 1e-6
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert abs(ipo.item() - (d - 1 / (2 * beta)) ** 2) < 1e-5  # (2 - 5)^2 = 9
    hinge, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")
    assert abs(hinge.item() - 0.8) < 1e-6  # max(0, 1 - 0.2)
    hinge_sat, _, _ = dpo_loss(pc + 10, pr, rc, rr, beta=beta, loss_type="hinge")  # d = 12: 1 - 1.2 < 0
    assert hinge_sat.item() == 0.0


def test_dpo_rejects_unknown_loss_type_and_misplaced_smoothing():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="'robust'"):
        dpo_loss(x, x, x, x, loss_type="robust")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)


def test_simpo_and_reward_model_hand_values():
    # SimPO: beta * (avg_c - avg_r) - gamma = 2 * 1 - 0.5 = 1.5 -> log(1 + e^-1.5)
    loss = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=0.5)
    assert abs(loss.item() - math.log1p(math.exp(-1.5))) < 1e-6
    # Bradley-Terry: ln 2 at equal scores, log(1 + e^-2) at a margin of 2
    s = torch.randn(5, generator=_gen(6))
    torch.testing.assert_close(reward_model_loss(s, s.clone()), torch.full((5,), LN2))
    margin_two = reward_model_loss(torch.tensor([3.0]), torch.tensor([1.0])).item()
    assert abs(margin_two - math.log1p(math.exp(-2))) < 1e-6


# ------------------------------------------------------------------------------------- policy_loss


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    g = _gen(7)
    logps = -torch.rand(2, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv = torch.tensor([0.5, -2.0])  # (B,) broadcast over T
    loss, metrics = policy_loss(logps, logps.clone(), adv, mask)
    # 5 valid tokens: 3 with A = 0.5, 2 with A = -2 -> -(1.5 - 4) / 5 = 0.5
    assert abs(loss.item() - 0.5) < 1e-6
    assert metrics["clip_frac"].item() == 0.0 and metrics["approx_kl"].item() == 0.0
    assert metrics["ratio_mean"].item() == 1.0


def test_policy_loss_aggregations_on_ragged_batch():
    # ratio = 1, so the token loss is -A: row 0 has [-1, -2, -3], row 1 has [-4]; other slots are junk.
    logps = torch.zeros(2, 4)
    adv = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    expected = {
        "token_mean": -(1 + 2 + 3 + 4) / 4,  # -2.5
        "seq_mean_token_mean": (-6 / 3 + -4 / 1) / 2,  # -3
        "seq_mean_token_sum": (-6 + -4) / 2,  # -5
        "seq_mean_token_sum_norm": (-6 / 4 + -4 / 4) / 2,  # -1.25, divided by the padded T = 4
    }
    got = {agg: policy_loss(logps, logps, adv, mask, loss_agg=agg)[0].item() for agg in expected}
    for agg, value in expected.items():
        assert abs(got[agg] - value) < 1e-6, agg
    assert len(set(round(v, 6) for v in got.values())) == 4
    loss_norm8 = policy_loss(logps, logps, adv, mask, loss_agg="seq_mean_token_sum_norm", norm_len=8)[0]
    assert abs(loss_norm8.item() - (-6 / 8 + -4 / 8) / 2) < 1e-6
    with pytest.raises(ValueError, match="loss_agg"):
        policy_loss(logps, logps, adv, mask, loss_agg="sum")


def test_policy_loss_clipped_tokens_get_exactly_zero_gradient_asymmetric():
    # band [0.8, 1.28]; tokens: A>0 above band (clipped), A<0 below band (clipped), A<0 above band (not),
    # A>0 below band (not), A>0 inside, A>0 at 1.25 (inside only because clip_high = 0.28 > 0.2)
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1, 1.25]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 6)
    logps = ratio.log().requires_grad_()
    loss, metrics = policy_loss(logps, torch.zeros_like(ratio), adv, mask, clip_low=0.2, clip_high=0.28)
    loss.backward()
    # d(-ratio * A)/d logp = -ratio * A for active unclipped tokens, / 6 tokens (token mean)
    expected_grad = torch.tensor([[0.0, 0.0, 1.5, -0.5, -1.1, -1.25]], dtype=torch.float64) / 6
    torch.testing.assert_close(logps.grad, expected_grad)
    assert logps.grad[0, 0].item() == 0.0 and logps.grad[0, 1].item() == 0.0
    expected_loss = (-1.28 + 0.8 + 1.5 - 0.5 - 1.1 - 1.25) / 6
    assert abs(loss.item() - expected_loss) < 1e-9
    assert abs(metrics["clip_frac"].item() - 2 / 6) < 1e-9

    # the same batch with a symmetric clip: token 5 (ratio 1.25 > 1.2, A > 0) is now clipped too
    logps2 = ratio.log().requires_grad_()
    loss2, metrics2 = policy_loss(logps2, torch.zeros_like(ratio), adv, mask, clip_low=0.2, clip_high=0.2)
    loss2.backward()
    assert logps2.grad[0, 5].item() == 0.0
    assert abs(metrics2["clip_frac"].item() - 3 / 6) < 1e-9


def test_policy_loss_dual_clip_bounds_negative_advantage_loss():
    ratio = torch.tensor([[10.0, 10.0, 1.0]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    # without dual clip: token losses 10 (A<0, ratio above band is not clipped), -1.2 (clipped), 1
    plain, _ = policy_loss(ratio.log(), torch.zeros_like(ratio), adv, mask)
    assert abs(plain.item() - (10 - 1.2 + 1) / 3) < 1e-9
    logps = ratio.log().requires_grad_()
    loss, metrics = policy_loss(logps, torch.zeros_like(ratio), adv, mask, dual_clip=3.0)
    loss.backward()
    # token 0 capped at -c * A = 3; tokens 1 and 2 unchanged
    assert abs(loss.item() - (3 - 1.2 + 1) / 3) < 1e-9
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.0, 1.0 / 3]], dtype=torch.float64))
    assert abs(metrics["dual_clip_frac"].item() - 1 / 3) < 1e-9
    assert abs(metrics["clip_frac"].item() - 1 / 3) < 1e-9
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logps, logps, adv, mask, dual_clip=1.0)


AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_padding_never_changes_anything(agg):
    g = _gen(8)
    B, T, P = 3, 5, 3
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64)
    old = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]])

    def junk(*shape):
        return 1e4 * torch.randn(*shape, generator=g, dtype=torch.float64)

    # pad: P extra junk columns and one extra fully masked junk row
    logps_p = torch.cat([torch.cat([logps, junk(B, P)], 1), junk(1, T + P)], 0)
    old_p = torch.cat([torch.cat([old, junk(B, P)], 1), junk(1, T + P)], 0)
    adv_p = torch.cat([torch.cat([adv, junk(B, P)], 1), junk(1, T + P)], 0)
    adv_p[0, T] = float("inf")  # even an infinite advantage in a padded slot must change nothing
    mask_p = torch.zeros(B + 1, T + P, dtype=torch.long)
    mask_p[:B, :T] = mask

    x = logps.clone().requires_grad_()
    loss, metrics = policy_loss(x, old, adv, mask, clip_high=0.28, dual_clip=3.0, loss_agg=agg, norm_len=T)
    loss.backward()
    x_p = logps_p.clone().requires_grad_()
    loss_p, metrics_p = policy_loss(x_p, old_p, adv_p, mask_p, clip_high=0.28, dual_clip=3.0, loss_agg=agg,
                                    norm_len=T)
    loss_p.backward()
    assert torch.isfinite(loss_p) and torch.isfinite(x_p.grad).all()
    torch.testing.assert_close(loss_p, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_p.grad[:B, :T], x.grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(x_p.grad[:, T:], torch.zeros(B + 1, P, dtype=torch.float64))
    for k in metrics:
        torch.testing.assert_close(metrics_p[k], metrics[k], rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------------------- kl_penalty


def test_kl_penalty_zero_when_equal_and_nonnegative():
    g = _gen(9)
    logps = -5 * torch.rand(3, 7, generator=g)
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(logps, logps.clone(), kind), torch.zeros(3, 7))
    ref = -5 * torch.rand(3, 7, generator=g)
    assert (kl_penalty(logps, ref, "k2") >= 0).all() and (kl_penalty(logps, ref, "k3") >= 0).all()
    assert (kl_penalty(logps, ref, "k1") < 0).any()  # k1 is only non-negative in expectation
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logps, ref, "k4")


def _expected_and_true_kl_grads(kind):
    # A categorical over 5 outcomes, pi = softmax(theta), and a fixed reference. "Sampling on-policy" is done
    # by exact enumeration: E_{x~pi}[grad k(x)] = sum_x pi(x) grad k(x) with pi(x) a constant weight.
    g = _gen(10)
    theta0 = torch.randn(5, generator=g, dtype=torch.float64)
    ref_logp = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)

    theta = theta0.clone().requires_grad_()
    logp = torch.log_softmax(theta, -1)
    k = kl_penalty(logp[None], ref_logp[None], kind)[0]  # (5,) per-outcome sample value
    (expected_grad,) = torch.autograd.grad((logp.exp().detach() * k).sum(), theta)

    theta = theta0.clone().requires_grad_()
    logp = torch.log_softmax(theta, -1)
    reverse_kl = (logp.exp() * (logp - ref_logp)).sum()  # KL(pi || ref)
    (grad_reverse,) = torch.autograd.grad(reverse_kl, theta)
    theta = theta0.clone().requires_grad_()
    logp = torch.log_softmax(theta, -1)
    forward_kl = (ref_logp.exp() * (ref_logp - logp)).sum()  # KL(ref || pi)
    (grad_forward,) = torch.autograd.grad(forward_kl, theta)
    return expected_grad, grad_reverse, grad_forward


def test_kl_penalty_expected_gradients_by_exact_enumeration():
    g1, grad_reverse, grad_forward = _expected_and_true_kl_grads("k1")
    g2, _, _ = _expected_and_true_kl_grads("k2")
    g3, _, _ = _expected_and_true_kl_grads("k3")
    assert not torch.allclose(grad_reverse, grad_forward, atol=1e-3)  # the test can tell them apart
    torch.testing.assert_close(g1, torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)  # k1: zero
    torch.testing.assert_close(g2, grad_reverse, atol=1e-12, rtol=1e-10)  # k2: grad KL(pi || ref)
    torch.testing.assert_close(g3, grad_forward, atol=1e-12, rtol=1e-10)  # k3: grad KL(ref || pi)


# ---------------------------------------------------------------------------------- value, entropy


def test_value_loss_hand_case_with_clipping_and_junk_padding():
    values = torch.tensor([[1.0, 2.0, 1.6, 1.0, 1e30]])
    old_values = torch.tensor([[1.5, 1.5, 1.5, 1.5, -1e30]])
    returns = torch.tensor([[0.0, 3.0, 1.0, 2.0, 1e30]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # clip 0.2 -> V_clip = [1.3, 1.7, 1.6, 1.3]
    # unclipped sq: [1.0, 1.0, 0.36, 1.0]; clipped sq: [1.69, 1.69, 0.36, 0.49]; max: [1.69, 1.69, 0.36, 1.0]
    expected = 0.5 * (1.69 + 1.69 + 0.36 + 1.0) / 4
    assert abs(value_loss(values, old_values, returns, mask, clip=0.2).item() - expected) < 1e-6


def test_entropy_from_logits():
    V = 13
    h = entropy_from_logits(torch.zeros(2, 3, V, dtype=torch.bfloat16))
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, torch.full((2, 3), math.log(V)))
    logits = 4 * torch.randn(2, 3, V, generator=_gen(11), dtype=torch.float64)
    p = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1).float())
    masked_vocab = torch.tensor([[[0.0, 0.0, float("-inf")]]])  # a -inf entry must not give NaN
    torch.testing.assert_close(entropy_from_logits(masked_vocab), torch.tensor([[LN2]]))


# -------------------------------------------------------------------------------------- advantages


def test_group_advantages_centred_scaled_and_zero_for_equal_groups():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 3.0, 1.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4)
    torch.testing.assert_close(adv.view(3, 4).sum(-1), torch.zeros(3), atol=1e-6, rtol=0)
    assert torch.equal(adv[4:8], torch.zeros(4))  # equal rewards: exactly zero, no NaN
    # group 0: mean 0.5, unbiased std = sqrt((0.25 + 0.25 + 0 + 0) / 3) = sqrt(1/6)
    s = math.sqrt(1 / 6)
    torch.testing.assert_close(adv[:4], torch.tensor([0.5 / s, -0.5 / s, 0.0, 0.0]), atol=1e-5, rtol=0)
    ones = group_advantages(torch.ones(4), group_size=2)
    assert torch.equal(ones, torch.zeros(4))
    # in fp32, mean([0.9, 0.9, 0.9]) != 0.9: without the explicit zeroing this group would get 0.056 each
    assert torch.equal(group_advantages(torch.full((3,), 0.9), group_size=3), torch.zeros(3))
    assert torch.equal(rloo_advantages(torch.full((3,), 0.9), group_size=3), torch.zeros(3))


def test_group_advantages_two_samples_give_0707_with_unbiased_std():
    adv = group_advantages(torch.tensor([1.0, 0.0]), group_size=2)
    torch.testing.assert_close(adv, torch.tensor([0.70710678, -0.70710678]), atol=1e-5, rtol=0)


def test_group_advantages_dr_grpo_mode_and_errors():
    adv = group_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 10.0]), group_size=3, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, -2.0, -4.0, 6.0]))
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(torch.zeros(4), group_size=1)


def test_rloo_hand_case():
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    # group 0: 1 - 0 = 1; 0 - (1 + 0 + 0) / 3 = -1/3; group 1: equal -> 0
    torch.testing.assert_close(adv, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0]))
    r = torch.tensor([0.3, 1.2, -0.4])
    torch.testing.assert_close(rloo_advantages(r, 3), 3 / 2 * (r - r.mean()))


def test_gae_hand_example():
    # gamma = 0.9, lam = 0.8, rewards [0, 0, 1], values [0.5, 0.6, 0.7], value after the end = 0
    # delta2 = 1 - 0.7 = 0.3                 A2 = 0.3
    # delta1 = 0.9 * 0.7 - 0.6 = 0.03        A1 = 0.03 + 0.72 * 0.3 = 0.246
    # delta0 = 0.9 * 0.6 - 0.5 = 0.04        A0 = 0.04 + 0.72 * 0.246 = 0.21712
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0]]))


def test_gae_skips_masked_slots_and_nothing_leaks_after_the_end():
    g = _gen(12)
    r = torch.randn(2, 4, generator=g)
    v = torch.randn(2, 4, generator=g)
    adv_c, ret_c = gae(r, v, torch.ones(2, 4), gamma=0.95, lam=0.9)  # compact sequences
    # same tokens with a masked slot (huge reward and value) inserted at index 2 and junk after the end;
    # row 1 also starts with a masked slot
    keep = [torch.tensor([0, 1, 3, 4]), torch.tensor([1, 2, 4, 5])]
    r_p = torch.full((2, 8), 1e6)
    v_p = torch.full((2, 8), 1e6)
    mask = torch.zeros(2, 8)
    for b in range(2):
        r_p[b, keep[b]] = r[b]
        v_p[b, keep[b]] = v[b]
        mask[b, keep[b]] = 1
    adv_p, ret_p = gae(r_p, v_p, mask, gamma=0.95, lam=0.9)
    for b in range(2):
        torch.testing.assert_close(adv_p[b, keep[b]], adv_c[b])
        torch.testing.assert_close(ret_p[b, keep[b]], ret_c[b])
    assert torch.equal(adv_p[mask == 0], torch.zeros(8)) and torch.equal(ret_p[mask == 0], torch.zeros(8))


def test_process_advantages_hand_example():
    # group 0 (rows 0, 1): valid step rewards {1, 0, 0}: mean 1/3, unbiased std sqrt((4/9 + 1/9 + 1/9) / 2)
    # = sqrt(1/3) = 0.57735, so 1 -> 1.1547 and 0 -> -0.57735.
    # row 0 steps end at tokens 1 and 4: t <= 1 gets 1.1547 - 0.57735 = 0.57735; t = 2..4 gets -0.57735;
    # t = 5 gets 0
    # row 1 has one valid step ending at 2 (its second step is padding with junk): t <= 2 -> -0.57735
    # group 1 (rows 2, 3): all valid rewards equal -> zeros
    step_rewards = torch.tensor([[1.0, 0.0], [0.0, 123.0], [0.9, 0.9], [0.9, 0.0]])
    step_ends = torch.tensor([[1, 4], [2, 99], [0, 3], [5, -7]])
    step_mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]])
    adv = process_advantages(step_rewards, step_ends, step_mask, group_size=2, seq_len=6)
    a, b = 1 / math.sqrt(3), 2 / (3 * math.sqrt(1 / 3))
    expected = torch.tensor([
        [b - a, b - a, -a, -a, -a, 0.0],
        [-a, -a, -a, 0.0, 0.0, 0.0],
        [0.0] * 6,
        [0.0] * 6,
    ])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    assert torch.equal(adv[2:], torch.zeros(2, 6))
    with pytest.raises(ValueError, match="outside"):
        process_advantages(step_rewards, step_ends.clamp(max=6) + 1, step_mask, group_size=2, seq_len=6)


# -------------------------------------------------------------------------------------- distill.py


def _manual_kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def _softmax64(z, tau=1.0):
    e = torch.exp(z.double() / tau)
    return e / e.sum(-1, keepdim=True)


def test_kl_distill_zero_when_equal_and_matches_manual():
    g = _gen(13)
    s = 2 * torch.randn(2, 4, 6, generator=g)
    t = 2 * torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    for direction in ("forward", "reverse"):
        assert kl_distill_loss(s, s.clone(), mask, direction).abs().item() < 1e-6
    tau = 2.0
    p_t, p_s = _softmax64(t, tau), _softmax64(s, tau)
    fwd = _manual_kl(p_t, p_s)[mask.bool()].mean()
    rev = _manual_kl(p_s, p_t)[mask.bool()].mean()
    assert abs(kl_distill_loss(s, t, mask, "forward", tau).item() - fwd.item()) < 1e-5
    assert abs(kl_distill_loss(s, t, mask, "reverse", tau).item() - rev.item()) < 1e-5
    assert abs(fwd.item() - rev.item()) > 1e-3  # the two directions really differ here
    with pytest.raises(ValueError, match="sideways"):
        kl_distill_loss(s, t, mask, "sideways")


def test_kl_distill_teacher_with_minus_inf_entry_stays_finite():
    # a teacher that forbids a vocabulary entry (-inf logit): 0 * log 0 counts as 0, value and gradient finite
    t = torch.tensor([[[1.0, 0.0, float("-inf")]]])
    s = torch.tensor([[[0.0, 0.5, 0.2]]], requires_grad=True)
    loss = kl_distill_loss(s, t, torch.ones(1, 1), "forward")
    loss.backward()
    p_t, p_s = _softmax64(t[..., :2]), _softmax64(s.detach())
    manual = (p_t * (p_t.log() - p_s[..., :2].log())).sum()  # sum over the teacher's support only
    assert abs(loss.item() - manual.item()) < 1e-6
    assert torch.isfinite(s.grad).all()


def test_generalized_jsd_endpoints_are_exactly_forward_and_reverse_kl():
    g = _gen(14)
    s = 2 * torch.randn(2, 3, 7, generator=g)
    t = 2 * torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(generalized_jsd_loss(s, t, mask, beta=0.0), kl_distill_loss(s, t, mask, "forward"))
    assert torch.equal(generalized_jsd_loss(s, t, mask, beta=1.0), kl_distill_loss(s, t, mask, "reverse"))
    # ...and the formula itself only approaches them in direction: JSD_beta / beta -> forward KL as beta -> 0
    fwd = kl_distill_loss(s, t, mask, "forward").item()
    assert abs(generalized_jsd_loss(s, t, mask, beta=1e-4).item() / 1e-4 - fwd) < 1e-2 * fwd
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(s, t, mask, beta=1.5)


def test_generalized_jsd_zero_when_equal_manual_at_half_and_bounded_by_ln2():
    g = _gen(15)
    s = 2 * torch.randn(2, 3, 7, generator=g)
    t = 2 * torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert generalized_jsd_loss(s, s.clone(), mask, beta=beta).abs().item() < 1e-6
    p_t, p_s = _softmax64(t, 1.5), _softmax64(s, 1.5)
    m = 0.5 * p_t + 0.5 * p_s  # the mixture in probability space
    manual = (0.5 * _manual_kl(p_t, m) + 0.5 * _manual_kl(p_s, m))[mask.bool()].mean()
    assert abs(generalized_jsd_loss(s, t, mask, beta=0.5, temperature=1.5).item() - manual.item()) < 1e-5
    # nearly disjoint distributions: close to, but never above, ln 2
    far_t = torch.tensor([[[30.0, 0.0, 0.0, 0.0]]])
    far_s = torch.tensor([[[0.0, 0.0, 0.0, 30.0]]])
    jsd = generalized_jsd_loss(far_s, far_t, torch.ones(1, 1), beta=0.5).item()
    assert LN2 - 1e-3 < jsd <= LN2 + 1e-6


# ------------------------------------------------------------------------------------------ prm.py


def test_prm_loss_matches_manual_bce_over_masked_steps():
    logits = torch.tensor([[2.0, -1.0, 50.0], [0.5, 7.0, -3.0]])
    labels = torch.tensor([[1.0, 0.0, -100.0], [0.0, 1.0, 0.7]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    terms = []
    for (b, s) in [(0, 0), (0, 1), (1, 0), (1, 2)]:
        z, y = logits[b, s].item(), labels[b, s].item()
        terms.append(-(y * _log_sigmoid(z) + (1 - y) * _log_sigmoid(-z)))
    assert abs(prm_loss(logits, labels, mask).item() - sum(terms) / 4) < 1e-6
    assert abs(prm_loss(torch.zeros(2, 3), labels.clamp(0, 1), mask).item() - LN2) < 1e-6
    # an inf label in a padded slot must not reach the gradient (0 * inf = NaN)
    z = logits.clone().requires_grad_()
    prm_loss(z, labels.masked_fill(mask == 0, float("inf")), mask).backward()
    assert torch.isfinite(z.grad).all() and torch.equal(z.grad[mask == 0], torch.zeros(2))


# ----------------------------------------------------------------------------------------- padding


def test_padding_never_changes_masked_losses():
    g = _gen(16)
    B, T, V, P = 2, 4, 6, 3

    def pad(x, *shape):  # append junk positions along T
        return torch.cat([x, 1e4 * torch.randn(*shape, generator=g)], dim=1)

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    mask_p = torch.cat([mask, torch.zeros(B, P, dtype=torch.long)], dim=1)
    s, t = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    s_p, t_p = pad(s, B, P, V), pad(t, B, P, V)
    for direction in ("forward", "reverse"):
        torch.testing.assert_close(kl_distill_loss(s_p, t_p, mask_p, direction),
                                   kl_distill_loss(s, t, mask, direction))
    for beta in (0.0, 0.3, 1.0):
        torch.testing.assert_close(generalized_jsd_loss(s_p, t_p, mask_p, beta),
                                   generalized_jsd_loss(s, t, mask, beta))
    z, y = torch.randn(B, T, generator=g), torch.rand(B, T, generator=g)
    torch.testing.assert_close(prm_loss(pad(z, B, P), pad(y, B, P), mask_p), prm_loss(z, y, mask))
    v, ov, ret = (torch.randn(B, T, generator=g) for _ in range(3))
    v_p = pad(v, B, P)
    v_p[0, T] = float("inf")
    v_p.requires_grad_()
    loss_v = value_loss(v_p, pad(ov, B, P), pad(ret, B, P), mask_p)
    loss_v.backward()
    torch.testing.assert_close(loss_v, value_loss(v, ov, ret, mask))
    assert torch.isfinite(v_p.grad).all()
    adv, rets = gae(pad(z, B, P), pad(v, B, P), mask_p)
    adv_ref, rets_ref = gae(z, v, mask)
    torch.testing.assert_close(adv[:, :T], adv_ref)
    torch.testing.assert_close(rets[:, :T], rets_ref)
    # SFT: padded positions carry IGNORE_INDEX labels
    labels = torch.randint(0, V, (B, T), generator=g)
    labels_p = torch.cat([labels, torch.full((B, P), IGNORE_INDEX)], dim=1)
    torch.testing.assert_close(sft_loss(s_p, labels_p), sft_loss(s, labels))
    # process supervision: an extra padded step with junk reward and a junk end index
    sr, se, sm = torch.tensor([[1.0], [0.0]]), torch.tensor([[2], [1]]), torch.ones(2, 1)
    sr_p = torch.cat([sr, torch.tensor([[1e6], [-1e6]])], 1)
    se_p = torch.cat([se, torch.tensor([[50], [-3]])], 1)
    sm_p = torch.cat([sm, torch.zeros(2, 1)], 1)
    torch.testing.assert_close(process_advantages(sr_p, se_p, sm_p, 2, T),
                               process_advantages(sr, se, sm, 2, T))


# -------------------------------------------------------------------------- newer methods (GSPO, CISPO, ...)

from losses import (  # noqa: E402
    cispo_loss, gspo_loss, kto_loss, orpo_loss, overlong_penalty, tis_weights, token_reverse_kl_pg_loss)


def test_gspo_ratio_is_the_token_ratio_when_every_token_log_ratio_is_equal():
    old = torch.log(torch.rand(3, 5)) - 0.1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    new = old + 0.05  # every token's log-ratio is 0.05
    _, m = gspo_loss(new, old, torch.tensor([1.0, -1.0, 0.5]), mask, clip_low=1.0, clip_high=1.0)
    assert abs(m["ratio_mean"].item() - math.exp(0.05)) < 1e-6


def test_gspo_gradient_is_the_papers_expression():
    # grad of -s_b * A_b wrt logps[b, t] is -A_b * s_b / n_b on each valid token (no clipping active), / B
    torch.manual_seed(0)
    old = -torch.rand(2, 4)
    new = (old + 0.1 * torch.randn(2, 4)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    adv = torch.tensor([0.7, -1.3])
    loss, _ = gspo_loss(new, old, adv, mask, clip_low=10.0, clip_high=10.0)
    loss.backward()
    n = mask.sum(1).float()
    s = torch.exp(((new.detach() - old) * mask).sum(1) / n)
    expected = (-adv * s / n / 2)[:, None] * mask  # (B, T)
    assert torch.allclose(new.grad, expected, atol=1e-7)
    assert abs(loss.item() - (-(adv * s).mean()).item()) < 1e-7


def test_gspo_is_minus_the_mean_advantage_before_the_update():
    old = -torch.rand(4, 3)
    adv = torch.tensor([1.0, -1.0, 2.0, 0.0])
    loss, m = gspo_loss(old.clone(), old, adv, torch.ones(4, 3))
    assert loss.item() == -adv.mean().item() and m["ratio_mean"].item() == 1.0 and m["clip_frac"].item() == 0.0


def test_cispo_keeps_the_gradient_of_tokens_ppo_clips():
    # ratio 1.5 > 1 + 0.2 with A > 0: PPO's clip zeroes that token's gradient, CISPO weighs it by 1 + clip_high
    old = torch.log(torch.tensor([[0.2, 0.5]]))
    new = torch.log(torch.tensor([[0.3, 0.5]])).requires_grad_()  # token 0: ratio 1.5; token 1: ratio 1
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2)
    policy_loss(new, old, adv, mask, clip_low=0.2, clip_high=0.2)[0].backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] != 0
    new.grad = None
    loss, m = cispo_loss(new, old, adv, mask, clip_high=0.2)
    loss.backward()
    assert abs(new.grad[0, 0].item() - (-1.2 / 2)) < 1e-6  # -min(1.5, 1.2) * A / (2 tokens)
    assert abs(new.grad[0, 1].item() - (-1.0 / 2)) < 1e-6 and m["clip_frac"].item() == 0.5


def test_cispo_gradient_equals_policy_loss_gradient_before_the_update():
    torch.manual_seed(1)
    old = -torch.rand(3, 4)
    adv, mask = torch.randn(3), torch.ones(3, 4)
    a = old.clone().requires_grad_()
    policy_loss(a, old, adv, mask)[0].backward()
    b = old.clone().requires_grad_()
    cispo_loss(b, old, adv, mask)[0].backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_tis_weight_is_one_when_sampler_and_trainer_agree_and_capped_otherwise():
    old = -torch.rand(2, 3)
    w, m = tis_weights(old, old.clone(), torch.ones(2, 3), cap=2.0)
    assert torch.equal(w, torch.ones(2, 3)) and m["tis_clip_frac"].item() == 0.0
    sampler = old - torch.tensor([[0.0, math.log(3.0), -math.log(2.0)]] * 2)  # ratios 1, 3, 1/2
    w, m = tis_weights(old, sampler, torch.tensor([[1, 1, 1], [1, 1, 0]]), cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, 0.5], [1.0, 2.0, 0.0]]))
    assert abs(m["tis_clip_frac"].item() - 2 / 5) < 1e-7 and abs(m["tis_log_ratio_max"].item() - math.log(3)) < 1e-6


def test_token_level_on_policy_distillation_has_the_reverse_kl_gradient_in_expectation():
    # exact enumeration over a 5-token vocabulary, one position: sum_y p(y) * grad of the loss at y equals
    # the gradient of KL(p || q) with respect to the student's logits
    torch.manual_seed(2)
    z = torch.randn(5, requires_grad=True)
    q = torch.log_softmax(torch.randn(5), -1)
    logp = torch.log_softmax(z, -1)
    expected = torch.autograd.grad((logp.exp() * (logp - q)).sum(), z)[0]
    total = torch.zeros(5)
    for y in range(5):
        lp = torch.log_softmax(z, -1)
        loss, _ = token_reverse_kl_pg_loss(lp[y].view(1, 1), q[y].view(1, 1), torch.ones(1, 1))
        total += lp[y].exp().detach() * torch.autograd.grad(loss, z)[0]
    assert torch.allclose(total, expected, atol=1e-6)
    # and were the student the teacher, the loss and its gradient are exactly 0
    loss, kl = token_reverse_kl_pg_loss(q.view(1, 5).clone().requires_grad_(), q.view(1, 5), torch.ones(1, 5))
    assert loss.item() == 0.0 and kl.item() == 0.0


def test_kto_at_the_reference_is_half_the_weights():
    logps = -torch.rand(4) * 10
    desirable = torch.tensor([True, False, True, False])
    losses, rewards = kto_loss(logps, logps.clone(), desirable, torch.tensor(0.0), beta=0.1,
                               desirable_weight=1.0, undesirable_weight=1.5)
    assert torch.allclose(losses, torch.tensor([0.5, 0.75, 0.5, 0.75])) and torch.equal(rewards, torch.zeros(4))
    # a desirable completion above the reference point loses less; an undesirable one more
    up, _ = kto_loss(logps + 1, logps, desirable, torch.tensor(0.0))
    assert (up[desirable] < 0.5).all() and (up[~desirable] > 0.5).all()


def test_orpo_on_hand_worked_numbers():
    chosen, rejected = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    losses, log_or = orpo_loss(chosen, rejected, lam=0.1)
    assert abs(log_or.item() - math.log(3.0)) < 1e-6  # odds 1 vs 1/3
    assert abs(losses.item() - (math.log(2.0) + 0.1 * math.log(4 / 3))) < 1e-6


@pytest.mark.parametrize("length, value", [(10, 0.0), (12, 0.0), (14, -0.5), (16, -1.0), (20, -1.0)])
def test_overlong_penalty(length, value):
    # budget 16, buffer 4: free up to 12, then -1/4 per token, -1 at and beyond the budget
    assert overlong_penalty(torch.tensor([length]), 16, 4).item() == value
