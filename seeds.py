"""
Results over seeds: each seed a whole chain (pretrain -> sft -> the stage), held-out pass@1 before and after
the stage, mean and standard deviation across seeds beside each run's own paired standard error.

    python seeds.py --seeds 1 2 3                                   # the main job: grpo, defaults
    python seeds.py --seeds 1 2 3 --stage dpo --name dpo-rpo --flags "--rpo-alpha 0.5"
    python seeds.py --seeds 1 2 3 --stage prm                       # a PRM per seed, in OUT/seed<S>/prm/prm
    python seeds.py --seeds 1 2 3 --name grpo-prm --flags "--reward prm" --link prm:prm
    python seeds.py --seeds 1 2 3 --stage distill                   # teacher: that seed's grpo variant
    python seeds.py --seeds 1 2 3 --all                             # every variant of README's tables
    python seeds.py --table --summary seeds.json                    # README's table, from the summary

Folders: OUT/seed<S>/ holds that seed's pretrain and sft (built once, shared by every variant), and each
variant trains into OUT/seed<S>/<name>/ from that sft. OUT/summary.json collects every variant's per-seed
numbers; --table prints them as the markdown table README's Results show, so README and measurement come
from one file. A variant's numbers are read from its eval.json, so a finished seed is never run twice.

--link STAGE:VARIANT lets variants share a model instead of each training its own: OUT/seed<S>/<name>/<STAGE>
becomes a link to OUT/seed<S>/<VARIANT>/<STAGE> (e.g. one PRM per seed for every --reward prm variant).
distill is measured from its own student base (pretrain-small, built in the variant's folder or linked) with
the seed's grpo variant (OUT/seed<S>/grpo/grpo, trained first if missing) as the teacher; its "before" is the
student base's pass@1.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


# every variant of README's "Over seeds" tables: (name, stage, flags, links); `--all` runs them in this order
VARIANTS = [
    ("sft", "sft", "", []),
    ("grpo", "grpo", "", []),
    ("dpo", "dpo", "", []),
    ("dpo-rpo", "dpo", "--rpo-alpha 1", []),
    ("grpo-drgrpo", "grpo", "--no-std-scaling --loss-agg seq_mean_token_sum_norm", []),
    ("grpo-dapo", "grpo", "--clip-high 0.28", []),
    ("grpo-rloo", "grpo", "--advantage rloo", []),
    ("grpo-kl", "grpo", "--kl-coef 0.04", []),
    ("ppo", "ppo", "", []),
    ("rft", "rft", "", []),
    ("rm", "rm", "", []),
    ("distill-forward", "distill", "", []),
    *[(f"distill-{m}", "distill", f"--distill-mode {m}", ["pretrain-small:distill-forward"])
      for m in ("reverse", "jsd", "onpolicy", "token")],
    ("prm", "prm", "", []),
    ("grpo-steps", "grpo", "--reward steps", []),
    ("grpo-prm-combined", "grpo", "--reward prm --process-coef 1", ["prm:prm"]),
    ("grpo-steps-combined", "grpo", "--reward steps --process-coef 1", []),
    ("grpo-prm", "grpo", "--reward prm", ["prm:prm"]),
    # the PRM of earlier versions, a linear head on the hidden state, and the same two grpo runs with it
    ("prm-hidden", "prm", "--prm-score hidden", []),
    ("grpo-prm-hidden", "grpo", "--reward prm", ["prm:prm-hidden"]),
    ("grpo-prm-combined-hidden", "grpo", "--reward prm --process-coef 1", ["prm:prm-hidden"]),
    ("grpo-bf16", "grpo", "--dtype bf16", []),
    ("grpo-bf16-tis", "grpo", "--dtype bf16 --tis-cap 2", []),
]


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
    for link in args.link:
        stage, variant = link.split(":")
        os.makedirs(out, exist_ok=True)
        if not os.path.lexists(os.path.join(out, stage)):
            os.symlink(os.path.join(base, variant, stage), os.path.join(out, stage))
    start = ["--init", os.path.join(base, "sft")]
    if args.stage == "distill":
        teacher = os.path.join(base, "grpo", "grpo")
        if not os.path.exists(os.path.join(teacher, "eval.json")):
            run_variant(argparse.Namespace(**{**vars(args), "stage": "grpo", "name": "grpo", "flags": "",
                                              "link": []}), seed)
        start = ["--teacher", teacher]
    if not os.path.exists(os.path.join(out, args.stage, "eval.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "posttrain.py"), "--stage", args.stage, *start,
                        "--out-dir", out, *common, *shlex.split(args.flags)], check=True)
    ev = json.load(open(os.path.join(out, args.stage, "eval.json")))
    with open(os.path.join(out, args.stage, "metrics.jsonl")) as f:
        ev["metrics"] = [json.loads(line) for line in f]
    return ev


# logged per step; their mean over a run's last 5 steps shows whether a learned reward was gamed (the verifier's
# "reward" falls while the scorer's rises, completions grow, more are cut off), and how far the sampler's
# log-probs are from the trainer's (bf16) and what truncated importance sampling did about it
SIGNALS = ("reward", "prm_step_reward", "rm_score", "step_reward", "len", "cut_off", "kl_ref", "sampler_logp_gap",
           "tis_weight_mean", "tis_clip_frac")


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
    # a scorer's own held-out numbers (prm: step_balanced_accuracy, ...), and the last steps' logged signals
    for group, values in (("held_out", [ev["after"] for ev in evals.values()]),
                          ("last_steps", [last_steps(ev.get("metrics", [])) for ev in evals.values()])):
        keys = [k for k in values[0] if k not in ("greedy", "sampled") and isinstance(values[0][k], (int, float))]
        out[group] = {k: mean_sd([v[k] for v in values if isinstance(v.get(k), (int, float))]) for k in keys}
    return out


def last_steps(metrics, n=5):
    rows = metrics[-n:]
    return {k: statistics.mean(r[k] for r in rows) for k in SIGNALS if rows and all(r.get(k) is not None
                                                                                     for r in rows)}


def mean_sd(xs):
    return {"per_seed": xs, "mean": statistics.mean(xs) if xs else None,
            "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def table(summary, names=None):
    lines = ["| variant | seeds | greedy after | greedy change | sampled after | sampled change | "
             "per-seed sampled change (paired SE) |", "|---|---|---|---|---|---|---|"]
    for name in names or summary:
        v = summary[name]
        g, s = v["result"].get("greedy"), v["result"].get("sampled")
        cell = (lambda r: f"{r['after_mean']:.1f}%" if r else "-")
        change = (lambda r: f"{r['change_mean']:+.1f} ± {r['change_sd']:.1f}" if r else "-")
        seeds = " ".join(f"{p['change']:+.1f} ({p['paired_se']:.1f})" for p in (s or g or {}).get("per_seed", []))
        lines.append(f"| {name} (`{v['command']}`) | {', '.join(map(str, v['seeds']))} | {cell(g)} | {change(g)} | "
                     f"{cell(s)} | {change(s)} | {seeds} |")
    return "\n".join(lines)


def signals_table(summary, names):
    """The held-out checks of a scorer and the last steps' logged signals, mean ± sd over seeds."""
    keys = [k for k in ("step_balanced_accuracy", "step_accuracy", "step_base_rate", "prm_answer_acc", "pair_acc")
            + SIGNALS if any(k in summary[n]["result"].get(g, {}) for n in names for g in ("held_out", "last_steps"))]
    lines = ["| variant | " + " | ".join(f"`{k}`" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for n in names:
        r = {**summary[n]["result"].get("held_out", {}), **summary[n]["result"].get("last_steps", {})}
        cells = [f"{r[k]['mean']:.3g} ± {r[k]['sd']:.2g}" if r.get(k, {}).get("mean") is not None else "-"
                 for k in keys]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description="posttrain results over seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--stage", default="grpo", help="the stage measured, trained from each seed's sft")
    p.add_argument("--name", default=None, help="the variant's name (default: the stage's)")
    p.add_argument("--flags", default="", help="extra posttrain flags of the variant, one quoted string")
    p.add_argument("--link", action="append", default=[], metavar="STAGE:VARIANT",
                   help="use that variant's STAGE output (e.g. prm:prm) instead of training one in this variant")
    p.add_argument("--out", default=os.path.join(ROOT, "out_seeds"), help="where the chains are trained")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each run")
    p.add_argument("--summary", default=None, help="the summary file (default: OUT/summary.json)")
    p.add_argument("--all", action="store_true", help="run every variant of VARIANTS (README's tables)")
    p.add_argument("--table", action="store_true", help="print the markdown table of the summary and exit")
    p.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                   help="with --table: only these variants, in this order")
    p.add_argument("--signals", nargs="+", default=None, metavar="VARIANT",
                   help="with --table: print instead these variants' held-out scorer checks and the mean of "
                        "their last 5 steps' reward, scorer score, length and cut-off fraction")
    args = p.parse_args()
    args.name = args.name or args.stage
    path = args.summary or os.path.join(args.out, "summary.json")
    summary = json.load(open(path)) if os.path.exists(path) else {}
    jobs = [(args.name, args.stage, args.flags, args.link)] if not args.all else VARIANTS
    for name, stage, flags, link in ([] if args.table else jobs):
        job = argparse.Namespace(**{**vars(args), "name": name, "stage": stage, "flags": flags, "link": link})
        evals = {seed: run_variant(job, seed) for seed in args.seeds}
        command = f"--stage {stage} {flags}".strip()
        summary[name] = {"command": command, "seeds": args.seeds, "result": summarise(evals)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(path + ".tmp", path)
    print(signals_table(summary, args.signals) if args.signals else table(summary, args.variants))


if __name__ == "__main__":
    main()
