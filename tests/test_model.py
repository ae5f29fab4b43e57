"""model.py: parity with HF transformers both ways (through committed fixtures, so no transformers here),
checkpoint round trip, KV cache, left padding, tied embeddings, GQA shapes, and clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import GPT, GPTConfig, KVCache

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # written by tests/make_hf_fixtures.py
TINY = dict(vocab_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=64)


@pytest.fixture(scope="module")
def recorded():
    return load_file(FIXTURES / "logits.safetensors")


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


# --- parity with HF transformers --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_hf_checkpoint_gives_hf_logits(recorded, name):
    # llama/ is sharded (index.json path), GQA, untied; qwen2/ has q/k/v biases and tied embeddings
    model = GPT.from_pretrained(FIXTURES / name)
    with torch.no_grad():
        logits = model(recorded["input_ids"])
    assert (logits - recorded[f"{name}_logits"]).abs().max() <= 1e-5


def test_hf_greedy_tokens(recorded):
    model = GPT.from_pretrained(FIXTURES / "llama")
    new = recorded["llama_greedy"].size(1) - recorded["input_ids"].size(1)
    assert torch.equal(model.generate(recorded["input_ids"], new, temperature=0), recorded["llama_greedy"])


@pytest.mark.parametrize("name", ["ours_llama", "ours_qwen2"])
def test_our_checkpoint_gives_hf_logits(recorded, name, tmp_path):
    # transformers read this folder (written by our save_pretrained) and produced the recorded logits
    model = GPT.from_pretrained(FIXTURES / name)
    with torch.no_grad():
        logits = model(recorded["input_ids"])
    assert (logits - recorded[f"{name}_logits"]).abs().max() <= 1e-5
    # and today's save_pretrained still writes what transformers was shown: same config, same tensors
    model.save_pretrained(tmp_path)
    now, then = tmp_path, FIXTURES / name
    assert json.loads((now / "config.json").read_text()) == json.loads((then / "config.json").read_text())
    ours, committed = load_file(now / "model.safetensors"), load_file(then / "model.safetensors")
    assert ours.keys() == committed.keys()
    assert all(torch.equal(ours[k], committed[k]) for k in ours)


# --- checkpoints --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, dict(qkv_bias=True, tie_embeddings=True, score_head=True)])
def test_save_load_round_trip(tmp_path, overrides):
    model = tiny(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-trivial norms, biases and score head
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.config == model.config
    idx = torch.randint(0, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
        if model.config.score_head:
            scores = [m.score(m(idx, return_hidden=True)) for m in (loaded, model)]
            assert torch.equal(*scores)


def test_fresh_score_head_is_zero():
    # a value model started from a policy checkpoint that has no score head
    model = GPT.from_pretrained(FIXTURES / "llama", score_head=True)
    idx = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        scores = model.score(model(idx, return_hidden=True)).squeeze(-1)  # (B, T)
    assert scores.shape == (2, 5) and torch.equal(scores, torch.zeros(2, 5))


def test_tokenizer_ids_in_config(tmp_path):
    tok = tmp_path / "tok.json"
    added = [{"id": 0, "content": "<pad>"}, {"id": 2, "content": "<eos>"}]
    tok.write_text(json.dumps({"added_tokens": added}))
    tiny().save_pretrained(tmp_path / "m", tokenizer_path=tok)
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (hf["pad_token_id"], hf["eos_token_id"], "bos_token_id" in hf) == (0, 2, False)
    assert (tmp_path / "m" / "tokenizer.json").read_text() == tok.read_text()


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        GPT.from_pretrained(tmp_path)
    tiny().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel"):
        GPT.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight has shape"):
        GPT.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight missing"):
        GPT.from_pretrained(tmp_path)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither model.safetensors"):
        GPT.from_pretrained(tmp_path)


def test_sharded_folder_missing_shard(tmp_path):
    shutil.copytree(FIXTURES / "llama", tmp_path / "llama")
    next((tmp_path / "llama").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors is missing"):
        GPT.from_pretrained(tmp_path / "llama")


# --- architecture -------------------------------------------------------------------------------------------


def test_tied_embeddings_are_one_tensor():
    model = GPT.from_pretrained(FIXTURES / "qwen2")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    n_untied = tiny(tie_embeddings=False).num_params()
    assert tiny(tie_embeddings=True).num_params() == n_untied - TINY["vocab_size"] * TINY["n_embd"]


def test_gqa_shapes():
    model = tiny()
    hs = TINY["n_embd"] // TINY["n_head"]
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (TINY["n_head"] * hs, TINY["n_embd"])
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (TINY["n_kv_head"] * hs, TINY["n_embd"])
    cache = KVCache(model.config, batch_size=3, max_len=20)
    assert cache.k.shape == (TINY["n_layer"], 3, TINY["n_kv_head"], 20, hs)


@pytest.mark.parametrize("padded", [True, False])
def test_kv_cache_matches_full_forward(padded):
    model = tiny()
    idx = torch.randint(0, TINY["vocab_size"], (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0  # one left-padded row
    mask[2, :1] = 0

    def m(t):  # the mask for the first t tokens; None (the no-padding fast path) when unpadded
        return mask[:, :t] if padded else None

    with torch.no_grad():
        full = model(idx, m(12))  # (B, T, V)
        cache = KVCache(model.config, batch_size=3, max_len=12)
        # a prefill of 5, a chunk of 3, then one token at a time, as a sampler and a multi-turn rollout would
        pieces = [model(idx[:, :5], m(5), cache), model(idx[:, 5:8], m(8), cache)]
        pieces += [model(idx[:, t:t + 1], m(t + 1), cache) for t in range(8, 12)]
    assert cache.pos == 12
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5


def test_left_padding_changes_nothing():
    model = tiny()
    seqs = [torch.randint(0, TINY["vocab_size"], (n,)) for n in (9, 4, 1)]
    idx = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, 9 - len(s):], mask[i, 9 - len(s):] = s, 1
    padded = model(idx, mask)  # (B, T, V), with gradients
    assert torch.isfinite(padded).all()  # pad query rows see their own key: no 0/0 softmax
    for i, s in enumerate(seqs):
        alone = model(s[None])  # (1, n, V)
        assert (padded[i, 9 - len(s):] - alone[0]).abs().max() <= 1e-5
    # masked-out rows must not poison gradients with NaN either
    (padded * mask[..., None]).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_too_long_is_an_error():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
