"""
The batched KV-cache sampler: left-padded prompts -> completions, their masks and log-probs.

It is the hot path of every on-policy stage (GRPO, PPO, RFT, on-policy distillation), so it is written for
speed as much as a reference can be. On small models a decode step is a few hundred tiny kernels, so the cost
is their number, not their arithmetic; everything here serves to keep the loop down to the model's own
matrix products and attention:

  * one prefill forward over the distinct prompts, then one single-token forward per new token for the
    whole batch; rows with the same prompt (a GRPO group, the eval's n samples of a problem) run as one row
    until their tokens differ (branch), which a model sure of its answers makes several times cheaper;
    no per-row Python in the decode loop: finished rows ride along, masked once at the end, until they
    are a quarter of the batch and leave it (drop_finished);
  * one KVCache preallocated for prompt_len + max_new_tokens, written in place (no growing torch.cat);
  * the attention mask is preallocated too (prompt mask, then ones) and each step passes a slice of it;
    when no prompt is padded we pass no mask at all, and the model reads positions straight off its RoPE
    tables, computed once at construction;
  * sampling is argmax(p / Exp(1) noise), the same distribution as torch.multinomial in three kernels;
  * per-step results are collected in lists and stacked once;
  * the only host-device sync is the "all rows finished?" check, done every CHECK_EVERY steps; with rows
    that share a prompt, branch() adds one per step (the number of distinct histories sizes the next step).

Left padding keeps every row's last prompt token in the same column, so one new column per step serves all
rows; positions come from the mask (model.py), so padding changes nothing a row computes.

Log-probs: the log-prob of each sampled token under logits/temperature, the full distribution, NOT the
top-k/top-p truncated one the token was drawn from. That is what the policy and reference compute with
completion_logps, so the two agree to float error (the ratio itself uses completion_logps on both sides, and is
exactly 1 before an update).
"""

from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
from torch.utils.checkpoint import checkpoint

from losses.common import gather_logprobs
from losses.policy import entropy_from_logits
from model import KVCache

CHECK_EVERY = 4  # decode steps between "have all rows hit EOS?" checks (each is a GPU -> CPU sync)


@dataclass
class Samples:
    prompt_ids: torch.Tensor  # (B, P) left padded with pad_id
    prompt_mask: torch.Tensor  # (B, P) 1 real, 0 pad
    completion_ids: torch.Tensor  # (B, N) pad_id after EOS
    completion_mask: torch.Tensor  # (B, N) 1 on generated tokens up to and including EOS
    logps: torch.Tensor  # (B, N) fp32 log-prob of each token under logits/temperature; 0 where mask is 0
    finished: torch.Tensor  # (B,) bool: the row emitted an EOS id; False = cut off at the length limit
    entropy: torch.Tensor | None = None  # (B, N) entropy of logits/temperature at each token (return_entropy)


def left_pad(prompts, pad_id, device=None):
    """list of B token-id lists -> ids (B, P) and mask (B, P), padded on the left to the longest prompt."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts], device=device)  # (B, P)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)  # (B, P)
    return ids, mask


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit (B, V) outside the top_k largest and outside the nucleus of mass top_p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)  # (B, V)
        # drop a token if the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # (B, V)
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # (B, V) back in vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.inference_mode()
def sample(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
           generator=None, pad_id=0, noise_rows=None, stop_all=None, return_entropy=False):
    """Sample completions for a batch of prompts with a KV cache.

    Args:
        model: a model.GPT (any device / dtype; log-probs are computed in fp32).
        prompts: list of B prompts, each a list of token ids (different lengths are fine).
        max_new_tokens: completion budget N_max; prompt_len + N_max must fit config.max_seq_len.
        temperature: logits are divided by it before sampling; 0 = greedy (argmax).
        top_k, top_p: optional truncation of the sampling distribution (not of the reported log-probs).
        eos_id: an id or a list of ids; a row stops after emitting any of them; None = every row runs
            max_new_tokens.
        generator: a torch.Generator on the model's device, for reproducible samples.
        pad_id: written in place of prompt padding and of tokens after EOS.
        noise_rows: (offset, total): these B rows are rows offset .. offset + B - 1 of a batch of `total` rows
            sampled by several processes; the noise is drawn for all `total` rows and this slice kept, so
            each row gets exactly the sample it would get in one process sampling the whole batch.
        stop_all: done (B,) -> whether to stop early; with several processes, whether every process's rows
            are done (the loop must run as long as one process sampling everything would). Default: done.all().
        return_entropy: also the entropy of each step's distribution (logits/temperature, untruncated), as
            completion_logps(return_entropy=True) would compute it in a forward over the samples.

    Returns Samples. N is the longest completion in the batch (<= max_new_tokens): columns in which every row
    had already finished are dropped. logps are of logits/temperature without top-k/top-p; with temperature 0
    they are the temperature-1 log-probs of the argmax tokens.
    """
    if min(len(p) for p in prompts) == 0 or max_new_tokens < 1:
        raise ValueError("sample: every prompt needs a token (e.g. BOS) and max_new_tokens must be >= 1")
    device = model.lm_head.weight.device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)  # (B, P), (B, P)
    B, P = prompt_ids.shape
    total = P + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} = {total} exceeds "
                         f"max_seq_len={model.config.max_seq_len}")
    # Rows that share a prompt (a GRPO group, the eval's n samples of a problem) share everything up to the
    # first token in which they differ, and a model that is sure of itself often writes them all alike. So the
    # model runs once per distinct history, a "slot": slots start as the distinct prompts (ids and padding)
    # and a slot splits when its rows draw different tokens (branch). Each row draws its own noise, so the
    # samples are those of one forward per row.
    distinct, row_of = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
    state = row_of if len(distinct) < B else None  # (B,) the slot of each row; None: row b is slot b
    slot_ids, slot_mask = (distinct[:, :P], distinct[:, P:]) if state is not None else (prompt_ids, prompt_mask)
    cache = KVCache(model.config, B, total, device=device, dtype=model.lm_head.weight.dtype)
    cache.rows = len(slot_ids)
    # attention mask of each slot's whole rollout: its prompt's padding, then every generated column counts as
    # real. Tokens after a row's EOS are garbage we feed anyway; they come after everything the row keeps, so
    # causality already stops them from influencing it.
    attn_mask = torch.ones(B, total, dtype=torch.long, device=device)  # (B, P + N_max), slots in rows 0..U-1
    attn_mask[:len(slot_ids), :P] = slot_mask
    # with no padding at all the model needs no mask: positions are a slice of its tables and a decode step
    # attends to every key, which saves building and applying a mask in every step and layer
    padded = not bool(prompt_mask.all())
    # every id that ends a completion (an instruct model often has two: end of turn and end of text)
    stop = None if eos_id is None else torch.tensor(eos_id, device=device).reshape(-1)  # (S,)

    # prefill: one forward over the slots' prompts; only the last position's logits are needed, so we take
    # the hidden state there and apply the head to that alone (a (B, P, V) tensor would be wasted on a big vocab)
    hidden = model(slot_ids, attn_mask[:cache.rows, :P] if padded else None, cache=cache, return_hidden=True)
    logits = model.lm_head(hidden[:, -1]).float()  # (U, V) one row per slot

    def per_row(x):  # (U, ...) one per slot -> (B, ...) one per row
        return x if state is None else x[state]

    # per-step results go into lists and are stacked once at the end: fewer kernels in the loop than
    # writing into preallocated (B, N) tensors column by column
    ids, logps, finished, entropy = [], [], [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,) row has emitted EOS
    for t in range(max_new_tokens):
        if temperature not in (0, 1):
            logits = logits / temperature  # (U, V) the distribution we report log-probs of
        if temperature == 0:
            next_id = per_row(logits.argmax(-1))  # (B,)
        else:
            probs = per_row(filter_logits(logits, top_k, top_p).softmax(-1))  # (B, V)
            # argmax(p / E) with E ~ Exp(1) i.i.d. is an exact draw from p (the smallest of independent
            # exponentials E_v / p_v is E_j / p_j with probability p_j); unlike torch.multinomial it needs
            # no input validation and, on a GPU, no sync
            if noise_rows is None:
                noise = torch.empty_like(probs).exponential_(generator=generator)  # (B, V)
            else:
                offset, total = noise_rows
                noise = probs.new_empty(total, probs.shape[1]).exponential_(generator=generator)[offset:offset + B]
            next_id = (probs / noise).argmax(-1)  # (B,)
        ids.append(next_id)
        logps.append(gather_logprobs(per_row(logits), next_id))  # (B,) of the untruncated tempered distribution
        if return_entropy:
            entropy.append(per_row(entropy_from_logits(logits)))  # (B,)
        finished.append(done)  # rows already finished before this token: they get pad, mask 0, logp 0
        if stop is not None:
            done = done | torch.isin(next_id, stop)  # (B,)
            if (t + 1) % CHECK_EVERY == 0 and (stop_all(done) if stop_all else bool(done.all())):
                break
        if t + 1 < max_new_tokens:
            if stop is not None and (t + 1) % CHECK_EVERY == 0:
                state = drop_finished(cache, attn_mask, state, done)
            # one new column for every slot (no per-row work); cache.pos advances by 1
            fed = next_id  # (B,)
            if state is not None:
                fed, state = branch(cache, attn_mask, state, next_id.masked_fill(done, pad_id),
                                    max(logits.size(-1), pad_id + 1))
            step_mask = attn_mask[:cache.rows, :P + t + 1] if padded else None  # (U, P + t + 1)
            logits = model(fed[:, None], step_mask, cache=cache)[:, -1].float()  # (U, V)

    finished = torch.stack(finished, dim=1)  # (B, N)
    completion_mask = (~finished).long()  # (B, N) 1 up to and including EOS
    N = int(completion_mask.sum(-1).max())  # drop trailing columns where every row had finished
    completion_ids = torch.stack(ids, dim=1).masked_fill(finished, pad_id)[:, :N]  # (B, N)
    logps = torch.stack(logps, dim=1).masked_fill(finished, 0.0)[:, :N]  # (B, N)
    entropy = torch.stack(entropy, dim=1).masked_fill(finished, 0.0)[:, :N] if return_entropy else None  # (B, N)
    return Samples(prompt_ids, prompt_mask, completion_ids, completion_mask[:, :N], logps, done, entropy)


def branch(cache, attn_mask, state, next_id, V):
    """Slots after one more token: rows of a slot that drew the same token stay together, each other token
    opens a new slot with a copy of the parent's cached keys and values (and mask row). -> (the token each
    slot is fed (U',), each row's slot (B,)); cache.rows becomes U'. state (B,): each row's slot; next_id
    (B,): each row's token, below V, and pad for rows already finished (their tokens are thrown away, so they
    need never split)."""
    U = cache.rows
    children, slot_of = torch.unique(state * V + next_id, return_inverse=True)  # (U',), (B,); sorted
    parent, token = children // V, children % V  # (U',) the children of a slot are consecutive
    first = torch.ones_like(parent, dtype=torch.bool)
    first[1:] = parent[1:] != parent[:-1]  # every slot has a first child, which keeps the slot
    slot = parent.clone()  # (U',) where each child lives
    slot[~first] = torch.arange(U, len(children), device=parent.device)  # the others: the next free slots
    if len(children) > U:
        src = parent[~first]  # (U' - U,)
        cache.copy_rows(src, U)
        attn_mask[U:len(children)] = attn_mask[src]
    cache.rows = len(children)
    fed = torch.empty_like(token).index_copy_(0, slot, token)  # (U',) slot s is fed its child's token
    return fed, slot[slot_of]


def drop_finished(cache, attn_mask, state, done):
    """Slots whose rows have all finished leave the batch once they are a quarter of it: the live slots move
    to the front of the cache (keys, values, mask rows) -> each row's new slot (B,), or state unchanged.
    A finished row's later tokens are thrown away, so finished rows all point at slot 0 from then on.
    state None means row b is slot b; done (B,) rows that have emitted EOS."""
    U = cache.rows
    rows = torch.arange(len(done), device=done.device) if state is None else state  # (B,)
    live = torch.zeros(U, dtype=torch.bool, device=done.device)
    live[rows[~done]] = True  # (U,) slots with a row still writing
    keep = live.nonzero()[:, 0]  # (U',)
    if len(keep) > 3 * U // 4:
        return state  # too few gone to pay for the copy
    keep = keep if len(keep) else keep.new_zeros(1)  # other processes may still be writing: keep one slot
    n = len(keep)
    cache.copy_rows(keep, 0)
    attn_mask[:n] = attn_mask[keep]
    cache.rows = n
    moved = torch.zeros(U, dtype=torch.long, device=done.device)
    moved[keep] = torch.arange(n, device=done.device)  # old slot -> new slot (dropped ones -> 0)
    return moved[rows]


def generate(model, prompts, max_new_tokens, temperature=1.0, eos_id=None, generator=None, pad_id=0,
             autocast=nullcontext, noise_rows=None, stop_all=None, max_prompt_len=None, return_entropy=False):
    """sample() as every stage calls it: the length budget clamped to the model's context, under autocast.

    max_new_tokens is cut to what fits after the longest prompt (config.max_seq_len), so a long prompt
    shortens the budget instead of failing. The returned tensors are ordinary ones, not inference-mode
    tensors (which a forward that autograd records may not save), ready to train on. The model's train / eval
    mode is left as the caller set it. noise_rows, stop_all: see sample; max_prompt_len: the longest prompt of
    the whole batch when several processes share it (the budget must be the same for all); return_entropy:
    see sample.
    """
    max_new = min(max_new_tokens, model.config.max_seq_len - max(max(map(len, prompts)), max_prompt_len or 0))
    with autocast():
        s = sample(model, prompts, max_new, temperature=temperature, eos_id=eos_id, generator=generator,
                   pad_id=pad_id, noise_rows=noise_rows, stop_all=stop_all, return_entropy=return_entropy)
    return Samples(*(None if getattr(s, f.name) is None else getattr(s, f.name).clone() for f in fields(s)))


def sequence(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """[prompt; completion] ids and attention mask, each (B, P + N): the one place they are concatenated."""
    return torch.cat((prompt_ids, completion_ids), dim=1), torch.cat((prompt_mask, completion_mask), dim=1)


LOGIT_CHUNK = 2 ** 24  # fp32 logits (rows x tokens x vocab, 64 MB) the LM head produces at once


def over_head_chunks(fn, model, hidden, *per_row):
    """[fn(logits, *rows) for each chunk of rows]: the LM head applied to a few rows of hidden (B, T, D) at a
    time, so that no more than LOGIT_CHUNK logits exist at once (a 152k vocabulary x 64 rows x 200 tokens
    would be 7.8 GB in fp32). per_row: tensors (B, ...) sliced alongside. With gradients and more than one
    chunk, each chunk's logits are recomputed in the backward pass instead of kept (activation checkpointing
    of the head alone); with one chunk this is exactly fn(model.lm_head(hidden), *per_row)."""
    B, T = hidden.shape[:2]
    rows = max(1, LOGIT_CHUNK // max(1, T * model.config.vocab_size))

    def run(h, *rest):
        return fn(model.lm_head(h), *rest)

    out = []
    for i in range(0, B, rows):
        args = (hidden[i:i + rows], *(x[i:i + rows] for x in per_row))
        if torch.is_grad_enabled() and rows < B:
            out.append(checkpoint(run, *args, use_reentrant=False))
        else:
            out.append(run(*args))
    return out


def completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """The final hidden states (B, N, D) that predict each completion token, and those tokens (B, N), by one
    forward over [prompt; completion]; the LM head is left to the caller (over_head_chunks)."""
    P = prompt_ids.size(1)
    ids, mask = sequence(prompt_ids, prompt_mask, completion_ids, completion_mask)  # (B, P + N) each
    # hidden[:, P - 1] predicts the first completion token, the last position predicts nothing we have
    hidden = model(ids, mask, return_hidden=True)[:, P - 1:-1]  # (B, N, D)
    # targets: the completion as part of the concatenation, an ordinary tensor even when it came out of the
    # sampler's inference mode, which autograd may not save for backward
    return hidden, ids[:, P:]


def completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0,
                     return_logits=False, return_entropy=False, entropy_grad=False):
    """Log-probs (B, N) of completion tokens under model, by one full forward over [prompt; completion].

    The ONE function that turns a model's output into completion log-probs: the policy (with gradients), the
    old policy, the reference and the teacher all call it, with the temperature the sampler used. One code
    path is what makes the PPO/GRPO ratio exactly 1 and the KL to an identical reference exactly 0 before an
    update, in fp32 and under bf16 autocast alike: the logits are cast to fp32 FIRST and only then divided by
    the temperature (dividing low-precision logits rounds them once more, differently from a forward that
    casts first). temperature 0 (greedy sampling) is scored as 1, as in sample(): the greedy tokens'
    log-probs under the model's own distribution. Positions where completion_mask is 0 get exactly 0 (and no
    gradient), so an estimator that exponentiates a difference of log-probs cannot overflow there. The LM
    head runs a few rows at a time (over_head_chunks), so memory holds LOGIT_CHUNK logits at most.

    prompt_ids, prompt_mask (B, P) left padded; completion_ids, completion_mask (B, N). Call it inside the
    autocast context the caller trains in. Returns fp32 logps (B, N); with return_entropy also the entropy
    (B, N) of each position's tempered distribution (with gradient only if entropy_grad, for an entropy
    bonus); with return_logits the fp32,
    temperature-scaled logits (B, N, V) themselves, whole, in place of the chunking (distillation compares
    two models' whole distributions).
    """
    hidden, targets = completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask)

    def score(logits, targets):
        logits = logits.float()  # (b, N, V)
        if temperature not in (0, 1):
            logits = logits / temperature  # NOTE: after the cast to fp32, never before
        out = [gather_logprobs(logits, targets)]  # (b, N)
        if return_entropy:
            with nullcontext() if entropy_grad else torch.no_grad():
                out.append(entropy_from_logits(logits))  # (b, N)
        return out + [logits] if return_logits else out

    parts = [score(model.lm_head(hidden), targets)] if return_logits else \
        over_head_chunks(score, model, hidden, targets)
    logps = torch.cat([p[0] for p in parts]).masked_fill(completion_mask == 0, 0.0)  # (B, N)
    extra = [torch.cat([p[1] for p in parts])] if return_entropy else []
    extra += [parts[0][-1]] if return_logits else []
    return (logps, *extra) if extra else logps
