"""Correctness off the default path: what the on-policy stages compute under the flags README documents.

Each test pins one way a flag could silently compute the wrong thing: k1 is the only KL estimator whose policy
gradient through the reward is that of KL(pi || ref) (checked by exact enumeration on a small categorical);
dynamic sampling filters on the outcome reward even when the KL is in the reward; the first ratio is exactly 1
under bf16 autocast at a temperature other than 1; --temperature 0 is refused where it gives no signal and
works for distillation; the gradient does not depend on --micro-batch-size for any --loss-agg, with or without
the KL term; Dr. GRPO's normaliser is a constant; a pad token with log-prob -1e4 gives finite gradients.
"""

import os

import pytest
import torch

import posttrain
from data import task
from losses import kl_penalty
from data.tokenizer import Tokenizer
from model import GPT, GPTConfig

torch.set_num_threads(1)
TOK = Tokenizer(task.DATA_DIR)  # the built-in character-level tokenizer
TINY = ["--n-layer", "1", "--n-embd", "32", "--threads", "1"]


def tiny_folder(path, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_embd=32, n_head=4, n_kv_head=2,
                    intermediate_size=96, max_seq_len=128)
    GPT(cfg).save_pretrained(path)
    TOK.save(path)
    return str(path)


def prepare(stage, init, *flags):
    return posttrain.prepare(stage, posttrain.get_args(["--stage", stage, "--init", init, *TINY, *flags]))


def perturb(model, scale=0.3, seed=1):
    """Move a model's weights so that it differs from its init (a reference, say)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g) * p.abs().mean())


def fake_rollout(prompt, completions, rewards):
    """What sample_groups returns for hand-written completions of one prompt, with given 0/1 rewards."""
    ids = [TOK.completion_ids(c) for c in completions]
    roll = posttrain.completion_rows(TOK, [prompt] * len(completions), ids, "cpu")
    roll["sampler_logps"] = torch.zeros(roll["completion_ids"].shape)
    verdicts = [task.verify(prompt, c) for c in completions]
    verdicts = [posttrain.dataclasses.replace(v, correct=bool(r)) for v, r in zip(verdicts, rewards)]
    return [prompt] * len(completions), completions, verdicts, roll


def run_main(argv):
    with pytest.raises(SystemExit) as e:
        posttrain.main(argv)
    return e.value.code


# -----------------------------------------------------------------------------------------------------------
# 1. the KL in the reward: only k1 has the gradient of KL(pi || ref)


def test_only_k1_in_the_reward_has_the_reverse_kl_gradient():
    # exact enumeration over a categorical of 6 outcomes: the policy gradient of E_pi[-k(x)] through the
    # score function is -sum_x pi(x) k(x) grad log pi(x), with k(x) a constant of the update (it sits in the
    # reward); compare it with the true gradient of -KL(pi || ref)
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=g, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, generator=g) * 2, -1)
    logp = torch.log_softmax(theta, -1)  # (6,)
    true = torch.autograd.grad(-(logp.exp() * (logp - ref)).sum(), theta, retain_graph=True)[0]

    def reward_gradient(kind):
        k = kl_penalty(logp.detach()[None], ref[None], kind=kind)[0]  # (6,) the penalty per outcome
        surrogate = (logp.exp().detach() * -k * logp).sum()  # E_pi[-k(x) log pi(x)], pi held fixed
        return torch.autograd.grad(surrogate, theta, retain_graph=True)[0]

    torch.testing.assert_close(reward_gradient("k1"), true, atol=1e-6, rtol=1e-6)
    for kind in ("k2", "k3"):
        cosine = torch.nn.functional.cosine_similarity(reward_gradient(kind), true, dim=0)
        assert cosine < 0.99, kind  # a different direction, not just a different scale


def test_kl_in_the_reward_resolves_to_k1_and_refuses_k3(tmp_path):
    args = posttrain.stage_args(posttrain.get_args(["--kl-in", "reward"]), "grpo")
    assert args.kl_kind == "k1"
    assert posttrain.stage_args(posttrain.get_args([]), "grpo").kl_kind == "k3"  # in the loss: DeepSeekMath's
    assert posttrain.stage_args(posttrain.get_args([]), "ppo").kl_kind == "k1"  # ppo's KL is a reward
    out = tmp_path / "out"
    for flags in (["--stage", "grpo", "--kl-in", "reward", "--kl-kind", "k3"], ["--stage", "ppo", "--kl-kind", "k2"]):
        assert run_main([*flags, "--out-dir", str(out), "--kl-coef", "0.1"]) == 2
    assert not out.exists()  # refused before anything was written


def test_kl_in_the_reward_error_names_both_flags(tmp_path, capsys):
    run_main(["--stage", "grpo", "--kl-in", "reward", "--kl-kind", "k3", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kl-in reward" in err[0] and "--kl-kind" in err[0]


# -----------------------------------------------------------------------------------------------------------
# 2. dynamic sampling decides on the outcome reward, not on the reward with the KL folded in


def test_dynamic_sampling_filters_on_the_outcome_reward_with_the_kl_in_the_reward(tmp_path, monkeypatch):
    args, ctx = prepare("grpo", tiny_folder(tmp_path / "init"), "--kl-in", "reward", "--kl-coef", "0.1",
                        "--group-size", "2", "--batch-size", "2")
    perturb(ctx["ref"])  # a reference unlike the policy: every completion has a different KL
    prompt = "12+5-3="
    texts = ["12+5=17;17-3=14;#14", "#14", "12+5=17;17-3=14;#14", "12+5=17;#17"]
    fake = fake_rollout(prompt, texts, [1, 1, 1, 0])  # group 0 all right, group 1 mixed
    monkeypatch.setattr(posttrain, "sample_groups", lambda *a, **k: fake)
    roll, stats = posttrain.grpo_batch(ctx, args, 0)
    assert len(roll["w"]) == 2  # only the mixed group is left
    assert torch.equal(roll["completion_ids"], fake[3]["completion_ids"][2:])
    assert stats["zero_std_groups"] == 0.5
    # its advantages: the outcome minus the k1 penalty, normalised within the group (G = 2: +-0.7071)
    assert roll["adv"][0] > 0 > roll["adv"][1]
    torch.testing.assert_close(roll["adv"].abs(), torch.full((2,), 0.5 ** 0.5), atol=1e-4, rtol=0)


def test_a_step_whose_every_group_is_dropped_gives_an_empty_batch(tmp_path, monkeypatch):
    args, ctx = prepare("grpo", tiny_folder(tmp_path / "init"), "--group-size", "2", "--batch-size", "2")
    texts = ["12+5=17;17-3=14;#14", "#14", "12+5=17;#17", "#13"]
    fake = fake_rollout("12+5-3=", texts, [1, 1, 0, 0])  # one all-right and one all-wrong group
    monkeypatch.setattr(posttrain, "sample_groups", lambda *a, **k: fake)
    batch, stats = posttrain.grpo_batch(ctx, args, 0)
    assert len(batch["w"]) == 0 and stats["zero_std_groups"] == 1.0


# -----------------------------------------------------------------------------------------------------------
# 3. bf16 autocast at temperature 0.7: one log-prob path, so the first ratio is exactly 1 and the KL exactly 0


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
@pytest.mark.parametrize("peaked", [False, True])
def test_first_ratio_is_exactly_one_under_bf16_at_temperature_0_7(tmp_path, stage, peaked):
    init = tmp_path / "init"
    tiny_folder(init)
    if peaked:  # sharper distributions make any rounding difference between two log-prob paths larger
        model = GPT.from_pretrained(str(init))
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
        model.save_pretrained(str(init))
        TOK.save(str(init))
    args, ctx = prepare(stage, str(init), "--dtype", "bf16", "--temperature", "0.7", "--kl-coef", "0.1",
                        "--batch-size", "3", "--group-size", "2", "--max-new-tokens", "12",
                        "--micro-batch-size", "4", "--no-dynamic-sampling")
    roll, stats = posttrain.STAGES[stage].make_batch(ctx, args, 0)
    assert stats["kl_ref"] == 0.0
    for rows in (torch.arange(0, 4), torch.arange(4, 6)):  # the same chunks as the old log-probs
        micro = {k: v[rows] for k, v in roll.items()}
        _, metrics = posttrain.STAGES[stage].loss(ctx, args, micro)
        assert metrics["ratio_mean"].item() == 1.0 and metrics["approx_kl"].item() == 0.0


# -----------------------------------------------------------------------------------------------------------
# 4. --temperature 0


@pytest.mark.parametrize("stage", ["grpo", "ppo", "rft"])
def test_temperature_zero_is_refused_where_groups_would_be_identical(tmp_path, stage, capsys):
    out = tmp_path / "out"
    assert run_main(["--stage", stage, "--temperature", "0", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--temperature 0" in err[0] and stage in err[0]
    assert not out.exists()


def test_negative_temperature_is_refused(tmp_path):
    assert run_main(["--stage", "sft", "--temperature", "-1", "--out-dir", str(tmp_path / "out")]) == 2


def test_distill_from_greedy_teacher_sequences_scores_at_temperature_one(tmp_path):
    a, b = tiny_folder(tmp_path / "a", seed=0), tiny_folder(tmp_path / "b", seed=1)
    flags = ["--temperature", "0", "--batch-size", "3", "--max-new-tokens", "12"]
    args, ctx = prepare("distill", a, "--teacher", b, *flags)
    batch, _ = posttrain.distill_batch(ctx, args, 0)
    loss, metrics = posttrain.distill_loss(ctx, args, batch)
    assert torch.isfinite(loss) and loss.item() > 1e-4
    args.temperature = 1.0  # score the same greedy sequences at temperature 1: exactly the same numbers
    loss_t1, _ = posttrain.distill_loss(ctx, args, batch)
    assert loss.item() == loss_t1.item()
    args, ctx = prepare("distill", a, "--teacher", a, *flags)  # the student is the teacher: exactly 0
    batch, _ = posttrain.distill_batch(ctx, args, 0)
    assert posttrain.distill_loss(ctx, args, batch)[0].item() == 0.0


# -----------------------------------------------------------------------------------------------------------
# 5. the accumulated gradient does not depend on --micro-batch-size, for every --loss-agg, KL or not


def gradient(ctx, args, batch, micro_batch_size):
    for p in ctx["params"]:
        p.grad = None
    args.micro_batch_size = micro_batch_size
    posttrain.accumulate_gradients(posttrain.STAGES[args.stage], ctx, args, batch, torch.arange(len(batch["w"])))
    return torch.cat([p.grad.flatten() for p in ctx["params"] if p.grad is not None])


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                      "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("kl_coef", ["0", "0.5"])
def test_gradient_does_not_depend_on_the_micro_batch_size(tmp_path, monkeypatch, stage, loss_agg, kl_coef):
    if stage == "ppo" and kl_coef == "0":
        pytest.skip("ppo's KL is in the reward, not in the loss")
    args, ctx = prepare(stage, tiny_folder(tmp_path / "init"), "--loss-agg", loss_agg, "--kl-coef", kl_coef,
                        "--group-size", "3", "--batch-size", "2", "--no-dynamic-sampling",
                        "--micro-batch-size", "6")
    perturb(ctx["ref"])
    prompt = "12+5-3="
    texts = ["12+5=17;17-3=14;#14", "#14", "12+5=17;#17", "12+5=17;17-3=15;#15", "#13", "12+5=17;17-3=14;#14"]
    fake = fake_rollout(prompt, texts, [1, 1, 0, 0, 0, 1])  # lengths 20, 4, 12, 20, 4, 20 with the EOS
    monkeypatch.setattr(posttrain, "sample_groups", lambda *a, **k: fake)
    batch, _ = posttrain.STAGES[stage].make_batch(ctx, args, 0)
    # a nonzero PPO critic, so that its value loss contributes a gradient too
    if stage == "ppo":
        with torch.no_grad():
            ctx["critic"].score.weight.normal_(0, 1.0)
    ctx["params"] = [p for p in ctx["policy"].parameters()] + ctx.get("trainable", [])
    whole = gradient(ctx, args, batch, 6)
    for size in (1, 2, 4):
        part = gradient(ctx, args, batch, size)
        assert ((part - whole).norm() / whole.norm()).item() < 1e-6, size


# -----------------------------------------------------------------------------------------------------------
# 6. Dr. GRPO divides by a constant: the generation budget, not the padded width of the batch


def test_dr_grpo_normaliser_does_not_depend_on_the_padded_width(tmp_path, monkeypatch):
    args, ctx = prepare("grpo", tiny_folder(tmp_path / "init"), "--loss-agg", "seq_mean_token_sum_norm",
                        "--no-std-scaling", "--group-size", "2", "--batch-size", "1", "--no-dynamic-sampling",
                        "--max-new-tokens", "40")
    fake = fake_rollout("12+5-3=", ["12+5=17;17-3=14;#14", "#15"], [1, 0])
    monkeypatch.setattr(posttrain, "sample_groups", lambda *a, **k: fake)
    batch, _ = posttrain.grpo_batch(ctx, args, 0)
    ctx["policy"].lm_head.weight.data.mul_(3.0)  # a policy moved off the old one, so the ratio is not 1
    loss, _ = posttrain.grpo_loss(ctx, args, batch)
    wide = dict(batch)
    extra = 7  # seven more padding columns, as a batch with one longer completion would have
    for key, fill in (("completion_ids", task.PAD), ("completion_mask", 0), ("old_logps", 0.0),
                      ("ref_logps", 0.0)):
        wide[key] = torch.cat([batch[key], torch.full((2, extra), fill, dtype=batch[key].dtype)], 1)
    loss_wide, _ = posttrain.grpo_loss(ctx, args, wide)
    assert loss.item() != 0.0
    assert loss_wide.item() == pytest.approx(loss.item(), rel=1e-6)


# -----------------------------------------------------------------------------------------------------------
# 7. a pad token the policy has driven to log-prob -1e4 gives finite gradients with k3 in the loss


def test_k3_gives_finite_gradients_when_the_pad_logit_is_minus_1e4(tmp_path, monkeypatch):
    args, ctx = prepare("grpo", tiny_folder(tmp_path / "init"), "--kl-coef", "0.1", "--kl-kind", "k3",
                        "--group-size", "2", "--batch-size", "1", "--no-dynamic-sampling")
    fake = fake_rollout("12+5-3=", ["12+5=17;17-3=14;#14", "#15"], [1, 0])  # the second row is padded
    monkeypatch.setattr(posttrain, "sample_groups", lambda *a, **k: fake)
    batch, _ = posttrain.grpo_batch(ctx, args, 0)

    def pad_logit(module, inputs, output):
        output = output.clone()
        output[..., task.PAD] = -1e4  # the policy has learned never to emit PAD
        return output

    ctx["policy"].lm_head.register_forward_hook(pad_logit)
    loss, _ = posttrain.grpo_loss(ctx, args, batch)
    loss.backward()
    grads = [p.grad for p in ctx["policy"].parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_out_dir_is_untouched_by_a_refused_run(tmp_path):
    out = tmp_path / "out"
    os.makedirs(out / "sft")
    (out / "sft" / "marker").write_text("kept")
    assert run_main(["--stage", "sft,grpo", "--temperature", "0", "--out-dir", str(out)]) == 2
    # (a run takes OUT_DIR/.lock before anything else, to repair a killed save under the lock)
    assert (out / "sft" / "marker").read_text() == "kept" and sorted(set(os.listdir(out)) - {".lock"}) == ["sft"]


def test_token_level_distillation_of_a_copy_is_exactly_zero(tmp_path):
    a = tiny_folder(tmp_path / "a")
    args, ctx = prepare("distill", a, "--teacher", a, "--distill-mode", "token", "--batch-size", "3",
                        "--max-new-tokens", "10")
    batch, _ = posttrain.STAGES["distill"].make_batch(ctx, args, 0)
    loss, metrics = posttrain.STAGES["distill"].loss(ctx, args, batch)
    loss.backward()
    assert loss.item() == 0.0 and metrics["kl_reverse"] == 0.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in ctx["policy"].parameters())


@pytest.mark.parametrize("argv, culprit", [
    (["--stage", "ppo", "--policy-loss", "gspo"], "--policy-loss gspo"),
    (["--stage", "grpo", "--policy-loss", "gspo", "--tis-cap", "2"], "--tis-cap"),
    (["--stage", "grpo", "--policy-loss", "gspo", "--reward", "prm"], "--reward prm"),
    (["--stage", "grpo", "--tis-cap", "0.5"], "--tis-cap"),
    (["--stage", "grpo", "--overlong-buffer", "200"], "--overlong-buffer"),
    (["--stage", "grpo", "--entropy-coef", "-1"], "--entropy-coef"),
])
def test_newer_method_flags_refuse_what_they_cannot_do(refused, tmp_path, argv, culprit):
    assert culprit in refused(*argv, "--out-dir", str(tmp_path / "out"))


def test_overlong_shaping_lowers_the_reward_of_long_completions_of_a_kept_group(tmp_path, monkeypatch):
    # one group: a 21-token right completion and a 3-token wrong one, budget 40, buffer 20. The right one's
    # reward is 1 + ((40 - 20) - 21) / 20 = 0.95, so without std scaling the advantages are +-0.475 (+-0.5
    # without the shaping)
    prompt, right, wrong = "12+30-5=", "12+30=42;42-5=37;#37", "#9"
    flags = ("--group-size", "2", "--batch-size", "1", "--max-new-tokens", "40", "--no-std-scaling")
    for buffer, expected in (("0", 0.5), ("20", 0.475)):
        args, ctx = prepare("grpo", tiny_folder(tmp_path / f"init{buffer}"), *flags, "--overlong-buffer", buffer)
        monkeypatch.setattr(posttrain, "sample_groups",
                            lambda ctx, args, model: fake_rollout(prompt, [right, wrong], [1, 0]))
        batch, _ = posttrain.grpo_batch(ctx, args, 0)
        assert batch["completion_mask"].sum(1).tolist() == [21, 3]
        assert torch.allclose(batch["adv"], torch.tensor([expected, -expected]))
