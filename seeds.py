"""
Results over seeds: each seed a whole chain (pretrain -> sft -> the stage), held-out pass@1 before and after
the stage, mean and standard deviation across seeds beside each run's own paired standard error.

    python seeds.py --seeds 1 2 3                                   # the main job: grpo, defaults
    python seeds.py --seeds 1 2 3 --stage dpo --name dpo-rpo --flags "--rpo-alpha 0.5"
    python seeds.py --table --summary seeds.json                    # README's table, from the summary

Folders: OUT/seed<S>/ holds that seed's pretrain and sft (built once, shared by every variant), and each
variant trains into OUT/seed<S>/<name>/ from that sft. OUT/summary.json collects every variant's per-seed
numbers; --table prints them as the markdown table README's Results show, so README and measurement come
from one file. A variant's numbers are read from its eval.json, so a finished seed is never run twice.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def run_variant(args, seed):
    """Train (if missing) seed's pretrain, sft and this variant; return its eval.json."""
    base = os.path.join(args.out, f"seed{seed}")
    common = ["--seed", str(seed), "--threads", str(args.threads)]
    if not os.path.exists(os.path.join(base, "sft", "eval.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "posttrain.py"), "--stage", "pretrain,sft",
                        "--out-dir", base, "--no-pipeline-eval", *common], check=True)
    out = os.path.join(base, args.name)
    if args.stage == "sft":  # the chain's own sft
        return json.load(open(os.path.join(base, "sft", "eval.json")))
    if not os.path.exists(os.path.join(out, args.stage, "eval.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "posttrain.py"), "--stage", args.stage, "--init",
                        os.path.join(base, "sft"), "--out-dir", out, *common, *shlex.split(args.flags)],
                       check=True)
    return json.load(open(os.path.join(out, args.stage, "eval.json")))


def paired(before, after):
    """Mean change in points and its paired standard error, as posttrain's report_eval prints them."""
    d = [100 * (a - b) for a, b in zip(after, before)]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0
    return statistics.mean(d), se


def summarise(evals):
    """Per-seed and across-seed numbers of one variant: before / after / change, greedy and sampled."""
    out = {}
    for kind in ("greedy", "sampled"):
        per_seed = []
        for ev in evals.values():
            before, after = ev["before"].get(kind), ev["after"].get(kind)
            if not after:
                continue
            change, se = paired(before, after) if before else (100 * statistics.mean(after), 0.0)
            per_seed.append({"before": 100 * statistics.mean(before) if before else 0.0,
                             "after": 100 * statistics.mean(after), "change": change, "paired_se": se})
        if per_seed:
            changes = [p["change"] for p in per_seed]
            out[kind] = {"per_seed": per_seed, "change_mean": statistics.mean(changes),
                         "change_sd": statistics.stdev(changes) if len(changes) > 1 else 0.0,
                         "after_mean": statistics.mean(p["after"] for p in per_seed)}
    return out


def table(summary):
    lines = ["| variant | seeds | greedy after | greedy change | sampled after | sampled change | "
             "per-seed sampled change (paired SE) |", "|---|---|---|---|---|---|---|"]
    for name, v in summary.items():
        g, s = v["result"].get("greedy"), v["result"].get("sampled")
        cell = (lambda r: f"{r['after_mean']:.1f}%" if r else "-")
        change = (lambda r: f"{r['change_mean']:+.1f} ± {r['change_sd']:.1f}" if r else "-")
        seeds = " ".join(f"{p['change']:+.1f} ({p['paired_se']:.1f})" for p in (s or g or {}).get("per_seed", []))
        lines.append(f"| {name} (`{v['command']}`) | {', '.join(map(str, v['seeds']))} | {cell(g)} | {change(g)} | "
                     f"{cell(s)} | {change(s)} | {seeds} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description="posttrain results over seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--stage", default="grpo", help="the stage measured, trained from each seed's sft")
    p.add_argument("--name", default=None, help="the variant's name (default: the stage's)")
    p.add_argument("--flags", default="", help="extra posttrain flags of the variant, one quoted string")
    p.add_argument("--out", default=os.path.join(ROOT, "out_seeds"), help="where the chains are trained")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each run")
    p.add_argument("--summary", default=None, help="the summary file (default: OUT/summary.json)")
    p.add_argument("--table", action="store_true", help="print the markdown table of the summary and exit")
    args = p.parse_args()
    args.name = args.name or args.stage
    path = args.summary or os.path.join(args.out, "summary.json")
    summary = json.load(open(path)) if os.path.exists(path) else {}
    if not args.table:
        evals = {seed: run_variant(args, seed) for seed in args.seeds}
        command = f"--stage {args.stage} {args.flags}".strip()
        summary[args.name] = {"command": command, "seeds": args.seeds, "result": summarise(evals)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(path + ".tmp", path)
    print(table(summary))


if __name__ == "__main__":
    main()
