"""Process supervision: the cut-off rule in every reward path, the oracle step rewards (--reward steps) against a
hand computation of DeepSeekMath's process advantages, outcome plus process (--process-coef) on a hand-made
group where a biased process reward would rank a cut-off completion above the right one, and the balanced PRM
loss. CPU, a few seconds.
"""

import math

import pytest
import torch

import posttrain
from data import task
from data.tokenizer import Tokenizer
from losses import group_advantages, outcome_process_advantages, prm_loss, process_advantages
from model import GPT, GPTConfig

TOK = Tokenizer(task.DATA_DIR)
TINY = ["--n-layer", "1", "--n-embd", "32", "--threads", "1"]

# One group of the kind that broke --reward prm: 10+5+3-2+7 = 23.
PROMPT = "10+5+3-2+7="
GROUP = [
    ("10+5=15;15+3=18;18-2=16;16+7=23;#23", True),  # right, finished
    ("10+5=15;15+3=19;19-2=17;17+7=24;#24", True),  # a slip in step 1, finished, wrong answer
    ("10+5=15;15+3=18;18-2=16;16+7=23;", False),  # right steps, cut off before the answer
    ("10+5=15;15+3=18;18-2=16;16+7=23;23+7=30;30+", False),  # an extra (wrong) step, cut off mid-step
]


def group_roll(group=GROUP):
    """Rollout tensors and verdicts of hand-written completions; a cut-off one has no EOS."""
    ids = [TOK.completion_ids(t) if done else TOK.encode(t) for t, done in group]
    roll = posttrain.completion_rows(TOK, [PROMPT] * len(group), ids, "cpu")
    verdicts = [posttrain.Task("arith", task.DATA_DIR, TOK).verify(PROMPT, t, done) for t, done in group]
    return roll, verdicts


def args_for(*flags):
    return posttrain.stage_args(posttrain.get_args(["--stage", "grpo", *TINY, *flags]), "grpo")


def token_means(adv, mask):
    return ((adv * mask).sum(1) / mask.sum(1)).tolist()


# -----------------------------------------------------------------------------------------------------------
# the cut-off rule


def test_verifier_calls_a_cut_off_completion_wrong_even_with_a_right_answer():
    t = posttrain.Task("arith", task.DATA_DIR, TOK)
    right = "10+5=15;15+3=18;18-2=16;16+7=23;#23"
    assert t.verify(PROMPT, right, True).correct and not t.verify(PROMPT, right, False).correct


def test_rm_gives_a_cut_off_completion_the_lowest_score_of_the_batch(monkeypatch):
    roll, verdicts = group_roll()
    # the RM likes the cut-off rows best; the rule overrides that
    monkeypatch.setattr(posttrain, "sequence_scores", lambda model, ids, last, args, attn_mask=None:
                        torch.tensor([0.5, -1.0, 3.0, 2.0])[:len(ids)])
    stats = {}
    rewards, steps = posttrain.rollout_rewards({"reward_model": None}, args_for("--reward", "rm"), roll, verdicts,
                                               stats)
    assert steps is None and rewards.tolist() == [0.5, -1.0, -1.0, -1.0]


def test_prm_and_oracle_steps_score_every_step_of_a_cut_off_completion_as_wrong(monkeypatch):
    roll, verdicts = group_roll()
    monkeypatch.setattr(posttrain, "chunked_scores", lambda model, roll, args, shift=False:
                        torch.full(roll["completion_ids"].shape, 2.0))  # a PRM that trusts every step
    for reward in ("prm", "steps"):
        stats = {}
        seq, steps = posttrain.rollout_rewards({"reward_model": None}, args_for("--reward", reward), roll,
                                               verdicts, stats)
        n = steps["mask"].sum(1).tolist()
        # 4 ';' + the EOS; 4 ';' + the slip's EOS; 4 ';' and the last token is one; 5 ';' + the closing '+'
        assert n == [5, 5, 4, 6]
        last = roll["completion_mask"].sum(1) - 1
        assert steps["ends"][3, 5] == last[3] and steps["ends"][2, 3] == last[2]  # cut off: closed at the end
        r = steps["rewards"]
        assert r[2:].abs().sum() == 0  # the cut-off rows: every step 0
        if reward == "prm":
            assert torch.allclose(r[:2, :5], torch.full((2, 5), torch.sigmoid(torch.tensor(2.0)).item()))
            assert stats["prm_step_reward"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())  # before
        else:
            # local labels: the slip (step 1) is wrong, the steps after it continue correctly from it
            assert r[0, :5].tolist() == [1, 1, 1, 1, 1] and r[1, :5].tolist() == [1, 0, 1, 1, 0]
        assert seq[2:].abs().sum() == 0


# -----------------------------------------------------------------------------------------------------------
# the oracle against DeepSeekMath's formula by hand


def test_oracle_process_advantages_equal_a_hand_computation():
    roll, verdicts = group_roll()
    _, steps = posttrain.rollout_rewards({}, args_for("--reward", "steps"), roll, verdicts, {})
    T = roll["completion_ids"].shape[1]
    adv = process_advantages(steps["rewards"], steps["ends"], steps["mask"], 4, T)
    # by hand: the group's 20 valid step rewards, their mean and unbiased std, each normalised; a token's
    # advantage sums the normalised rewards of its row's steps that end at or after it
    labels = [[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0] * 4, [0] * 6]
    ends = [[i for i, c in enumerate(t) if c == ";"] + [len(t) if done else len(t) - 1] for t, done in GROUP]
    ends[2] = ends[2][:4]  # cut off right after a ';': that ';' is its last token, no extra step
    flat = [x for row in labels for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1))
    for b in range(4):
        assert steps["ends"][b, :len(ends[b])].tolist() == ends[b]
        for t in range(T):
            expected = sum((r - mean) / (std + 1e-6) for r, e in zip(labels[b], ends[b]) if e >= t)
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-5)
    mask = roll["completion_mask"].float()
    means = token_means(adv, mask)
    assert means[0] == max(means)  # with the cut-off rule the right, finished solution ranks first


# -----------------------------------------------------------------------------------------------------------
# outcome plus process: the ordering guarantee


def biased_process_rewards(roll):
    """Step rewards as a frozen PRM without the cut-off rule gave them: plausible steps of the cut-off rows
    trusted (0.88), every answer step doubted (0.3)."""
    ends, step_mask = posttrain.step_positions(roll["completion_ids"], roll["completion_mask"])
    rewards = torch.full(ends.shape, 0.88) * step_mask
    is_answer = roll["completion_ids"].gather(1, ends) == task.EOS
    rewards[is_answer & step_mask.bool()] = 0.3
    return rewards, ends, step_mask


@pytest.mark.parametrize("coef", [0.1, 1.0, 10.0, 1000.0])
def test_a_right_finished_solution_never_gets_a_lower_mean_advantage(coef):
    roll, verdicts = group_roll()
    mask = roll["completion_mask"].float()
    rewards, ends, step_mask = biased_process_rewards(roll)
    process = process_advantages(rewards, ends, step_mask, 4, mask.shape[1])
    # the failure this guards against: the process advantage alone ranks both cut-off rows above the right one
    alone = token_means(process, mask)
    assert alone[2] > alone[0] and alone[3] > alone[0]
    outcome = group_advantages(torch.tensor([float(v.correct) for v in verdicts]), 4)  # (4,) [1, 0, 0, 0]
    adv = outcome_process_advantages(outcome, process, mask, coef)
    means = token_means(adv, mask)
    # the token mean is the outcome's, any coef (to fp32 rounding of the centred process term)
    assert means == pytest.approx(outcome.tolist(), abs=1e-5 * max(1.0, coef))
    assert all(means[0] > m for m in means[1:])
    assert torch.equal(adv[mask == 0], torch.zeros(int((mask == 0).sum())))
    # within a completion the process term still moves credit: the slip row's tokens are not all equal
    assert adv[1][mask[1] > 0].std() > 0


def test_grpo_batch_with_process_coef_combines_outcome_and_oracle(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_embd=32, n_head=4, n_kv_head=2,
                    intermediate_size=96, max_seq_len=128)
    GPT(cfg).save_pretrained(tmp_path / "init")
    TOK.save(tmp_path / "init")
    roll, verdicts = group_roll()
    roll["sampler_logps"] = torch.zeros(roll["completion_ids"].shape)
    flags = ["--group-size", "4", "--batch-size", "1", "--reward", "steps"]
    for coef in (None, "0.5"):
        args, ctx = posttrain.prepare("grpo", posttrain.get_args(
            ["--stage", "grpo", "--init", str(tmp_path / "init"), *TINY, *flags,
             *(["--process-coef", coef] if coef else [])]))
        monkeypatch.setattr(posttrain, "sample_groups",
                            lambda ctx, args, model: ([PROMPT] * 4, [t for t, _ in GROUP], verdicts, dict(roll)))
        batch, stats = posttrain.grpo_batch(ctx, args, 0)
        assert stats["cut_off"] == 0.5 and stats["reward"] == 0.25
        mask = batch["completion_mask"].float()
        means = token_means(batch["adv"], mask)
        if coef:
            expected = group_advantages(torch.tensor([1.0, 0, 0, 0]), 4).tolist()
            assert means == pytest.approx(expected, abs=1e-5)
        else:
            assert means[0] == max(means)


def test_process_coef_needs_grpo_with_a_process_reward(refused, tmp_path):
    out = str(tmp_path / "out")
    assert "--process-coef" in refused("--stage", "grpo", "--process-coef", "1", "--out-dir", out)
    assert "--process-coef" in refused("--stage", "ppo", "--reward", "steps", "--process-coef", "1",
                                       "--out-dir", out)
    assert "--process-coef" in refused("--stage", "grpo", "--reward", "prm", "--process-coef", "-1",
                                       "--out-dir", out)
    assert "--reward steps" in refused("--stage", "grpo", "--reward", "steps", "--policy-loss", "gspo",
                                       "--out-dir", out)


# -----------------------------------------------------------------------------------------------------------
# the balanced PRM loss


def test_balanced_prm_loss_weighs_the_two_classes_half_each():
    logits = torch.tensor([[2.0, 1.0, -0.5], [3.0, 0.5, 9.9]])
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # by hand: right steps 2.0, 1.0, 3.0 -> softplus(-z); wrong steps -0.5, 0.5 -> softplus(z)
    sp = lambda z: math.log1p(math.exp(z))  # noqa: E731
    right = (sp(-2.0) + sp(-1.0) + sp(-3.0)) / 3
    wrong = (sp(-0.5) + sp(0.5)) / 2
    assert prm_loss(logits, labels, mask, balance=True).item() == pytest.approx((right + wrong) / 2, rel=1e-6)
    assert prm_loss(logits, labels, mask).item() == pytest.approx((3 * right + 2 * wrong) / 5, rel=1e-6)
    assert prm_loss(torch.zeros(2, 3), labels, mask, balance=True).item() == pytest.approx(math.log(2))
    only_right = torch.ones(2, 3)  # one class absent: the plain mean
    assert prm_loss(logits, only_right, mask, balance=True).item() == pytest.approx(
        prm_loss(logits, only_right, mask).item(), rel=1e-6)
    z = logits.clone().requires_grad_(True)
    prm_loss(z, labels, mask, balance=True).backward()
    assert z.grad[1, 2] == 0  # padding gets no gradient
    assert z.grad[0, 2].item() == pytest.approx(torch.sigmoid(torch.tensor(-0.5)).item() / 4, rel=1e-5)


def test_prm_token_rows_label_every_step_token_and_agree_with_the_step_rows_at_each_step_end():
    roll, verdicts = group_roll()
    texts = [t for t, _ in GROUP]
    rows = posttrain.prm_token_rows(roll, [PROMPT] * len(GROUP), texts, verdicts)
    steps = posttrain.prm_rows(roll, verdicts, [v.step_labels for v in verdicts])
    for b, (text, done) in enumerate(GROUP):
        n = int(rows["step_mask"][b].sum())
        ends, labels = rows["step_ends"][b, :n].tolist(), rows["step_labels"][b, :n].tolist()
        # every character up to the last ';', then the EOS of a finished row
        assert ends == list(range(text.rindex(";") + 1)) + [len(text)] * done
        assert labels[:len(ends) - done] == task.token_labels(PROMPT, text)
        # at every ';' and at the EOS the labels are the step rows' labels
        k = int(steps["step_mask"][b].sum())
        assert [labels[ends.index(e)] for e in steps["step_ends"][b, :k].tolist()] == steps["step_labels"][b, :k].tolist()
    # the slip "15+3=19;" of row 1 is wrong from its "9" on, and so is its answer
    slip = GROUP[1][0].index("19;") + 1
    assert rows["step_labels"][1, slip - 1:slip + 2].tolist() == [1.0, 0.0, 0.0]
    assert rows["step_labels"][1, int(rows["step_mask"][1].sum()) - 1] == 0.0
    assert rows["w"].tolist() == rows["step_mask"].sum(1).tolist()


def test_prm_tokens_is_refused_with_monte_carlo_labels(refused, tmp_path):
    assert "--prm-tokens" in refused("--stage", "prm", "--prm-labels", "mc", "--prm-tokens",
                                     "--out-dir", str(tmp_path / "out"))


def test_ranking_auc_and_best_balanced_accuracy_by_hand():
    z = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.1])
    right = torch.tensor([True, True, False, False, False])
    # pairs (right, wrong): 0.9 beats all 3; 0.8 ties one 0.8 (a half) and beats 2 -> (3 + 2.5) / 6
    assert posttrain.ranking_auc(z, right) == pytest.approx(5.5 / 6)
    # t = 0.9: (1/2 + 1) / 2; t = 0.8: (1 + 2/3) / 2 (the tied wrong step comes along); t = 0.3: (1 + 1/3) / 2
    assert posttrain.best_balanced_accuracy(z, right) == pytest.approx((5 / 6, 0.8))
    assert posttrain.ranking_auc(-z, right) == pytest.approx(0.5 / 6)  # reversed scores: 1 - AUC
    assert math.isnan(posttrain.ranking_auc(z, torch.ones(5, dtype=torch.bool)))
