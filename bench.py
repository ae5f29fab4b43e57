"""
Speed figures for posttrain, one function per benchmark:

    python bench.py --what sampler     new tokens/s of rollout.sample at several batch sizes, side by side
                                       with HF transformers' generate on the same weights if it is installed
    python bench.py --what grpo        one GRPO step (rollout, old/reference log-probs, update), by phase, side
                                       by side with TRL's GRPOTrainer at equal work if trl is installed
    python bench.py --what smollm2 --grpo-prompts 4 --group-size 4 --new-tokens 32
                                       the same on a random model of SmolLM2-135M's shape, with peak memory,
                                       and our sampler against transformers' generate on its weights
    python bench.py --what gemm        the machine's matrix-product peak (GFLOP/s) at the model's shapes,
                                       fp32 and bf16
    python bench.py --what train       pretrain and sft optimizer steps: real tokens/s, GFLOP/s and the
                                       fraction of the fp32 GEMM peak measured in the same run (MFU); also
                                       an sft step on a random model of SmolLM2-135M's shape
    python bench.py --what eval --eval-dir OUT --eval-anchor DIR
                                       the eval stage on OUT's pretrain, sft and grpo as a whole process,
                                       against the same command of an earlier checkout DIR
    python bench.py --what all --init OUT/sft --eval-dir OUT --eval-anchor DIR --markdown
                                       sampler, train, grpo and eval in one run, then every target line as a
                                       Markdown table with the command and the machine (README's speed table)

This script (only this one, besides the test-fixture script) imports transformers (and trl), and only if
present; the program never needs them. Timings are wall-clock medians after a warm-up run, on the threads
torch is given.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from data import task
from data.tokenizer import Tokenizer
from model import GPT, GPTConfig
from rollout import sample

# the ops that do the model's arithmetic; everything else in a decode step is overhead we try to remove
COMPUTE_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
               "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention",
               "aten::_scaled_dot_product_cudnn_attention")


TARGETS = []  # (what, measured, goal, met) of every target line this run printed, for --markdown


def target(what, value, goal, unit="x"):
    """One line of a speed target of the project against its measured value: met or not."""
    shown = f"{value:.0%}" if unit == "%" else f"{value:.2f}x"
    bar = f"{goal:.0%}" if unit == "%" else f"{goal:g}x"
    print(f"  target {what}: {shown} (goal >= {bar}): {'met' if value >= goal else 'not met'}")
    TARGETS.append((what, shown, bar, "met" if value >= goal else "not met"))


def machine():
    """The CPU's model name, its cores, torch's threads and version: what a figure of this run was taken on."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def markdown(command):
    """The run's target lines as a Markdown table, with the command and the machine: README's speed table."""
    print(f"\n`{command}` on {machine()}, {time.strftime('%Y-%m-%d')}:\n")
    print("| target | measured | goal | |\n|---|---|---|---|")
    for what, shown, bar, met in TARGETS:
        print(f"| {what} | {shown} | {bar} | {met} |")


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
    results = []  # (batch, ours / HF or None, matmul + attention share)
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
        results.append((B, secs["hf"] / secs["ours"] if hf is not None else None, share))
    for B, ratio, _ in results:
        if ratio is not None:
            target(f"sampler vs transformers' generate at batch {B}", ratio, 2.0)
    for B, _, share in results:
        if B == 64:
            target("sampler's matmul + attention share of its time at batch 64", share, 0.6, "%")


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
            Tokenizer(task.DATA_DIR).save(tmp)  # the built-in tokenizer the default config's vocabulary fits
        argv = ["--stage", "grpo", "--init", args.init or tmp, "--device", args.device, "--batch-size",
                str(args.grpo_prompts), "--group-size", str(args.group_size), "--kl-coef", "0.04"]
        pargs, ctx = posttrain.prepare("grpo", posttrain.get_args(argv))
        _, total = grpo_step_report(pargs, ctx, args.reps)
        trl_grpo_report(pargs, ctx, args.init or tmp, args.reps, total)  # TRL reads the same folder


def grpo_step_report(pargs, ctx, reps):
    """Time the phases of reps GRPO steps (after a warm-up step) and print their medians -> (the last
    rollout, the total: the sum of the phases' medians, in seconds)."""
    import posttrain
    policy = ctx["policy"]
    params = list(policy.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6)  # tiny lr: the step's cost, not its effect, is measured here
    phases = {"rollout": [], "old logps": [], "ref logps": [], "update": []}

    def clock():
        if pargs.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    for rep in range(reps + 1):  # the first run is a warm-up
        t0 = clock()
        _, _, _, roll = posttrain.sample_groups(ctx, pargs, policy)
        t1 = clock()
        roll["old_logps"] = posttrain.chunked_logps(policy, roll, pargs)
        t2 = clock()
        roll["ref_logps"] = posttrain.chunked_logps(ctx["ref"], roll, pargs)
        t3 = clock()
        roll["adv"] = torch.randn(len(roll["old_logps"]), device=roll["old_logps"].device)  # any advantages
        roll["w"] = roll["completion_mask"].sum(1)
        for _ in range(pargs.ppo_epochs):
            posttrain.accumulate_gradients(posttrain.STAGES["grpo"], ctx, pargs, roll, torch.arange(len(roll["w"])))
            opt.step()
            opt.zero_grad(set_to_none=True)
        t4 = clock()
        if rep > 0:
            for key, t in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[key].append(t)
    total = sum(statistics.median(v) for v in phases.values())
    rows = len(roll["w"])
    print(f"one GRPO step: {pargs.batch_size} prompts x G={pargs.group_size} = {rows} completions, "
          f"mean length {roll['completion_mask'].sum(1).float().mean():.1f} tokens, {pargs.ppo_epochs} passes, "
          f"{torch.get_num_threads()} threads, median of {reps}")
    for key, v in phases.items():
        print(f"  {key:10s} {statistics.median(v):7.3f} s  ({100 * statistics.median(v) / total:4.1f}%)")
    print(f"  {'total':10s} {total:7.3f} s")
    # the update's floor: its matrix products (6 FLOPs per weight per token, attention left out) over every
    # cell of the padded rows, each pass; divide by a GEMM peak (--what gemm) for the least time they can take
    cells = roll["prompt_ids"].numel() + roll["completion_ids"].numel()
    real = int(roll["prompt_mask"].sum() + roll["completion_mask"].sum())
    per_token = train_flops_per_token(policy.config, 0)
    print(f"  update's matrix products: {pargs.ppo_epochs} passes x {cells} cells ({real} real tokens) = "
          f"{pargs.ppo_epochs * per_token * cells / 1e9:.1f} GFLOP ({pargs.ppo_epochs * per_token * real / 1e9:.1f} "
          f"over real tokens)")
    return roll, total


def trl_grpo_report(pargs, ctx, folder, reps, ours):
    """TRL's GRPOTrainer on the GRPO step grpo_step_report times, printed against `ours` (that total, s/step).

    Equal work, as far as TRL allows: the weights of `folder` (the policy's init; TRL loads its reference
    from it too), posttrain's prompts in sample_groups' order with the same token ids (checked), group_size
    completions each at the same temperature and length limit, no top-k / top-p, posttrain's verifier as the
    reward, and the same update: ppo_epochs passes over the batch (num_iterations), one AdamW step each, in
    micro-batches of --micro-batch-size rows (TRL's gradient accumulation over slices of one generation), old
    and reference log-probs in the same chunks, k3 KL at --kl-coef, clip 0.2, token-mean loss ("dapo"), fp32,
    CPU, no gradient checkpointing. Not equal: TRL samples with transformers' generate; its Trainer computes
    the gradient norm every step (for its log; max_grad_norm=0 skips only the clipping, and the bench's own
    step neither clips nor takes the norm); it turns rewards into advantages (the bench draws random ones);
    its random streams differ, so the completions' lengths do too (both are printed). One GRPO step of TRL
    is one generation and its num_iterations optimizer steps: the time between the ends of every
    num_iterations-th optimizer step (a callback), median over reps after a warm-up step; posttrain's figure
    is the sum of its phases' medians.
    """
    try:
        import datasets
        import trl
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    except ImportError:
        print("trl not installed: no TRL GRPOTrainer comparison")
        return
    if pargs.device != "cpu":
        print("TRL GRPOTrainer comparison: CPU only")
        return
    import posttrain
    task_, tok, K = ctx["task"], ctx["task"].tok, pargs.ppo_epochs
    rows = pargs.batch_size * pargs.group_size
    # TRL's accumulation needs equal slices: a micro-batch size that does not divide the batch becomes one slice
    mb = pargs.micro_batch_size if rows % pargs.micro_batch_size == 0 else rows

    def token(i):
        return None if i is None else tok.tok.id_to_token(i)

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=tok.path, bos_token=token(tok.bos_id),
                                     eos_token=token(tok.eos_id), pad_token=token(tok.pad_id),
                                     add_bos_token=tok.add_bos)
    hf_tok.chat_template = tok.chat_template if tok.use_chat else None
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    policy.generation_config.eos_token_id = tok.stop_ids  # TRL stops, and masks after, at each of ours
    # the prompts sample_groups drew, in its order: a fresh Shuffler of the same seed, warm-up step + reps
    order = posttrain.Shuffler(len(ctx["prompts"]), pargs.seed)
    problems = [ctx["prompts"][i] for _ in range(reps + 1) for i in order.take(pargs.batch_size)]
    shown = [[{"role": "user", "content": p}] if tok.use_chat else tok.render(p) for p in problems]
    data = datasets.Dataset.from_dict({"prompt": shown, "problem": problems})  # TRL passes "problem" on
    lengths, stamps = [], []  # mean completion length of each generation; the end of each optimizer step

    def verifier(prompts, completions, completion_ids, problem, **_):
        # posttrain's decoding and verdict, with its cut-off rule: a completion without a stop id is wrong
        lengths.append(statistics.mean(len(ids) for ids in completion_ids))  # EOS counted, as in ours
        return [float(task_.verify(q, tok.decode(ids), bool(ids) and ids[-1] in tok.stop_ids).correct)
                for q, ids in zip(problem, completion_ids)]

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = trl.GRPOConfig(
            # TRL's defaults are bf16 and gradient checkpointing on (transformers 5 names it activation_...)
            output_dir=out, use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False,
            per_device_train_batch_size=mb, gradient_accumulation_steps=rows // mb,  # one generation of `rows`
            num_generations=pargs.group_size, num_iterations=K, max_steps=K * (reps + 1),
            max_completion_length=pargs.max_new_tokens, temperature=pargs.temperature, top_k=0, top_p=1.0,
            beta=pargs.kl_coef, epsilon=0.2, loss_type="dapo", scale_rewards="group",
            optim="adamw_torch", learning_rate=1e-6, weight_decay=0.01, lr_scheduler_type="constant",
            max_grad_norm=0.0, shuffle_dataset=False, seed=pargs.seed, report_to="none",
            save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True)
        trainer = trl.GRPOTrainer(model=policy, reward_funcs=verifier, args=config, train_dataset=data,
                                  processing_class=hf_tok, callbacks=[Clock()])
        theirs = list(trainer._tokenize_prompts(shown[:1])[0][0])  # what TRL feeds generate for one prompt
        if theirs != tok.prompt_ids(problems[0]):
            raise ValueError(f"TRL's prompt ids {theirs} differ from posttrain's {tok.prompt_ids(problems[0])}")
        trainer.train()
    steps = [stamps[j + K] - stamps[j] for j in range(K - 1, len(stamps) - K, K)]  # (reps,), warm-up dropped
    secs = statistics.median(steps)
    print(f"TRL {trl.__version__} GRPOTrainer, the same step: mean length {statistics.mean(lengths[1:]):.1f} "
          f"tokens, micro-batches of {mb} rows, {torch.get_num_threads()} threads, median of {reps}")
    print(f"  {'total':10s} {secs:7.3f} s  (TRL / posttrain: {secs / ours:.2f}x)")
    target("GRPO step vs TRL's GRPOTrainer", secs / ours, 2.5)


SMOLLM2_135M = GPTConfig(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                         max_seq_len=2048, rope_theta=100000.0, tie_embeddings=True)


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "fixtures")


def smollm2_folder(folder):
    """Write a random model of SmolLM2-135M's shape (seed 0) with the fixtures' small BPE tokenizer into
    folder; return the flags that point a stage at it and at the GSM8K-style rows of tests/fixtures/gsm."""
    torch.manual_seed(0)
    GPT(SMOLLM2_135M).save_pretrained(folder)
    Tokenizer(os.path.join(FIXTURES, "qwen2")).save(folder)
    return ["--init", folder, "--task", "answer", "--data-dir", os.path.join(FIXTURES, "gsm")]


def peak_memory_gb(device):
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak resident set on the CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports kB


def bench_smollm2(args):
    """One GRPO step of a randomly initialised model of SmolLM2-135M's shape (30 layers, width 576, 9 heads,
    3 KV heads, vocabulary 49,152), by phase, with peak memory; then our sampler against transformers'
    generate on the same weights and prompts. Prompts are the GSM8K-style rows of tests/fixtures/gsm through
    that folder's small BPE tokenizer (the vocabulary is SmolLM2's size, the tokenizer is not SmolLM2's: no
    weights or tokenizers can be downloaded here). A random model never says EOS, so every completion runs
    --new-tokens: the step's cost at a fixed length."""
    import posttrain
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--stage", "grpo", *smollm2_folder(tmp), "--device", args.device,
                "--batch-size", str(args.grpo_prompts), "--group-size", str(args.group_size), "--max-new-tokens", str(args.new_tokens),
                "--micro-batch-size", str(args.grpo_prompts * args.group_size), "--kl-coef", "0.04",
                "--ppo-epochs", "1"] + (["--dtype", "bf16"] if args.device == "cuda" else [])
        pargs, ctx = posttrain.prepare("grpo", posttrain.get_args(argv))
    print(f"SmolLM2-135M shape: {ctx['policy'].num_params() / 1e6:.1f}M parameters, {args.device}")
    before = peak_memory_gb(args.device)
    roll, _ = grpo_step_report(pargs, ctx, args.reps)
    print(f"  peak memory {peak_memory_gb(args.device):.2f} GB (after loading the models: {before:.2f} GB)")
    # the sampler alone, against transformers' generate on the same weights and the same left-padded prompts
    hf = load_hf(ctx["policy"].cpu()) if args.device == "cpu" else None
    if hf is None:
        print("  transformers not installed (or not on the CPU): no generate comparison")
        return
    # the rollout's prompts, left padding removed: ours pads them again, HF reads the mask
    prompts = [ids[-int(m.sum()):] for ids, m in zip(roll["prompt_ids"].tolist(), roll["prompt_mask"])]
    ids, mask = roll["prompt_ids"], roll["prompt_mask"]
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, use_cache=True,
                  eos_token_id=None, pad_token_id=0)
    fns = {"ours": lambda: sample(ctx["policy"], prompts, args.new_tokens, temperature=1.0, generator=gen),
           "hf": torch.inference_mode()(lambda: hf.generate(ids, **kwargs))}
    secs = median_times(fns, args.reps)
    n = len(prompts) * args.new_tokens
    print(f"  sampler, {len(prompts)} rows x {args.new_tokens} new tokens: ours {n / secs['ours']:.0f} tok/s, "
          f"transformers generate {n / secs['hf']:.0f} tok/s, ours/HF {secs['hf'] / secs['ours']:.2f}x")


def model_shapes(config, rows):
    """(M, K, N) of every matrix product of one layer in a forward of `rows` tokens, each as often as it runs:
    q, k, v, o, the SwiGLU's gate, up and down; then the LM head, which runs once per forward, not per layer.
    The backward's products have the same three sizes, permuted."""
    q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    D, I = config.n_embd, config.intermediate_size
    return [(rows, D, q), (rows, D, kv), (rows, D, kv), (rows, q, D), (rows, D, I), (rows, D, I), (rows, I, D),
            (rows, D, config.vocab_size)]


def gemm_peak(config, rows, reps, dtype=torch.float32):
    """GFLOP/s of torch.mm at each of the model's forward shapes (model_shapes), and their maximum, the peak
    a training step could reach on this machine. Median of reps timings of 10 products each."""
    out = {}
    for M, K, N in sorted(set(model_shapes(config, rows))):
        a, b = torch.randn(M, K, dtype=dtype), torch.randn(K, N, dtype=dtype)
        secs = median_times({"mm": lambda: [torch.mm(a, b) for _ in range(10)]}, reps)["mm"] / 10
        out[(M, K, N)] = 2 * M * K * N / secs / 1e9
    return out


def bench_gemm(args):
    """The machine's matrix-product peak at the default model's shapes, fp32 and bf16."""
    config = GPTConfig()
    rows = args.gemm_rows
    print(f"GEMM (torch.mm) at the default model's shapes, M = {rows} tokens, {torch.get_num_threads()} threads, "
          f"median of {args.reps}")
    results = {dt: gemm_peak(config, rows, args.reps, dt) for dt in (torch.float32, torch.bfloat16)}
    print(f"{'M x K x N':>18} {'fp32 GFLOP/s':>13} {'bf16 GFLOP/s':>13}")
    for shape in results[torch.float32]:
        print(f"{'x'.join(map(str, shape)):>18} {results[torch.float32][shape]:>13.1f} "
              f"{results[torch.bfloat16][shape]:>13.1f}")
    print(f"{'peak':>18} {max(results[torch.float32].values()):>13.1f} {max(results[torch.bfloat16].values()):>13.1f}")
    return results


def train_flops_per_token(config, seq_len):
    """Training FLOPs per token: 6 per matrix parameter (forward 2, backward 4), plus attention's
    12 * layers * width * context (Kaplan et al. 2020 / nanoGPT's estimate), width = heads x head size."""
    *layer, head = model_shapes(config, 1)
    matrix = sum(K * N for _, K, N in layer) * config.n_layer + head[1] * head[2]  # the LM head once
    return 6 * matrix + 12 * config.n_layer * config.n_head * config.head_dim * seq_len


def mix_rate(config, rates):
    """GFLOP/s of one forward's matrix products run one after the other at the measured rates {(M, K, N):
    GFLOP/s}: their FLOPs over the sum of their times. The most a step made only of these products could
    reach, below the peak when the model's shapes run slower than its best one."""
    M = next(iter(rates))[0]
    *layer, head = model_shapes(config, M)
    shapes = layer * config.n_layer + [head]
    flops = [2 * m * k * n for m, k, n in shapes]
    return sum(flops) / sum(f / rates[shape] for f, shape in zip(flops, shapes))


def bench_train(args):
    """Optimizer steps of pretrain and sft as posttrain.py runs them (the stages' own batches, loss and
    accumulate_gradients, AdamW), in real (non-pad) tokens per second, GFLOP/s and MFU: the fraction of the
    fp32 GEMM peak measured in this same run at the same number of rows. Then the same sft step on a random
    model of SmolLM2-135M's shape (the GSM8K-style rows and BPE tokenizer of tests/fixtures, --train-batch
    rows), where the matrix products are large enough beside the rest to show what the loop can reach."""
    config = GPTConfig()
    print(f"training steps, {torch.get_num_threads()} threads, median of {args.reps}")
    with tempfile.TemporaryDirectory() as tmp:
        train_report("pretrain", config, [], args.reps)
        torch.manual_seed(0)
        GPT(config).save_pretrained(tmp)
        Tokenizer(task.DATA_DIR).save(tmp)
        train_report("sft", config, ["--init", tmp], args.reps)
    with tempfile.TemporaryDirectory() as tmp:
        train_report("sft", SMOLLM2_135M, [*smollm2_folder(tmp), "--batch-size", str(args.train_batch),
                                           "--micro-batch-size", str(args.train_batch)], args.reps,
                     label="sft, SmolLM2-135M shape")


def train_report(name, config, argv, reps, label=None):
    """Time reps optimizer steps of stage `name` (after a warm-up step) on a model of `config` and print
    the step's speed and MFU, with its target line."""
    import posttrain
    label = label or f"{name}, default model"
    with tempfile.TemporaryDirectory() as out:
        pargs, ctx = posttrain.prepare(name, posttrain.get_args(["--stage", name, "--out-dir", out, *argv]))
    stage, policy = posttrain.STAGES[name], ctx["policy"]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    batches = [stage.make_batch(ctx, pargs, i)[0] for i in range(reps + 1)]
    it = iter(batches)

    def step():
        batch = next(it)
        posttrain.accumulate_gradients(stage, ctx, pargs, batch, torch.arange(len(batch["w"])))
        opt.step()
        opt.zero_grad(set_to_none=True)

    secs = median_times({"step": step}, reps)["step"]
    real = statistics.median(int((b["ids"] != ctx["pad"]).sum()) for b in batches)
    T = statistics.median(b["ids"].shape[1] for b in batches)
    rows = int(statistics.median(b["ids"].numel() for b in batches))
    flops = train_flops_per_token(config, T) * real / secs
    rates = gemm_peak(config, rows, reps)
    peak, mix = max(rates.values()), mix_rate(config, rates)
    n_rows = statistics.median(len(b["ids"]) for b in batches)  # fewer than the sequences when packed
    print(f"  {label} ({policy.num_params() / 1e6:.2f}M params), {pargs.batch_size} sequences in {n_rows:g} rows "
          f"x {T:g} tokens ({real:g} real): {secs * 1e3:6.1f} ms/step, {real / secs / 1e3:5.1f}k real tok/s, "
          f"{flops / 1e9:5.1f} GFLOP/s = {flops / 1e9 / peak:4.0%} of the {peak:.0f} GFLOP/s fp32 GEMM peak at M = {rows}; the model's own "
          f"products in a row reach {mix:.0f} GFLOP/s ({mix / peak:.0%} of the peak)")
    target(f"{label} training at the fp32 GEMM peak (MFU)", flops / 1e9 / peak, 0.6, "%")


def bench_eval(args):
    """The eval stage of a pipeline, as a whole process: `posttrain.py --stage eval` on OUT/sft and OUT/grpo
    against OUT/pretrain (--eval-dir OUT, e.g. the main job's out/), wall seconds and the stage's own seconds
    per checkpoint. With --eval-anchor DIR (a checkout of an earlier posttrain, e.g. `git worktree add DIR
    5f9e300`, the version the eval's speed target is set against) the same command of that checkout runs in
    turn with this one, --eval-reps times each, and its estimates are printed beside ours: greedy accuracy and
    pass@1 per split, to show both measured the same thing (sampled figures are draws, so they differ a little;
    greedy ones agree unless a near-tie rounds the other way)."""
    import json
    import subprocess
    if args.eval_dir is None:
        sys.exit("bench.py --what eval needs --eval-dir OUT, a folder with pretrain, sft and grpo in it")
    folders = [os.path.join(args.eval_dir, s) for s in ("pretrain", "sft", "grpo")]
    for f in folders:
        if not os.path.exists(os.path.join(f, "config.json")):
            sys.exit(f"bench.py --eval-dir {args.eval_dir}: no checkpoint {f} (run `python posttrain.py --stage "
                     f"grpo --out-dir {args.eval_dir}` first)")
    here = os.path.dirname(os.path.abspath(__file__))
    checkouts = {"posttrain": here} | ({"anchor": os.path.abspath(args.eval_anchor)} if args.eval_anchor else {})
    runs = {name: [] for name in checkouts}  # name -> [(wall s, {checkpoint: s}, eval.json)]
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.eval_reps):
            for name, root in checkouts.items():
                out = os.path.join(tmp, f"{name}{rep}.json")
                cmd = [sys.executable, os.path.join(root, "posttrain.py"), "--stage", "eval",
                       "--ckpt", folders[1], "--ckpt", folders[2], "--base", folders[0],
                       "--out-dir", os.path.join(tmp, "out"), "--eval-out", out, "--threads", str(args.threads)]
                t0 = time.perf_counter()
                subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True)
                wall = time.perf_counter() - t0
                with open(out) as f:
                    res = json.load(f)  # its "seconds" are the stage's own time of each checkpoint
                runs[name].append((wall, {c["name"]: c["seconds"] for c in res["checkpoints"]}, res))
    print(f"the eval stage on {', '.join(folders[1:])} against {folders[0]}: whole process, {args.threads} "
          f"threads, median of {args.eval_reps}")
    for name, root in checkouts.items():
        wall = statistics.median(w for w, _, _ in runs[name])
        per = ", ".join(f"{c} {statistics.median(p[c] for _, p, _ in runs[name]):.1f} s"
                        for c in runs[name][0][1])  # the stage's own seconds of each checkpoint
        print(f"  {name:9s} {wall:6.1f} s  ({per}; {root})")
        res = runs[name][0][2]
        for split in res["problems"]:
            shown = [f"{c['name']} {100 * c[split]['greedy']:.1f} / {100 * c[split]['pass@1']:.1f}"
                     for c in res["checkpoints"]]
            print(f"            {split}: greedy / pass@1 %  {', '.join(shown)}")
    if args.eval_anchor:
        wall = {name: statistics.median(w for w, _, _ in r) for name, r in runs.items()}
        ratio = wall["anchor"] / wall["posttrain"]
        print(f"  anchor / posttrain: {ratio:.2f}x")
        target("the eval stage vs the version before (--eval-anchor)", ratio, 3.0)


def bench_all(args):
    """Every benchmark with a target, one after another: sampler, train, grpo (with TRL if importable), and
    eval if --eval-dir is given."""
    for what in ("sampler", "train", "grpo") + (("eval",) if args.eval_dir else ()):
        BENCHMARKS[what](args)
        print()


BENCHMARKS = {"sampler": bench_sampler, "grpo": bench_grpo, "smollm2": bench_smollm2, "gemm": bench_gemm,
              "train": bench_train, "eval": bench_eval, "all": bench_all}


def main():
    parser = argparse.ArgumentParser(description="posttrain speed figures")
    parser.add_argument("--what", choices=sorted(BENCHMARKS), default="sampler", help="which benchmark to run")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per figure (median reported)")
    parser.add_argument("--device", default="cpu", help="grpo, smollm2: cpu or cuda (cuda runs bf16 autocast)")
    # sampler
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64, 256], help="sampler batch sizes")
    parser.add_argument("--prompt-len", type=int, default=16, help="sampler prompt length")
    parser.add_argument("--new-tokens", type=int, default=64, help="sampler tokens generated per row")
    # grpo
    parser.add_argument("--init", default=None, help="grpo: checkpoint folder of the policy (default: random)")
    parser.add_argument("--grpo-prompts", type=int, default=16, help="grpo: prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="grpo: completions per prompt")
    # smollm2 uses --grpo-prompts, --group-size and --new-tokens
    parser.add_argument("--gemm-rows", type=int, default=4096, help="gemm: M, the tokens of one product")
    parser.add_argument("--train-batch", type=int, default=64, help="train: rows of the SmolLM2-shape sft step")
    parser.add_argument("--eval-dir", default=None,
                        help="eval: an out dir with pretrain, sft, grpo (`posttrain.py --stage grpo` writes one)")
    parser.add_argument("--eval-anchor", default=None, help="eval: a checkout of an earlier posttrain to time")
    parser.add_argument("--eval-reps", type=int, default=1, help="eval: whole eval runs of each checkout")
    parser.add_argument("--markdown", action="store_true",
                        help="end with the run's targets as a Markdown table, with the command and the machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    BENCHMARKS[args.what](args)
    if args.markdown:
        markdown(" ".join(["python bench.py"] + sys.argv[1:]))


if __name__ == "__main__":
    main()
