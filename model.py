"""
A compact decoder of the Llama family (Llama, Qwen2, Qwen3, SmolLM, Mistral without sliding window), written
bottom-up in the manner of nanoGPT: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP, block,
config, model.

Module names are the HF names (model.embed_tokens, model.layers.{i}.self_attn.q_proj, ..., lm_head), so our
state_dict *is* an HF checkpoint: save_pretrained / from_pretrained only write and read safetensors files
and translate config.json, no renaming table needed.

Conventions: logits[:, t] scores token t+1. Padding is on the LEFT and described by attn_mask (B, T_total),
1 for real tokens, 0 for padding; positions are counted over real tokens only, so a left-padded row gets
exactly the logits it would get unpadded.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): LayerNorm without the mean and the bias."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) * weight. HF normalises in fp32 and casts back to the input dtype before
        # applying the weight: in fp32 that is the one call below, in bf16 we follow HF's order exactly
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def rope_tables(head_dim, max_len, theta):
    """cos and sin of RoPE (Su et al. 2021) for every position < max_len, each (max_len, head_dim), fp32.

    HF layout ("rotate_half"): frequency i turns the pair (i, i + hs/2), not (2i, 2i+1) as in the paper; the
    two are equal up to a permutation of the q/k weights, and HF's makes HF checkpoints load as they are.
    The sin table comes with the sign of rotate_half folded in, see apply_rope.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (hs/2,)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, hs/2)
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)  # (max_len, hs)
    sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)  # (max_len, hs), first half negated
    return cos, sin


def apply_rope(x, cos, sin):
    """Rotate x (B, nh, T, hs) by the angles of its positions; cos, sin (B, 1, T, hs) from rope_tables.

    HF writes x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1). cat(x2, x1) is roll(x, hs/2),
    and the minus sits in our sin table, so the same numbers take one roll instead of a chunk, neg and cat:
    this runs twice per layer per decode step, where kernel count, not arithmetic, is the cost.
    """
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


def decode_attention(q, k, v, mask=None):
    """Attention of ONE new token per row over the cache: q (B, nh, 1, hs), k and v (B, nkv, T, hs), mask
    None (every key visible) or additive (B, 1, 1, T) -> (B, nh, 1, hs).

    The same numbers as scaled_dot_product_attention (to float error), as two batched matrix products: each
    group of nh / nkv query heads is one (G, hs) x (hs, T) product against its shared k/v head. On the CPU,
    SDPA's fused kernels are built for many queries; for one query per row they cost 1.2-2.4x more than this
    at the batch sizes the sampler runs (measured at 8-1024 rows, 20-110 cached positions).
    """
    B, nh, _, hs = q.shape
    nkv, T = k.size(1), k.size(2)
    scores = q.view(B, nkv, nh // nkv, hs) @ k.transpose(-1, -2)  # (B, nkv, G, T)
    scores = scores.float() * hs ** -0.5  # the softmax in fp32, under bf16 autocast too
    if mask is not None:
        scores = scores + mask.view(B, 1, 1, T)
    return (scores.softmax(-1).to(v.dtype) @ v).view(B, nh, 1, hs)  # (B, nkv, G, hs) -> (B, nh, 1, hs)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads: n_head query heads share n_kv_head key/value heads."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KV cache is ours
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        # Qwen2 has biases on q, k, v (not on o); Llama and Qwen3 have none
        self.q_proj = nn.Linear(config.n_embd, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, config.n_embd, bias=False)
        if config.qk_norm:
            # Qwen3: an RMSNorm over each head's hs features, shared by the heads, bounds attention logits
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x, cos, sin, mask, cache):
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            # before RoPE, as HF's Qwen3: the per-feature weight does not commute with the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # store this step's keys/values, attend over everything stored so far
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, T_total, hs)
        if cache is not None and T == 1:
            y = decode_attention(q, k, v, mask)  # (B, nh, 1, hs)
        else:
            # mask None = no padding: plain causal. enable_gqa lets each group of n_head / n_kv_head query
            # heads read one k/v head without materialising repeated copies
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh * hs), not D in Qwen3
        return self.o_proj(y)  # (B, T, D)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, I) inside, (B, T, D) out


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Keys and values of every layer, preallocated for max_len positions and written in place.

    pos counts the positions already stored; the model advances it after its last layer, so one forward of T
    tokens moves it by T. Rows of a batch share pos: with left padding all rows are the same length.
    """

    def __init__(self, config, batch_size, max_len, device=None, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nkv, max_len, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nkv, max_len, hs)
        self.max_len = max_len
        self.pos = 0
        self.rows = batch_size  # rows in use, the first ones (the sampler runs one per distinct history)

    def update(self, layer, k, v):
        """Write k, v (rows, nkv, T, hs) at pos -> views of every stored position, (rows, nkv, pos + T, hs)."""
        T = k.size(2)
        keys, values = self.k[layer, :self.rows], self.v[layer, :self.rows]  # views
        keys.narrow(2, self.pos, T).copy_(k)
        values.narrow(2, self.pos, T).copy_(v)
        return keys.narrow(2, 0, self.pos + T), values.narrow(2, 0, self.pos + T)

    def copy_rows(self, src, start):
        """Rows start .. start + len(src) - 1 become copies of rows src (the positions stored so far): the
        sampler's new slots and its compaction. The right side is gathered first, so the two may overlap."""
        n, pos = len(src), self.pos
        self.k[:, start:start + n, :, :pos] = self.k[:, src, :, :pos]  # (L, n, nkv, pos, hs)
        self.v[:, start:start + n, :, :pos] = self.v[:, src, :, :pos]


# -----------------------------------------------------------------------------
# the model


SCORE_FROM = ("hidden", "token_logodds")  # what a score head can read (GPTConfig.score_from)
# the HF class of each model_type; save_pretrained picks qwen3 by qk_norm, qwen2 by qkv_bias
ARCHITECTURES = dict(llama="LlamaForCausalLM", qwen2="Qwen2ForCausalLM", qwen3="Qwen3ForCausalLM")


@dataclass
class GPTConfig:
    vocab_size: int = 18
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # < n_head: grouped-query attention; == n_head: plain multi-head
    n_embd: int = 128
    intermediate_size: int = 352  # SwiGLU width, about 8/3 * n_embd as in Llama
    max_seq_len: int = 128  # size of the RoPE tables; longer inputs are an error, not silently cropped
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False  # True = Qwen2
    qk_norm: bool = False  # True = Qwen3: RMSNorm on each head of q and k
    head_dim: int | None = None  # None = n_embd // n_head; Qwen3's differs (0.6B: 1024 / 16 heads, 128)
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    score_head: bool = False  # scalar head for value / reward / process-reward models
    # what the score head reads: "hidden" = the final hidden state (Linear(n_embd, 1)); "token_logodds" = one
    # number per token that the caller computes from the LM head (Linear(1, 1): a scale and a bias), the
    # log-odds PRM of posttrain's prm stage
    score_from: str = "hidden"

    def __post_init__(self):
        # resolved here, so every user reads one int and a config equals its save / load round trip
        if self.head_dim is None:
            assert self.n_embd % self.n_head == 0, "n_embd must divide by n_head unless head_dim is given"
            self.head_dim = self.n_embd // self.n_head


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_head % config.n_kv_head == 0
        self.config = config
        self.grad_checkpointing = False  # recompute each block in backward instead of storing it (memory)
        # nn.ModuleDict named "model" so parameter names come out exactly as HF's "model.layers.0...."
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            norm=RMSNorm(config.n_embd, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # one Parameter under two names: a gradient from either use lands in the same tensor
            self.lm_head.weight = self.model.embed_tokens.weight
        if config.score_head:
            self.score = nn.Linear(config.n_embd if config.score_from == "hidden" else 1, 1)
        # RoPE tables for every position, computed once; non-persistent so they never enter a checkpoint
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hs)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, hs)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2 init; the score head starts at exactly 0 so a fresh value / reward model predicts 0 everywhere
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.0 if module is getattr(self, "score", None) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_score_head(self, score_from):
        """Replace the score head (or add one) by a zero one that reads score_from (GPTConfig.score_from)."""
        self.config.score_head, self.config.score_from = True, score_from
        self.score = nn.Linear(self.config.n_embd if score_from == "hidden" else 1, 1).to(self.lm_head.weight)
        nn.init.zeros_(self.score.weight), nn.init.zeros_(self.score.bias)

    def num_params(self):
        # parameters() yields a tied matrix once, so tied embeddings are counted once
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, attn_mask=None, cache=None, return_hidden=False):
        """idx (B, T) -> logits (B, T, V), or the final-normed hidden states (B, T, D) if return_hidden.

        attn_mask (B, T_past + T): 1 real, 0 left padding, covering cached positions too. None = no padding.
            Values above 1 mark packed documents: see _positions_and_mask.
        cache: a KVCache holding T_past = cache.pos positions; this call appends T more.
        """
        B, T = idx.shape
        T_past = 0 if cache is None else cache.pos
        if T_past + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {T_past + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if cache is not None and T_past + T > cache.max_len:
            raise ValueError(f"sequence of {T_past + T} tokens exceeds the cache's max_len={cache.max_len}")
        if attn_mask is None and T > 1 and T_past > 0:
            # a chunk appended to a cache needs a causal mask shifted by T_past: take the general path
            attn_mask = torch.ones(B, T_past + T, dtype=torch.long, device=idx.device)
        if attn_mask is None:
            # no padding (training, or a sampler whose prompts are all the same length): every row has
            # positions T_past..T_past+T-1, a slice of the tables, and SDPA needs no mask (see Attention)
            cos = self.rope_cos[T_past:T_past + T]  # (T, hs), broadcast over batch and heads
            sin = self.rope_sin[T_past:T_past + T]  # (T, hs)
            mask = None
        else:
            # (B, T), (B, 1, T, T_total)
            pos, mask = self._positions_and_mask(attn_mask, T, self.lm_head.weight.dtype)
            cos = self.rope_cos[pos].unsqueeze(1)  # (B, 1, T, hs), broadcast over heads
            sin = self.rope_sin[pos].unsqueeze(1)  # (B, 1, T, hs)

        x = self.model.embed_tokens(idx)  # (B, T, D)
        for block in self.model.layers:
            if self.grad_checkpointing and cache is None and torch.is_grad_enabled():
                # keep only each block's input; its activations are recomputed in the backward pass
                x = checkpoint(block, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        x = self.model.norm(x)  # (B, T, D)
        return x if return_hidden else self.lm_head(x)  # (B, T, V)

    @staticmethod
    def _positions_and_mask(attn_mask, T, dtype):
        """Positions (B, T) and SDPA's additive mask (B, 1, T, T_total) for the last T of T_total tokens.

        attn_mask (B, T_total): 0 is padding; any other value names a segment, a run of consecutive tokens
        with that value. A token attends to the earlier tokens of its own segment only, and its position
        counts from the segment's first token. The usual 1 / 0 mask is one segment after left padding;
        packed rows (several documents in one row, as lm_batch builds them) number their documents 1, 2, ...
        """
        T_total = attn_mask.size(1)
        # a token's position is its distance from the first token of its run, so left padding does not shift
        # it and each packed document starts at 0; pads get positions too (their rows are garbage no one reads)
        k_idx = torch.arange(T_total, device=attn_mask.device)  # (T_total,)
        run_start = torch.ones_like(attn_mask, dtype=torch.bool)  # (B, T_total) where a run begins
        run_start[:, 1:] = attn_mask[:, 1:] != attn_mask[:, :-1]
        pos = (k_idx - torch.where(run_start, k_idx, 0).cummax(-1).values)[:, T_total - T:]  # (B, T)
        q_idx = k_idx[T_total - T:, None]  # (T, 1) the new tokens are the last T
        # causal AND key is real AND of the query's segment; plus the diagonal, so a pad query still sees one
        # key: a row with every key masked would make SDPA's softmax 0/0 = NaN, and NaN leaks into gradients
        # even where masked (and, through the KV cache, into later real tokens)
        same = attn_mask[:, None, :] == attn_mask[:, T_total - T:, None]  # (B, T, T_total)
        allowed = ((k_idx <= q_idx) & same & attn_mask.bool()[:, None, :]) | (k_idx == q_idx)  # (B, T, T_total)
        # SDPA would turn a boolean mask into this additive 0 / -inf form in every layer; once here serves all
        mask = torch.where(allowed, 0.0, float("-inf")).to(dtype)  # (B, T, T_total)
        return pos, mask.unsqueeze(1)  # (B, 1, T, T_total), broadcast over heads

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, eos_id=None, generator=None):
        """Naive sampling, the reference the cached sampler (rollout.py) is tested against: a full forward
        over the whole sequence for every new token, no padding. temperature 0 = greedy. Stops when every
        row has produced eos_id (rows that finished early keep sampling). Returns idx (B, T + new)."""
        for _ in range(max_new_tokens):
            logits = self(idx)[:, -1, :].float()  # (B, V)
            if temperature == 0:
                idx_next = logits.argmax(-1, keepdim=True)  # (B, 1)
            else:
                probs = F.softmax(logits / temperature, dim=-1)  # (B, V)
                idx_next = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
            if eos_id is not None and bool((idx == eos_id).any(-1).all()):
                break
        return idx

    # -------------------------------------------------------------------------
    # checkpoints in the HF folder layout

    def save_pretrained(self, folder, tokenizer_path=None):
        """Write config.json (HF keys) and model.safetensors (HF names) [+ tokenizer.json] into folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        c = self.config
        # q/k/v biases without an o bias is Qwen2; HF Llama's and Qwen3's attention_bias put one on o_proj too
        if c.qk_norm and c.qkv_bias:
            raise ValueError("qk_norm with qkv_bias has no HF architecture (Qwen3's attention_bias biases o)")
        model_type = "qwen3" if c.qk_norm else "qwen2" if c.qkv_bias else "llama"
        hf = dict(
            architectures=[ARCHITECTURES[model_type]],
            model_type=model_type,
            vocab_size=c.vocab_size,
            hidden_size=c.n_embd,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            num_key_value_heads=c.n_kv_head,
            head_dim=c.head_dim,
            hidden_act="silu",
            max_position_embeddings=c.max_seq_len,
            rms_norm_eps=c.rms_norm_eps,
            # transformers >= 5 reads rope_parameters, older versions rope_theta: write both
            rope_theta=c.rope_theta,
            rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta),
            tie_word_embeddings=c.tie_embeddings,
            torch_dtype="float32",
        )
        if model_type != "qwen2":
            hf.update(attention_bias=False)
        if model_type == "llama":
            hf.update(mlp_bias=False)
        if c.score_head:
            hf["score_head"] = True
            if c.score_from != "hidden":
                hf["score_from"] = c.score_from
        if tokenizer_path is not None:
            tok_text = Path(tokenizer_path).read_text()
            # special token ids, if the tokenizer has tokens of those names, so HF generate knows them too
            added = {t["content"]: t["id"] for t in json.loads(tok_text).get("added_tokens", [])}
            for name in ("bos", "eos", "pad"):
                if f"<{name}>" in added:
                    hf[f"{name}_token_id"] = added[f"<{name}>"]
            (folder / "tokenizer.json").write_text(tok_text)
        (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if c.tie_embeddings:
            del state["lm_head.weight"]  # HF stores a tied matrix once, under the embedding's name
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, folder, score_head=None, device="cpu", check_only=False):
        """Load an HF Llama / Qwen2 / Qwen3 folder (model.safetensors, or shards listed in
        model.safetensors.index.json). Every defect raises ValueError with one line naming the file.

        score_head: None = as the folder says; True = attach a score head, zero-initialised if the folder has
        none (e.g. a value model started from a policy); False = drop it, ignoring score.* in the checkpoint.
        check_only: run every check (config, file headers, tensor names and shapes) without reading any
        weights or allocating the model; returns None.
        """
        folder = Path(folder)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{folder}: no config.json, not a model folder")
        hf = _read_json(config_file)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [key for key in required if key not in hf]
        if missing:
            raise ValueError(f"{config_file}: missing {', '.join(missing)}")
        arch = (hf.get("architectures") or ["(none)"])[0]
        if arch not in ARCHITECTURES.values():
            raise ValueError(f"{config_file}: unsupported architecture {arch}, "
                             f"expected one of {', '.join(ARCHITECTURES.values())}")
        qwen2, qwen3 = arch == ARCHITECTURES["qwen2"], arch == ARCHITECTURES["qwen3"]
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        # an explicit head_dim may differ from hidden / heads (it does in Qwen3); for a missing one HF's Qwen3
        # takes 128, the others hidden / heads
        head_dim = hf.get("head_dim") or (128 if qwen3 else hf["hidden_size"] // hf["num_attention_heads"])
        unsupported = [
            ("hidden_act", hf.get("hidden_act", "silu") != "silu"),
            ("rope type", rope.get("rope_type", rope.get("type", "default")) != "default"),
            # Qwen2 always has q/k/v biases and no o bias; elsewhere attention_bias means all four
            ("attention_bias", not qwen2 and hf.get("attention_bias", False)),
            ("mlp_bias", hf.get("mlp_bias", False)),
            ("sliding window", hf.get("use_sliding_window", False)),
        ]
        for what, bad in unsupported:
            if bad:
                raise ValueError(f"{config_file}: unsupported {what} setting")
        if hf.get("score_from", "hidden") not in SCORE_FROM:
            raise ValueError(f"{config_file}: score_from is {hf['score_from']!r}, expected one of "
                             f"{', '.join(SCORE_FROM)}")
        config = GPTConfig(
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            n_embd=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            qkv_bias=qwen2,
            qk_norm=qwen3,
            head_dim=head_dim,
            tie_embeddings=hf.get("tie_word_embeddings", False),
            score_head=hf.get("score_head", False) if score_head is None else score_head,
            score_from=hf.get("score_from", "hidden"),
        )
        if check_only:
            with torch.device("meta"):  # shapes only, no memory
                model = cls(config)
        else:
            model = cls(config).to(device)
        # which files hold the tensors: one file, or shards listed in an index {"weight_map": {name: file}}
        index_file = folder / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = _read_json(index_file).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_file}: no weight_map")
            for name, file in weight_map.items():
                # the entry, not its resolved path: HF's cache folders are symlinks into a blob store
                if Path(file).is_absolute() or ".." in Path(file).parts:
                    raise ValueError(f"{index_file}: entry {name}: {file} points outside the folder")
            files = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ValueError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")
        tensors = {}
        for file in files:
            if not (folder / file).is_file():
                raise ValueError(f"{folder}: {file} is missing")
            try:
                if check_only:
                    with safe_open(folder / file, "pt") as f:  # reads the header, which covers the file
                        tensors.update({k: _Shape(f.get_slice(k).get_shape()) for k in f.keys()})
                else:
                    tensors.update(load_file(folder / file, device=str(device)))
            except SafetensorError as e:
                raise ValueError(f"{folder / file}: not a complete safetensors file ({e})") from None
        params = model.state_dict()
        # a tensor we would not read means config.json describes another model (say, fewer layers than the
        # checkpoint has): refuse rather than run a truncated one. Exceptions: a tied lm_head some exporters
        # write anyway, score.* when the caller asked to drop the head, and old exports' RoPE inv_freq buffers
        ignored = [name for name in tensors if name not in params
                   and not (name == "lm_head.weight" and config.tie_embeddings)
                   and not (name.startswith("score.") and score_head is False)
                   and not name.endswith("rotary_emb.inv_freq")]
        if ignored:
            raise ValueError(f"{folder}: tensor {sorted(ignored)[0]} in the checkpoint is not part of the "
                             f"model that config.json describes ({len(ignored)} such tensors)")
        with torch.no_grad():
            for name, param in params.items():
                if name == "lm_head.weight" and config.tie_embeddings:
                    continue  # the same tensor as model.embed_tokens.weight, loaded under that name
                if name.startswith("score.") and name not in tensors:
                    continue  # a new head on a pretrained body (e.g. a value model): keep its zero init
                if name not in tensors:
                    raise ValueError(f"{folder}: tensor {name} missing from the checkpoint")
                if tensors[name].shape != param.shape:
                    raise ValueError(f"{folder}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                     f"config.json implies {tuple(param.shape)}")
                if not check_only:
                    param.copy_(tensors[name])  # copy_ also converts a bf16 / fp16 file to our fp32
        return None if check_only else model


class _Shape:
    """A tensor's shape read from a safetensors header, standing in for the tensor in the checks above."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)


def _read_json(path):
    try:
        out = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return out
