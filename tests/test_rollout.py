"""rollout.py: the cached batched sampler against the naive model.generate and the full-forward log-probs."""

import pytest
import torch

from model import GPT, GPTConfig
from rollout import completion_logps, sample

V, PAD = 32, 0
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]  # different lengths: left padding


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64,
                          max_seq_len=48)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # sharper distributions, so greedy has no near-ties and EOS shows up
    return model


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_greedy_equals_naive_generate(model):
    out = sample(model, PROMPTS, 12, temperature=0)
    assert out.completion_ids.shape == (len(PROMPTS), 12) and out.completion_mask.all()
    for i, p in enumerate(PROMPTS):
        naive = model.generate(torch.tensor([p]), 12, temperature=0)[0, len(p):]  # one prompt, no padding
        assert torch.equal(out.completion_ids[i], naive)


def test_completion_does_not_depend_on_batch(model):
    alone = sample(model, PROMPTS[1:2], 12, temperature=0).completion_ids[0]
    assert torch.equal(sample(model, PROMPTS, 12, temperature=0).completion_ids[1], alone)


def test_rows_sharing_a_prompt_get_that_prompts_prefill(model):
    # the prefill runs once per distinct prompt; a wrong row -> prompt mapping would give a row another prompt's
    # keys, values or first logits. [PAD, 5] and [5] have the same ids once left padded, only the mask tells
    # them apart, so they must not be merged
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[2], [PAD, 5], PROMPTS[0], [5], PROMPTS[2], [PAD, 5]]
    out = sample(model, prompts, 10, temperature=0)
    for i, p in enumerate(prompts):
        assert torch.equal(out.completion_ids[i], sample(model, [p], 10, temperature=0).completion_ids[0])
    drawn = sample(model, prompts, 10, temperature=1.0, generator=seeded(3))  # rows of a prompt now differ
    assert not torch.equal(drawn.completion_ids[0], drawn.completion_ids[2])
    full = completion_logps(model, drawn.prompt_ids, drawn.prompt_mask, drawn.completion_ids,
                            drawn.completion_mask)
    assert (drawn.logps - full).abs().max() <= 1e-5


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (2.0, None), (1.5, 4)])
def test_rows_that_share_a_history_sample_as_if_alone(model, temperature, top_k):
    # groups of rows with one prompt run as one "slot" until their tokens differ, then split (rollout.branch).
    # Each row must still get exactly the sample it would get alone with its own noise: noise_rows gives a
    # single row the noise of row i of the whole batch, and a single row never shares anything
    prompts = [PROMPTS[1]] * 6 + [PROMPTS[2]] * 5 + [PROMPTS[1], [PAD, 12, 13]]  # mixed, two of them padded
    free = sample(model, prompts, 12, temperature=temperature, top_k=top_k, generator=seeded(5))
    eos = int(free.completion_ids[0, 2])  # some rows stop early, so finished and running rows share slots
    out = sample(model, prompts, 12, temperature=temperature, top_k=top_k, eos_id=eos, generator=seeded(5))
    assert len({tuple(r) for r in out.completion_ids[:6].tolist()}) > 2  # a group did split
    assert out.completion_mask.sum(1).min() < out.completion_mask.size(1)  # and some rows did finish early
    for i, p in enumerate(prompts):
        alone = sample(model, [p], 12, temperature=temperature, top_k=top_k, eos_id=eos, generator=seeded(5),
                       noise_rows=(i, len(prompts)))
        n = int(alone.completion_mask.sum())
        assert out.completion_mask[i].tolist() == [1] * n + [0] * (out.completion_mask.size(1) - n)
        assert torch.equal(out.completion_ids[i, :n], alone.completion_ids[0, :n])
        assert (out.logps[i, :n] - alone.logps[0, :n]).abs().max() <= 1e-5


@pytest.mark.parametrize("prompts", [PROMPTS * 3, [PROMPTS[1]] * 8 + PROMPTS])  # distinct rows; and groups
def test_rows_that_finish_leave_the_batch_and_the_rest_sample_as_if_alone(model, prompts, monkeypatch):
    import rollout
    shrunk = []  # (slots before, slots after) of each drop

    def watched(cache, attn_mask, state, done):
        before = cache.rows
        out = drop_finished(cache, attn_mask, state, done)
        shrunk.append((before, cache.rows))
        return out

    drop_finished = rollout.drop_finished
    monkeypatch.setattr(rollout, "drop_finished", watched)
    free = sample(model, prompts, 16, temperature=1.0, generator=seeded(7))
    eos = int(torch.mode(free.completion_ids[:, :4].flatten()).values)  # a common early token: rows stop soon
    out = sample(model, prompts, 16, temperature=1.0, eos_id=eos, generator=seeded(7))
    assert any(after < before for before, after in shrunk)  # finished rows did leave the batch
    for i, p in enumerate(prompts):
        alone = sample(model, [p], 16, temperature=1.0, eos_id=eos, generator=seeded(7),
                       noise_rows=(i, len(prompts)))
        n = int(alone.completion_mask.sum())
        assert out.completion_mask[i].tolist() == [1] * n + [0] * (out.completion_mask.size(1) - n)
        assert torch.equal(out.completion_ids[i, :n], alone.completion_ids[0, :n])
        assert (out.logps[i, :n] - alone.logps[0, :n]).abs().max() <= 1e-5


def test_left_padding_layout(model):
    out = sample(model, PROMPTS, 3, temperature=0)
    assert out.prompt_ids.shape == out.prompt_mask.shape == (4, 7)
    assert out.prompt_ids[1].tolist() == [PAD] * 5 + [12, 13]
    assert out.prompt_mask[1].tolist() == [0] * 5 + [1, 1]


def test_eos_stops_rows_and_masks(model):
    free = sample(model, PROMPTS, 16, temperature=1.0, generator=seeded())
    eos = int(free.completion_ids[0, 3])  # a token row 0 will emit at step 3: call it EOS
    out = sample(model, PROMPTS, 16, temperature=1.0, eos_id=eos, generator=seeded())
    hits = [(row == eos).nonzero() for row in free.completion_ids]
    lengths = [int(h[0]) + 1 if len(h) else 16 for h in hits]  # up to and including the first EOS
    assert out.completion_ids.size(1) == max(lengths)  # columns after every row finished are dropped
    for i, n in enumerate(lengths):
        assert torch.equal(out.completion_ids[i, :n], free.completion_ids[i, :n])  # same draws until then
        assert out.completion_mask[i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (out.completion_ids[i, n:] == PAD).all() and (out.logps[i, n:] == 0).all()


def test_all_rows_done_stops_early(model):
    eos = int(sample(model, PROMPTS[:1], 1, temperature=0).completion_ids[0, 0])
    out = sample(model, PROMPTS[:1], 30, temperature=0, eos_id=eos)
    assert out.completion_ids.tolist() == [[eos]] and out.completion_mask.tolist() == [[1]]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 5, None), (2.0, None, 0.8),
                                                       (0, None, None)])
def test_sampler_logps_equal_full_forward(model, temperature, top_k, top_p):
    free = sample(model, PROMPTS, 10, temperature=max(temperature, 1.0), generator=seeded(1))
    eos = int(free.completion_ids[2, 4])  # some rows stop early: masked positions get checked too
    out = sample(model, PROMPTS, 10, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos,
                 generator=seeded(1))
    full = completion_logps(model, out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask,
                            temperature=temperature)
    assert (out.logps - full).abs().max() <= 1e-5
    assert (out.logps[out.completion_mask == 0] == 0).all()
    assert (out.logps[out.completion_mask == 1] < 0).all()


def test_logps_are_of_the_tempered_distribution(model):
    out = sample(model, PROMPTS, 8, temperature=2.0, generator=seeded())
    args = (model, out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)
    with torch.no_grad():
        logits = model(torch.cat((out.prompt_ids, out.completion_ids), 1),
                       torch.cat((out.prompt_mask, out.completion_mask), 1))[:, out.prompt_ids.size(1) - 1:-1]
    by_hand = torch.log_softmax(logits / 2.0, -1).gather(-1, out.completion_ids[..., None]).squeeze(-1)
    assert (out.logps - by_hand).abs().max() <= 1e-5
    assert (completion_logps(*args, temperature=1.0) - out.logps).abs().max() > 1e-2  # temperature mattered


def test_same_seed_same_samples(model):
    a, b = (sample(model, PROMPTS, 10, top_p=0.9, generator=seeded(3)) for _ in range(2))
    c = sample(model, PROMPTS, 10, top_p=0.9, generator=seeded(4))
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logps, b.logps)
    assert not torch.equal(a.completion_ids, c.completion_ids)


@pytest.mark.parametrize("truncation", [dict(top_k=1), dict(top_p=1e-6)])
def test_keeping_one_token_is_greedy(model, truncation):
    greedy = sample(model, PROMPTS, 10, temperature=0)
    out = sample(model, PROMPTS, 10, temperature=1.5, generator=seeded(), **truncation)
    assert torch.equal(out.completion_ids, greedy.completion_ids)


def test_draws_follow_the_distribution(model):
    # 4000 one-token samples of one prompt: empirical frequencies match softmax(logits / T)
    n, temperature = 4000, 3.0
    out = sample(model, [PROMPTS[0]] * n, 1, temperature=temperature, generator=seeded())
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([PROMPTS[0]]))[0, -1] / temperature, -1)  # (V,)
    freq = torch.bincount(out.completion_ids[:, 0], minlength=V) / n  # (V,)
    assert (freq - probs).abs().max() < 0.03


def test_too_long_is_an_error(model):
    with pytest.raises(ValueError, match="exceeds max_seq_len=48"):
        sample(model, PROMPTS, 42)


def test_chunked_head_gives_the_same_logps_entropy_and_gradients(model, monkeypatch):
    # a LOGIT_CHUNK of one row's logits forces a chunk per row (recomputed in backward): the numbers, the
    # entropies and the gradients equal the one-chunk computation's
    import rollout
    from losses.policy import entropy_from_logits
    out = sample(model, PROMPTS, 8, temperature=1.0, generator=seeded(5))
    args = (model, out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)
    results = []
    for chunk in (10 ** 9, out.completion_ids.size(1) * V):
        monkeypatch.setattr(rollout, "LOGIT_CHUNK", chunk)
        model.zero_grad()
        logps, entropy = completion_logps(*args, temperature=0.8, return_entropy=True)
        (logps.sum() * 0.5).backward()
        results.append((logps.detach(), entropy, model.model.embed_tokens.weight.grad.clone()))
    (a_lp, a_ent, a_grad), (b_lp, b_ent, b_grad) = results
    assert (a_lp - b_lp).abs().max() <= 1e-6 and (a_ent - b_ent).abs().max() <= 1e-6
    assert (a_grad - b_grad).abs().max() <= 1e-6 and a_grad.abs().max() > 0
    # and the entropy is the tempered distribution's
    _, logits = completion_logps(*args, temperature=0.8, return_logits=True)
    assert (entropy_from_logits(logits) - a_ent).abs().max() <= 1e-5
