"""
Speed figures for posttrain, one function per benchmark:

    python bench.py --what sampler     new tokens/s of rollout.sample at several batch sizes, side by side
                                       with HF transformers' generate on the same weights if it is installed
    python bench.py --what grpo        one GRPO step (rollout, old/reference log-probs, update), by phase

This script (only this one, besides the test-fixture script) imports transformers, and only if present; the
program never needs it. Timings are wall-clock medians after a warm-up run, on the threads torch is given.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from model import GPT, GPTConfig
from rollout import sample

# the ops that do the model's arithmetic; everything else in a decode step is overhead we try to remove
COMPUTE_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
               "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention",
               "aten::_scaled_dot_product_cudnn_attention")


def median_times(fns, reps):
    """Median wall-clock seconds of each fn() over reps rounds, after one warm-up call each. The fns take
    turns within a round, so a change in machine load (shared machines) hits them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def compute_share(fn):
    """Fraction of fn's wall time spent inside matrix-product and attention kernels (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("bench_total"):
            fn()
    events = prof.key_averages()
    total = next(e.cpu_time_total for e in events if e.key == "bench_total")
    return sum(e.self_cpu_time_total for e in events if e.key in COMPUTE_OPS) / total


def load_hf(model):
    """The same weights in transformers, read from a folder save_pretrained wrote; None if not installed."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    return hf.eval()


def bench_sampler(args):
    """rollout.sample vs HF generate: random default-config weights, no EOS, so every row runs new_tokens."""
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()
    hf = load_hf(model)
    print(f"sampler: default GPTConfig ({model.num_params() / 1e6:.2f}M params), prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, temperature 1, {torch.get_num_threads()} threads, "
          f"median of {args.reps}")
    print(f"{'batch':>6} {'ours tok/s':>11} {'HF tok/s':>9} {'ours/HF':>8} {'matmul+attn share':>18}")
    for B in args.batch_sizes:
        gen = torch.Generator().manual_seed(0)
        prompt_ids = torch.randint(3, model.config.vocab_size, (B, args.prompt_len), generator=gen)  # (B, P)
        prompts = prompt_ids.tolist()

        fns = {"ours": lambda: sample(model, prompts, args.new_tokens, temperature=1.0, generator=gen)}
        if hf is not None:
            # top_k=0 switches off HF's default top-k of 50; no EOS id and min_new_tokens pin the length
            kwargs = dict(attention_mask=torch.ones_like(prompt_ids), do_sample=True, temperature=1.0,
                          top_k=0, top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                          use_cache=True, eos_token_id=None, pad_token_id=0)
            fns["hf"] = torch.inference_mode()(lambda: hf.generate(prompt_ids, **kwargs))
        secs = median_times(fns, args.reps)
        tok_s = {name: B * args.new_tokens / s for name, s in secs.items()}
        share = compute_share(fns["ours"])
        if hf is not None:
            theirs = f"{tok_s['hf']:>9.0f} {secs['hf'] / secs['ours']:>7.2f}x"
        else:
            theirs = f"{'-':>9} {'-':>8}"
        print(f"{B:>6} {tok_s['ours']:>11.0f} {theirs} {share:>17.0%}")


def bench_grpo(args):
    """Seconds of one GRPO step of posttrain.py at a fixed config, split into its phases.

    The step is the stage's own code (sample_groups, chunked_logps, grpo_loss), not a re-implementation; the
    model is --init (e.g. out/sft) or, by default, a fresh model of the default config (its completions are
    then long and random, so pass an SFT checkpoint for realistic lengths).
    """
    import posttrain
    with tempfile.TemporaryDirectory() as tmp:
        if args.init is None:
            GPT(GPTConfig()).save_pretrained(tmp)
        argv = ["--stage", "grpo", "--init", args.init or tmp, "--device", "cpu", "--batch-size",
                str(args.grpo_prompts), "--group-size", str(args.group_size), "--kl-coef", "0.04"]
        pargs, ctx = posttrain.prepare("grpo", posttrain.get_args(argv))
    policy = ctx["policy"]
    params = list(policy.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6)  # tiny lr: the step's cost, not its effect, is measured here
    phases = {"rollout": [], "old logps": [], "ref logps": [], "update": []}
    for rep in range(args.reps + 1):  # the first run is a warm-up
        t0 = time.perf_counter()
        _, _, _, roll = posttrain.sample_groups(ctx, pargs, policy)
        t1 = time.perf_counter()
        roll["old_logps"] = posttrain.chunked_logps(policy, roll, pargs)
        t2 = time.perf_counter()
        roll["ref_logps"] = posttrain.chunked_logps(ctx["ref"], roll, pargs)
        t3 = time.perf_counter()
        roll["adv"] = torch.randn(len(roll["old_logps"]))  # (B,) any advantages: the cost does not depend on them
        roll["w"] = roll["completion_mask"].sum(1)
        for _ in range(pargs.ppo_epochs):
            posttrain.accumulate_gradients(posttrain.STAGES["grpo"], ctx, pargs, roll, torch.arange(len(roll["w"])))
            opt.step()
            opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if rep > 0:
            for key, t in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[key].append(t)
    total = sum(statistics.median(v) for v in phases.values())
    rows = len(roll["w"])
    print(f"one GRPO step: {args.grpo_prompts} prompts x G={args.group_size} = {rows} completions, "
          f"mean length {roll['completion_mask'].sum(1).float().mean():.1f} tokens, {pargs.ppo_epochs} passes, "
          f"{torch.get_num_threads()} threads, median of {args.reps}")
    for key, v in phases.items():
        print(f"  {key:10s} {statistics.median(v):7.3f} s  ({100 * statistics.median(v) / total:4.1f}%)")
    print(f"  {'total':10s} {total:7.3f} s")


BENCHMARKS = {"sampler": bench_sampler, "grpo": bench_grpo}


def main():
    parser = argparse.ArgumentParser(description="posttrain speed figures")
    parser.add_argument("--what", choices=sorted(BENCHMARKS), default="sampler", help="which benchmark to run")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per figure (median reported)")
    # sampler
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64, 256], help="sampler batch sizes")
    parser.add_argument("--prompt-len", type=int, default=16, help="sampler prompt length")
    parser.add_argument("--new-tokens", type=int, default=64, help="sampler tokens generated per row")
    # grpo
    parser.add_argument("--init", default=None, help="grpo: checkpoint folder of the policy (default: random)")
    parser.add_argument("--grpo-prompts", type=int, default=16, help="grpo: prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="grpo: completions per prompt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    BENCHMARKS[args.what](args)


if __name__ == "__main__":
    main()
