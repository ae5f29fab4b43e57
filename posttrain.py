"""
posttrain.py: one training loop, every post-training stage.

    python posttrain.py --stage grpo                      # builds pretrain -> sft first if they are missing
    python posttrain.py --stage pretrain,sft,dpo,grpo     # a pipeline: each stage starts from the previous one
    python posttrain.py --stage eval --ckpt out/sft --ckpt out/grpo --base out/pretrain

A stage is a row of the STAGES table near the bottom of this file: how to make a batch (from given data, i.e.
off-policy, or from the learner's own rollouts, i.e. on-policy) and which loss from losses/ to apply to it.
Everything else (optimizer, schedule, gradient accumulation, clipping, logging, eval, atomic checkpoints)
exists once, in train_stage(). The survey this follows (arXiv 2604.07941) sorts methods by where the
trajectories come from (off- vs on-policy) and by what they do to the model (support expansion, policy
reshaping, consolidation); each row of STAGES says both.

The file reads top to bottom in the order things happen: flags, data, checkpoints, eval, the stages, the loop.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

import rollout
from data import task
from losses.advantages import group_advantages, rloo_advantages
from losses.common import IGNORE_INDEX, gather_logprobs, masked_mean
from losses.policy import entropy_from_logits, kl_penalty, policy_loss
from losses.sft import sft_loss
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------------------------------------
# flags


def get_args(argv=None):
    p = argparse.ArgumentParser(description="posttrain: LLM post-training stages on one loop.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # which stage(s), where things live
    g = p.add_argument_group("stage and files")
    g.add_argument("--stage", default="grpo",
                   help=f"stage or comma-separated pipeline of stages; one of {', '.join(STAGES)}")
    g.add_argument("--out-dir", default=os.path.join(ROOT, "out"),
                   help="each stage writes its checkpoint folder OUT_DIR/<stage>")
    g.add_argument("--init", default=None,
                   help="checkpoint folder to start the first stage from (default: the previous stage's output)")
    g.add_argument("--data-dir", default=os.path.join(ROOT, "data"), help="folder of the task's JSONL files")
    g.add_argument("--seed", type=int, default=1337, help="seed for data order, sampling and init")
    # the model, used only when a stage starts from scratch (pretrain)
    g = p.add_argument_group("model (from-scratch stages only)")
    g.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    g.add_argument("--n-embd", type=int, default=128, help="model width D")
    g.add_argument("--n-head", type=int, default=4, help="query heads")
    g.add_argument("--n-kv-head", type=int, default=2, help="key/value heads (grouped-query attention)")
    g.add_argument("--max-seq-len", type=int, default=128, help="longest sequence (prompt + completion)")
    # optimisation; None means "the stage's own default" (see STAGES), so a pipeline gets sane values per stage
    g = p.add_argument_group("optimisation (unset = the stage's default)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (on-policy: rollout batches)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step (on-policy stages: prompts per step, each sampled --group-size times)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="rows per forward/backward; gradients accumulate up to the batch")
    g.add_argument("--warmup", type=int, default=None, help="linear warmup steps before the cosine decay")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this")
    # on-policy stages
    g = p.add_argument_group("on-policy (grpo, ppo, rft)")
    g.add_argument("--group-size", type=int, default=8, help="G: completions sampled per prompt")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of rollouts")
    g.add_argument("--max-new-tokens", type=int, default=96, help="longest completion sampled")
    g.add_argument("--ppo-epochs", type=int, default=None, help="passes over each rollout batch")
    g.add_argument("--minibatch-size", type=int, default=None,
                   help="rows per optimizer step inside a rollout batch (default: the whole batch)")
    g.add_argument("--clip-low", type=float, default=0.2, help="PPO clip: ratio floor is 1 - clip_low")
    g.add_argument("--clip-high", type=float, default=0.2,
                   help="PPO clip: ratio ceiling is 1 + clip_high (DAPO clip-higher uses 0.28)")
    g.add_argument("--dual-clip", type=float, default=None, help="dual-clip constant c > 1 (off if unset)")
    g.add_argument("--loss-agg", default="token_mean",
                   choices=["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"],
                   help="how per-token losses become one number (DAPO, GRPO paper, -, Dr. GRPO)")
    g.add_argument("--kl-coef", type=float, default=None, help="KL-to-reference coefficient beta")
    g.add_argument("--kl-kind", default="k3", choices=["k1", "k2", "k3"], help="KL estimator")
    g.add_argument("--kl-in", default="loss", choices=["loss", "reward"],
                   help="add the KL to the loss (GRPO) or subtract it from the reward (PPO/RLHF)")
    g.add_argument("--advantage", default="group", choices=["group", "rloo"],
                   help="GRPO group-normalised advantages or RLOO leave-one-out baseline")
    g.add_argument("--no-std-scaling", action="store_true",
                   help="do not divide group advantages by the group std (Dr. GRPO)")
    g.add_argument("--dynamic-sampling", action=argparse.BooleanOptionalAction, default=None,
                   help="drop groups whose rewards are all equal (DAPO); they carry no gradient")
    # eval
    g = p.add_argument_group("eval and logging")
    g.add_argument("--eval-split", default="test", help="held-out JSONL file in --data-dir used for pass@1")
    g.add_argument("--eval-problems", type=int, default=500, help="held-out problems (0 = skip eval)")
    g.add_argument("--eval-samples", type=int, default=4, help="sampled completions per problem (T=1)")
    g.add_argument("--log-every", type=int, default=None, help="print one progress line every N steps")
    # system
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: all cores; use 1 when other jobs share the cores, "
                        "since idle-spinning OpenMP threads of several processes slow each other down badly)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="bf16 = autocast matmuls in bfloat16 (weights and log-probs stay fp32)")
    return p.parse_args(argv)


def stage_args(args, name):
    """A copy of the flags with every unset (None) value filled from STAGES[name].defaults."""
    out = argparse.Namespace(**vars(args))
    for key, value in STAGES[name].defaults.items():
        if getattr(out, key, None) is None:
            setattr(out, key, value)
    if out.minibatch_size is None:
        out.minibatch_size = 10**9  # the whole rollout batch in one optimizer step
    return out


# -----------------------------------------------------------------------------------------------------------
# data: JSONL files of data/, tokenised once per stage


def read_rows(args, name, fields):
    """Rows of DATA_DIR/<name>.jsonl; a malformed file ends the program with the reader's one-line error."""
    path = os.path.join(args.data_dir, name + ".jsonl")
    if not os.path.exists(path):
        sys.exit(f"posttrain: error: {path} not found (regenerate with: python -m data.task)")
    try:
        return task.read_jsonl(path, fields)
    except ValueError as e:
        sys.exit(f"posttrain: error: {e}")


def prompt_ids(tok, prompt):
    # every sequence starts with BOS; the completion follows the prompt directly
    return [task.BOS] + task.encode(tok, prompt)


def pad_right(seqs, value):
    """List of id lists -> (B, T) tensor, padded on the right with `value`."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class Shuffler:
    """Endless random batches of indices, one pass over the data per epoch (seeded)."""

    def __init__(self, n, seed):
        self.n, self.rng, self.order = n, random.Random(seed), []

    def take(self, k):
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out


# -----------------------------------------------------------------------------------------------------------
# checkpoints: HF folder layout (config.json + model.safetensors + tokenizer.json) + our JSON, written atomically


def save_checkpoint(folder, model, args, metrics, evals):
    """Write the whole folder under a temporary name, then rename it into place.

    An interrupted run therefore leaves either the old folder or the new one, never a half-written one
    (between the two renames the old copy sits at FOLDER.old, which load_policy() falls back to).
    """
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp, tokenizer_path=os.path.join(ROOT, "data", "tokenizer.json"))
    with open(os.path.join(tmp, "args.json"), "w") as f:
        json.dump({k: v for k, v in vars(args).items() if not callable(v)}, f, indent=1)
    with open(os.path.join(tmp, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)
    with open(os.path.join(tmp, "eval.json"), "w") as f:
        json.dump(evals, f, indent=1)
    if os.path.exists(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_model(folder, device, score_head=None):
    if not os.path.exists(os.path.join(folder, "config.json")) and os.path.exists(folder + ".old"):
        folder = folder + ".old"  # a run died between the two renames of save_checkpoint
    try:
        return GPT.from_pretrained(folder, score_head=score_head, device=device)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"posttrain: error: {e}")


def ensure_stage_output(user_args, name):
    """Folder of stage `name`'s output; if it does not exist yet, say so and build it with its defaults.

    Flags the user set explicitly (model size, --steps, ...) apply to the stages built this way too; unset ones
    take that stage's own defaults.
    """
    folder = os.path.join(user_args.out_dir, name)
    if not os.path.exists(os.path.join(folder, "config.json")):
        print(f"[{name}] {folder} not found: building it first with --stage {name}")
        train_stage(argparse.Namespace(**{**vars(user_args), "init": None}), name)
    return folder


# -----------------------------------------------------------------------------------------------------------
# eval: held-out pass@1, greedy and sampled, on the same problems before and after a stage


@torch.no_grad()
def solve(model, tok, prompts, n, temperature, args, seed, batch_rows=256):
    """Sample n completions per prompt; returns (correct (P, n) bool tensor, completions as text)."""
    gen = torch.Generator(device=args.device).manual_seed(seed)
    rows = [p for p in prompts for _ in range(n)]
    correct, texts = [], []
    for i in range(0, len(rows), batch_rows):
        chunk = rows[i:i + batch_rows]
        ids = [prompt_ids(tok, p) for p in chunk]
        max_new = min(args.max_new_tokens, model.config.max_seq_len - max(map(len, ids)))
        with args.amp():
            s = rollout.sample(model, ids, max_new, temperature=temperature, eos_id=task.EOS, generator=gen)
        finished = (s.completion_ids == task.EOS).any(1).tolist()  # cut off at the length limit = wrong
        for p, c, done in zip(chunk, s.completion_ids.tolist(), finished):
            text = task.decode(tok, c)
            texts.append(text)
            correct.append(done and task.verify(p, text).correct)
    return torch.tensor(correct).view(len(prompts), n), texts


def evaluate(model, tok, problems, args, seed=0):
    """Greedy and sampled (T=1) correctness per held-out problem."""
    model.eval()
    prompts = [r["prompt"] for r in problems]
    greedy, _ = solve(model, tok, prompts, 1, 0.0, args, seed)
    out = {"greedy": greedy[:, 0].float().tolist()}
    if args.eval_samples > 0:
        sampled, _ = solve(model, tok, prompts, args.eval_samples, 1.0, args, seed)
        out["sampled"] = sampled.float().mean(1).tolist()  # per-problem fraction solved
    model.train()
    return out


def paired_change(before, after):
    """Mean change and its paired standard error over the same problems."""
    d = torch.tensor(after) - torch.tensor(before)  # (P,)
    return d.mean().item(), (d.std() / math.sqrt(len(d))).item() if len(d) > 1 else 0.0


def report_eval(name, before, after):
    for key in after:
        before_key = before.get(key, [0.0] * len(after[key]))  # from scratch: 0 before
        b, a = sum(before_key) / len(before_key), sum(after[key]) / len(after[key])
        delta, se = paired_change(before_key, after[key])
        print(f"[{name}] held-out pass@1 {key:7s}: {100 * b:5.1f}% -> {100 * a:5.1f}%  "
              f"({100 * delta:+.1f} points, paired SE {100 * se:.1f}, {len(after[key])} problems)")


# -----------------------------------------------------------------------------------------------------------
# off-policy language-model stages: pretrain (noisy worked solutions) and sft (clean solutions, prompt masked)


def setup_pretrain(args, policy, tok):
    rows = read_rows(args, "pretrain", {"text": str})
    seqs = [[task.BOS] + ids + [task.EOS] for ids in (e.ids for e in tok.encode_batch([r["text"] for r in rows]))]
    return {"seqs": seqs, "n_prompt": [1] * len(seqs), "order": Shuffler(len(seqs), args.seed)}


def setup_sft(args, policy, tok):
    rows = read_rows(args, "sft", {"prompt": str, "completion": str})
    seqs, n_prompt = [], []
    for r in rows:
        p = prompt_ids(tok, r["prompt"])
        seqs.append(p + task.encode(tok, r["completion"]) + [task.EOS])
        n_prompt.append(len(p))
    return {"seqs": seqs, "n_prompt": n_prompt, "order": Shuffler(len(seqs), args.seed)}


def lm_batch(ctx, args, step):
    """Right-padded ids and labels; labels are IGNORE_INDEX on the prompt (incl. BOS) and on padding."""
    idx = ctx["order"].take(args.batch_size)
    ids = pad_right([ctx["seqs"][i] for i in idx], task.PAD)  # (B, T)
    labels = pad_right([ctx["seqs"][i] for i in idx], IGNORE_INDEX)  # (B, T)
    for row, i in enumerate(idx):
        labels[row, :ctx["n_prompt"][i]] = IGNORE_INDEX  # no loss, hence no gradient, on prompt tokens
    # w = tokens that carry loss in each row; the loop normalises by their total over the accumulated batch
    return {"ids": ids, "labels": labels, "w": (labels[:, 1:] != IGNORE_INDEX).sum(1)}


def lm_loss(ctx, args, mb):
    # right padding needs no attention mask: causal attention never lets a real token see the pads after it
    with args.amp():
        logits = ctx["policy"](mb["ids"])  # (B, T, V)
    return sft_loss(logits, mb["labels"]), {}


# -----------------------------------------------------------------------------------------------------------
# on-policy stages: grpo (and the pieces ppo and rft share with it)


def setup_grpo(args, policy, tok):
    rows = read_rows(args, "rl", {"prompt": str, "answer": int})
    ctx = {"prompts": [r["prompt"] for r in rows], "order": Shuffler(len(rows), args.seed),
           "gen": torch.Generator(device=args.device).manual_seed(args.seed)}
    if args.kl_coef > 0:
        # the frozen reference is a second copy of the init weights; same code path, so KL is exactly 0 at step 0
        ctx["ref"] = load_model(args.init_folder, args.device).eval().requires_grad_(False)
    return ctx


@torch.no_grad()
def chunked_logps(model, roll, args):
    """Completion log-probs of a whole rollout batch, in micro-batch chunks (same chunks as the update)."""
    out = []
    for sl in chunks(len(roll["completion_ids"]), args.micro_batch_size):
        with args.amp():
            out.append(rollout.completion_logps(model, roll["prompt_ids"][sl], roll["prompt_mask"][sl],
                                                roll["completion_ids"][sl], roll["completion_mask"][sl],
                                                temperature=args.temperature))
    return torch.cat(out)  # (B, N)


def sample_groups(ctx, args, tok):
    """Draw batch_size prompts, sample G completions for each (rows of a group are consecutive), verify them."""
    policy = ctx["policy"]
    prompts = [ctx["prompts"][i] for i in ctx["order"].take(args.batch_size) for _ in range(args.group_size)]
    ids = [prompt_ids(tok, p) for p in prompts]
    max_new = min(args.max_new_tokens, policy.config.max_seq_len - max(map(len, ids)))
    policy.eval()
    with args.amp():
        s = rollout.sample(policy, ids, max_new, temperature=args.temperature, eos_id=task.EOS,
                           generator=ctx["gen"])
    policy.train()
    texts = [task.decode(tok, c) for c in s.completion_ids.tolist()]
    verdicts = [task.verify(p, t) for p, t in zip(prompts, texts)]
    # a completion cut off by --max-new-tokens never scores, even if its text happens to end in "#<answer>"
    finished = (s.completion_ids == task.EOS).any(1).tolist()
    verdicts = [dataclasses.replace(v, correct=v.correct and done) for v, done in zip(verdicts, finished)]
    roll = {"prompt_ids": s.prompt_ids, "prompt_mask": s.prompt_mask, "completion_ids": s.completion_ids,
            "completion_mask": s.completion_mask, "sampler_logps": s.logps}
    return prompts, texts, verdicts, roll


def grpo_batch(ctx, args, step):
    tok, G = ctx["tok"], args.group_size
    prompts, texts, verdicts, roll = sample_groups(ctx, args, tok)
    rewards = torch.tensor([float(v.correct) for v in verdicts])  # (B,) outcome reward from the verifier
    mask = roll["completion_mask"].float()  # (B, N)
    stats = {"reward": rewards.mean().item(), "len": mask.sum(1).mean().item(),
             "zero_std_groups": (rewards.view(-1, G).std(1) == 0).float().mean().item()}
    # old log-probs: the policy's own training forward before any update of this batch (not the sampler's
    # incremental ones), so the first ratio is exactly 1; the sampler's are kept only as a diagnostic
    roll["old_logps"] = chunked_logps(ctx["policy"], roll, args)  # (B, N)
    stats["sampler_logp_gap"] = ((roll["old_logps"] - roll["sampler_logps"]).abs() * mask).max().item()
    if "ref" in ctx:
        roll["ref_logps"] = chunked_logps(ctx["ref"], roll, args)  # (B, N)
        kl = kl_penalty(roll["old_logps"], roll["ref_logps"], kind=args.kl_kind)  # (B, N)
        stats["kl_ref"] = masked_mean(kl, mask).item()
        if args.kl_in == "reward":
            # KL as a per-sequence penalty folded into the reward before the group normalisation
            rewards = rewards - args.kl_coef * (kl * mask).sum(1)
    if args.advantage == "rloo":
        adv = rloo_advantages(rewards, G)  # (B,)
    else:
        adv = group_advantages(rewards, G, scale_by_std=not args.no_std_scaling)  # (B,)
    roll["adv"] = adv
    keep = torch.ones(len(adv), dtype=torch.bool)
    if args.dynamic_sampling:
        # DAPO dynamic sampling: groups whose rewards are all equal have zero advantage and no gradient
        keep = (rewards.view(-1, G).std(1) > 0).repeat_interleave(G)  # (B,)
    roll = {k: v[keep] for k, v in roll.items()}
    # w: the units the loss averages over, per row (tokens for token_mean, sequences otherwise)
    roll["w"] = roll["completion_mask"].sum(1) if args.loss_agg == "token_mean" else torch.ones(int(keep.sum()))
    return roll, stats


def completion_forward(model, mb, args):
    """Training forward over [prompt; completion] -> completion log-probs (B, N) and logits (B, N, V)."""
    P = mb["prompt_ids"].shape[1]
    ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)  # (B, P+N)
    attn = torch.cat([mb["prompt_mask"], mb["completion_mask"]], 1)  # (B, P+N)
    with args.amp():
        logits = model(ids, attn_mask=attn)  # (B, P+N, V)
    # NOTE: divide by the sampling temperature, exactly as the sampler and completion_logps do
    logits = logits[:, P - 1:-1].float() / args.temperature  # (B, N, V): position t scores completion token t
    logps = gather_logprobs(logits, mb["completion_ids"])  # (B, N), the one shared helper
    return logps, logits


def grpo_loss(ctx, args, mb):
    mask = mb["completion_mask"].float()  # (B, N)
    logps, logits = completion_forward(ctx["policy"], mb, args)  # (B, N), (B, N, V)
    loss, metrics = policy_loss(logps, mb["old_logps"], mb["adv"], mask, clip_low=args.clip_low,
                                clip_high=args.clip_high, dual_clip=args.dual_clip, loss_agg=args.loss_agg)
    if "ref_logps" in mb and args.kl_in == "loss":
        kl = kl_penalty(logps, mb["ref_logps"], kind=args.kl_kind)  # (B, N)
        loss = loss + args.kl_coef * masked_mean(kl, mask)
    metrics["entropy"] = masked_mean(entropy_from_logits(logits.detach()), mask).item()
    return loss, metrics


# -----------------------------------------------------------------------------------------------------------
# the table of stages


@dataclass
class Stage:
    regime: str  # where trajectories come from: "off-policy" (given data) or "on-policy" (own rollouts)
    role: str  # the survey's role: support expansion, policy reshaping, consolidation
    init: str | None  # the stage whose output is this stage's default starting point (None: from scratch)
    setup: Callable  # (args, policy, tok) -> ctx: data, and the frozen models the stage holds
    make_batch: Callable  # (ctx, args, step) -> (dict of row tensors incl. "w", dict of logged stats)
    loss: Callable  # (ctx, args, micro-batch) -> (scalar loss, dict of metrics)
    holds: str  # the models the stage keeps in memory
    defaults: dict = field(default_factory=dict)  # the stage's values for flags left unset
    score_head: bool = False  # the trained model is a scalar scorer (reward model, PRM), not a generator
    evaluate: Callable | None = None  # (ctx, args) -> dict: the stage's own held-out check (e.g. RM accuracy)


def lm_stage_batch(ctx, args, step):
    return lm_batch(ctx, args, step), {}


STAGES = {
    "pretrain": Stage("off-policy", "support (base model)", None, setup_pretrain, lm_stage_batch, lm_loss,
                      "policy", dict(steps=1500, lr=3e-3, batch_size=64, micro_batch_size=64, warmup=100,
                                     ppo_epochs=1, log_every=100)),
    "sft": Stage("off-policy", "support expansion", "pretrain", setup_sft, lm_stage_batch, lm_loss,
                 "policy", dict(steps=400, lr=1e-3, batch_size=64, micro_batch_size=64, warmup=20,
                                ppo_epochs=1, log_every=50)),
    "grpo": Stage("on-policy", "policy reshaping", "sft", setup_grpo, grpo_batch, grpo_loss,
                  "policy, reference (if --kl-coef > 0)",
                  dict(steps=60, lr=1e-4, batch_size=16, micro_batch_size=64, warmup=0, ppo_epochs=2,
                       kl_coef=0.0, dynamic_sampling=True, log_every=5)),
}


# -----------------------------------------------------------------------------------------------------------
# the one loop


def chunks(n, size):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def lr_at(step, args):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def train_stage(user_args, name):
    """Run one stage from its init to OUT_DIR/<name>, with held-out pass@1 before and after."""
    stage = STAGES[name]
    args = stage_args(user_args, name)
    torch.manual_seed(args.seed)
    tok = task.load_tokenizer()
    # --- the policy: from --init, from the previous stage's output, or from scratch
    if args.init is None and stage.init is not None:
        args.init = ensure_stage_output(user_args, stage.init)
    args.init_folder = args.init
    if args.init is not None:
        print(f"[{name}] init from {args.init}")
        policy = load_model(args.init, args.device, score_head=stage.score_head or None)
    else:
        cfg = GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=args.n_layer, n_embd=args.n_embd,
                        n_head=args.n_head, n_kv_head=args.n_kv_head,
                        intermediate_size=int(8 * args.n_embd / 3 / 32 + 1) * 32, max_seq_len=args.max_seq_len)
        policy = GPT(cfg).to(args.device)
        print(f"[{name}] new model from scratch: {policy.num_params() / 1e6:.2f}M parameters")
    ctx = stage.setup(args, policy, tok)
    ctx.update(policy=policy, tok=tok)
    # held-out pass@1 of a generator; a scorer (RM, PRM) is judged by the stage's own evaluate() instead
    problems = [] if stage.score_head else read_rows(args, args.eval_split, {"prompt": str, "answer": int})
    problems = problems[:args.eval_problems]
    # a model from scratch solves nothing (and never stops generating), so its "before" is 0 by construction
    before = evaluate(policy, tok, problems, args) if problems and args.init else {}
    if stage.evaluate is not None:
        before.update(stage.evaluate(ctx, args))
    # --- optimizer: AdamW, weight decay on matrices only; ctx["trainable"] adds e.g. a PPO critic
    params = [p for p in policy.parameters() if p.requires_grad] + ctx.get("trainable", [])
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    print(f"[{name}] {stage.regime}, {stage.role}; holds: {stage.holds}; {args.steps} steps")
    metrics_log, t0, n_tokens = [], time.time(), 0
    for step in range(args.steps):
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        # --- a batch: from data (off-policy) or from the policy's own rollouts (on-policy)
        batch, stats = stage.make_batch(ctx, args, step)
        n_rows = len(batch["w"])
        row_metrics = []
        for epoch in range(args.ppo_epochs):
            for mb_slice in chunks(n_rows, args.minibatch_size):
                # one optimizer step per minibatch; its micro-batches accumulate gradients. Each micro-batch's
                # mean loss is weighted by its share of the minibatch's units (tokens or sequences), so the
                # accumulated gradient is that of the mean over the whole minibatch, not a mean of means.
                total_w = batch["w"][mb_slice].sum().clamp(min=1)
                for sl in chunks(mb_slice.stop - mb_slice.start, args.micro_batch_size):
                    sl = slice(mb_slice.start + sl.start, mb_slice.start + sl.stop)
                    micro = {k: v[sl] for k, v in batch.items()}
                    loss, m = stage.loss(ctx, args, micro)
                    (loss * micro["w"].sum() / total_w).backward()
                    row_metrics.append({"loss": loss.item(), **{k: float(v) for k, v in m.items()}})
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        n_tokens += int(batch["w"].sum()) if n_rows else 0
        # --- log: averages over the step's micro-batches, plus the batch's own stats
        rec = {"step": step + 1, "lr": lr, **stats}
        for key in (row_metrics[0] if row_metrics else {}):
            rec[key] = sum(r[key] for r in row_metrics) / len(row_metrics)
        if row_metrics:
            rec["grad_norm"] = float(grad_norm)
        elapsed = time.time() - t0
        rec["elapsed"] = elapsed
        metrics_log.append(rec)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            extra = " ".join(f"{k} {v:.4g}" for k, v in rec.items() if k not in ("step", "elapsed", "lr"))
            print(f"[{name}] step {step + 1}/{args.steps} | {extra} | {n_tokens / elapsed / 1e3:.1f}k tok/s | "
                  f"{fmt_time(elapsed)} elapsed, ETA {fmt_time(eta)}", flush=True)
    # --- held-out pass@1 after, then the atomic checkpoint
    after = evaluate(policy, tok, problems, args) if problems else {}
    if problems:
        report_eval(name, before, after)
    if stage.evaluate is not None:
        after.update(stage.evaluate(ctx, args))
        for key in after:
            if key not in ("greedy", "sampled"):
                print(f"[{name}] held-out {key}: {before.get(key, float('nan')):.4g} -> {after[key]:.4g}")
    out = os.path.join(args.out_dir, name)
    save_checkpoint(out, policy, args, metrics_log, {"before": before, "after": after})
    print(f"[{name}] saved {out} ({fmt_time(time.time() - t0)})")
    return out


# -----------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    names = [s.strip() for s in args.stage.split(",") if s.strip()]
    for n in names:
        if n not in STAGES:
            sys.exit(f"posttrain: error: --stage {n!r} is not a stage; choose from {', '.join(STAGES)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("posttrain: error: --device cuda but no CUDA device is available")
    bf16 = args.dtype == "bf16"
    args.amp = (lambda: torch.autocast(args.device, dtype=torch.bfloat16)) if bf16 else nullcontext
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    os.makedirs(args.out_dir, exist_ok=True)
    for i, n in enumerate(names):
        if i > 0:
            args.init = os.path.join(args.out_dir, names[i - 1])  # a pipeline: each stage from the previous
        train_stage(args, n)


if __name__ == "__main__":
    main()
