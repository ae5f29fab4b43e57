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

The file reads top to bottom in the order things happen: flags, the task, checkpoints, eval, the stages, the loop.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rollout
from data import answer as answer_task
from data import task as arith
from data.tokenizer import Tokenizer
from losses.advantages import (gae, group_advantages, outcome_process_advantages, overlong_penalty,
                               process_advantages, rloo_advantages)
from losses.common import IGNORE_INDEX, masked_mean, token_logprobs
from losses.distill import generalized_jsd_loss, kl_distill_loss, token_reverse_kl_pg_loss
from losses.dpo import dpo_loss, kto_loss, orpo_loss, reward_model_loss, simpo_loss
from losses.policy import aggregate_loss, cispo_loss, gspo_loss, kl_penalty, policy_loss, tis_weights, value_loss
from losses.prm import prm_loss
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
    g.add_argument("--task", default="arith", choices=["arith", "answer"],
                   help="arith: the built-in arithmetic task, with per-step labels; answer: the JSONL files of "
                        "--data-dir, each prompt verified by the final number of its completion")
    g.add_argument("--no-chat-template", action="store_true",
                   help="show prompts through --prompt-template even when the model's folder has a chat template")
    g.add_argument("--prompt-template", default="{prompt}",
                   help="how a prompt is shown to a model without a chat template; {prompt} is replaced by it")
    g.add_argument("--seed", type=int, default=1337, help="seed for data order, sampling and init")
    # the model, used only when a stage starts from scratch (pretrain, pretrain-small)
    g = p.add_argument_group("model (from-scratch stages only)")
    g.add_argument("--n-layer", type=int, default=None,
                   help="transformer blocks (unset: the stage's default, 4; pretrain-small, the student's base: 2)")
    g.add_argument("--n-embd", type=int, default=None,
                   help="model width D (unset: the stage's default, 128; pretrain-small: 64)")
    g.add_argument("--n-head", type=int, default=None, help="query heads (unset: 4)")
    g.add_argument("--n-kv-head", type=int, default=None, help="key/value heads, grouped-query attention (unset: 2)")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="longest sequence, prompt + completion (unset: 128)")
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
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each transformer block in the backward pass instead of storing its "
                        "activations: less memory, about one more forward of time (trained models only)")
    # on-policy stages
    g = p.add_argument_group("on-policy (grpo, ppo, rft)")
    g.add_argument("--group-size", type=int, default=8, help="G: completions sampled per prompt")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; log-probs are of logits / temperature. 0 = greedy, refused by "
                        "grpo, ppo and rft (every sample of a group would be the same); distill samples its "
                        "sequences greedily and scores them at temperature 1")
    g.add_argument("--max-new-tokens", type=int, default=96, help="longest completion sampled")
    g.add_argument("--ppo-epochs", type=int, default=None, help="passes over each rollout batch")
    g.add_argument("--minibatch-size", type=int, default=None,
                   help="rows per optimizer step inside a rollout batch (default: the whole batch)")
    g.add_argument("--policy-loss", default="ppo", choices=["ppo", "gspo", "cispo"],
                   help="grpo / ppo: the clipped token ratio (ppo), GSPO's clipped sequence ratio (grpo only), or "
                        "CISPO's REINFORCE with a clipped, detached token weight")
    g.add_argument("--clip-low", type=float, default=None,
                   help="clip: ratio floor is 1 - clip_low (unset: 0.2; gspo: 3e-4; cispo has no floor)")
    g.add_argument("--clip-high", type=float, default=None,
                   help="clip: ratio ceiling is 1 + clip_high (unset: 0.2, DAPO's clip-higher uses 0.28; gspo: "
                        "4e-4; cispo: 0.28, the cap of its weight)")
    g.add_argument("--tis-cap", type=float, default=None,
                   help="grpo / ppo: weigh each token's loss by min(pi_old / pi_sampler, cap), truncated "
                        "importance sampling for the sampler / trainer mismatch (off if unset)")
    g.add_argument("--entropy-coef", type=float, default=0.0,
                   help="grpo / ppo: subtract this times the policy's mean token entropy from the loss")
    g.add_argument("--overlong-buffer", type=int, default=0,
                   help="grpo: DAPO's soft overlong punishment over the last N tokens of --max-new-tokens (0: off)")
    g.add_argument("--dual-clip", type=float, default=None, help="dual-clip constant c > 1 (off if unset)")
    g.add_argument("--loss-agg", default="token_mean",
                   choices=["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"],
                   help="how per-token losses become one number (DAPO, GRPO paper, -, Dr. GRPO)")
    g.add_argument("--kl-coef", type=float, default=None, help="KL-to-reference coefficient beta")
    g.add_argument("--kl-kind", default=None, choices=["k1", "k2", "k3"],
                   help="KL estimator (unset: k3 with --kl-in loss, as DeepSeekMath; k1 with --kl-in reward, the "
                        "only estimator whose policy gradient through the reward is that of KL(pi || ref), so "
                        "k2 and k3 are refused there)")
    g.add_argument("--kl-in", default="loss", choices=["loss", "reward"],
                   help="add the KL to the loss (GRPO) or subtract it from the reward (PPO/RLHF)")
    g.add_argument("--advantage", default="group", choices=["group", "rloo"],
                   help="GRPO group-normalised advantages or RLOO leave-one-out baseline")
    g.add_argument("--no-std-scaling", action="store_true",
                   help="do not divide group advantages by the group std (Dr. GRPO)")
    g.add_argument("--dynamic-sampling", action=argparse.BooleanOptionalAction, default=None,
                   help="drop groups whose rewards are all equal (DAPO); they carry no gradient")
    # dpo / rm / distill / eval
    g = p.add_argument_group("dpo / rm / distill / eval")
    g.add_argument("--pairs", default="given", choices=["given", "self"],
                   help="dpo, rm: preference pairs; given = data/pairs.jsonl (clean vs corrupted solution), "
                        "self = --group-size samples per prompt from the init, a fully right vs a wrong one")
    g.add_argument("--pair-prompts", type=int, default=1000,
                   help="dpo, rm: prompts (of sft.jsonl and rl.jsonl) sampled for --pairs self")
    g.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "ipo", "hinge", "simpo", "kto", "orpo"],
                   help="dpo: DPO (sigmoid; cDPO with --label-smoothing), IPO, hinge (SLiC/RSO), SimPO (no "
                        "reference), KTO (each pair as one desirable and one undesirable completion), ORPO (SFT + "
                        "odds ratio, no reference)")
    g.add_argument("--kto-weights", type=float, nargs=2, default=[1.0, 1.0], metavar=("DESIRABLE", "UNDESIRABLE"),
                   help="dpo --loss-type kto: lambda_D and lambda_U")
    g.add_argument("--orpo-lambda", type=float, default=0.1, help="dpo --loss-type orpo: odds-ratio weight")
    g.add_argument("--beta", type=float, default=None,
                   help="dpo: scale of the implicit reward (unset: 0.1; 2.0 for simpo)")
    g.add_argument("--simpo-gamma", type=float, default=0.5,
                   help="dpo --loss-type simpo: target reward margin")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="dpo sigmoid: assumed rate of flipped preference labels (cDPO); 0 = plain DPO")
    g.add_argument("--rpo-alpha", type=float, default=0.0,
                   help="dpo: weight of an NLL term on the chosen completion, per token (RPO, Pang et al. "
                        "2024); 0 = plain DPO")
    g.add_argument("--teacher", default=None,
                   help="distill: the teacher's checkpoint folder (unset: OUT_DIR/grpo, built if missing; "
                        "in a pipeline: the previous stage's output)")
    g.add_argument("--distill-mode", default="forward", choices=["forward", "reverse", "jsd", "onpolicy", "token"],
                   help="distill: forward / reverse KL or JSD on teacher samples (off-policy); on the student's "
                        "own samples, JSD over the whole vocabulary (onpolicy, GKD) or a policy gradient with "
                        "the per-token reverse-KL sample as advantage (token)")
    g.add_argument("--jsd-beta", type=float, default=0.5,
                   help="distill jsd, onpolicy: teacher weight beta of the generalized JSD "
                        "(0 = forward KL, 1 = reverse KL)")
    g.add_argument("--ckpt", action="append", default=None,
                   help="eval: a checkpoint folder to evaluate; repeat the flag for several "
                        "(unset: every stage folder in OUT_DIR)")
    g.add_argument("--base", default=None,
                   help="eval: the base folder that gained / lost problems and KL are measured against "
                        "(unset: OUT_DIR/pretrain if it exists, else the first --ckpt)")
    g.add_argument("--eval-n", type=int, default=16,
                   help="eval: samples per held-out problem at T=1; pass@k for k = 1, 2, 4, ..., n")
    g.add_argument("--eval-out", default=None,
                   help="eval: JSON file of the results (unset: OUT_DIR/eval.json)")
    g.add_argument("--pipeline-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="after a run of several stages, evaluate every stage's output as the eval stage does")
    # ppo / rft / prm, and the learned rewards grpo and ppo can optimise
    g = p.add_argument_group("ppo / rft / prm")
    g.add_argument("--reward", default="verifier", choices=["verifier", "prm", "rm", "steps"],
                   help="grpo, ppo: what scores a rollout; verifier = the task's 0/1 outcome, prm = the step "
                        "scores of OUT_DIR/prm (process supervision), rm = the sequence score of OUT_DIR/rm "
                        "(each built first if missing), steps = the verifier's own step labels as process "
                        "rewards (the oracle PRM: the upper bound of process supervision)")
    g.add_argument("--process-coef", type=float, default=None,
                   help="grpo --reward prm | steps: unset = the process advantage alone (DeepSeekMath); C = the "
                        "verifier's outcome advantage plus C times the process advantage, centred on each "
                        "completion (outcome plus process, as PRIME)")
    g.add_argument("--vf-coef", type=float, default=0.1, help="ppo: weight of the value loss")
    g.add_argument("--value-clip", type=float, default=0.2,
                   help="ppo: a value may move at most this far from its rollout-time value (reward units)")
    g.add_argument("--gamma", type=float, default=1.0, help="ppo: GAE discount")
    g.add_argument("--lam", type=float, default=0.95, help="ppo: GAE lambda")
    g.add_argument("--rounds", type=int, default=3,
                   help="rft: sample-filter-finetune rounds; a new round starts every STEPS / ROUNDS steps")
    g.add_argument("--round-prompts", type=int, default=1024,
                   help="rft: rl.jsonl prompts sampled per round (--group-size samples each, BATCH_SIZE "
                        "prompts at a time)")
    g.add_argument("--prm-data", default="samples", choices=["samples", "pretrain", "mixed"],
                   help="prm: completions to learn from; samples = the init policy's own on rl.jsonl "
                        "prompts, pretrain = the noisy worked solutions of pretrain.jsonl, mixed = both, "
                        "as many of each per step (held out: the policy's samples)")
    g.add_argument("--prm-labels", default="verifier", choices=["verifier", "mc"],
                   help="prm: step labels; verifier = the task's step checker, mc = Math-Shepherd "
                        "Monte-Carlo (1 if any of --mc-rollouts continuations from the step reaches the "
                        "answer)")
    g.add_argument("--mc-rollouts", type=int, default=4, help="prm --prm-labels mc: continuations per step")
    g.add_argument("--prm-policy", default=None,
                   help="prm --prm-data samples: the policy whose completions the PRM learns to judge (unset: the "
                        "PRM's own init)")
    g.add_argument("--prm-tokens", action=argparse.BooleanOptionalAction, default=False,
                   help="prm --prm-labels verifier: train the score at every token of a step (1 until the step's "
                        "first wrong token, 0 from it), not only at its ';'")
    g.add_argument("--prm-balance", action=argparse.BooleanOptionalAction, default=True,
                   help="prm: right and wrong steps weigh half of the loss each (class-balanced cross-entropy)")
    g.add_argument("--prm-score", default="logodds", choices=["logodds", "hidden"],
                   help="prm: what the step score reads; logodds = the step's least likely written token under "
                        "the PRM's own LM head (its log-odds, times a learned scale, plus a learned bias, both "
                        "fitted before step 1), hidden = a linear head on the hidden state at the step's end "
                        "token (the default before this flag existed)")
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
    # faults
    g = p.add_argument_group("faults and resuming")
    g.add_argument("--save-every", type=int, default=50,
                   help="steps between resumable states (OUT_DIR/<stage>.state), which --resume continues from")
    g.add_argument("--resume", action="store_true",
                   help="continue each stage from its resumable state, if it has one (same flags as the run "
                        "that wrote it): the result is bit-identical to an uninterrupted run on the same machine")
    g.add_argument("--max-bad-steps", type=int, default=3,
                   help="a step whose loss or gradient is not finite is skipped; this many in a row stop the "
                        "stage, leaving its previous checkpoint untouched")
    return p.parse_args(argv)


def stage_args(args, name):
    """A copy of the flags with every unset (None) value filled from STAGES[name].defaults, and the device
    and autocast context resolved."""
    out = argparse.Namespace(**vars(args))
    if out.device == "auto":
        out.device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = out.dtype == "bf16"
    # bf16 = autocast: matmuls in bfloat16, weights, log-probs and losses in fp32
    out.amp = (lambda: torch.autocast(out.device, dtype=torch.bfloat16)) if bf16 else nullcontext
    for key, value in STAGES[name].defaults.items():
        if getattr(out, key, None) is None:
            setattr(out, key, value)
    if out.minibatch_size is None:
        out.minibatch_size = 10**9  # the whole rollout batch in one optimizer step
    clip_low, clip_high = {"ppo": (0.2, 0.2), "gspo": (3e-4, 4e-4), "cispo": (None, 0.28)}[out.policy_loss]
    out.clip_low = clip_low if out.clip_low is None else out.clip_low
    out.clip_high = clip_high if out.clip_high is None else out.clip_high
    if out.kl_kind is None:
        # k1 wherever the KL is a reward (ppo always; grpo --kl-in reward), k3 in the loss (DeepSeekMath)
        out.kl_kind = "k1" if name == "ppo" or out.kl_in == "reward" else "k3"
    return out


def die(msg):
    """Bad input: one line on stderr and exit code 2 (argparse's own code for a bad flag), no traceback.
    With several processes every rank stops, and rank 0 alone says why."""
    if RANK == 0:
        print(f"posttrain: error: {msg}", file=sys.stderr)
    sys.exit(2)


# flag -> (test of a set value, what it must be); every one is also refused when not finite (inf, nan)
FLAG_RANGES = {
    **{f: (lambda v: v >= 1, "an integer >= 1") for f in (
        "steps", "batch-size", "micro-batch-size", "group-size", "max-new-tokens", "ppo-epochs", "minibatch-size",
        "eval-n", "log-every", "threads", "save-every", "max-bad-steps", "rounds", "round-prompts", "pair-prompts",
        "mc-rollouts", "n-layer", "n-embd", "n-head", "n-kv-head", "max-seq-len")},
    **{f: (lambda v: v >= 0, ">= 0") for f in (
        "eval-problems", "eval-samples", "warmup", "weight-decay", "kl-coef", "temperature", "rpo-alpha",
        "simpo-gamma", "vf-coef", "value-clip", "clip-high")},
    "lr": (lambda v: v > 0, "> 0"), "grad-clip": (lambda v: v > 0, "> 0"), "beta": (lambda v: v > 0, "> 0"),
    "tis-cap": (lambda v: v >= 1, ">= 1"), "entropy-coef": (lambda v: v >= 0, ">= 0"),
    "process-coef": (lambda v: v >= 0, ">= 0"),
    "overlong-buffer": (lambda v: v >= 0, ">= 0"), "orpo-lambda": (lambda v: v >= 0, ">= 0"),
    "clip-low": (lambda v: 0 <= v < 1, "in [0, 1)"), "dual-clip": (lambda v: v > 1, "> 1"),
    "jsd-beta": (lambda v: 0 <= v <= 1, "in [0, 1]"), "label-smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "gamma": (lambda v: 0 <= v <= 1, "in [0, 1]"), "lam": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}
MODEL_FLAGS = ("n-layer", "n-embd", "n-head", "n-kv-head", "max-seq-len")  # shape a model made from scratch


def check_stage_args(args, name):
    """Refuse, with one line, flag values that would make stage `name` compute the wrong thing.

    args are the stage's own (stage_args). main() calls this for every stage a run will train, before any
    work; train_stage() calls it again for a stage it builds on demand.
    """
    for flag, (ok, what) in FLAG_RANGES.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is not None and not (math.isfinite(value) and ok(value)):
            die(f"--{flag} must be {what}, got {value}")
    if WORLD > 1 and args.batch_size is not None and args.batch_size % WORLD:
        unit = "prompts" if name in ("grpo", "ppo", "rft", "prm", "distill") else "rows"
        die(f"--batch-size {args.batch_size} ({name}: {unit} per step) does not divide by the {WORLD} processes "
            "torchrun started: every rank takes an equal share")
    if args.policy_loss == "gspo" and name == "ppo":
        die("--policy-loss gspo is a sequence ratio for one advantage per sequence (grpo); ppo's GAE gives one "
            "per token: use --policy-loss ppo or cispo")
    if args.policy_loss == "gspo" and args.reward in ("prm", "steps"):
        die(f"--policy-loss gspo needs one advantage per sequence; --reward {args.reward} gives one per token")
    if args.prm_tokens and args.prm_labels == "mc":
        die("--prm-tokens needs --prm-labels verifier: Monte-Carlo labels exist per step, not per token")
    if args.process_coef is not None and not (name == "grpo" and args.reward in ("prm", "steps")):
        die("--process-coef weighs grpo's process advantage: it needs --stage grpo with --reward prm or steps")
    if args.policy_loss == "gspo" and args.tis_cap is not None:
        die("--tis-cap weighs tokens; --policy-loss gspo has one ratio per sequence: use one of them")
    if args.overlong_buffer > args.max_new_tokens:
        die(f"--overlong-buffer {args.overlong_buffer} is longer than --max-new-tokens {args.max_new_tokens}")
    if name == "grpo" and args.group_size < 2:
        die(f"--group-size {args.group_size}: grpo's advantages compare the samples of a prompt, it needs >= 2")
    scratch = args.init is None and STAGES[name].init is None and STAGES[name].run is None  # a new model
    if scratch and args.n_embd % args.n_head:
        die(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head}")
    if scratch and args.n_head % args.n_kv_head:
        die(f"--n-head {args.n_head} must be a multiple of --n-kv-head {args.n_kv_head}")
    if args.temperature < 0:
        die(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.temperature == 0 and name in ("grpo", "ppo", "rft"):
        die(f"--temperature 0 samples greedily, so every completion of a group is the same and {name} gets no "
            "learning signal; use a temperature > 0")
    kl_in_reward = name == "ppo" or (name == "grpo" and args.kl_in == "reward")
    if kl_in_reward and args.kl_kind != "k1":
        where = "ppo puts the KL in the reward" if name == "ppo" else "--kl-in reward"
        die(f"{where}, which needs --kl-kind k1, got --kl-kind {args.kl_kind}: only k1 in the reward has the "
            "policy gradient of KL(pi || ref); k2 and k3 belong in the loss (--kl-in loss)")
    if args.task != "arith" and needs_step_labels(name, args):
        what = (f"--reward {args.reward}" if name in ("grpo", "ppo") else
                "--pairs self" if name in ("dpo", "rm") else name)
        die(f"{what} needs per-step labels, which only --task arith has; --task {args.task} cannot use it")
    if args.task != "arith" and scratch:
        die(f"--task {args.task} needs a model with a tokenizer for its text: pass --init FOLDER (the {name} stage "
            "would start a model from scratch with the arithmetic task's character-level tokenizer)")
    if "{prompt}" not in args.prompt_template:
        die(f"--prompt-template must contain {{prompt}}, got {args.prompt_template!r}")
    if name == "grpo" and args.reward in ("prm", "steps") and args.kl_in == "reward" and args.kl_coef > 0:
        die(f"grpo --reward {args.reward} keeps the KL in the loss (as DeepSeekMath does); drop --kl-in reward")


def needs_step_labels(name, args):
    """Whether stage `name` with these flags reads the arithmetic verifier's per-step labels."""
    return name == "prm" or (name in ("grpo", "ppo") and args.reward in ("prm", "steps")) or \
        (name in ("dpo", "rm") and args.pairs == "self")


def check_step_tokenizer(name, args, task):
    """Per-step labels find each step's end as the ';' token of the character-level tokenizer: refuse them
    with any other tokenizer, where that token means something else or does not exist."""
    if needs_step_labels(name, args) and task.tok.tok.get_vocab(with_added_tokens=True) != arith.VOCAB:
        die(f"{name}: per-step labels need the arithmetic task's character-level tokenizer, and {task.tok.path} "
            "is another one")


def stages_to_train(user_args, names):
    """The training stages a run will go through, in order: each of `names` after the stages it builds first
    because their output is missing (its init, distill's teacher, the --reward scorer). Eval is not one."""
    plan = []

    def visit(name, first):
        stage = STAGES[name]
        if stage.run is not None:
            return
        args = stage_args(user_args, name)
        deps = []
        if first:  # a later stage of a pipeline starts from the previous stage's output (distill: distils it)
            deps += [stage.init] if stage.init and args.init is None else []
            deps += ["grpo"] if name == "distill" and args.teacher is None else []
        if name in ("grpo", "ppo") and args.reward in ("rm", "prm"):
            deps.append(args.reward)
        for dep in deps:
            if dep not in plan and not os.path.exists(os.path.join(user_args.out_dir, dep, "config.json")):
                visit(dep, True)
        plan.append(name)

    for i, name in enumerate(names):
        visit(name, i == 0)
    return plan


# -----------------------------------------------------------------------------------------------------------
# the task: tokenizer, data files and verifier, in the one object every stage receives


# what each data file holds; "answer" is an integer for --task arith, any number (or numeric string) for answer
FIELDS = {"pretrain": {"text": str}, "sft": {"prompt": str, "completion": str},
          "pairs": {"prompt": str, "chosen": str, "rejected": str}, "rl": {"prompt": str, "answer": int},
          "test": {"prompt": str, "answer": int}, "test_ood": {"prompt": str, "answer": int}}


ROWS_READ = {}  # (path, mtime, task, tokenizer) -> the rows Task.rows read and checked


class Task:
    """What a stage learns from and is judged by: its tokenizer, the data files, and the verifier.

    --task arith   the built-in chained arithmetic (data/task.py). Its verifier also labels every worked
                   step, which the process stages need (prm, grpo / ppo --reward prm, dpo --pairs self).
    --task answer  any JSONL task whose rows have a numeric answer (data/answer.py): a completion is right iff
                   its final number (after "####" if it has one) equals the row's answer.
    The tokenizer is the one of the stage's init folder (the built-in character-level one for a model trained
    from scratch); every text a stage reads is checked against it when its file is read.
    """

    def __init__(self, name, data_dir, tok):
        self.name, self.data_dir, self.tok = name, data_dir, tok
        self.answers = {}  # prompt -> its answer, from every {prompt, answer} file read so far (answer task)

    def rows(self, name):
        """Rows of DATA_DIR/<name>.jsonl; a missing or malformed file ends the program with one line."""
        path = os.path.join(self.data_dir, name + ".jsonl")
        if not os.path.exists(path):
            hint = " (regenerate with: python -m data.task)" if self.name == "arith" else ""
            die(f"{path} not found{hint}")
        key = (path, os.stat(path).st_mtime_ns, self.name, self.tok.path)
        if key in ROWS_READ:  # validate_run() read and checked this file before the stage's setup() asks
            rows = ROWS_READ[key]
            self.answers.update((r["prompt"], r["answer"]) for r in rows if "answer" in r)
            return rows
        fields = dict(FIELDS[name])
        if self.name == "answer" and "answer" in fields:
            fields["answer"] = answer_task.answer_value
        # the built-in tokenizer's check is the task's alphabet: the same test, without a tokenizer call
        builtin = self.name == "arith" and self.tok.tok.get_vocab(with_added_tokens=True) == arith.VOCAB
        try:
            rows = arith.read_jsonl(path, fields, **({} if builtin else {"check_text": self.tok.check}))
            if self.name == "arith" and "answer" in fields:
                for r in rows:
                    arith.parse_prompt(r["prompt"])  # ValueError unless it is an arithmetic prompt
        except ValueError as e:
            die(f"{path}: {e}" if str(e).startswith("not a task prompt") else f"{e}")
        if not rows:
            die(f"{path} has no rows")
        self.answers.update((r["prompt"], r["answer"]) for r in rows if "answer" in r)
        ROWS_READ[key] = rows
        return rows

    def verify(self, prompt, text, finished=True):
        """The verifier's verdict on a completion's text, with the cut-off rule: a completion that never
        emitted EOS (it reached --max-new-tokens or the model's context) is wrong, even if its text happens to
        end in a right answer."""
        if self.name == "arith":
            v = arith.verify(prompt, text)
        else:
            v = arith.Verdict(answer_task.is_correct(text, self.answers[prompt]), None, [], [])
        return dataclasses.replace(v, correct=v.correct and bool(finished))


def load_task(args, folder):
    """The Task of a stage whose model comes from `folder` (None: a new model, the built-in tokenizer)."""
    try:
        tok = Tokenizer(folder or arith.DATA_DIR, chat=not args.no_chat_template,
                        prompt_template=args.prompt_template)
    except ValueError as e:
        die(f"{e}")
    if folder is None and args.task != "arith":
        die(f"--task {args.task} needs a model with a tokenizer for its text: pass --init FOLDER (a model "
            f"trained from scratch uses the arithmetic task's character-level tokenizer, {tok.path})")
    return Task(args.task, args.data_dir, tok)


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
# several processes: `torchrun --nproc_per_node N posttrain.py ...` (gloo on CPU, nccl on GPUs)
#
# Data parallel over the rows of every batch, with the same numbers as one process on the whole batch:
#   * every rank holds the same models (same seed, and rank 0's weights broadcast once) and the same Shufflers
#     and generators, so every rank draws the same GLOBAL batch of indices or prompts and keeps its own
#     contiguous share of it (share()): for an on-policy stage whole groups, since a share is counted in
#     prompts;
#   * the sampler draws its noise for every row of the global batch and keeps its share's rows, so a rank's
#     completions are exactly those one process would have sampled for them;
#   * every normaliser is global: the loss units (tokens, sequences, steps) of the whole batch (all_sum), PPO's
#     advantage whitening; group statistics never cross ranks, because groups never do;
#   * after each minibatch's backward the gradients are summed over ranks (sum_gradients), then clipped and
#     stepped identically everywhere. This is what DistributedDataParallel does, written out in one all-reduce
#     per optimizer step: DDP's bucketed overlap of backward and communication buys nothing at these sizes,
#     and the explicit sum keeps the loss weighting in one visible place;
#   * frozen models (reference, teacher, PRM, RM) are replicated, not wrapped; rank 0 alone evaluates, logs
#     and writes checkpoints; the other ranks wait for it.
# A single process never enters any of this beyond `WORLD > 1` checks.
WORLD = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun, like RANK and LOCAL_RANK
RANK = int(os.environ.get("RANK", "0"))


def init_distributed(device):
    """Join the process group of torchrun's ranks (once); on GPUs each rank takes the device LOCAL_RANK."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")


def share(items):
    """This rank's contiguous share of a global batch (a list); all of it in a single process."""
    if WORLD == 1:
        return items
    n = len(items) // WORLD  # the flags were checked: the batch divides by the world size
    return items[RANK * n:(RANK + 1) * n]


def all_sum(x):
    """Sum of a tensor (or number) over ranks, as a tensor on the CPU; x itself in a single process."""
    x = torch.as_tensor(x, dtype=torch.float64)
    if WORLD > 1:
        import torch.distributed as dist
        x = x.to(DIST_DEVICE).clone()
        dist.all_reduce(x)
    return x.cpu()


def all_gather_lists(items):
    """Every rank's list, concatenated in rank order: the global list, as one process would have it."""
    if WORLD == 1:
        return items
    import torch.distributed as dist
    out = [None] * WORLD
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def sum_gradients(params):
    """Sum every parameter's gradient over ranks, in one flat all-reduce. A parameter without a gradient on
    some rank counts zeros there; one without a gradient on every rank keeps none, so AdamW skips it as it
    would in one process."""
    if WORLD == 1:
        return
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([float(p.grad is not None)
                                                                     for p in params], device=grads[0].device)])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    for p, seen in zip(params, flat[offset:].tolist()):
        if seen == 0:
            p.grad = None


def barrier():
    if WORLD > 1:
        import torch.distributed as dist
        dist.barrier()


def broadcast_weights(*models):
    """Rank 0's weights on every rank: the seeds already agree, this makes sure."""
    if WORLD > 1:
        import torch.distributed as dist
        with torch.no_grad():
            for m in models:
                for t in list(m.parameters()) + list(m.buffers()):
                    dist.broadcast(t.data, 0)


DIST_DEVICE = "cpu"  # where all_sum's tensors go: the GPU with nccl (set by main)


def chunks(n, size):
    """Slices that cut range(n) into consecutive pieces of at most `size`."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def rl_prompts(task):
    """The prompts of rl.jsonl, where the on-policy stages (and the PRM's samples) come from."""
    return [r["prompt"] for r in task.rows("rl")]


def training_prompts(task):
    """Prompts of every length the held-out test has: sft.jsonl (2 to 5 operands) and rl.jsonl (5 to 6);
    for --task answer, rl.jsonl's alone (the prompts with an answer to verify samples against).

    Only the prompts: stages that generate their own trajectories from them (dpo --pairs self, distill) never
    read the files' solutions. rl.jsonl alone holds only the longest chains, where an sft model gets few
    samples right: too few good samples to learn from.
    """
    if task.name == "answer":
        return rl_prompts(task)
    return [r["prompt"] for r in task.rows("sft")] + rl_prompts(task)


def heldout_problems(task, args, split=None):
    """The first --eval-problems rows {prompt, answer} of the held-out split (--eval-split unless named)."""
    return task.rows(split or args.eval_split)[:args.eval_problems]


def prompt_source(prompts, args):
    """What a sampling stage draws from: the prompts, their seeded order, the sampler's seeded generator."""
    return {"prompts": prompts, "order": Shuffler(len(prompts), args.seed),
            "gen": torch.Generator(device=args.device).manual_seed(args.seed)}


# -----------------------------------------------------------------------------------------------------------
# checkpoints: HF folder layout (config.json + model.safetensors + tokenizer.json) + our JSON, written atomically


def save_checkpoint(folder, model, tok, args, metrics, evals):
    """Write the whole folder under a temporary name, then rename it into place.

    Every file is flushed to disk (fsync) before the next is written, and eval.json comes last: a FOLDER.tmp
    holding eval.json is complete. The renames are FOLDER -> FOLDER.old, FOLDER.tmp -> FOLDER, then FOLDER.old
    is removed; a kill at any point leaves a state recover_folder() turns back into one complete FOLDER.
    """
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp, tokenizer_path=tok.path)
    tok.save(tmp)  # all of the tokenizer's files (config, chat template), so the folder loads with them
    write_file(os.path.join(tmp, "args.json"), json.dumps({k: v for k, v in vars(args).items() if not callable(v)},
                                                         indent=1))
    write_file(os.path.join(tmp, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics))
    for name in os.listdir(tmp):
        fsync_path(os.path.join(tmp, name))  # the weights and tokenizer files written above
    write_file(os.path.join(tmp, "eval.json"), json.dumps(evals, indent=1))  # last: marks tmp complete
    fsync_path(tmp)
    if os.path.exists(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    os.rename(tmp, folder)
    fsync_path(os.path.dirname(os.path.abspath(folder)))  # the renames themselves
    shutil.rmtree(old, ignore_errors=True)


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_folder(folder):
    """Turn what a killed save_checkpoint can leave behind into one complete FOLDER (or none).

    FOLDER.tmp with eval.json is a complete new checkpoint whose rename was cut short: it wins. FOLDER.old is
    the previous checkpoint, kept until the new one is in place: it comes back if nothing newer is there.
    Anything else (a FOLDER.tmp without eval.json: a save killed while writing) is removed."""
    tmp, old = folder + ".tmp", folder + ".old"
    if os.path.isdir(tmp) and os.path.exists(os.path.join(tmp, "eval.json")) and not os.path.exists(folder):
        os.rename(tmp, folder)
    if os.path.isdir(old) and not os.path.exists(folder):
        os.rename(old, folder)
    for leftover in (tmp, old):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)


def lock_out_dir(out_dir):
    """Hold OUT_DIR/.lock for the life of this process, or end with one line if another run holds it.

    An flock dies with its process, so a lock file left by a killed run blocks nothing."""
    import fcntl
    try:
        f = open(os.path.join(out_dir, ".lock"), "a")
    except OSError as e:
        die(f"--out-dir {out_dir}: cannot write there ({e.strerror})")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        die(f"{out_dir} is locked by another posttrain run writing there; wait for it, or use another --out-dir")
    return f  # keep it open: closing the file would release the lock


def load_model(folder, device, score_head=None):
    try:
        return GPT.from_pretrained(folder, score_head=score_head, device=device)
    except (ValueError, FileNotFoundError) as e:
        die(f"{e}")


def check_model_folder(flag, folder):
    """Refuse, with one line, a model folder a run would fail on later: config, weights' headers, tokenizer."""
    if not os.path.isdir(folder):
        die(f"{flag} {folder}: no such folder")
    try:
        GPT.from_pretrained(folder, check_only=True)
        Tokenizer(folder)
    except ValueError as e:
        die(f"{flag} {e}")


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
# sampling and scoring, shared by every stage that samples completions or scores them
#
# A rollout batch ("roll") is a dict of row tensors: prompt_ids, prompt_mask (B, P) left padded;
# completion_ids, completion_mask (B, N), the mask 1 on generated tokens up to and including EOS; finished
# (B,); plus whatever the stage adds (old_logps, ref_logps, adv, ...). Every log-prob of a completion, for the
# old policy, the reference, the policy in training and a teacher alike, comes from rollout.completion_logps.


@torch.no_grad()
def sample_and_verify(model, task, prompts, args, temperature, generator, rows=None, return_entropy=False):
    """One completion for each prompt (text) from model, decoded and verified -> (texts, verdicts, roll).

    Every stage that samples comes through here (rollouts, eval, self-generated pairs, PRM data). roll holds
    the rollout tensors: prompt_ids, prompt_mask (B, P) left padded; completion_ids, completion_mask (B, N),
    the mask 1 up to and including EOS; sampler_logps (B, N), the sampler's own log-probs (a diagnostic);
    finished (B,) whether the row emitted EOS; with return_entropy, entropy (B, N) of each step's distribution.
    rows: see sample_groups.
    """
    tok = task.tok
    s = rollout.generate(model, tok.prompts_ids(prompts), args.max_new_tokens,
                         temperature=temperature, eos_id=tok.stop_ids, generator=generator, pad_id=tok.pad_id,
                         autocast=args.amp, return_entropy=return_entropy, **(rows or {}))
    texts = [tok.decode(c) for c in s.completion_ids.tolist()]
    verdicts = [task.verify(p, t, done) for p, t, done in zip(prompts, texts, s.finished.tolist())]
    roll = {"prompt_ids": s.prompt_ids, "prompt_mask": s.prompt_mask, "completion_ids": s.completion_ids,
            "completion_mask": s.completion_mask, "sampler_logps": s.logps, "finished": s.finished}
    if return_entropy:
        roll["entropy"] = s.entropy
    return texts, verdicts, roll


def sample_groups(ctx, args, model):
    """Draw --batch-size prompts of ctx["prompts"] and sample --group-size completions of each with model (the
    rows of a group are consecutive), verified -> (prompts, texts, verdicts, roll), as sample_and_verify.

    Several processes: each rank samples the groups of its share of the prompts, with the noise and length
    budget of the whole batch, so its rows are those one process would have sampled."""
    chosen = [ctx["prompts"][i] for i in ctx["order"].take(args.batch_size)]
    mine, G = share(chosen), args.group_size
    prompts = [p for p in mine for _ in range(G)]
    rows = None
    if WORLD > 1:
        longest = max(len(ids) for ids in ctx["task"].tok.prompts_ids(chosen))
        rows = {"noise_rows": (RANK * len(prompts), len(chosen) * G), "stop_all": all_ranks_done,
                "max_prompt_len": longest}
    texts, verdicts, roll = sample_and_verify(model, ctx["task"], prompts, args, args.temperature, ctx["gen"],
                                              **({"rows": rows} if rows else {}))
    return prompts, texts, verdicts, roll


def all_ranks_done(done):
    """Whether every row of every rank has finished (the sampler stops only then, as one process would)."""
    return bool(all_sum(int(not bool(done.all()))) == 0)


def solve(model, task, prompts, n, temperature, args, seed, batch_rows=256, by_length=False, scores=None):
    """n completions per prompt -> (correct (P, n) bool, P * n texts, P * n completion id lists).

    A prompt's n samples are consecutive. The id lists are the sampled tokens themselves, up to and
    including EOS: the exact sequences, which decoded text is not (decode drops the special tokens).

    by_length (the eval stage): batch rows of equal prompt length together, up to batch_rows at a time, and
    return them in the usual order. Such a batch needs no padding mask, and its rows finish at about the same
    step, so the sampler wastes few decode steps on finished rows. The samples are different draws from the
    same distribution (the noise meets the rows in another order). scores: a dict that receives the
    sampler's "seq_logps" and "entropy" (summed over each completion) and "n_tokens", (P * n,) each, what a
    forward over the samples would compute again.
    """
    gen = torch.Generator(device=args.device).manual_seed(seed)
    rows = [p for p in prompts for _ in range(n)]
    lengths = [len(ids) for ids in task.tok.prompts_ids(prompts) for _ in range(n)] if by_length else None
    batches = row_batches(len(rows), batch_rows, lengths)
    correct, texts, completions = [None] * len(rows), [None] * len(rows), [None] * len(rows)
    seq_logps, entropy, n_tokens = [0.0] * len(rows), [0.0] * len(rows), [0] * len(rows)
    for idx in batches:
        t, verdicts, roll = sample_and_verify(model, task, [rows[i] for i in idx], args, temperature, gen,
                                              return_entropy=scores is not None)
        mask = roll["completion_mask"]  # (b, N)
        n_real = mask.sum(1).tolist()  # each completion's tokens, EOS included
        for j, (i, c) in enumerate(zip(idx, roll["completion_ids"].tolist())):
            texts[i], correct[i], completions[i] = t[j], verdicts[j].correct, c[:n_real[j]]
        if scores is not None:
            for j, (lp, ent) in enumerate(zip((roll["sampler_logps"] * mask).sum(1).tolist(),
                                              (roll["entropy"] * mask).sum(1).tolist())):
                seq_logps[idx[j]], entropy[idx[j]], n_tokens[idx[j]] = lp, ent, n_real[j]
    if scores is not None:
        scores.update(seq_logps=torch.tensor(seq_logps), entropy=torch.tensor(entropy),
                      n_tokens=torch.tensor(n_tokens))
    return torch.tensor(correct).view(len(prompts), n), texts, completions


def row_batches(n, batch_rows, lengths=None):
    """Index lists that cut rows 0 .. n - 1 into batches of at most batch_rows: consecutive rows, or, given
    each row's prompt length, rows of one length together (shortest first, in row order within a length)."""
    if lengths is None:
        return [list(range(i, min(i + batch_rows, n))) for i in range(0, n, batch_rows)]
    groups = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length, []).append(i)
    return [idx[i:i + batch_rows] for _, idx in sorted(groups.items()) for i in range(0, len(idx), batch_rows)]


def completion_rows(tok, prompts, completions, device):
    """Prompts (text) and completions (token ids, with their EOS if finished) -> the rollout tensors that
    sample_groups() returns: left-padded prompts, right-padded completions, masks."""
    prompt_ids, prompt_mask = rollout.left_pad(tok.prompts_ids(prompts), tok.pad_id)  # (B, P) x2
    roll = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": pad_right(completions, tok.pad_id),  # (B, N)
            "completion_mask": pad_right([[1] * len(c) for c in completions], 0),  # (B, N)
            "finished": torch.tensor([c[-1:] != [] and c[-1] in tok.stop_ids for c in completions])}  # (B,)
    return {k: v.to(device) for k, v in roll.items()}


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


def completion_forward(model, mb, args):
    """Training forward over [prompt; completion] -> completion log-probs (B, N) and the entropy (B, N) of each
    position, fp32, of logits / temperature: rollout.completion_logps, the one log-prob path, under the
    stage's autocast. The entropy carries a gradient only for an entropy bonus (--entropy-coef)."""
    with args.amp():
        return rollout.completion_logps(model, mb["prompt_ids"], mb["prompt_mask"], mb["completion_ids"],
                                        mb["completion_mask"], temperature=args.temperature, return_entropy=True,
                                        entropy_grad=getattr(args, "entropy_coef", 0) > 0)


def completion_scores(model, mb, args, shift=False):
    """Score head over [prompt; completion] -> one scalar per completion token, (B, N), fp32.

    shift=False: the score AT token t, i.e. after reading it. Reward models and PRMs judge what they have
                 read, so a step is scored at its own last token (the one exception to the
                 shift).
    shift=True:  the score at the position BEFORE token t, i.e. of the state in which token t is chosen: the
                 PPO critic's V(s_t), aligned with the policy's log-probs exactly as in completion_forward().

    A log-odds PRM (config.score_from "token_logodds", prm --prm-score logodds) reads no hidden state: its
    score at token t is a * m_t + b, where m_t = step_minimum of the written tokens' log-odds under the
    model's own LM head, and a, b are the head's weight and bias.
    """
    if model.config.score_from == "token_logodds":
        if shift:
            raise ValueError("a log-odds score head judges what it has read; it has no shifted (critic) reading")
        return model.score(logodds_features(model, mb, args).unsqueeze(-1)).squeeze(-1)  # (B, N)
    P = mb["prompt_ids"].shape[1]
    ids, attn = rollout.sequence(mb["prompt_ids"], mb["prompt_mask"], mb["completion_ids"],
                                 mb["completion_mask"])  # (B, P+N) each
    with args.amp():
        hidden = model(ids, attn_mask=attn, return_hidden=True)  # (B, P+N, D)
        scores = model.score(hidden).squeeze(-1).float()  # (B, P+N)
    return scores[:, P - 1:-1] if shift else scores[:, P:]  # (B, N)


def logodds_features(model, mb, args):
    """m (B, N) of a log-odds PRM: step_minimum of the written tokens' log-odds under model's LM head
    (temperature 1: the model's own distribution, whatever the stage samples at)."""
    P = mb["prompt_ids"].shape[1]
    ids, attn = rollout.sequence(mb["prompt_ids"], mb["prompt_mask"], mb["completion_ids"],
                                 mb["completion_mask"])  # (B, P+N) each
    with args.amp():
        logits = model(ids, attn_mask=attn)[:, P - 1:-1].float()  # (B, N, V): the distribution of each token
    return step_minimum(token_logodds(logits, mb["completion_ids"]), mb["completion_ids"],
                            mb["completion_mask"])


def token_logodds(logits, ids):
    """log p / (1 - p) of each written token under logits (B, N, V): its logit minus the log-sum-exp of every
    other token's logit (computed so, not from p, it stays exact where p rounds to 1 in fp32). -> (B, N)"""
    own = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (B, N)
    others = logits.scatter(-1, ids.unsqueeze(-1), float("-inf")).logsumexp(-1)  # (B, N)
    return own - others


def step_minimum(x, completion_ids, completion_mask):
    """At each completion token, the smallest x (B, N) so far in its step (a token's log-odds for the log-odds
    PRM, its log-prob for init_logp_check), and at an EOS the smallest over the whole completion. A step runs from the token after the previous ';' up to and including its own ';'; the
    answer step is labelled by the outcome, which any earlier step can spoil, hence its whole-completion
    minimum. Padding reads 0. -> (B, N)"""
    big = torch.finfo(x.dtype).max  # "nothing read yet"; finite, so no 0 * inf reaches the backward pass
    real = completion_mask.bool()
    cur = glob = torch.full_like(x[:, 0], big)  # (B,) the step's and the completion's minimum so far
    out = []
    for t in range(x.size(1)):
        xt = torch.where(real[:, t], x[:, t], torch.full_like(cur, big))  # (B,)
        cur, glob = torch.minimum(cur, xt), torch.minimum(glob, xt)
        out.append(torch.where(completion_ids[:, t] == arith.EOS, glob, cur))
        cur = torch.where(completion_ids[:, t] == STEP_END, torch.full_like(cur, big), cur)  # a new step begins
    return torch.where(real, torch.stack(out, 1), torch.zeros_like(x))  # (B, N)


@torch.no_grad()
def chunked_scores(model, roll, args, shift=False):
    """completion_scores of a whole rollout batch, in micro-batch chunks."""
    return torch.cat([completion_scores(model, {k: v[sl] for k, v in roll.items()}, args, shift)
                      for sl in chunks(len(roll["completion_ids"]), args.micro_batch_size)])  # (B, N)


# -----------------------------------------------------------------------------------------------------------
# held-out pass@1 before and after a stage (greedy, and sampled at T=1), on the same problems


def evaluate(model, task, problems, args, seed=0):
    """Greedy and sampled (T=1) correctness per held-out problem."""
    prompts = [r["prompt"] for r in problems]
    greedy = solve(model, task, prompts, 1, 0.0, args, seed)[0]  # (P, 1)
    out = {"greedy": greedy[:, 0].float().tolist()}
    if args.eval_samples > 0:
        sampled = solve(model, task, prompts, args.eval_samples, 1.0, args, seed)[0]  # (P, n)
        out["sampled"] = sampled.float().mean(1).tolist()  # per-problem fraction solved
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
# the table of stages: each section below ends with its rows


@dataclass
class Stage:
    regime: str  # where trajectories come from: "off-policy" (given data) or "on-policy" (own rollouts)
    role: str  # the survey's role: support expansion, policy reshaping, consolidation
    init: str | None  # the stage whose output is this stage's default starting point (None: from scratch)
    holds: str  # the models the stage keeps in memory
    setup: Callable | None = None  # (args, policy, task) -> ctx: data, and the frozen models the stage holds
    make_batch: Callable | None = None  # (ctx, args, step) -> (dict of row tensors incl. "w", logged stats)
    loss: Callable | None = None  # (ctx, args, micro-batch) -> (scalar loss, dict of metrics)
    defaults: dict = field(default_factory=dict)  # the stage's values for flags left unset
    score_head: bool = False  # the trained model is a scalar scorer (reward model, PRM), not a generator
    evaluate: Callable | None = None  # (ctx, args) -> dict: the stage's own held-out check (e.g. RM accuracy)
    pipeline_input: str = "init"  # the flag a pipeline sets to the previous stage's output (distill: teacher)
    run: Callable | None = None  # (user_args, name): a stage that trains nothing (eval) runs this, not the loop

STAGES = {}  # name -> Stage, in pipeline order; `--stage -h` lists them, the eval stage walks them in order


# ===========================================================================================================
# lm: pretrain, sft, rft -- next-token cross-entropy on demonstrations
#
# pretrain: every token of noisy worked solutions (data/pretrain.jsonl), from scratch: the base model.
# sft: supervised fine-tuning on clean demonstrations (sft.jsonl), the loss on the completion only
#      (InstructGPT, Ouyang et al. 2022, arXiv 2203.02155, Sec. 3.5). Off-policy, support expansion.
# rft: rejection-sampling fine-tuning: sample from the policy, keep what the verifier accepts, SFT on it.
#      STaR (Zelikman et al. 2022, arXiv 2203.14465: iterate sample, keep correct, fine-tune); RFT (Yuan et
#      al. 2023, arXiv 2308.01825: k samples per problem, distinct correct paths); also called expert
#      iteration or ReST-EM (Singh et al. 2023, arXiv 2312.06585). On-policy, policy reshaping.
# Differs from the papers (rft):
#   1. Fine-tuning continues from the current weights, and each round's set replaces the previous one
#      (STaR and ReST-EM restart from the base model each iteration; RFT samples once, from the SFT model).
#   2. Distinct by exact string (RFT compares the list of equations; here they are the same thing).
#   3. No rationalisation (STaR's retry with the answer as a hint for problems it failed).
#   4. A fixed number of steps per round (--steps / --rounds) instead of training each round to convergence.


def setup_pretrain(args, policy, task):
    # every token is a target; the first (BOS, if the tokenizer has one) never is, having no predecessor
    seqs = task.tok.documents([r["text"] for r in task.rows("pretrain")])
    return {"seqs": seqs, "n_prompt": [1] * len(seqs), "order": Shuffler(len(seqs), args.seed),
            "pad": task.tok.pad_id}


def setup_sft(args, policy, task):
    seqs, n_prompt = [], []
    for r in task.rows("sft"):
        p = task.tok.prompt_ids(r["prompt"])
        seqs.append(p + task.tok.completion_ids(r["completion"]))
        n_prompt.append(len(p))
    return {"seqs": seqs, "n_prompt": n_prompt, "order": Shuffler(len(seqs), args.seed), "pad": task.tok.pad_id}


def lm_stage_batch(ctx, args, step):
    return lm_batch(ctx, args, step), {}


def lm_batch(ctx, args, step):
    """The step's sequences packed into rows as wide as the longest of them: ids, labels and mask (B', T).

    Several short sequences share a row, each attending to itself only (mask numbers them 1, 2, ... and is 0 on
    the right padding; model.GPT._positions_and_mask), so a batch has about a quarter fewer positions (the
    arithmetic pretrain data: 86% of them real tokens, against 66% with one sequence per row) for the same loss:
    the same sequences, the same token mean. labels are IGNORE_INDEX on each sequence's prompt (incl. BOS) and on
    padding; the first token of a sequence is never a target, so no sequence learns from the one before it in its
    row. Rows are never wider than with one sequence per row, so a micro-batch of --micro-batch-size rows holds
    no more tokens than it would unpacked; the one new tensor is the attention mask the model builds from `mask`,
    (B', T, T).
    """
    idx = share(ctx["order"].take(args.batch_size))  # several processes: this rank's sequences of the batch
    seqs = [ctx["seqs"][i] for i in idx]
    T = max(map(len, seqs))
    rows = pack_rows([len(s) for s in seqs], T)
    ids = torch.full((len(rows), T), ctx["pad"], dtype=torch.long)  # (B', T)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # (B', T)
    mask = torch.zeros(len(rows), T, dtype=torch.long)  # (B', T) 0 padding, k the row's k-th sequence
    for row, members in enumerate(rows):
        start = 0
        for k, j in enumerate(members, 1):
            seq, end = torch.tensor(seqs[j]), start + len(seqs[j])
            ids[row, start:end], mask[row, start:end] = seq, k
            n_prompt = ctx["n_prompt"][idx[j]]  # no loss, hence no gradient, on prompt tokens
            labels[row, start + n_prompt:end] = seq[n_prompt:]
            start = end
    # w = tokens that carry loss in each row; the loop normalises by their total over the accumulated batch
    return {"ids": ids, "labels": labels, "mask": mask, "w": (labels[:, 1:] != IGNORE_INDEX).sum(1)}


def pack_rows(lengths, width):
    """First-fit decreasing bin packing: the indices of `lengths` grouped into rows whose lengths sum to at
    most width, longest first (ties in order), each into the first row with room for it."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            rows.append([i])
            room.append(width - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


def lm_loss(ctx, args, mb):
    model = ctx["policy"]
    with args.amp():
        hidden = model(mb["ids"], mb["mask"], return_hidden=True)  # (B, T, D), each packed sequence alone
        # the LM head a few rows at a time: each chunk's token mean, weighted by its share of the labelled
        # tokens, sums to the token mean of the whole micro-batch (with one chunk, sft_loss itself)
        n = (mb["labels"][:, 1:] != IGNORE_INDEX).sum(1)  # (B,)
        parts = rollout.over_head_chunks(lambda logits, labels, n_rows: sft_loss(logits, labels) * (
            n_rows.sum() / n.sum().clamp(min=1)), model, hidden, mb["labels"], n)
    return sum(parts), {}

STAGES["pretrain"] = Stage(
    regime="off-policy", role="support (base model)", init=None, holds="policy",
    setup=setup_pretrain, make_batch=lm_stage_batch, loss=lm_loss,
    defaults=dict(steps=1500, lr=3e-3, batch_size=64, micro_batch_size=64, warmup=100, ppo_epochs=1,
                  log_every=100, n_layer=4, n_embd=128, n_head=4, n_kv_head=2, max_seq_len=128))
STAGES["sft"] = Stage(
    regime="off-policy", role="support expansion", init="pretrain", holds="policy",
    setup=setup_sft, make_batch=lm_stage_batch, loss=lm_loss,
    defaults=dict(steps=200, lr=1e-3, batch_size=64, micro_batch_size=64, warmup=20, ppo_epochs=1,
                  log_every=50))


def setup_rft(args, policy, task):
    # not setup_grpo: RFT needs neither a reference nor a --reward scorer, only prompts and a generator
    return {**prompt_source(rl_prompts(task), args), "round": 0,
            "steps_per_round": math.ceil(args.steps / args.rounds)}


def rft_batch(ctx, args, step):
    """Every steps / rounds steps a round begins: --round-prompts prompts, --group-size samples each from the
    current policy; the verified-correct ones (deduplicated) replace the SFT set, and the steps until the next
    round are plain SFT batches of it (lm_loss: the prompt is masked). A round that keeps nothing gives empty
    batches, which the loop skips."""
    tok, stats = ctx["task"].tok, {}
    if step % ctx["steps_per_round"] == 0:
        prompts, texts, verdicts = [], [], []
        # BATCH_SIZE prompts x G samples per sampler call, which bounds the KV cache's memory
        for _ in range(math.ceil(args.round_prompts / args.batch_size)):
            p, t, v, _ = sample_groups(ctx, args, ctx["policy"])
            p, t, v = all_gather_lists(p), all_gather_lists(t), all_gather_lists(v)  # every rank: the whole round
            prompts, texts, verdicts = prompts + p, texts + t, verdicts + v
        kept = rft_keep(prompts, texts, verdicts)
        seqs = [tok.prompt_ids(p) + tok.completion_ids(c) for p, c in kept]
        ctx["data"] = {"seqs": seqs, "n_prompt": [len(tok.prompt_ids(p)) for p, _ in kept],
                       "order": Shuffler(len(seqs), args.seed + step), "pad": tok.pad_id}
        ctx["round"] += 1
        ctx["round_stats"] = {"round": ctx["round"], "kept_distinct": len(kept),
                              "kept_frac": sum(v.correct for v in verdicts) / len(verdicts),
                              "prompts_solved": len({p for p, _ in kept}) * args.group_size / len(prompts)}
    stats.update(ctx["round_stats"])
    if not ctx["data"]["seqs"]:
        empty = torch.zeros(0, 1, dtype=torch.long)
        return {"ids": empty, "labels": empty, "mask": empty, "w": torch.zeros(0)}, stats  # the loop skips it
    return lm_batch(ctx["data"], args, step), stats


def rft_keep(prompts, texts, verdicts):
    """The (prompt, completion) pairs worth imitating: verified correct (sample_groups already counts a
    completion cut off before EOS as wrong), each distinct pair once, in order of first appearance."""
    return list(dict.fromkeys((p, t) for p, t, v in zip(prompts, texts, verdicts) if v.correct))

STAGES["rft"] = Stage(
    regime="on-policy", role="policy reshaping (rejection sampling)", init="sft", holds="policy",
    setup=setup_rft, make_batch=rft_batch, loss=lm_loss,
    defaults=dict(steps=60, lr=1e-4, batch_size=64, micro_batch_size=64, warmup=0, ppo_epochs=1, log_every=5))


# ===========================================================================================================
# pairs: dpo and rm -- learning from preference pairs (prompt, chosen, rejected)
#
# dpo: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290, eq. 7):
#      -log sigmoid(beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))]), and its variants
#      --loss-type ipo (Azar et al. 2023, arXiv 2310.12036), hinge (SLiC-HF / RSO), simpo (Meng et al. 2024,
#      arXiv 2405.14734, no reference), cDPO (--label-smoothing), kto (Ethayarajh et al. 2024, arXiv
#      2402.01306: each pair as one desirable and one undesirable completion) and orpo (Hong et al. 2024,
#      arXiv 2403.07691: SFT on the chosen plus a log odds-ratio term, no reference). Loss at initialisation:
#      ln 2 (sigmoid), lambda / 2 per completion (kto).
# rm:  a Bradley-Terry reward model (InstructGPT, arXiv 2203.02155, Sec. 3.5, eq. 1): a scalar head on the
#      SFT model trained on -log sigmoid(r(x, y_c) - r(x, y_r)); ln 2 at initialisation (the head starts at
#      0). A sequence's score is the head's output at its EOS. It builds the reward that grpo / ppo
#      --reward rm optimise in place of the verifier.
# Regime: off-policy, trajectories the learner does not generate during training: --pairs given (a clean
# worked solution vs a corrupted one, written by the data generator) or --pairs self (the init's own samples,
# verified, drawn once before the first update). Role: policy reshaping.
# A batch keeps chosen and rejected as SEPARATE right-padded tensors, each (B, T) with a mask (B, T) that is
# 1 on the completion's tokens (EOS included), never one tensor half chosen.
# Differs from the papers:
#   1. dpo: the reference's log-probs are computed once, at setup, by a frozen copy of the init that is then
#      freed, not by a second model held through training: the same numbers, one model in memory (TRL's
#      precompute_ref_log_probs).
#   2. Preferences come from the task's verifier, not from human labellers: chosen is always correct,
#      rejected always wrong. --pairs self is the paper's "sample from the SFT model, then label" recipe with
#      the verifier as labeller (one round, like RSO or the first iteration of iterative DPO).
#   3. dpo: IPO and hinge use summed log-probs like DPO (the IPO authors average per token); SimPO averages,
#      as its paper does, counting EOS as a completion token.
#   4. dpo: no SFT-on-chosen warm start inside the stage: the init (by default the sft stage's output) is it.
#   5. dpo --rpo-alpha adds alpha * (the chosen completion's mean per-token NLL) to each pair's loss, as RPO
#      (Pang et al. 2024, arXiv 2404.19733, eq. 3) does for reasoning chains: plain DPO may lower the
#      likelihood of the chosen solutions too, as long as the rejected fall faster.
#   6. rm: InstructGPT puts all K-choose-2 comparisons of a prompt in one batch element; here a pair is a
#      row. The unused LM head stays in the checkpoint, so the folder still loads as a plain Llama model. No
#      reward normalisation (InstructGPT shifts the reward so that demonstrations score 0 on average).
#   7. kto: the data are pairs, split into their desirable and undesirable halves (KTO's point is that it
#      needs no pairs); its reference point z0 is the micro-batch's mean implied reward over those completions,
#      clamped at 0 and detached, where the paper averages over mismatched prompt-completion pairs.


def setup_dpo(args, policy, task):
    """Training and held-out pairs, and the frozen reference's log-probs of both (not for simpo), computed once
    here by a copy of the init that is then freed."""
    if args.beta is None:
        # SimPO's beta scales an average log-prob, DPO's (and KTO's) a sum
        args.beta = 2.0 if args.loss_type == "simpo" else 0.1
    ctx = setup_pairs(args, policy, task)
    if args.loss_type not in ("simpo", "orpo"):  # SimPO and ORPO have no reference
        ref = load_model(args.init_folder, args.device).eval().requires_grad_(False)
        for split in (ctx["train"], ctx["heldout"]):
            split["ref_chosen_logps"], split["ref_rejected_logps"] = pair_logps(ref, split, args)
        del ref  # never needed again
    return ctx


def setup_pairs(args, policy, task):
    """Training pairs (--pairs given or self) and held-out pairs, tokenised; dpo and rm share this."""
    heldout = None
    if args.pairs == "self":
        train = self_pairs(args, policy, task)
    elif task.name == "arith":
        train = encode_pairs(task.tok, task.rows("pairs"))
    else:
        # no generator of held-out pairs for a task of given files: hold out the last tenth of pairs.jsonl
        rows = task.rows("pairs")
        cut = len(rows) - len(rows) // 10
        train, heldout = encode_pairs(task.tok, rows[:cut]), encode_pairs(task.tok, rows[cut:])
    if not train:
        die("no preference pairs (--pairs self: no prompt got both a correct and a wrong sample; raise "
            "--pair-prompts or --group-size)")
    heldout = heldout_pairs(task, args) if heldout is None else heldout
    pad = task.tok.pad_id
    return {"train": {"pairs": train, "pad": pad}, "heldout": {"pairs": heldout, "pad": pad},
            "order": Shuffler(len(train), args.seed)}


def self_pairs(args, policy, task):
    """Pairs from the init policy's own samples: per prompt, a fully correct sample vs a wrong one.

    --group-size samples for each of --pair-prompts prompts (training_prompts, a seeded draw), sampled once,
    before any update. Chosen: the right answer AND every step right (the verifier's step labels); samples
    that reach the right answer through wrong steps are used for neither side, since preferring them teaches
    wrong arithmetic. Rejected: a wrong answer. A pair holds the sampled token ids themselves (up to and
    including EOS, or cut at the length limit), not a re-encoding of their text: exactly what the policy
    generated.
    """
    rng = random.Random(args.seed)
    pool = training_prompts(task)
    prompts, G = rng.sample(pool, min(args.pair_prompts, len(pool))), args.group_size
    correct, texts, completions = solve(policy, task, prompts, G, args.temperature, args, args.seed)
    n_ops = [len(arith.parse_prompt(p).ops) for p in prompts]
    pairs, n_clean = [], 0
    for i, prompt in enumerate(prompts):
        good, bad = [], []
        for j in range(i * G, (i + 1) * G):  # solve keeps a prompt's G samples together
            if not correct[i, j - i * G]:
                bad.append(completions[j])
            elif task.verify(prompt, texts[j]).step_labels == [1] * n_ops[i]:  # one right step per operation
                good.append(completions[j])
        n_clean += len(good)
        if good and bad:  # a prompt the policy always (or never) solves gives no pair
            pairs.append((task.tok.prompt_ids(prompt), rng.choice(good), rng.choice(bad)))
    print(f"[pairs] self: {len(pairs)} pairs from {len(prompts)} prompts x {G} samples ({correct.sum()} "
          f"samples correct, {n_clean} of them with every step right)")
    return pairs


def encode_pairs(tok, rows):
    """Text pairs [{"prompt", "chosen", "rejected"}] -> [(prompt ids, chosen ids, rejected ids)], + EOS."""
    return [(tok.prompt_ids(r["prompt"]), tok.completion_ids(r["chosen"]), tok.completion_ids(r["rejected"]))
            for r in rows]


def heldout_pairs(task, args):
    """Held-out pairs on the --eval-split prompts: the clean worked solution vs a corrupted one."""
    rng = random.Random(0)  # the same held-out pairs in every run, whatever --seed
    problems = [arith.parse_prompt(r["prompt"]) for r in heldout_problems(task, args)]
    rows = [{"prompt": p.prompt, "chosen": arith.solution(p), "rejected": arith.corrupt(p, rng)}
            for p in problems]
    return encode_pairs(task.tok, rows)


@torch.no_grad()
def pair_logps(model, split, args):
    """Summed completion log-probs of every pair's chosen and of its rejected completion: two (N,) tensors."""
    chosen, rejected = [], []
    for sl in chunks(len(split["pairs"]), args.micro_batch_size):
        b = pair_batch({"pairs": split["pairs"], "pad": split["pad"]}, list(range(sl.start, sl.stop)), args.device)
        chosen.append(sequence_logps(model, b["chosen_ids"], b["chosen_mask"], args).cpu())
        rejected.append(sequence_logps(model, b["rejected_ids"], b["rejected_mask"], args).cpu())
    return torch.cat(chosen), torch.cat(rejected)


def pair_batch(split, idx, device):
    """Pairs idx of a split {"pairs", "pad", optional "ref_chosen_logps", "ref_rejected_logps"} -> row tensors."""
    pairs = split["pairs"]
    batch = {}
    for side, k in (("chosen", 1), ("rejected", 2)):
        batch[side + "_ids"] = pad_right([pairs[i][0] + pairs[i][k] for i in idx], split["pad"])  # (B, T)
        # 1 on the completion's tokens, EOS included; 0 on BOS, the prompt and padding, for policy and reference alike
        batch[side + "_mask"] = pad_right([[0] * len(pairs[i][0]) + [1] * len(pairs[i][k]) for i in idx], 0)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in split:
            batch[key] = split[key][idx]  # (B,)
    batch["w"] = torch.ones(len(idx))  # one loss unit per pair: the loss is a mean over pairs
    return {k: v.to(device) for k, v in batch.items()}


def sequence_logps(model, ids, mask, args):
    """Summed completion log-probs (B,) of right-padded ids (B, T); mask (B, T) is 1 on completion tokens."""
    def summed(logits, ids, mask):
        logps = token_logprobs(logits, ids)  # (b, T-1): column t is the log-prob of token t+1
        # the mask shifts with the tokens: prompt and padding add exactly 0, to policy and reference alike
        return logps.masked_fill(mask[:, 1:] == 0, 0.0).sum(1)  # (b,)

    with args.amp():
        # right padding needs no attention mask: causal attention never lets a real token see the pads after it
        hidden = model(ids, return_hidden=True)  # (B, T, D)
        return torch.cat(rollout.over_head_chunks(summed, model, hidden, ids, mask))  # (B,)


def pair_stage_batch(ctx, args, step):
    return pair_batch(ctx["train"], share(ctx["order"].take(args.batch_size)), args.device), {}


def dpo_stage_loss(ctx, args, mb):
    losses, chosen_rewards, rejected_rewards = dpo_terms(ctx["policy"], args, mb)
    return losses.mean(), pair_metrics(chosen_rewards, rejected_rewards)


def dpo_terms(model, args, mb):
    """Per-pair losses (B,) of --loss-type and the implicit rewards of chosen and rejected (B,), detached."""
    chosen = sequence_logps(model, mb["chosen_ids"], mb["chosen_mask"], args)  # (B,) log pi(y_c | x)
    rejected = sequence_logps(model, mb["rejected_ids"], mb["rejected_mask"], args)  # (B,) log pi(y_r | x)
    chosen_avg = chosen / mb["chosen_mask"].sum(1)  # (B,) per-token average log-probs
    rejected_avg = rejected / mb["rejected_mask"].sum(1)  # (B,)
    if args.loss_type == "simpo":
        # no reference: SimPO's implicit reward is beta times the per-token average log-prob
        losses = simpo_loss(chosen_avg, rejected_avg, beta=args.beta, gamma=args.simpo_gamma)  # (B,)
        return losses, args.beta * chosen_avg.detach(), args.beta * rejected_avg.detach()
    if args.loss_type == "orpo":
        # no reference either; the rewards logged are the average log-probs themselves
        losses, _ = orpo_loss(chosen_avg, rejected_avg, lam=args.orpo_lambda)  # (B,)
        return losses, chosen_avg.detach(), rejected_avg.detach()
    if args.loss_type == "kto":
        # each pair is two unpaired examples, its chosen desirable and its rejected undesirable; z0, the
        # reference point, is the micro-batch's mean implied reward, clamped at 0 and detached
        policy = torch.cat([chosen, rejected])  # (2B,)
        ref = torch.cat([mb["ref_chosen_logps"], mb["ref_rejected_logps"]])  # (2B,)
        desirable = torch.arange(len(policy), device=policy.device) < len(chosen)  # (2B,)
        z0 = (policy - ref).mean().clamp(min=0).detach()
        losses, rewards = kto_loss(policy, ref, desirable, z0, beta=args.beta, desirable_weight=args.kto_weights[0],
                                   undesirable_weight=args.kto_weights[1])  # (2B,) each
        B = len(chosen)
        return (losses[:B] + losses[B:]) / 2, rewards[:B], rewards[B:]
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, mb["ref_chosen_logps"], mb["ref_rejected_logps"], beta=args.beta,
        loss_type=args.loss_type, label_smoothing=args.label_smoothing)  # 3 x (B,)
    if args.rpo_alpha > 0:
        losses = losses - args.rpo_alpha * chosen / mb["chosen_mask"].sum(1)  # + alpha * per-token NLL (B,)
    return losses, chosen_rewards, rejected_rewards


def dpo_evaluate(ctx, args):
    return heldout_pair_eval(ctx, args, dpo_terms)


@torch.no_grad()
def heldout_pair_eval(ctx, args, terms):
    """Accuracy and margin on the held-out pairs; terms(model, args, batch) -> (losses, chosen, rejected)."""
    split = ctx["heldout"]
    chosen, rejected = [], []
    # the same chunks as the reference log-probs at setup, so at init the margins are exactly 0 (accuracy 0.5)
    for sl in chunks(len(split["pairs"]), args.micro_batch_size):
        _, c, r = terms(ctx["policy"], args, pair_batch(split, list(range(sl.start, sl.stop)), args.device))
        chosen.append(c)
        rejected.append(r)
    if not chosen:
        return {}
    m = pair_metrics(torch.cat(chosen), torch.cat(rejected))
    return {"pair_acc": m["acc"], "pair_margin": m["margin"]}


def pair_metrics(chosen, rejected):
    """Preference accuracy (a tie counts half: equal rewards give 0.5), mean margin and rewards; (B,) each."""
    acc = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()  # (B,)
    return {"acc": acc.mean().item(), "margin": (chosen - rejected).mean().item(),
            "reward_chosen": chosen.mean().item(), "reward_rejected": rejected.mean().item()}

STAGES["dpo"] = Stage(
    regime="off-policy", role="policy reshaping", init="sft",
    holds="policy (reference log-probs precomputed at setup)",
    setup=setup_dpo, make_batch=pair_stage_batch, loss=dpo_stage_loss, evaluate=dpo_evaluate,
    defaults=dict(steps=100, lr=1e-4, batch_size=32, micro_batch_size=32, warmup=10, ppo_epochs=1,
                  log_every=10))


def setup_rm(args, policy, task):
    """The same pairs as dpo (--pairs given or self); no reference: the head starts at 0."""
    return setup_pairs(args, policy, task)


def rm_loss(ctx, args, mb):
    losses, chosen_scores, rejected_scores = rm_terms(ctx["policy"], args, mb)
    return losses.mean(), pair_metrics(chosen_scores, rejected_scores)


def rm_terms(model, args, mb):
    """Bradley-Terry losses (B,) and the scores of chosen and rejected (B,), detached, read at their EOS."""
    chosen = sequence_scores(model, mb["chosen_ids"], last_index(mb["chosen_mask"]), args)  # (B,)
    rejected = sequence_scores(model, mb["rejected_ids"], last_index(mb["rejected_mask"]), args)  # (B,)
    return reward_model_loss(chosen, rejected), chosen.detach(), rejected.detach()


def last_index(mask):
    """Index (B,) of the last 1 in each row of a 0/1 mask (B, T)."""
    return (mask * torch.arange(mask.size(1), device=mask.device)).argmax(1)  # (B,)


def sequence_scores(model, ids, last, args, attn_mask=None):
    """A score-head model's scalar per sequence (B,): its score at position last (B,) of ids (B, T).

    Convention (the rm stage, and whatever scores rollouts with a trained reward model): the score of a
    completion is read at the LAST real token of [bos] + prompt + completion + [eos], its EOS, the one
    position that has seen the whole completion. attn_mask (B, T) is needed only with left padding (rollouts).
    """
    with args.amp():
        hidden = model(ids, attn_mask=attn_mask, return_hidden=True)  # (B, T, D)
        scores = model.score(hidden).squeeze(-1).float()  # (B, T)
    return scores.gather(1, last[:, None]).squeeze(1)  # (B,)


def rm_evaluate(ctx, args):
    return heldout_pair_eval(ctx, args, rm_terms)

STAGES["rm"] = Stage(
    regime="off-policy", role="reward for policy reshaping", init="sft",
    holds="reward model (policy body + score head)", score_head=True,
    setup=setup_rm, make_batch=pair_stage_batch, loss=rm_loss, evaluate=rm_evaluate,
    defaults=dict(steps=400, lr=3e-4, batch_size=32, micro_batch_size=32, warmup=20, ppo_epochs=1,
                  log_every=50))


# ===========================================================================================================
# rl: grpo and ppo -- on-policy RL on the learner's own rollouts, with a clipped ratio
#
# grpo: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, Sec. 4.1, eq. 3):
#   for each prompt sample G completions from the current policy, score them (the verifier's outcome reward by
#   default), turn the rewards of each group into advantages (r - mean_group) / std_group, and take a few
#   clipped-ratio (PPO) steps on that batch; optionally penalise KL to the frozen initial policy. --advantage
#   rloo swaps in the leave-one-out baseline (RLOO, Ahmadian et al. 2024, arXiv 2402.14740).
# Differs from the paper (each is a flag):
#   1. No KL term by default (--kl-coef 0), as in DAPO and Dr. GRPO; the paper uses beta = 0.04 with k3 in
#      the loss (--kl-coef 0.04 --kl-in loss, k3 being the default there). The reference is held anyway, to
#      log the KL to it (kl_ref): how far the policy has drifted from its init is the first thing to watch.
#   2. token_mean aggregation (DAPO) by default, not the paper's per-sequence mean (--loss-agg
#      seq_mean_token_mean), which weighs the tokens of short completions more. An in-loss KL is aggregated
#      exactly like the surrogate, inside the same 1/|o_i| sum, as in eq. 3.
#   3. Dynamic sampling (DAPO) by default: groups whose outcome rewards are all equal have zero advantage, so
#      they are dropped before any log-prob is computed; no re-sampling to refill the batch.
#   4. Old log-probs come from a forward of the policy before the batch's first update, the same code and
#      micro-batches as the update's, not from the sampler, so the first ratio is exactly 1 (the sampler's own
#      log-probs are logged as a check, sampler_logp_gap).
#   5. A completion cut off by --max-new-tokens scores 0 whatever its text says.
#   6. --kl-in reward takes k1 only: k1 is the one estimator whose policy gradient through the reward is that
#      of KL(pi || ref) (see kl_penalty).
#   7. Dr. GRPO (--loss-agg seq_mean_token_sum_norm --no-std-scaling) divides by --max-new-tokens, the
#      generation budget, a constant; a long prompt that shortens the budget keeps the same divisor.
#   8. With several minibatches per rollout batch (--minibatch-size), the first pass takes the rows in
#      rollout order and later passes shuffle them (seeded).
#   9. Off by default, each a flag: --policy-loss gspo (GSPO's clipped sequence ratio) or cispo (CISPO's
#      clipped, detached token weight) in place of the clipped token ratio; --tis-cap (each token's loss
#      weighted by the truncated ratio of the trainer's to the sampler's probability); --entropy-coef (an
#      entropy bonus); --overlong-buffer (DAPO's soft overlong punishment, added to the reward after the
#      groups are chosen).
#  10. lr 5e-5: at 2e-4 GRPO collapsed from a weak sft model (measured over seeds in README).
#
# ppo: PPO for language models with a learned critic, GAE and a per-token KL penalty in the reward (RLHF-PPO).
#   Per token t of a sampled completion: r_t = -beta * (log pi_old(a_t) - log pi_ref(a_t)), plus the outcome
#   score on the last real token; A, returns = GAE(r, V_old) (gamma, lambda); A is whitened over the batch's
#   valid tokens; the loss is the clipped surrogate + vf_coef * the clipped value loss.
#   PPO, Schulman et al. 2017, arXiv 1707.06347 (eq. 7, 9); GAE, Schulman et al. 2015, arXiv 1506.02438;
#   per-token KL reward, Ziegler et al. 2019, arXiv 1909.08593 and InstructGPT, arXiv 2203.02155, eq. 2;
#   details as in Huang et al. 2024, arXiv 2403.17031 ("The N+ implementation details of RLHF with PPO").
# Differs from the paper:
#   1. The score is the task's verifier (0/1 outcome), or a learned RM / PRM with --reward; InstructGPT's is
#      always a learned RM. With --reward prm the reward is dense: each step's PRM probability minus 0.5 on
#      its end token (a step the PRM doubts costs, a step it trusts pays), instead of one score at the EOS.
#   2. No pretraining-mix term (InstructGPT's PPO-ptx) and no adaptive KL controller (Ziegler): beta is fixed.
#   3. The critic starts from the SFT policy with a zero score head (InstructGPT: from the reward model), and
#      shares the policy's AdamW, learning rate and global gradient clip (OpenRLHF: a separate optimizer).
#   4. --group-size samples per prompt only to spend the same rollouts per step as GRPO; GAE ignores groups.
#   5. The KL is k1 always (other --kl-kind values are refused); log pi_old is the policy's forward before
#      the update, not the sampler's, so that the first ratio is exactly 1.
#   6. The value loss is aggregated with --loss-agg, like the policy loss (as verl does).


def setup_grpo(args, policy, task):
    ctx = prompt_source(rl_prompts(task), args)
    # the frozen reference is a second copy of the init weights; same code path, so KL is exactly 0 at step 0.
    # Held even at --kl-coef 0 (the default), when it only feeds the logged kl_ref, at the cost of one forward
    # per batch: how far the policy has drifted from its init is the first thing to watch in an RL run.
    ctx["ref"] = load_model(args.init_folder, args.device).eval().requires_grad_(False)
    setup_reward(ctx, args)  # --reward rm | prm: the frozen scorer that replaces the verifier
    return ctx


def grpo_batch(ctx, args, step):
    G = args.group_size
    prompts, texts, verdicts, roll = sample_groups(ctx, args, ctx["policy"])
    mask = roll["completion_mask"].float()  # (B, N)
    outcome = torch.tensor([float(v.correct) for v in verdicts], device=mask.device)  # (B,) verifier outcome
    rewards = outcome
    stats = {"reward": outcome.mean().item(), "len": mask.sum(1).mean().item(),
             "cut_off": 1 - roll["finished"].float().mean().item()}
    steps = None
    if args.reward != "verifier":
        # another scorer replaces the verifier, whose accuracy stays logged as "reward" (see rollout_rewards)
        scores, steps = rollout_rewards(ctx, args, roll, verdicts, stats)  # (B,); prm, steps: (B, S) each
        rewards = scores.to(rewards.device)
    # Which groups carry a signal is decided on the outcome reward alone, BEFORE any KL is folded into it:
    # with the KL in the reward every group has some spread, so no group would ever be dropped, and an
    # all-right group would be normalised by a std made of KL noise alone.
    r = rewards.view(-1, G)  # (B/G, G)
    zero_std = (r == r[:, :1]).all(1)  # (B/G,) every reward of the group equal
    stats["zero_std_groups"] = zero_std.float().mean().item()
    if args.dynamic_sampling:
        # DAPO dynamic sampling: groups whose rewards are all equal have zero advantage and no gradient. They
        # are dropped before any log-prob is computed, which saves those forwards too.
        keep = (~zero_std).repeat_interleave(G)  # (B,)
        roll, rewards, outcome = {k: v[keep] for k, v in roll.items()}, rewards[keep], outcome[keep]
        if steps is not None:
            steps = {k: v[keep] for k, v in steps.items()}
        mask = roll["completion_mask"].float()  # (B', N)
        if not keep.any():  # every group all right or all wrong: nothing to learn, and the loop skips the step
            return {"w": torch.zeros(0)}, stats
    # old log-probs: the policy's own training forward before any update of this batch (not the sampler's
    # incremental ones), in the same micro-batch chunks as the update, so the first ratio is exactly 1; the
    # sampler's are kept only as a diagnostic
    roll["old_logps"] = chunked_logps(ctx["policy"], roll, args)  # (B', N)
    stats["sampler_logp_gap"] = ((roll["old_logps"] - roll["sampler_logps"]).abs() * mask).max().item()
    roll["ref_logps"] = chunked_logps(ctx["ref"], roll, args)  # (B', N)
    kl = kl_penalty(roll["old_logps"], roll["ref_logps"], kind=args.kl_kind, mask=mask)  # (B', N)
    stats["kl_ref"] = masked_mean(kl, mask).item()  # logged even when it is not penalised
    if args.kl_coef > 0 and args.kl_in == "reward":
        # KL as a per-sequence penalty folded into the reward before the group normalisation. kl_kind is k1
        # here (main refuses k2 / k3): only k1 in a reward has the gradient of KL(pi || ref).
        rewards = rewards - args.kl_coef * (kl * mask).sum(1)  # (B',)
    if args.overlong_buffer:
        # DAPO's length shaping, after the groups were chosen on the outcome: among the kept groups a long or
        # cut-off completion scores a little less than a short one with the same outcome
        rewards = rewards + overlong_penalty(mask.sum(1), args.max_new_tokens, args.overlong_buffer).to(rewards)
    if args.advantage == "rloo":
        adv = rloo_advantages(rewards, G)  # (B',)
    else:
        adv = group_advantages(rewards, G, scale_by_std=not args.no_std_scaling)  # (B',)
    if steps is not None:
        # process supervision (DeepSeekMath Sec. 4.1.3): a token's advantage is the sum of the group-normalised
        # step rewards of the steps that end at or after it (main refuses --kl-in reward with --reward prm or
        # steps: the KL folded into `rewards` above would be lost here)
        adv = process_advantages(steps["rewards"], steps["ends"], steps["mask"], G, mask.size(1))  # (B', N)
        if args.process_coef is not None:
            # outcome plus process (PRIME): the verifier decides which completion of a group is better, the
            # process term where within a completion the credit goes
            outcome_adv = group_advantages(outcome, G, scale_by_std=not args.no_std_scaling)  # (B',)
            adv = outcome_process_advantages(outcome_adv, adv, mask, args.process_coef)  # (B', N)
    roll["adv"] = adv
    add_tis_weights(roll, args, stats, mask)
    # w: the units the loss averages over, per row (tokens for token_mean, sequences otherwise; GSPO's loss is
    # a mean over sequences whatever --loss-agg says)
    per_token = args.loss_agg == "token_mean" and args.policy_loss != "gspo"
    roll["w"] = roll["completion_mask"].sum(1) if per_token else torch.ones(len(adv))
    return roll, stats


def add_tis_weights(roll, args, stats, mask):
    """--tis-cap: the truncated importance weights between the sampler's log-probs and the trainer's old ones,
    for every row (grpo and ppo); their statistics go into the step's log."""
    if args.tis_cap is not None:
        roll["tis_w"], m = tis_weights(roll["old_logps"], roll["sampler_logps"], mask, cap=args.tis_cap)
        stats.update({k: v.item() for k, v in m.items()})


def surrogate(logps, mb, args, mask):
    """The policy term of grpo and ppo (--policy-loss) on the batch's advantages, with the --tis-cap weights."""
    if args.policy_loss == "gspo":
        return gspo_loss(logps, mb["old_logps"], mb["adv"], mask, clip_low=args.clip_low, clip_high=args.clip_high)
    if args.policy_loss == "cispo":
        return cispo_loss(logps, mb["old_logps"], mb["adv"], mask, clip_high=args.clip_high, loss_agg=args.loss_agg,
                          norm_len=args.max_new_tokens, weights=mb.get("tis_w"))
    # Dr. GRPO's constant normaliser is the generation budget, the same for every batch
    return policy_loss(logps, mb["old_logps"], mb["adv"], mask, clip_low=args.clip_low, clip_high=args.clip_high,
                       dual_clip=args.dual_clip, loss_agg=args.loss_agg, norm_len=args.max_new_tokens,
                       weights=mb.get("tis_w"))


def entropy_bonus(loss, entropy, mask, args, metrics):
    """The token entropy (B, N), logged; with --entropy-coef c, minus c times it aggregated like the loss."""
    if args.entropy_coef > 0:
        loss = loss - args.entropy_coef * aggregate_loss(entropy, mask, args.loss_agg, norm_len=args.max_new_tokens)
    metrics["entropy"] = masked_mean(entropy.detach(), mask).item()
    return loss


def grpo_loss(ctx, args, mb):
    mask = mb["completion_mask"].float()  # (B, N)
    logps, entropy = completion_forward(ctx["policy"], mb, args)  # (B, N) each
    loss, metrics = surrogate(logps, mb, args, mask)
    if args.kl_coef > 0 and args.kl_in == "loss":
        kl = kl_penalty(logps, mb["ref_logps"], kind=args.kl_kind, mask=mask)  # (B, N), 0 on padding
        # GRPO eq. 3 puts the KL inside the same 1/|o_i| sum as the surrogate: aggregate it the same way, or
        # its weight would change with the micro-batch size under a sequence-level --loss-agg
        loss = loss + args.kl_coef * aggregate_loss(kl, mask, args.loss_agg, norm_len=args.max_new_tokens)
    return entropy_bonus(loss, entropy, mask, args, metrics), metrics

STAGES["grpo"] = Stage(
    regime="on-policy", role="policy reshaping", init="sft",
    holds="policy, reference (for the logged KL; in the loss if --kl-coef > 0), RM / PRM (with --reward)",
    setup=setup_grpo, make_batch=grpo_batch, loss=grpo_loss,
    defaults=dict(steps=40, lr=5e-5, batch_size=16, micro_batch_size=64, warmup=5, ppo_epochs=2, kl_coef=0.0,
                  dynamic_sampling=True, log_every=5))


def setup_ppo(args, policy, task):
    # prompts, their order, the sampler's generator, the frozen reference, the --reward scorer
    ctx = setup_grpo(args, policy, task)
    # The critic is a SEPARATE copy of the init weights with a zero-initialised score head (InstructGPT,
    # OpenRLHF), not a value head on the policy's trunk. A shared trunk is cheaper, but then value and policy
    # gradients pull on the same weights, and the value loss's scale (vf_coef) becomes a policy
    # hyper-parameter; with a separate critic the two objectives only meet in the advantages. It trains in the
    # loop's one optimizer via ctx["trainable"]; its LM head is never used, so it stays out.
    critic = load_model(args.init_folder, args.device, score_head=True)
    ctx["critic"] = critic
    ctx["trainable"] = [p for n, p in critic.named_parameters() if not n.startswith("lm_head.")]
    return ctx


def ppo_batch(ctx, args, step):
    """Sample, score, then per token: the k1 KL penalty of the reward, the outcome score on the last real token,
    the critic's values, GAE advantages (whitened over the batch's valid tokens) and returns."""
    prompts, texts, verdicts, roll = sample_groups(ctx, args, ctx["policy"])
    mask = roll["completion_mask"].float()  # (B, N)
    score = torch.tensor([float(v.correct) for v in verdicts], device=mask.device)  # (B,) verifier outcome
    stats = {"reward": score.mean().item(), "len": mask.sum(1).mean().item(),
             "cut_off": 1 - roll["finished"].float().mean().item()}
    steps = None
    if args.reward != "verifier":
        score, steps = rollout_rewards(ctx, args, roll, verdicts, stats)  # (B,); prm, steps: (B, S) each
    roll["old_logps"] = chunked_logps(ctx["policy"], roll, args)  # (B, N)
    roll["old_values"] = chunked_scores(ctx["critic"], roll, args, shift=True) * mask  # (B, N) V(s_t)
    ref_logps = chunked_logps(ctx["ref"], roll, args)  # (B, N)
    kl = kl_penalty(roll["old_logps"], ref_logps, kind="k1", mask=mask)  # (B, N) log pi_old - log pi_ref
    stats["kl_ref"] = masked_mean(kl, mask).item()
    if steps is None:
        rewards = ppo_token_rewards(score, kl, mask, args.kl_coef)  # (B, N)
    else:
        rewards = ppo_token_rewards(torch.zeros_like(score), kl, mask, args.kl_coef)  # (B, N) the KL part
        dense = (steps["rewards"] - 0.5) * steps["mask"]  # (B, S) a doubted step costs, a trusted one pays
        rewards.scatter_add_(1, steps["ends"], dense)  # (B, N) each step's reward on its end token
    adv, returns = gae(rewards, roll["old_values"], mask, gamma=args.gamma, lam=args.lam)  # (B, N) each
    # Whiten over the valid tokens of the whole batch (before it is split into minibatches): the policy's step
    # size then does not depend on the reward's scale. Biased variance, as OpenRLHF; padding stays 0.
    mean, var = batch_mean_var(adv, mask)  # over every rank's rows
    roll["adv"] = (adv - mean) * torch.rsqrt(var + 1e-8) * mask  # (B, N)
    roll["returns"], roll["rewards"] = returns, rewards  # rewards ride along for tests and inspection
    # explained variance of the critic at rollout time: 1 = perfect values, 0 = no better than a constant
    var_returns = masked_var(returns, mask).item()
    residual = masked_var(returns - roll["old_values"], mask).item()
    explained = 1 - residual / var_returns if var_returns else 0.0
    stats.update(value=masked_mean(roll["old_values"], mask).item(), explained_var=explained,
                 returns=masked_mean(returns, mask).item())
    add_tis_weights(roll, args, stats, mask)
    roll["w"] = roll["completion_mask"].sum(1) if args.loss_agg == "token_mean" else torch.ones(len(mask))
    return roll, stats


def ppo_token_rewards(score, kl, mask, kl_coef):
    """Per-token reward of RLHF-PPO: -kl_coef * KL at every completion token, plus the sequence score on the
    LAST REAL token (the EOS; never on the first pad after it). score (B,), kl and mask (B, N)."""
    last = mask.sum(1).long() - 1  # (B,) index of the last real token (completions are contiguous from 0)
    rewards = -kl_coef * kl * mask  # (B, N)
    rewards[torch.arange(len(score), device=mask.device), last] += score.to(rewards.dtype)
    return rewards  # (B, N)


def batch_mean_var(x, mask):
    """masked_mean and masked_var of x over the whole batch: with several processes, over every rank's rows."""
    if WORLD == 1:
        return masked_mean(x, mask), masked_var(x, mask)
    n, total = all_sum(mask.sum()), all_sum((x * mask).sum())
    mean = (total / n.clamp(min=1)).to(x)
    var = (all_sum((((x - mean) ** 2) * mask).sum()) / n.clamp(min=1)).to(x)
    return mean, var


def masked_var(x, mask):
    """Biased variance of x over the positions where mask is 1 (OpenRLHF's whitening uses the biased one)."""
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def ppo_loss(ctx, args, mb):
    mask = mb["completion_mask"].float()  # (B, N)
    logps, entropy = completion_forward(ctx["policy"], mb, args)  # (B, N) each
    loss, metrics = surrogate(logps, mb, args, mask)
    values = completion_scores(ctx["critic"], mb, args, shift=True)  # (B, N), with gradient into the critic
    # the value loss is aggregated like the policy loss (as verl does), so both weigh tokens alike and the
    # accumulated gradient does not depend on the micro-batch size
    v_loss = value_loss(values, mb["old_values"], mb["returns"], mask, clip=args.value_clip,
                        loss_agg=args.loss_agg, norm_len=args.max_new_tokens)
    metrics["value_loss"] = v_loss.detach()
    return entropy_bonus(loss, entropy, mask, args, metrics) + args.vf_coef * v_loss, metrics

STAGES["ppo"] = Stage(
    regime="on-policy", role="policy reshaping", init="sft",
    holds="policy, critic (trained), reference (for the KL in the reward), RM / PRM (with --reward)",
    setup=setup_ppo, make_batch=ppo_batch, loss=ppo_loss,
    defaults=dict(steps=60, lr=1e-4, batch_size=16, micro_batch_size=64, warmup=0, ppo_epochs=2, kl_coef=0.05,
                  log_every=5))


# ===========================================================================================================
# process: prm, and the learned rewards grpo and ppo can optimise (--reward prm | rm)
#
# prm: a process reward model, a score trained to say, at each step's end token, whether the step is
#   right: binary cross-entropy per step (Lightman et al. 2023, arXiv 2305.20050: per-step correctness;
#   Math-Shepherd, Wang et al. 2023, arXiv 2312.08935: labels from rollouts, hard estimate = any of N reaches
#   the answer, Sec. 3.2). Rows: --batch-size prompts x --group-size completions, fresh each step, sampled
#   from the frozen init on rl.jsonl prompts (--prm-data samples: the PRM then knows the policy's own
#   mistakes) or the noisy worked solutions of pretrain.jsonl (--prm-data pretrain). Labels (--prm-labels):
#   the verifier's local step labels, or Math-Shepherd Monte-Carlo labels (can the init still reach the right
#   answer from here? --mc-rollouts tries). The answer "#N" is a last step, scored at the EOS and labelled by
#   the outcome. --prm-data mixed: the init's samples plus as many noisy worked solutions of pretrain.jsonl
#   per step (more wrong steps to learn from; held out are the samples). --prm-tokens: the score is also
#   trained at every token of a step, 1 until the step's first wrong token and 0 from it (the mistake's
#   position, from the verifier), so the PRM is told where a step went wrong, not only that it did.
#   What the score reads (--prm-score): logodds (the default) = a * m + b, m the smallest log p / (1 - p) of
#   a token the step wrote, under the PRM's own LM head, so the PRM is a language model that judges a step
#   by how surprised it is by the step's least expected token; a and b are fitted to the init before step 1
#   (logodds_head), then the whole model trains. hidden = a linear head on the hidden state at the step's
#   end token, which reads what the model expects NEXT and has to learn to look back at what was written
#   (held out, on this task, it flagged 22-64% of the wrong steps after 300 steps; logodds flags nearly all).
# --reward prm: process supervision (DeepSeekMath, arXiv 2402.03300, Sec. 4.1.3): the PRM's probability that
#   each step is right, sigmoid(score) at the step's end token, becomes a step reward; grpo turns the step
#   rewards into advantages with process_advantages. --reward steps: the same, with the verifier's own step
#   labels in place of the PRM (an oracle PRM, the upper bound of process supervision on this task: it tells
#   whether the formula or the PRM is at fault). --process-coef C (grpo): the verifier's outcome advantage plus
#   C times the process advantage, centred on each completion (outcome_process_advantages, after PRIME, arXiv
#   2502.01456). --reward rm: the Bradley-Terry score at the EOS replaces the verifier's 0/1. Every path
#   follows the cut-off rule (see rollout_rewards): an unfinished completion scores as wrong.
# Differs from the papers:
#   1. A scalar score with binary cross-entropy, not the LM predicting a label token. The default score
#      (--prm-score logodds) is read from the LM head, as an implicit PRM's is (Yuan et al. 2024, arXiv
#      2412.01981: per-token rewards beta * log(pi / pi_ref), trained on outcome labels only); ours is the
#      step's smallest token log-odds under the PRM alone, scaled and shifted, and trained on step labels.
#   2. Verifier labels are exact and LOCAL (a right step after an earlier mistake is right); PRM800K has human
#      labels, Math-Shepherd's "still reaches the answer" labels are what --prm-labels mc estimates.
#   3. Math-Shepherd's completer is a separately fine-tuned model with N = 8; ours is the init policy itself
#      with --mc-rollouts (default 4), and only the hard estimate.
#   4. The answer is a step of its own, labelled by the outcome, so a wrong final answer after right steps is
#      still penalised; Math-Shepherd's last step holds the answer, DeepSeekMath's PRM scores steps only.
#   5. Fresh completions every step (no fixed dataset, no epochs).
#   6. Step reward = sigmoid(PRM logit), a probability in (0, 1); the paper does not say how the PRM's output
#      becomes a number. The PRM stays frozen during RL; DeepSeekMath's iterative RL retrains it on the
#      policy's new samples.
#   7. The PRM's cross-entropy is class-balanced by default (--prm-balance): most sampled steps are right, and
#      the plain mean is met by a PRM that calls nearly everything right.
#   8. The cut-off rule (0 for every step of an unfinished completion, and a closing 0 step) is ours; the
#      papers do not say what a process reward does with a completion that hit the length limit.
#   9. --prm-tokens trains on token-level labels that no paper's PRM has; the score is read at the ';' as
#      without it.
#  10. Outcome plus process centres the process term per completion, which PRIME does not (see
#      outcome_process_advantages): that makes a right, finished solution outrank every wrong or unfinished one
#      of its group, whatever the PRM says.


def setup_reward(ctx, args):
    """--reward rm | prm: load the frozen scorer (OUT_DIR/rm or OUT_DIR/prm, trained first if missing)."""
    if args.reward in ("verifier", "steps"):
        return
    if args.reward not in STAGES:
        die(f"--reward {args.reward} needs a stage {args.reward!r}, and there is none")
    folder = args.stage_output(args.reward)
    print(f"[reward] {args.reward} from {folder}")
    ctx["reward_model"] = load_model(folder, args.device, score_head=True).eval().requires_grad_(False)


@torch.no_grad()
def rollout_rewards(ctx, args, roll, verdicts, stats):
    """The --reward scorer's verdict on a rollout batch, in place of the verifier's 0/1.

    --reward rm:    a Bradley-Terry reward model's sequence score, read at the completion's last real token (the
                    EOS of [bos] + prompt + completion + [eos], where the RM was trained to score). Returns
                    (rewards (B,), None); the caller uses them exactly like the verifier's 0/1.
    --reward prm:   the PRM's probability that each step is right, sigmoid(score) at the step's end token (every
                    ';', and the EOS closing the answer).
    --reward steps: the verifier's own local step labels (the oracle PRM), and its outcome for the answer step.
    prm and steps return (per-row mean step reward (B,), for logging and dynamic sampling, and {"rewards",
    "ends", "mask"} each (B, S)) for process_advantages / PPO's dense reward.

    THE CUT-OFF RULE, in every reward path: a completion that never emitted EOS (it reached --max-new-tokens)
    scores as wrong. The verifier calls it wrong (Task.verify); the RM gives it the batch's lowest score; a
    process reward gives each of its steps 0, the reward of a wrong step, and closes it with a 0 answer step on
    its last token. Without the rule a process reward pays for steps and never for finishing: a cut-off
    completion keeps the scores of its plausible steps and has no answer step to be doubted on, and outranks the
    right, finished solutions of its group.

    NOTE: a frozen learned reward can be exploited: the policy finds completions the scorer likes and the
    verifier does not. The verifier's accuracy is therefore always logged beside it ("reward"), with the
    fraction cut off ("cut_off") and the length ("len").
    """
    mask, finished = roll["completion_mask"], roll["finished"]  # (B, N), (B,)
    if args.reward == "steps":
        # the PRM's training rows with the cut-off rule: the labels a perfect PRM would learn to give
        rows = prm_rows(roll, verdicts, [v.step_labels for v in verdicts], close=finished)
        step_rewards, step_mask = rows["step_labels"].to(mask.device), rows["step_mask"]  # (B, S) each
        stats["step_reward"] = masked_mean(step_rewards, step_mask).item()
        return masked_mean(step_rewards, step_mask, dim=1), {"rewards": step_rewards, "ends": rows["step_ends"],
                                                             "mask": step_mask}
    model = ctx["reward_model"]
    if args.reward == "rm":
        P = roll["prompt_ids"].shape[1]
        ids, attn = rollout.sequence(roll["prompt_ids"], roll["prompt_mask"], roll["completion_ids"],
                                     mask)  # (B, P+N) each
        last = P + mask.sum(1) - 1  # (B,) the last real token: the EOS of a finished completion
        rewards = torch.cat([sequence_scores(model, ids[sl], last[sl], args, attn_mask=attn[sl])
                             for sl in chunks(len(ids), args.micro_batch_size)])  # (B,)
        # A cut-off completion never reached the [eos] the RM learned to score at, and the verifier would call
        # it wrong: give it the lowest score of the batch rather than an out-of-distribution guess (TRL
        # instead subtracts a fixed missing_eos_penalty).
        rewards = torch.where(roll["finished"], rewards, rewards.min())  # (B,)
        stats["rm_score"] = rewards.mean().item()
        return rewards, None
    scores = chunked_scores(model, roll, args)  # (B, N) the PRM's score after reading each completion token
    ends, step_mask = step_positions(roll["completion_ids"], mask, close=finished)  # (B, S), (B, S)
    step_rewards = torch.sigmoid(scores.gather(1, ends)) * step_mask  # (B, S)
    # the PRM's own mean score, before the cut-off rule: what the policy could learn to please
    stats["prm_step_reward"] = masked_mean(step_rewards, step_mask).item()
    step_rewards = step_rewards * finished[:, None].to(step_rewards)  # (B, S) the cut-off rule
    seq_rewards = masked_mean(step_rewards, step_mask, dim=1)  # (B,)
    return seq_rewards, {"rewards": step_rewards, "ends": ends, "mask": step_mask}


STEP_END = arith.VOCAB[";"]  # every ';' closes one worked step (char-level tokenizer: one token)


def step_positions(completion_ids, completion_mask, close=None):
    """Index of the end token of every step of each completion: each ';', then the EOS that closes the answer.

    The answer "#N" counts as the last step, so a PRM judges the answer too (Math-Shepherd's last step holds
    the answer); a cut-off completion has no EOS, hence no answer step, unless close (B,) bool is given: then
    every row where close is False ends with a step at its last real token (if that is not a ';' already), the
    cut-off answer step of the rewards. Returns ends (B, S) long and step_mask (B, S), padded with 0 on the
    right (S = most steps in the batch).
    """
    real = completion_mask.bool()  # (B, N)
    is_end = real & ((completion_ids == STEP_END) | (completion_ids == arith.EOS))  # (B, N)
    if close is not None:
        last = completion_mask.sum(1, keepdim=True) - 1  # (B, 1)
        at_last = torch.arange(real.size(1), device=real.device)[None] == last  # (B, N)
        is_end |= real & at_last & ~close.bool().to(real.device)[:, None]
    rows = [torch.nonzero(row).squeeze(1).tolist() for row in is_end.cpu()]
    ends = pad_right(rows + [[0]], 0)[:-1]  # (B, S); the dummy last row makes S >= 1
    step_mask = pad_right([[1] * len(r) for r in rows] + [[0]], 0)[:-1]  # (B, S)
    return ends.to(completion_ids.device), step_mask.to(completion_ids.device)


def setup_prm(args, policy, task):
    tok = task.tok
    ctx = prompt_source(rl_prompts(task), args)
    if args.prm_data in ("samples", "mixed") or args.prm_labels == "mc":
        # the frozen init policy: it writes the training completions (the PRM must judge the steps and
        # mistakes of the policy it will reward) and, with --prm-labels mc, the rollouts that estimate the
        # labels
        sampler = args.prm_policy or args.init_folder
        ctx["sampler"] = load_model(sampler, args.device).eval().requires_grad_(False)
        if args.prm_policy and load_task(args, sampler).tok.identity() != tok.identity():
            die(f"--prm-policy {sampler} has another tokenizer than the PRM's init {args.init_folder}")
    if args.prm_data in ("pretrain", "mixed"):
        texts = task.rows("pretrain")
        # "37+48-19=37+48=85;..." -> prompt up to and including the first '=', the rest is the completion
        ctx["solutions"] = [(r["text"][:r["text"].index("=") + 1], r["text"][r["text"].index("=") + 1:])
                            for r in texts]
        ctx["solution_order"] = Shuffler(len(ctx["solutions"]), args.seed)
    # Held-out steps, drawn once (fixed seed) so that before and after see the same ones: completions of the
    # same kind as the training data for the first --eval-problems held-out prompts, --eval-samples each.
    prompts = [r["prompt"] for r in heldout_problems(task, args)]
    ctx["heldout"] = None
    if prompts:
        ctx["heldout"] = fixed_prm_rows(ctx, args, task, prompts, max(1, args.eval_samples), seed=0)
        if "sampler" in ctx:
            ctx["heldout_init_logp"] = init_logp_check(ctx["sampler"], ctx["heldout"], args)
    if args.prm_score == "logodds":
        logodds_head(ctx, args, task, policy)
    elif policy.config.score_from != "hidden":  # a log-odds PRM as the init of a hidden-state one
        policy.new_score_head("hidden")
    return ctx


def fixed_prm_rows(ctx, args, task, prompts, n, seed):
    """PRM rows drawn once with a fixed seed (held out, or the log-odds head's fit): n completions for each of
    prompts of the kind the PRM trains on, the init policy's samples (--prm-data samples, mixed) or noisy
    worked solutions (pretrain), with their step labels. The same rows on every rank (nothing is shared)."""
    tok = task.tok
    rows = [p for p in prompts for _ in range(n)]
    if args.prm_data == "pretrain":
        rng = random.Random(seed)
        texts = [arith.solution(arith.parse_prompt(p), rng, arith.PRETRAIN_ERROR_RATE) for p in rows]
        completions = [tok.completion_ids(t) for t in texts]
    else:
        _, texts, completions = solve(ctx["sampler"], task, prompts, n, args.temperature, args, seed=seed)
    # mc labels estimate "can the policy still reach the answer from here?", which are the prefix labels
    verdicts = [task.verify(p, t, tok.eos_id in c) for p, t, c in zip(rows, texts, completions)]
    labels = [v.prefix_labels if args.prm_labels == "mc" else v.step_labels for v in verdicts]
    return prm_rows(completion_rows(tok, rows, completions, args.device), verdicts, labels)


PRM_FIT_PROMPTS = 128  # rl.jsonl prompts (x --group-size completions) the log-odds head's scale and bias fit on


def logodds_head(ctx, args, task, policy):
    """--prm-score logodds: make the PRM's score head read the log-odds of its own LM head (score_from
    "token_logodds", see completion_scores), with its scale a and bias b fitted before the first step.

    The step logit is a * m + b, where m is the smallest log p / (1 - p) of a token written in the step. A
    Linear(1, 1) at --lr would take thousands of steps to travel from a = 1, b = 0 to where the classes part
    (b came out between -5.0 and -2.7 for this task's sft policies), so a and b are first fitted to the init
    as it is: the class-balanced cross-entropy (prm_loss, as the training loss weighs classes) of a * m + b on
    the step labels of PRM_FIT_PROMPTS rl.jsonl prompts, --group-size completions each, sampled with the seed
    --seed + 1 (not the training batches', and not held out), minimised by L-BFGS. Training then moves a, b
    and the whole body. An init that already is a log-odds PRM keeps its a and b.
    """
    if policy.config.score_from == "token_logodds":
        return
    policy.new_score_head("token_logodds")
    prompts = random.Random(args.seed + 1).sample(rl_prompts(task), min(PRM_FIT_PROMPTS, len(rl_prompts(task))))
    rows = fixed_prm_rows(ctx, args, task, prompts, args.group_size, seed=args.seed + 1)
    with torch.no_grad():
        m = torch.cat([logodds_features(policy, {k: v[sl] for k, v in rows.items()}, args)
                       for sl in chunks(len(rows["completion_ids"]), args.micro_batch_size)])  # (B, N)
    valid = rows["step_mask"].bool()
    z, y = m.gather(1, rows["step_ends"])[valid].double(), rows["step_labels"][valid].double()  # (K,) each
    a, b = fit_scale_bias(z, y, args.prm_balance)
    with torch.no_grad():
        policy.score.weight.fill_(a), policy.score.bias.fill_(b)
    print(f"[prm] log-odds head fitted on {len(z)} steps ({int((y < 0.5).sum())} wrong): "
          f"logit = {a:.3f} m {'-' if b < 0 else '+'} {abs(b):.3f}")


def fit_scale_bias(z, y, balance):
    """a, b minimising prm_loss(a * z + b, y) (balanced or not) over K steps: z (K,) feature, y (K,) labels.
    One class alone has no finite optimum: then a = 1, b = 0 stays (the probability of the step is its least
    likely token's)."""
    if bool((y > 0.5).all()) or bool((y < 0.5).all()):
        print("[prm] the log-odds head's fit saw one class only: a = 1, b = 0")
        return 1.0, 0.0
    a = torch.ones((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")
    ones = torch.ones(1, len(z), dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = prm_loss((a * z + b)[None], y[None], ones, balance=balance)
        loss.backward()
        return loss

    opt.step(closure)
    return a.item(), b.item()


@torch.no_grad()
def init_logp_check(model, rows, args):
    """step_auc and step_balanced_accuracy_best of an untrained step score: model's smallest token log-prob
    within each ';' step of the held-out PRM rows (a step starts after the previous step's end)."""
    m = step_minimum(chunked_logps(model, rows, args), rows["completion_ids"], rows["completion_mask"])  # (B, N)
    semicolon = rows["step_mask"].bool() & (rows["completion_ids"].gather(1, rows["step_ends"]) == STEP_END)
    z, labels = m.gather(1, rows["step_ends"])[semicolon], rows["step_labels"][semicolon].bool()  # (K,) each
    if len(z) == 0:
        return {}
    return {"init_logp_step_auc": ranking_auc(z, labels),
            "init_logp_step_balanced_accuracy_best": best_balanced_accuracy(z, labels)[0]}


def ranking_auc(scores, labels):
    """P(score of a random positive > score of a random negative), ties counting half (Mann-Whitney U /
    (n_pos n_neg)); nan without both classes. scores (K,) float, labels (K,) bool."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = torch.cat([pos, neg]).double()
    ranks = torch.empty_like(order)
    sorted_vals, idx = order.sort()
    ranks[idx] = torch.arange(1, len(order) + 1, dtype=torch.float64)
    for v in sorted_vals.unique():  # tied values share their mean rank
        tied = order == v
        ranks[tied] = ranks[tied].mean()
    return ((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))).item()


def best_balanced_accuracy(scores, labels):
    """The highest balanced accuracy of "positive iff score >= t" over every threshold t, and that t.
    scores (K,) float, labels (K,) bool; (nan, nan) without both classes."""
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    s, order = scores.sort(descending=True)
    lab = labels[order].double()
    # t = s[k] calls the top k + 1 positive; only the last of a run of tied scores is a real choice
    tpr, fpr = lab.cumsum(0) / n_pos, (1 - lab).cumsum(0) / n_neg  # (K,)
    bal = (tpr + 1 - fpr) / 2
    bal[:-1][s[1:] == s[:-1]] = 0.0
    k = int(bal.argmax())
    return bal[k].item(), s[k].item()


def prm_batch(ctx, args, step):
    """Fresh PRM training rows: sampled and/or pretrain completions (--prm-data), their step labels
    (--prm-labels) and the step end positions, via prm_rows."""
    task, tok = ctx["task"], ctx["task"].tok
    prompts, texts, verdicts, completions = [], [], [], []
    if args.prm_data in ("samples", "mixed"):
        # the frozen init writes the completions, not the PRM in training
        prompts, texts, verdicts, roll = sample_groups(ctx, args, ctx["sampler"])
        lengths = roll["completion_mask"].sum(1).tolist()
        completions = [c[:m] for c, m in zip(roll["completion_ids"].tolist(), lengths)]
    if args.prm_data in ("pretrain", "mixed"):
        rows = [ctx["solutions"][i] for i in share(ctx["solution_order"].take(args.batch_size * args.group_size))]
        prompts += [p for p, _ in rows]
        texts += [t for _, t in rows]
        verdicts += [task.verify(p, t) for p, t in rows]
        completions += [tok.completion_ids(t) for _, t in rows]
    roll = completion_rows(tok, prompts, completions, args.device)
    if args.prm_labels == "mc":
        labels = mc_step_labels(prompts, texts, verdicts, lambda p, c: sample_continuations(ctx, args, p, c),
                                args.mc_rollouts)
        batch = prm_rows(roll, verdicts, labels)
    elif args.prm_tokens:
        batch = prm_token_rows(roll, prompts, texts, verdicts)
    else:
        batch = prm_rows(roll, verdicts, [v.step_labels for v in verdicts])
    step_mask = batch["step_mask"].float()  # (B, S)
    stats = {"outcome": sum(v.correct for v in verdicts) / len(verdicts),
             "steps": step_mask.sum(1).mean().item(),
             "label_base_rate": masked_mean(batch["step_labels"], step_mask).item()}
    return batch, stats


def prm_rows(roll, verdicts, labels, close=None):
    """A rollout batch + per-step labels -> PRM training rows: the step end positions, their labels and mask.

    labels[b] labels the ';'-steps of row b; the answer step (at the EOS) is labelled by the outcome.
    close (B,) bool, for rewards: the cut-off rule, as in step_positions; a row where it is False gets a
    closing step and every one of its steps labelled 0.
    """
    ends, step_mask = step_positions(roll["completion_ids"], roll["completion_mask"], close=close)  # (B, S)
    rows = []
    for b, (v, lab) in enumerate(zip(verdicts, labels)):
        finished = bool((roll["completion_ids"][b] == arith.EOS).any())
        if close is not None and not bool(close[b]):
            rows.append([0] * int(step_mask[b].sum()))  # cut off: wrong, every step of it
            continue
        rows.append(list(lab) + [int(v.correct)] * finished)
        # ';' tokens before the EOS are exactly the ';' characters of the decoded text the verifier read
        assert len(rows[-1]) == int(step_mask[b].sum()), "step labels and step positions disagree"
    return scored_rows(roll, [r[:len(lab)] for r, lab in zip(ends.tolist(), rows)], rows)


def scored_rows(roll, positions, labels):
    """PRM rows from per-row lists of scored completion positions and their 0/1 labels: step_ends,
    step_labels and step_mask (B, S), padded on the right, with the rollout tensors and w, each row's
    number of scored positions (prm_loss is a mean over them)."""
    empty = [[0]]  # a dummy last row makes S >= 1
    device = roll["completion_ids"].device
    step_mask = pad_right([[1] * len(r) for r in labels] + empty, 0)[:-1].to(device)  # (B, S)
    out = {k: roll[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    out.update(step_ends=pad_right(positions + empty, 0)[:-1].to(device),
               step_labels=pad_right(labels + empty, 0)[:-1].float().to(device), step_mask=step_mask,
               w=step_mask.sum(1))
    return out


def prm_token_rows(roll, prompts, texts, verdicts):
    """prm_rows with a label at every token of every step (--prm-tokens), not only at its ';': 1 while the
    step still reads as the right one, 0 from its first wrong token on (data.task.token_labels), so each ';'
    keeps its step label and the answer step (at the EOS) its outcome. The same keys as prm_rows: step_ends
    (B, S) then indexes every labelled token."""
    rows, ends = [], []
    for b, (p, t, v) in enumerate(zip(prompts, texts, verdicts)):
        labels = arith.token_labels(p, t)  # one per character up to the last ';' (= one per token)
        finished = bool(roll["finished"][b])
        eos = [int(roll["completion_mask"][b].sum()) - 1] * finished  # the answer step, at the EOS
        ends.append(list(range(len(labels))) + eos)
        rows.append(labels + [int(v.correct)] * finished)
    return scored_rows(roll, ends, rows)


@torch.no_grad()
def sample_continuations(ctx, args, prompts, prefixes):
    """Let the frozen init policy finish each prompt + prefix (a partial completion): full completion texts,
    and whether each ended with EOS."""
    tok, model, texts, finished = ctx["task"].tok, ctx["sampler"], [], []
    for sl in chunks(len(prompts), 512):
        ids = [tok.prompt_ids(p) + tok.encode(c) for p, c in zip(prompts[sl], prefixes[sl])]
        s = rollout.generate(model, ids, args.max_new_tokens, temperature=args.temperature, eos_id=tok.stop_ids,
                             generator=ctx["gen"], pad_id=tok.pad_id, autocast=args.amp)
        texts += [prefix + tok.decode(c) for prefix, c in zip(prefixes[sl], s.completion_ids.tolist())]
        finished += s.finished.tolist()
    return texts, finished


def mc_step_labels(prompts, texts, verdicts, complete, n):
    """Math-Shepherd hard-estimate step labels: step k of a completion is 1 iff at least one of n completions
    continued from the prefix that ends with step k's ';' reaches the right answer (and ends with EOS).

    complete(prompts, prefixes) -> (full completion texts, finished flags) does the continuing; in posttrain
    it is sample_continuations (the frozen init policy), in the tests an oracle. Returns one label list per
    row.
    """
    jobs = [(i, t[:end + 1]) for i, (t, v) in enumerate(zip(texts, verdicts)) for end in v.step_ends]
    labels = [[] for _ in texts]
    if not jobs:
        return labels
    reps = [job for job in jobs for _ in range(n)]  # n consecutive copies of each prefix
    full, finished = complete([prompts[i] for i, _ in reps], [prefix for _, prefix in reps])
    hits = [done and arith.verify(prompts[i], t).correct for (i, _), t, done in zip(reps, full, finished)]
    for k, (i, _) in enumerate(jobs):
        labels[i].append(int(any(hits[k * n:(k + 1) * n])))
    return labels


def prm_loss_fn(ctx, args, mb):
    scores = completion_scores(ctx["policy"], mb, args)  # (B, N): no shift, a step is judged at its end token
    step_logits = scores.gather(1, mb["step_ends"])  # (B, S)
    loss = prm_loss(step_logits, mb["step_labels"], mb["step_mask"], balance=args.prm_balance)
    acc = masked_mean(((step_logits > 0).float() == mb["step_labels"]).float(), mb["step_mask"])
    return loss, {"step_acc": acc.detach()}


@torch.no_grad()
def prm_evaluate(ctx, args):
    """Held-out PRM accuracy at threshold 0.5, on the ';'-steps and on the answer step separately.

    prm_step_base_rate is the fraction of right steps: always answering "right" scores max(base, 1 - base),
    and balanced accuracy (mean of the accuracies on right and on wrong steps) is 0.5 for any constant guess.
    step_auc (the chance that a right step outscores a wrong one) and step_balanced_accuracy_best (at the best
    threshold, chosen on these same steps, so optimistic) say how well the PRM ranks steps, whatever its
    calibration. init_logp_*: the same two for a score that needs no training, the init policy's smallest
    log-prob of a token within the step (with --prm-data samples: how sure the policy was of what it wrote).
    """
    batch = ctx["heldout"]
    if batch is None:
        return {}
    ctx["policy"].eval()
    logits = chunked_scores(ctx["policy"], batch, args).gather(1, batch["step_ends"])  # (B, S)
    ctx["policy"].train()
    valid = batch["step_mask"].bool()  # (B, S)
    pred, label = (logits > 0)[valid], batch["step_labels"].bool()[valid]  # (K,) over all held-out steps
    answer = (batch["completion_ids"].gather(1, batch["step_ends"]) == arith.EOS)[valid]  # (K,) answer steps

    def acc(sel):
        return (pred[sel] == label[sel]).float().mean().item() if bool(sel.any()) else float("nan")

    step = ~answer
    z = logits[valid][step]  # (K',) the scores of the ';' steps
    best, _ = best_balanced_accuracy(z, label[step])
    out = {"step_auc": ranking_auc(z, label[step]), "step_balanced_accuracy_best": best}
    out.update(ctx.get("heldout_init_logp", {}))  # the init policy's own confidence, the yardstick
    out.update({"prm_step_acc": acc(step), "prm_step_balanced_acc": (acc(step & label) + acc(step & ~label)) / 2,
           "prm_step_base_rate": label[step].float().mean().item(), "prm_answer_acc": acc(answer),
           "prm_step_recall_wrong": acc(step & ~label)})
    # the same numbers under the names of eval.json's "after" (the prm_ ones are kept for older scripts)
    out.update(step_accuracy=out["prm_step_acc"], step_balanced_accuracy=out["prm_step_balanced_acc"],
               step_base_rate=out["prm_step_base_rate"])
    return out

STAGES["prm"] = Stage(
    regime="off-policy (samples of the frozen init)", role="reward for policy reshaping (process)", init="sft",
    holds="PRM (policy body + score head), frozen init policy", score_head=True,
    setup=setup_prm, make_batch=prm_batch, loss=prm_loss_fn, evaluate=prm_evaluate,
    defaults=dict(steps=300, lr=3e-4, batch_size=16, micro_batch_size=64, warmup=10, ppo_epochs=1,
                  log_every=25))


# ===========================================================================================================
# distill: consolidation -- a smaller student learns a trained teacher's next-token distributions
#
# --distill-mode picks who writes the sequences and the divergence taken at each of their completion tokens:
#   forward   teacher samples, KL(teacher || student): sequence-level KD (Kim & Rush 2016, arXiv 1606.07947)
#             with Hinton et al.'s soft targets (arXiv 1503.02531) at every token. Off-policy.
#   reverse   teacher samples, KL(student || teacher). Off-policy.
#   jsd       teacher samples, the generalized JSD(--jsd-beta) of GKD (Agarwal et al. 2023, arXiv 2306.13649,
#             eq. 1). Off-policy.
#   onpolicy  the student's own samples, scored by the teacher with JSD(--jsd-beta): GKD with lambda = 1,
#             on-policy distillation (--jsd-beta 1: per-token reverse KL, MiniLLM's objective token-wise).
#   token     the student's own samples; a policy gradient whose per-token advantage is minus the sampled
#             token's reverse-KL sample, log p_S - log p_T (the Qwen3 / Thinking Machines recipe): the same
#             reverse KL in expectation as onpolicy with --jsd-beta 1, from two log-probs per token instead of
#             both full distributions.
# The student starts from its own small pretrain: the row "pretrain-small" runs the pretrain stage's code with
# a smaller default model (2 layers, width 64, instead of 4 and 128), built on demand like any other init.
# Loss at initialisation, were the student the teacher: exactly 0 in every mode.
# Differs from the papers:
#   1. Sequences are sampled afresh every step at --temperature (one for each of --batch-size prompts), not
#      decoded once into a fixed corpus (Kim & Rush decode once, with beam search). --temperature 0 samples
#      them greedily and scores them with temperature-1 log-probs.
#   2. GKD mixes student and fixed-data sequences with probability lambda per batch; a run here is all teacher
#      samples or all student samples.
#   3. The student starts from its own small pretrain, not from a supervised fine-tuned student as in GKD.
#   4. No temperature on the loss and no hard-label term (tau = 1, hence no tau^2 factor).


def setup_distill(args, policy, task):
    """The frozen teacher (--teacher, default OUT_DIR/grpo, built if missing) and the prompts of every length
    the held-out test has (training_prompts)."""
    if args.teacher is None:
        args.teacher = args.stage_output("grpo")  # OUT_DIR/grpo, trained first if missing
    teacher = load_model(args.teacher, args.device).eval().requires_grad_(False)
    # the KL compares the two models' distributions token by token: the same tokens must mean the same text
    teacher_tok = load_task(args, args.teacher).tok
    if teacher_tok.identity() != task.tok.identity() or teacher.config.vocab_size != policy.config.vocab_size:
        die(f"the teacher's tokenizer {teacher_tok.path} (model vocabulary {teacher.config.vocab_size}) differs "
            f"from the student's {task.tok.path} ({policy.config.vocab_size}); distillation needs one tokenizer")
    print(f"[distill] teacher {args.teacher}: {teacher.num_params() / 1e6:.2f}M parameters, "
          f"student {policy.num_params() / 1e6:.2f}M; mode {args.distill_mode}")
    # the student learns the teacher's distributions on prompts of every length, not on rl.jsonl's long chains
    # alone, which a teacher mostly gets wrong
    return {"teacher": teacher, **prompt_source(training_prompts(task), args)}


def distill_batch(ctx, args, step):
    # who writes the sequences is the whole difference between off- and on-policy distillation
    sampler = ctx["policy"] if args.distill_mode in ("onpolicy", "token") else ctx["teacher"]
    # one sample per prompt (group size 1): G samples of a prompt from a peaked teacher are near copies, so
    # --group-size 8 would divide the distinct sequences per step by about 8
    one_each = argparse.Namespace(**{**vars(args), "group_size": 1})
    _, _, verdicts, roll = sample_groups(ctx, one_each, sampler)
    del roll["sampler_logps"]
    roll["w"] = roll["completion_mask"].sum(1)  # (B,) tokens per row: the loss is a token mean over the batch
    stats = {"sample_reward": sum(v.correct for v in verdicts) / len(verdicts),
             "len": roll["completion_mask"].float().sum(1).mean().item()}
    return roll, stats


def distill_loss(ctx, args, mb):
    mask = mb["completion_mask"].float()  # (B, N)
    student, teacher = ctx["policy"], ctx["teacher"]
    if args.distill_mode == "token":
        # token-level on-policy distillation: only the two log-probs of each sampled token, no full logits
        logps, _ = completion_forward(student, mb, args)  # (B, N) with gradient
        with torch.no_grad():
            teacher_logps, _ = completion_forward(teacher, mb, args)  # (B, N)
        loss, kl = token_reverse_kl_pg_loss(logps, teacher_logps, mask)
        return loss, {"kl_reverse": kl.item()}
    seq = (mb["prompt_ids"], mb["prompt_mask"], mb["completion_ids"], mb["completion_mask"])
    temperature = args.temperature if args.temperature > 0 else 1.0  # greedy samples are scored at T = 1
    with args.amp():
        hidden, _ = rollout.completion_hidden(student, *seq)  # (B, N, D) the student, at completion positions
        with torch.no_grad():
            teacher_hidden, _ = rollout.completion_hidden(teacher, *seq)  # (B, N, D) the same positions

        def losses(logits, teacher_hidden, rows_mask):
            # both models' fp32 logits of a few rows, tempered as the sampler's; the loss is a token mean over
            # these rows, weighted by their share of the micro-batch's tokens
            logits = logits.float() / temperature  # (b, N, V)
            with torch.no_grad():
                teacher_logits = teacher.lm_head(teacher_hidden).float() / temperature  # (b, N, V)
            if args.distill_mode in ("forward", "reverse"):
                loss = kl_distill_loss(logits, teacher_logits, rows_mask, direction=args.distill_mode)
            else:
                loss = generalized_jsd_loss(logits, teacher_logits, rows_mask, beta=args.jsd_beta)
            # the forward KL in every mode, so that runs of different modes compare on one number
            kl_forward = kl_distill_loss(logits.detach(), teacher_logits, rows_mask, direction="forward")
            share = rows_mask.sum() / mask.sum().clamp(min=1)
            return loss * share, kl_forward * share

        parts = rollout.over_head_chunks(losses, student, hidden, teacher_hidden, mask)  # the head in chunks
    return sum(p[0] for p in parts), {"kl_forward": sum(p[1] for p in parts).item()}


def distill_evaluate(ctx, args):
    """The teacher's held-out pass@1 (computed once: it does not change) and both parameter counts."""
    if "teacher_eval" not in ctx:
        problems = heldout_problems(ctx["task"], args)
        ev = evaluate(ctx["teacher"], ctx["task"], problems, args) if problems else {}
        ctx["teacher_eval"] = {f"teacher_{k}": sum(v) / len(v) for k, v in ev.items()}
        ctx["teacher_eval"].update(teacher_params=float(ctx["teacher"].num_params()),
                                   student_params=float(ctx["policy"].num_params()))
    return dict(ctx["teacher_eval"])

STAGES["pretrain-small"] = dataclasses.replace(
    STAGES["pretrain"], role="support (the student's base model)",
    defaults={**STAGES["pretrain"].defaults, "steps": 1200, "n_layer": 2, "n_embd": 64})
STAGES["distill"] = Stage(
    regime="off-policy (teacher samples) or on-policy (--distill-mode onpolicy)", role="consolidation",
    init="pretrain-small", holds="student, frozen teacher", pipeline_input="teacher",
    setup=setup_distill, make_batch=distill_batch, loss=distill_loss, evaluate=distill_evaluate,
    defaults=dict(steps=200, lr=1e-3, batch_size=64, micro_batch_size=64, warmup=10, ppo_epochs=1,
                  log_every=20))


# ===========================================================================================================
# eval: measurement -- pass@k, problems gained and lost, KL to the base, entropy
#
# The eval stage trains nothing, so its row has a `run` in place of setup / make_batch / loss: main() calls
# run_eval where a training stage goes through train_stage. After a pipeline of several training stages,
# main() runs the same evaluation over every stage's output (eval_pipeline).


EVAL_SPLITS = ("test", "test_ood")  # held out: the training distribution, and chains longer than any trained


def run_eval(user_args, name):
    """Stage eval: held-out pass@k, greedy accuracy, support gained / lost, KL against a base. Trains nothing.

    For each checkpoint, on test and test_ood (--eval-problems each): greedy accuracy; --eval-n samples per
    problem at T = 1 and the unbiased pass@k of Chen et al. 2021 (arXiv 2107.03374) for k = 1, 2, 4, ..., n;
    problems gained (solved at least once, never by the base in its n samples), lost (the reverse) and kept,
    against the base and against the row above (in a pipeline, the previous stage); KL(base || checkpoint)
    estimated on the base's samples; the checkpoint's mean token entropy on its own samples. Prints a table
    and writes OUT_DIR/eval.json (or --eval-out). Scorers (reward models) are skipped: they generate nothing.
    Cost at the defaults (2 splits x 500 problems x 17 completions): about half a minute per 0.74M-parameter
    checkpoint on 2 CPU threads. Rows of one prompt length are sampled together (solve's by_length), the n
    rows of a problem run as one until their tokens differ (the sampler's branch), a checkpoint's own
    log-probs and entropies come from the sampler, and only the base's distinct samples are scored again.

    Differs from the papers:
        1. "Gained / lost" asks the survey's support-expansion question the way Yue et al. 2025 (arXiv
           2504.13837) do with pass@k, but with n = --eval-n samples, far fewer than their k up to 256: a
           problem the base "never" solves may just be rare for it. Read small counts with that in mind.
        2. The KL is a sequence-level Monte-Carlo estimate over completions cut at --max-new-tokens.
    """
    args = stage_args(user_args, name)
    args.temperature = 1.0  # samples, log-probs, KL and entropy are all of the T = 1 distribution
    folders = args.ckpt or [os.path.join(args.out_dir, s) for s in STAGES
                            if os.path.exists(os.path.join(args.out_dir, s, "config.json"))]
    for f in folders:
        if not os.path.exists(os.path.join(f, "config.json")):
            die(f"--ckpt {f}: no config.json, not a checkpoint folder")
    scorers = [f for f in folders if is_scorer(f)]
    if scorers:
        print(f"[eval] skipping scorers (they generate nothing): {', '.join(scorers)}")
    folders = [f for f in folders if f not in scorers]
    pretrain = os.path.join(args.out_dir, "pretrain")
    base = args.base or (pretrain if os.path.exists(os.path.join(pretrain, "config.json")) else None)
    base = base or (folders[0] if folders else None)
    if base is None:
        die(f"eval found no checkpoint in {args.out_dir}; name them with --ckpt")
    res = eval_checkpoints(args, folders, base)
    print_eval_table(res)
    out = args.eval_out or os.path.join(args.out_dir, "eval.json")
    with open(out + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(out + ".tmp", out)  # atomic, like the checkpoints
    stem = out[:-len(".json")] if out.endswith(".json") else out
    for path, svg in ((stem + "_passk.svg", pass_at_k_svg(res)), (stem + "_support.svg", support_svg(res))):
        with open(path + ".tmp", "w") as f:
            f.write(svg)
        os.replace(path + ".tmp", path)
    print(f"[eval] wrote {out}, {stem}_passk.svg, {stem}_support.svg")
    return out


def is_scorer(folder):
    """Whether a checkpoint folder holds a scorer (reward or value model) rather than a generator."""
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f).get("score_head", False)


def eval_checkpoints(args, folders, base):
    """The base, then each folder in order, on EVAL_SPLITS, one model in memory at a time -> a JSON dict."""
    task = load_task(args, base)
    # test_ood is the arithmetic task's; a data dir of another task may hold test.jsonl alone
    splits = [s for s in EVAL_SPLITS if s == "test" or os.path.exists(os.path.join(args.data_dir, s + ".jsonl"))]
    problems = {s: heldout_problems(task, args, s) for s in splits}
    results, base_samples = [], {}
    for folder in [base] + [f for f in folders if f != base]:
        t0 = time.time()
        model = load_model(folder, args.device, score_head=False).eval()
        # KL to the base compares log-probs of the same token ids: every checkpoint must share its tokenizer
        tok = load_task(args, folder).tok
        if tok.identity() != task.tok.identity():
            die(f"{tok.path} differs from the base's tokenizer {task.tok.path}; eval compares checkpoints of "
                "one tokenizer")
        name = os.path.basename(os.path.normpath(folder))
        rec = {"name": name, "path": folder, "params": model.num_params()}
        for split, rows in problems.items():
            out, samples = eval_split(model, task, rows, args)
            if not results:
                # this is the base: keep its samples, KL from it is measured on them, with its log-probs from
                # the same forward every other checkpoint scores them with (the sampler's differ by float
                # error), so that a copy of the base is at KL exactly 0
                samples["seq_logps"] = score_samples(model, task.tok, samples["prompts"], samples["completions"],
                                                     args)[0]  # (P*n,)
                base_samples[split] = samples
            ref = base_samples[split]
            if results:
                # KL(base || model): the model's log-probs of what the base wrote, against the base's own
                model_lp = score_samples(model, task.tok, ref["prompts"], ref["completions"], args)[0]  # (P*n,)
            else:
                model_lp = samples["seq_logps"]  # the base against itself: the same numbers, KL exactly 0
            out["kl_base"], out["kl_base_se"] = kl_estimate(ref["seq_logps"], model_lp)
            solved = torch.tensor(out["counts"]) > 0  # (P,) solved at least once in n samples
            base_solved = torch.tensor(results[0][split]["counts"] if results else out["counts"]) > 0
            prev_solved = torch.tensor(results[-1][split]["counts"] if results else out["counts"]) > 0
            out["vs_base"] = support_change(base_solved, solved)
            out["vs_prev"] = support_change(prev_solved, solved)
            rec[split] = out
        rec["seconds"] = time.time() - t0
        print(f"[eval] {rec['name']}: {rec['seconds']:.0f}s", flush=True)
        results.append(rec)
        del model
    return {"base": results[0]["path"], "n": args.eval_n,
            "problems": {s: len(r) for s, r in problems.items()}, "checkpoints": results}


EVAL_BATCH_ROWS = 1024  # rows the eval stage samples at once: a decode step's cost is mostly per step, not per row


def eval_split(model, task, problems, args):
    """One model on one split: greedy, n samples per problem, pass@k, token entropy on its own samples.

    Returns (results, samples): samples = {"prompts", "completions", "seq_logps"}, for KL from this model.
    """
    prompts, n = [r["prompt"] for r in problems], args.eval_n
    # greedy: one sample per problem, so all of them in one padded batch (one decode loop, not one per length)
    greedy = solve(model, task, prompts, 1, 0.0, args, seed=0, batch_rows=EVAL_BATCH_ROWS)[0]  # (P, 1)
    # every model samples with the same seed (common random numbers): differences between models then reflect
    # the models more than the luck of the draw. The sampler's own log-probs and entropies are those of the
    # temperature-1 distribution, what a second forward over the samples would compute (to float error).
    scores = {}
    correct, _, completions = solve(model, task, prompts, n, 1.0, args, seed=0, scores=scores,
                                    batch_rows=EVAL_BATCH_ROWS, by_length=True)  # (P, n), P * n id lists
    rows = [p for p in prompts for _ in range(n)]  # the prompt of each sample, in solve's order
    seq_logps, entropy, n_tokens = scores["seq_logps"], scores["entropy"], scores["n_tokens"]  # 3 x (P * n,)
    counts = correct.sum(1).tolist()  # per problem: correct samples out of n
    ks = sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})  # 1, 2, 4, ..., n
    out = {f"pass@{k}": sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks}
    out["greedy"] = greedy.float().mean().item()
    out["entropy"] = entropy.sum().item() / max(1, n_tokens.sum().item())  # mean over all sampled tokens
    out.update(counts=counts, greedy_correct=greedy[:, 0].int().tolist())
    return out, {"prompts": rows, "completions": completions, "seq_logps": seq_logps}


def pass_at_k(n, c, k):
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021, arXiv 2107.03374).

    pass@k = 1 - C(n - c, k) / C(n, k): the chance that k of the n samples, drawn without replacement,
    include a correct one. Computed as the numerically stable product of the paper's Figure 3,
    1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the huge binomials. It is 1 when n - c < k (every
    k-subset holds a correct sample) and 0 when c = 0.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


SCORE_BATCH_ROWS = 64  # rows of the eval's KL forward; on the 2-core CPU, 64 ran 1.5x faster than 256


@torch.no_grad()
def score_samples(model, tok, prompts, completions, args, batch_rows=SCORE_BATCH_ROWS):
    """Summed log-probs (B,), summed token entropies (B,) and token counts (B,) of given completions (B
    token-id lists, one per prompt) under model, of logits / args.temperature (the eval sets it to 1).
    Each distinct (prompt, completion) pair is scored once: a model sure of its answer writes many of its n
    samples of a problem alike (the arithmetic task's sft and grpo, 10-27% distinct; its pretrain, 41-70%).
    Rows of one prompt length are scored together (row_batches), so no batch pads its prompts, and in order of
    completion length, so a batch pads its completions little."""
    rows = list(zip(prompts, map(tuple, completions)))  # (prompt, completion) of each row
    # the distinct pairs, first seen first, then (a stable sort) by completion length; row_batches keeps this
    # order within a prompt length
    pairs = sorted(dict.fromkeys(rows), key=lambda pc: len(pc[1]))
    prompt_ids = tok.prompts_ids([p for p, _ in pairs])
    seq_logps, entropy = torch.zeros(len(pairs)), torch.zeros(len(pairs))  # (U,) in the order of pairs
    n_tokens = torch.zeros(len(pairs), dtype=torch.long)
    for idx in row_batches(len(pairs), batch_rows, [len(p) for p in prompt_ids]):
        chunk = [list(pairs[i][1]) for i in idx]
        ids, mask = rollout.left_pad([prompt_ids[i] for i in idx], tok.pad_id, args.device)  # (b, P)
        mb = {"prompt_ids": ids, "prompt_mask": mask,
              "completion_ids": pad_right(chunk, tok.pad_id).to(args.device),  # (b, N)
              "completion_mask": pad_right([[1] * len(c) for c in chunk], 0).to(args.device)}  # (b, N)
        logps, ent = completion_forward(model, mb, args)  # (b, N) each
        real = mb["completion_mask"] == 1  # (b, N)
        seq_logps[idx] = logps.masked_fill(~real, 0.0).sum(1).cpu()
        entropy[idx] = ent.masked_fill(~real, 0.0).sum(1).cpu()
        n_tokens[idx] = real.sum(1).cpu()
    at = {pc: i for i, pc in enumerate(pairs)}
    take = torch.tensor([at[pc] for pc in rows], dtype=torch.long)  # (B,) each row's place in pairs
    return seq_logps[take], entropy[take], n_tokens[take]


def kl_estimate(p_seq_logps, q_seq_logps):
    """Monte-Carlo KL(p || q) and its standard error from B sequences sampled from p.

    KL(p || q) = E_{y ~ p}[log p(y) - log q(y)], estimated by the mean over the samples of the per-sequence
    log-ratio, each the sum of the per-token log-ratios over the completion. p_seq_logps, q_seq_logps: (B,)
    summed log-probs of the same samples. An estimate: it can come out slightly negative for p and q close.
    """
    log_ratio = p_seq_logps - q_seq_logps  # (B,)
    se = log_ratio.std().item() / math.sqrt(len(log_ratio)) if len(log_ratio) > 1 else 0.0
    return log_ratio.mean().item(), se


def support_change(before, after):
    """Problems gained (solved by `after` at least once, never by `before`), lost (the reverse), kept (both).

    before, after: (P,) bool, whether each problem was solved at least once in n samples.
    """
    return {"gained": int((after & ~before).sum()), "lost": int((before & ~after).sum()),
            "kept": int((before & after).sum())}


def print_eval_table(res):
    for split in res["problems"]:
        rows = res["checkpoints"]
        ks = [key for key in rows[0][split] if key.startswith("pass@")]
        print(f"[eval] {split}: {res['problems'][split]} problems, n={res['n']} samples each at T=1 "
              f"(unbiased pass@k) and greedy; +gained/-lost/=kept: problems solved at least once vs never")
        print(f"{'checkpoint':<20}{'params':>7}" + "".join(f"{k:>9}" for k in ks)
              + f"{'greedy':>8}{'vs base +/-/=':>16}{'vs prev +/-':>13}{'KL(base||ckpt)':>17}{'entropy':>9}")
        for i, r in enumerate(rows):
            o, vb, vp = r[split], r[split]["vs_base"], r[split]["vs_prev"]
            name = r["name"] + (" (base)" if i == 0 else "")
            cells = [f"{name:<20}{r['params'] / 1e6:6.2f}M", *(f"{100 * o[k]:8.1f}%" for k in ks),
                     f"{100 * o['greedy']:7.1f}%", f"+{vb['gained']}/-{vb['lost']}/={vb['kept']}".rjust(16),
                     f"+{vp['gained']}/-{vp['lost']}".rjust(13),
                     f"{o['kl_base']:.2f} ±{o['kl_base_se']:.2f}".rjust(17), f"{o['entropy']:9.3f}"]
            print("".join(cells))


# pictures of an eval.json, as SVG written by hand (no plotting dependency): one panel per split
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
PANEL_W, PANEL_H, MARGIN = 360, 240, 48


def svg_document(panels, title, n_rows_legend):
    """Panels side by side (each a list of SVG elements drawn in a PANEL_W x PANEL_H box at the origin)."""
    width, height = len(panels) * (PANEL_W + MARGIN) + MARGIN, PANEL_H + 2 * MARGIN + 16 * n_rows_legend
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{MARGIN}" y="18" font-size="13">{title}</text>']
    for i, elements in enumerate(panels):
        out.append(f'<g transform="translate({MARGIN + i * (PANEL_W + MARGIN)},{MARGIN})">')
        out += elements
        out.append("</g>")
    return "\n".join(out + ["</svg>"]) + "\n"


def legend(names, y):
    return [f'<rect x="{8 + 120 * (i % 3)}" y="{y + 16 * (i // 3) - 8}" width="10" height="10" '
            f'fill="{COLORS[i % len(COLORS)]}"/><text x="{22 + 120 * (i % 3)}" y="{y + 16 * (i // 3) + 1}">'
            f'{name}</text>' for i, name in enumerate(names)]


def pass_at_k_svg(res):
    """pass@k for k = 1..n (x on a log scale), one line per checkpoint, one panel per split."""
    n, rows = res["n"], res["checkpoints"]
    ks = list(range(1, n + 1))
    x = (lambda k: PANEL_W * math.log(k) / math.log(n)) if n > 1 else (lambda k: PANEL_W / 2)
    panels = []
    for split in res["problems"]:
        el = [f'<rect width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#999"/>',
              f'<text x="0" y="-6">{split}: pass@k (%), k = 1..{n}, log scale</text>']
        for frac in (0, 0.25, 0.5, 0.75, 1):
            y = PANEL_H * (1 - frac)
            el.append(f'<line x1="0" x2="{PANEL_W}" y1="{y}" y2="{y}" stroke="#eee"/>'
                      f'<text x="-6" y="{y + 4}" text-anchor="end">{100 * frac:.0f}</text>')
        el += [f'<text x="{x(k)}" y="{PANEL_H + 14}" text-anchor="middle">{k}</text>'
               for k in sorted({1, n} | {2 ** i for i in range(n.bit_length()) if 2 ** i <= n})]
        for i, r in enumerate(rows):
            counts = r[split]["counts"]
            curve = [sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks]
            points = " ".join(f"{x(k):.1f},{PANEL_H * (1 - v):.1f}" for k, v in zip(ks, curve))
            el.append(f'<polyline points="{points}" fill="none" stroke="{COLORS[i % len(COLORS)]}" '
                      'stroke-width="2"/>')
        el += legend([r["name"] for r in rows], PANEL_H + 34)
        panels.append(el)
    return svg_document(panels, "held-out pass@k per checkpoint", math.ceil(len(rows) / 3))


def support_svg(res):
    """Problems gained (up) and lost (down) against the base, per checkpoint after it, one panel per split."""
    rows = res["checkpoints"][1:]
    panels = []
    for split, n_problems in res["problems"].items():
        top = max([1] + [max(r[split]["vs_base"]["gained"], r[split]["vs_base"]["lost"]) for r in rows])
        mid, w = PANEL_H / 2, PANEL_W / max(1, len(rows))
        el = [f'<rect width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#999"/>',
              f'<text x="0" y="-6">{split}: problems gained (up) / lost (down) vs the base, of {n_problems}</text>',
              f'<line x1="0" x2="{PANEL_W}" y1="{mid}" y2="{mid}" stroke="#333"/>']
        for i, r in enumerate(rows):
            gained, lost = r[split]["vs_base"]["gained"], r[split]["vs_base"]["lost"]
            hg, hl, x0 = mid * gained / top, mid * lost / top, i * w + w * 0.2
            el.append(f'<rect x="{x0:.1f}" y="{mid - hg:.1f}" width="{w * 0.6:.1f}" height="{hg:.1f}" '
                      f'fill="#2ca02c"/><text x="{x0 + w * 0.3:.1f}" y="{mid - hg - 3:.1f}" '
                      f'text-anchor="middle">+{gained}</text>')
            el.append(f'<rect x="{x0:.1f}" y="{mid:.1f}" width="{w * 0.6:.1f}" height="{hl:.1f}" fill="#d62728"/>'
                      f'<text x="{x0 + w * 0.3:.1f}" y="{mid + hl + 12:.1f}" text-anchor="middle">-{lost}</text>')
            el.append(f'<text x="{x0 + w * 0.3:.1f}" y="{PANEL_H + 30}" text-anchor="middle">{r["name"]}</text>')
        panels.append(el)
    return svg_document(panels, f"support change vs the base ({res['checkpoints'][0]['name']}), "
                                f"solved at least once in n = {res['n']} samples", 0)


def eval_pipeline(user_args, outputs):
    """After a multi-stage run: every stage's output, in order, against the first stage's init (for a
    pipeline that starts from scratch, its first output). "vs prev" compares each stage with the previous."""
    with open(os.path.join(outputs[0], "args.json")) as f:
        first_init = json.load(f).get("init")
    args = argparse.Namespace(**{**vars(user_args), "ckpt": list(outputs), "base": first_init or outputs[0]})
    return run_eval(args, "eval")

STAGES["eval"] = Stage(regime="none (trains nothing)", role="measurement", init=None,
                       holds="one checkpoint at a time", run=run_eval)


# ===========================================================================================================
# the one loop


def prepare(name, user_args):
    """Everything stage `name` needs before its first step: its flags, its policy, its ctx. -> (args, ctx)

    args: the user's flags with the stage's defaults filled in (stage_args). ctx: what the stage's setup()
    built (data, frozen models, generators), plus "policy" (the model it trains) and "task" (its Task: the
    tokenizer, the data files, the verifier).
    The policy comes from --init, else the output of the stage's default init (built first if missing), else
    from scratch. train_stage() and the tests both start a stage here.
    """
    stage = STAGES[name]
    args = stage_args(user_args, name)
    check_stage_args(args, name)
    torch.manual_seed(args.seed)
    if args.init is None and stage.init is not None:
        args.init = ensure_stage_output(user_args, stage.init)
    # frozen models a stage reads besides its init (distill's teacher; grpo --reward prm: OUT_DIR/prm): its
    # setup() fetches them with args.stage_output(name), built first if missing, like the init
    args.stage_output = lambda needed: ensure_stage_output(user_args, needed)
    args.init_folder = args.init
    task = load_task(args, args.init)  # the init's tokenizer; a new model gets the built-in one
    check_step_tokenizer(name, args, task)
    if args.init is not None:
        print(f"[{name}] init from {args.init}")
        policy = load_model(args.init, args.device, score_head=stage.score_head or None)
        if task.tok.vocab_size > policy.config.vocab_size:
            die(f"{task.tok.path} has {task.tok.vocab_size} tokens but the model's embedding "
                f"({os.path.join(args.init, 'config.json')}: vocab_size) has {policy.config.vocab_size}")
    else:
        cfg = GPTConfig(vocab_size=task.tok.vocab_size, n_layer=args.n_layer, n_embd=args.n_embd,
                        n_head=args.n_head, n_kv_head=args.n_kv_head,
                        intermediate_size=int(8 * args.n_embd / 3 / 32 + 1) * 32, max_seq_len=args.max_seq_len)
        policy = GPT(cfg).to(args.device)
        print(f"[{name}] new model from scratch: {policy.num_params() / 1e6:.2f}M parameters")
    policy.grad_checkpointing = args.grad_checkpoint
    broadcast_weights(policy)  # several processes: one set of weights
    ctx = stage.setup(args, policy, task)
    ctx.update(policy=policy, task=task)
    if "critic" in ctx:
        ctx["critic"].grad_checkpointing = args.grad_checkpoint
        broadcast_weights(ctx["critic"])
    return args, ctx


def train_stage(user_args, name):
    """Run one stage from its init to OUT_DIR/<name>, with held-out pass@1 before and after."""
    stage = STAGES[name]
    args, ctx = prepare(name, user_args)
    policy, task = ctx["policy"], ctx["task"]
    # --- optimizer: AdamW, weight decay on matrices only; ctx["trainable"] adds e.g. a PPO critic
    params = [p for p in policy.parameters() if p.requires_grad] + ctx.get("trainable", [])
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    state_dir = os.path.join(args.out_dir, name + ".state")
    # held-out pass@1 of a generator; a scorer (RM, PRM) is judged by the stage's own evaluate() instead
    problems = [] if stage.score_head else heldout_problems(task, args)
    run = load_state(state_dir, args, ctx, opt) if args.resume else None
    if run is None:
        if args.resume:
            print(f"[{name}] --resume: no resumable state in {state_dir}, starting from step 0")
        # a model from scratch solves nothing (and never stops generating), so its "before" is 0 by construction
        before = evaluate(policy, task, problems, args) if problems and args.init and RANK == 0 else {}
        if stage.evaluate is not None and RANK == 0:
            before.update(stage.evaluate(ctx, args))
        run = {"step": 0, "before": before, "metrics": [], "n_tokens": 0, "elapsed": 0.0, "updates": 0,
               "skipped_steps": 0, "bad_in_a_row": 0}
    else:
        print(f"[{name}] resuming from {state_dir} at step {run['step']}")
    print(f"[{name}] {stage.regime}, {stage.role}; holds: {stage.holds}; {args.steps} steps")
    t0 = time.time() - run["elapsed"]
    for step in range(run["step"], args.steps):
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        # --- a batch: from data (off-policy) or from the policy's own rollouts (on-policy)
        batch, stats = stage.make_batch(ctx, args, step)
        batch = {k: v.to(args.device) for k, v in batch.items()}  # data stages build theirs on the CPU
        n_rows = len(batch["w"])
        row_metrics, bad = [], False
        # several processes: one minibatch per pass (so every rank takes part in each all-reduce, even with no
        # rows of its own), and no pass at all when no rank has a row, as one process would skip an empty batch
        minibatches = list(chunks(n_rows, args.minibatch_size)) if WORLD == 1 else \
            [slice(0, n_rows)] * bool(all_sum(n_rows) > 0)
        for epoch in range(args.ppo_epochs):
            # The first pass takes the rows in rollout order, so the first minibatch is made of exactly the
            # rows and micro-batch chunks its old log-probs were computed with (ratio exactly 1). Later passes
            # shuffle the rows (seeded by step and pass), as TRL and OpenRLHF do, so that minibatches differ
            # from pass to pass. With a single minibatch the order changes nothing, and it is left alone.
            order = torch.arange(n_rows)
            if epoch > 0 and args.minibatch_size < n_rows:
                order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(
                    args.seed * 1_000_003 + step * 101 + epoch))
            for mb_slice in minibatches:
                mb_metrics = accumulate_gradients(stage, ctx, args, batch, order[mb_slice])
                sum_gradients(params)  # several processes: the gradient of the whole batch on every rank
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
                # a non-finite loss or gradient would poison the weights and Adam's moments for good: skip
                finite = math.isfinite(grad_norm) and all(math.isfinite(m["loss"]) for m in mb_metrics)
                finite = finite if WORLD == 1 else bool(all_sum(int(not finite)) == 0)  # all ranks agree
                if finite:
                    opt.step()
                    run["updates"] += 1
                else:
                    run["skipped_steps"] += 1
                    bad = True
                opt.zero_grad(set_to_none=True)
                row_metrics += mb_metrics
        run["bad_in_a_row"] = run["bad_in_a_row"] + 1 if bad else 0
        # tok/s counts the real (non-pad) tokens of the step's batch: prompts, completions, both sides of a pair
        n_tokens = sum(int(v.ne(task.tok.pad_id).sum()) for k, v in batch.items() if k.endswith("ids"))
        run["n_tokens"] += n_tokens if WORLD == 1 else int(all_sum(n_tokens))
        # --- log: averages over the step's micro-batches, plus the batch's own stats
        rec = {"step": step + 1, "lr": lr, **stats}
        for key in (row_metrics[0] if row_metrics else {}):
            rec[key] = sum(r[key] for r in row_metrics) / len(row_metrics)
        if row_metrics:
            rec["grad_norm"] = float(grad_norm)
        if WORLD > 1:
            rec = mean_over_ranks(rec)
        if run["skipped_steps"]:
            rec["skipped_steps"] = run["skipped_steps"]
        # a non-finite number is written as null: metrics.jsonl stays valid JSON
        rec = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in rec.items()}
        elapsed = time.time() - t0
        rec["elapsed"] = elapsed
        run["metrics"].append(rec)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps or bad:
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            extra = " ".join(f"{k} {v:.4g}" if v is not None else f"{k} nan" for k, v in rec.items()
                             if k not in ("step", "elapsed", "lr"))
            print(f"[{name}] step {step + 1}/{args.steps} | {extra} | {run['n_tokens'] / elapsed / 1e3:.1f}k tok/s | "
                  f"{fmt_time(elapsed)} elapsed, ETA {fmt_time(eta)}", flush=True)
        if run["bad_in_a_row"] >= args.max_bad_steps:
            fail(f"[{name}] {run['bad_in_a_row']} steps in a row with a non-finite loss or gradient (step "
                 f"{step + 1}; try a lower --lr); stopped without saving, {os.path.join(args.out_dir, name)} "
                 "is as it was")
        run["step"], run["elapsed"] = step + 1, elapsed
        stop = STOP_REQUESTED if WORLD == 1 else bool(all_sum(int(STOP_REQUESTED)) > 0)
        if (stop or ((step + 1) % args.save_every == 0 and step + 1 < args.steps)) and RANK == 0:
            save_state(state_dir, args, ctx, opt, run)
        if stop:
            barrier()
            print(f"[{name}] interrupted at step {step + 1}: continue with the same flags and --resume",
                  file=sys.stderr)
            sys.exit(130)
    if run["updates"] == 0:
        fail(f"[{name}] made no optimizer step in {args.steps} steps (every batch was empty or skipped); "
             f"{os.path.join(args.out_dir, name)} is as it was")
    # --- held-out pass@1 after, then the atomic checkpoint (rank 0 alone; the others wait for it)
    out = os.path.join(args.out_dir, name)
    if RANK > 0:
        barrier()
        return out
    before = run["before"]
    after = evaluate(policy, task, problems, args) if problems else {}
    if problems:
        report_eval(name, before, after)
    if stage.evaluate is not None:
        after.update(stage.evaluate(ctx, args))
        for key in after:
            if key not in ("greedy", "sampled"):
                print(f"[{name}] held-out {key}: {before.get(key, float('nan')):.4g} -> {after[key]:.4g}")
    try:
        save_checkpoint(out, policy, task.tok, args, run["metrics"], {"before": before, "after": after})
    except OSError as e:  # a full or failing disk: the previous checkpoint is still whole, say so
        shutil.rmtree(out + ".tmp", ignore_errors=True)
        fail(f"[{name}] could not write {out}.tmp ({e}); {out} is as it was; --resume continues from the last "
             f"state in {state_dir}, if one was saved")
    shutil.rmtree(state_dir, ignore_errors=True)  # the stage is done: nothing left to resume
    print(f"[{name}] saved {out} ({fmt_time(time.time() - t0)})")
    barrier()
    return out


def mean_over_ranks(rec):
    """A step's log record averaged over ranks, key by key (a rank whose share had no rows logs no loss)."""
    recs = all_gather_lists([rec])
    keys = dict.fromkeys(k for r in recs for k in r)
    out = {}
    for k in keys:
        vals = [r[k] for r in recs if isinstance(r.get(k), (int, float))]
        out[k] = rec.get(k) if k in ("step", "lr") or not vals else sum(vals) / len(vals)
    return out


# what a stage's ctx holds between steps besides its Shufflers and generators (found wherever they are):
# rft's current round (its data and stats)
RESUME_KEYS = ("data", "round", "round_stats")
UNRESUMED_FLAGS = ("resume", "save_every", "log_every", "max_bad_steps", "threads")  # may change on --resume


def save_state(folder, args, ctx, opt, run):
    """Everything the loop needs to continue bit-identically, in one safetensors file written atomically:
    the trained weights (policy, critic), AdamW's moments and steps, the torch RNG, and as JSON metadata the
    run's progress (step, metrics so far), the flags, and the stage's data-order and sampler states."""
    tensors, meta = {}, {"run": run, "args": resumable_args(args)}
    for prefix, model in (("policy.", ctx["policy"]), ("critic.", ctx.get("critic"))):
        if model is not None:
            tensors.update({prefix + k: v.detach().clone() for k, v in model.state_dict().items()})
    opt_state = opt.state_dict()
    for i, st in opt_state["state"].items():
        tensors.update({f"opt.{i}.{k}": v.clone() for k, v in st.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta["ctx"] = ctx_state(ctx, tensors, "ctx")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "state.safetensors")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, path + ".tmp",
              metadata={"state": json.dumps(meta)})
    fsync_path(path + ".tmp")
    os.replace(path + ".tmp", path)  # one file, replaced atomically: a kill leaves the old state or the new
    write_file(os.path.join(folder, "state.json.tmp"), json.dumps({"step": run["step"]}))
    os.replace(os.path.join(folder, "state.json.tmp"), os.path.join(folder, "state.json"))  # for people
    fsync_path(folder)


def ctx_state(obj, tensors, key, whole=False):
    """The resumable part of a stage's ctx as JSON: every Shuffler and generator wherever it sits, and the
    RESUME_KEYS values whole. Generator states go into tensors, under their key."""
    if isinstance(obj, Shuffler):
        version, internal, gauss = obj.rng.getstate()
        return {"shuffler": [version, list(internal), gauss], "n": obj.n, "order": obj.order}
    if isinstance(obj, torch.Generator):
        tensors[key] = obj.get_state()
        return {"generator": key}
    if isinstance(obj, dict):
        return {k: ctx_state(v, tensors, f"{key}.{k}", whole or (key == "ctx" and k in RESUME_KEYS))
                for k, v in obj.items()
                if whole or isinstance(v, (Shuffler, torch.Generator, dict)) or (key == "ctx" and k in RESUME_KEYS)}
    return obj  # a plain JSON value of a RESUME_KEYS entry


def restore_ctx(ctx, state, tensors):
    """Put a ctx_state back into ctx (rebuilt by prepare() exactly as the interrupted run built it)."""
    for k, v in state.items():
        if isinstance(v, dict) and "shuffler" in v:
            ctx[k] = ctx[k] if isinstance(ctx.get(k), Shuffler) else Shuffler(v["n"], 0)
            version, internal, gauss = v["shuffler"]
            ctx[k].rng.setstate((version, tuple(internal), gauss))
            ctx[k].n, ctx[k].order = v["n"], list(v["order"])
        elif isinstance(v, dict) and "generator" in v:
            ctx[k].set_state(tensors[v["generator"]])
        elif isinstance(v, dict):
            ctx[k] = ctx[k] if isinstance(ctx.get(k), dict) else {}
            restore_ctx(ctx[k], v, tensors)
        else:
            ctx[k] = v


def resumable_args(args):
    return {k: v for k, v in vars(args).items() if not callable(v) and k not in UNRESUMED_FLAGS}


def load_state(folder, args, ctx, opt):
    """The run progress saved by save_state, with the weights, optimizer, RNG and ctx put back; None if there
    is no state. A state written with other flags is refused with one line."""
    path = os.path.join(folder, "state.safetensors")
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["state"])
        tensors = load_file(path)
    except Exception as e:  # a state is ours: anything wrong with it is one line, not a traceback
        die(f"{path}: not a readable state ({str(e).splitlines()[0]}); delete {folder} to start over")
    now = json.loads(json.dumps(resumable_args(args)))
    changed = next((k for k in sorted(set(now) | set(meta["args"])) if now.get(k) != meta["args"].get(k)), None)
    if changed:
        die(f"--resume: {path} was written with --{changed.replace('_', '-')} {meta['args'].get(changed)}, "
            f"this run has {now.get(changed)}; resume with the same flags, or delete {folder}")
    for prefix, model in (("policy.", ctx["policy"]), ("critic.", ctx.get("critic"))):
        if model is not None:
            model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    saved = {}  # AdamW's per-parameter state, by the parameter's index, as opt.state_dict() numbers them
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, field = k.split(".", 2)
            saved.setdefault(int(i), {})[field] = v
    opt.load_state_dict({**opt.state_dict(), "state": saved})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    restore_ctx(ctx, meta["ctx"], tensors)
    return meta["run"]


def fail(msg):
    """A run that cannot go on (not bad input): one line on stderr and exit code 1; nothing is saved. With
    several processes every rank stops, and rank 0 alone says why."""
    if RANK == 0:
        print(f"posttrain: error: {msg}", file=sys.stderr)
    sys.exit(1)


STOP_REQUESTED = False


def request_stop(signum, frame):
    """SIGINT (Ctrl-C): finish the current step, save a resumable state, stop (see train_stage)."""
    global STOP_REQUESTED
    STOP_REQUESTED = True


def accumulate_gradients(stage, ctx, args, batch, rows):
    """Forward and backward over one minibatch (the batch rows `rows`, a (R,) index tensor) in micro-batches.

    Each micro-batch's mean loss is weighted by its share of the minibatch's units (batch["w"]: tokens or
    sequences per row, as the stage's loss averages), so the accumulated gradient is that of the mean over
    the whole minibatch, not a mean of micro-batch means, and does not depend on --micro-batch-size.
    Returns the micro-batches' logged metrics.
    """
    total_w = batch["w"][rows].sum()
    if WORLD > 1:
        total_w = all_sum(total_w).to(total_w)  # the units of every rank's rows: the global mean
    total_w = total_w.clamp(min=1)
    metrics = []
    for sl in chunks(len(rows), args.micro_batch_size):
        micro = {k: v[rows[sl]] for k, v in batch.items()}
        loss, m = stage.loss(ctx, args, micro)
        (loss * micro["w"].sum() / total_w).backward()
        metrics.append({"loss": loss.item(), **{k: float(v) for k, v in m.items()}})
    return metrics


def lr_at(step, args):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def main(argv=None):
    args = get_args(argv)
    names = [s.strip() for s in args.stage.split(",") if s.strip()]
    if WORLD > 1:
        start_distributed(args)
    lock = None
    if os.path.isdir(args.out_dir) and RANK == 0:
        # the lock first, then repair what a killed save left there, so that validation (say of --init
        # OUT_DIR/sft) and every later code path only ever see complete checkpoints
        lock = lock_out_dir(args.out_dir)
        for name in STAGES:
            recover_folder(os.path.join(args.out_dir, name))
    try:
        barrier()  # the other ranks read OUT_DIR only after rank 0 repaired it
        validate_run(args, names)  # every flag, folder and data file, before anything is written
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // WORLD))
        if lock is None and RANK == 0:
            os.makedirs(args.out_dir, exist_ok=True)
            lock = lock_out_dir(args.out_dir)
        barrier()
        previous_handler = signal.signal(signal.SIGINT, request_stop)  # Ctrl-C: stop after the step, resumable
        try:
            run_stages(args, names)
        finally:
            signal.signal(signal.SIGINT, previous_handler)
    finally:
        if lock is not None:
            lock.close()  # releases the lock


def start_distributed(args):
    """torchrun's ranks: join the group, keep only rank 0's prints, refuse what cannot be split."""
    global DIST_DEVICE
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    init_distributed(device)
    DIST_DEVICE = "cuda" if device == "cuda" else "cpu"
    if RANK > 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for all; errors still reach stderr
    if args.minibatch_size is not None:
        die(f"--minibatch-size splits a batch that {WORLD} processes already split; with torchrun each pass "
            "over a rollout batch is one optimizer step")


def run_stages(args, names):
    """The stages of --stage in order; each training stage starts from the previous policy's output."""
    outputs = []  # the folders the training stages wrote, in order
    for n in names:
        stage = STAGES[n]
        if stage.run is not None:
            if RANK == 0:  # eval: rank 0 alone, the others wait
                stage.run(args, n)  # a stage that trains nothing (eval)
            barrier()
            continue
        policies = [o for o, s in outputs if not STAGES[s].score_head]
        if policies and not stage.score_head:
            # a pipeline: each stage starts from the previous policy's output (distill distils it: its teacher).
            # Scorers (rm, prm) are skipped: a later grpo --reward rm|prm finds them in OUT_DIR, but its init is
            # the last policy, not the scorer.
            args.init = None
            setattr(args, stage.pipeline_input, policies[-1])
        outputs.append((train_stage(args, n), n))
    policies = [o for o, s in outputs if not STAGES[s].score_head]
    if len(policies) > 1 and args.pipeline_eval and RANK == 0:
        eval_pipeline(args, policies)


def validate_run(args, names):
    """Refuse bad input with one line before any work: the stage names, every flag of every stage the run
    will train (those built on the way included), the output folders, the model folders named by flags, and
    every row of every data file the stages will read. Returns the training plan (stages_to_train)."""
    if not names:
        die("--stage is empty; name a stage or a comma-separated pipeline of stages")
    for n in names:
        if n not in STAGES:
            die(f"--stage {n!r} is not a stage; choose from {', '.join(STAGES)}")
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        die(f"--stage names {twice} twice; its second run would overwrite the first's {twice} output")
    if args.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda but no CUDA device is available")
    shaped = [f for f in MODEL_FLAGS if getattr(args, f.replace("-", "_")) is not None]
    if args.init is not None and shaped:
        die(f"--{shaped[0]} shapes a model made from scratch, but --init {args.init} gives the model; drop it")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        die(f"--out-dir {args.out_dir} is a file, not a folder")
    parent = next(p for p in (args.out_dir, *parents(args.out_dir)) if os.path.exists(p))
    if not os.access(parent, os.W_OK):
        die(f"--out-dir {args.out_dir}: {parent} is not writable")
    if args.eval_out and not os.path.isdir(os.path.dirname(os.path.abspath(args.eval_out))):
        die(f"--eval-out {args.eval_out}: its folder does not exist")
    for flag, folder in (("--init", args.init), ("--teacher", args.teacher), ("--base", args.base),
                         ("--prm-policy", args.prm_policy),
                         *(("--ckpt", c) for c in args.ckpt or [])):
        if folder is not None:
            check_model_folder(flag, folder)
    plan = stages_to_train(args, names)
    # the stages named first, so that an error names what the user asked for, then those built on the way
    for n in dict.fromkeys(names + plan):
        check_stage_args(stage_args(args, n), n)
    # every row of every file, through the tokenizer the run starts from (a pipeline keeps its tokenizer)
    folder = args.init or args.base or (args.ckpt or [None])[0]
    task = load_task(args, folder)
    if folder is not None:
        with open(os.path.join(folder, "config.json")) as f:
            context = json.load(f).get("max_position_embeddings", 2048)
    else:
        context = args.max_seq_len or STAGES["pretrain"].defaults["max_seq_len"]
    for n in dict.fromkeys(names + plan):
        check_step_tokenizer(n, stage_args(args, n), task)
    files = dict.fromkeys(f for n in dict.fromkeys(plan + names) for f in stage_files(n, stage_args(args, n)))
    for f in files:
        check_lengths(task, f, task.rows(f), context)
    return plan


def check_lengths(task, name, rows, context):
    """Refuse a data row whose tokens would not fit the model's context (a prompt must leave room for one
    generated token): found here, not when the row is first drawn, minutes into training."""
    tok = task.tok
    if "text" in rows[0]:
        n = [len(ids) for ids in tok.documents([r["text"] for r in rows])]
    else:
        prompts = [r["prompt"] for r in rows]
        sides = [k for k in ("completion", "chosen", "rejected") if k in rows[0]]
        n = [max(x) for x in zip(*[tok.lengths(prompts, [r[k] for r in rows]) for k in sides])] if sides \
            else [m + 1 for m in tok.lengths(prompts)]
    i = next((i for i, m in enumerate(n) if m > context), None)
    if i is not None:
        die(f"{os.path.join(task.data_dir, name + '.jsonl')}: row {i + 1} is {n[i]} tokens, more than the "
            f"model's context of {context} (max_position_embeddings / --max-seq-len)")


def parents(path):
    path = os.path.abspath(path)
    while os.path.dirname(path) != path:
        path = os.path.dirname(path)
        yield path


def stage_files(name, args):
    """The data files (names in --data-dir) stage `name` reads with these flags."""
    prompts = ["sft", "rl"] if args.task == "arith" else ["rl"]  # training_prompts
    pairs = prompts if args.pairs == "self" else ["pairs"]
    files = {"pretrain": ["pretrain"], "pretrain-small": ["pretrain"], "sft": ["sft"], "rft": ["rl"],
             "dpo": pairs, "rm": pairs, "grpo": ["rl"], "ppo": ["rl"], "distill": prompts,
             "prm": ["rl"] + (["pretrain"] if args.prm_data in ("pretrain", "mixed") else []),
             "eval": [s for s in EVAL_SPLITS if s == "test" or os.path.exists(
                 os.path.join(args.data_dir, s + ".jsonl"))]}[name]
    return files + ([args.eval_split] if args.eval_problems > 0 and name != "eval" else [])


if __name__ == "__main__":
    main()
