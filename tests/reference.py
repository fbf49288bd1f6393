"""A frozen, independent NumPy reference of Meta's Llama 2 forward pass (llama/model.py):
interleaved-pair RoPE via complex numbers, repeat_kv for GQA, -inf causal mask, float64.
It reads weights in Meta's layout ([out, in] matrices, wq/wk rows in Meta's RoPE order)."""

import numpy as np


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_interleaved(x, theta):
    """x [T, N, Dh]: rotate pairs (2i, 2i+1) as complex numbers by t * theta^(-2i/Dh)."""
    T, _, Dh = x.shape
    freqs = 1.0 / theta ** (np.arange(0, Dh, 2) / Dh)
    angles = np.outer(np.arange(T), freqs)  # [T, Dh/2]
    xc = x.reshape(T, -1, Dh // 2, 2)
    xc = xc[..., 0] + 1j * xc[..., 1]
    out = xc * np.exp(1j * angles)[:, None, :]
    return np.stack([out.real, out.imag], axis=-1).reshape(x.shape)


def forward(meta: dict, n_layers, n_heads, n_kv_heads, eps, theta, tokens):
    """meta: Meta state-dict names -> float64 arrays. tokens: [T]. Returns logits [T, V]."""
    x = meta["tok_embeddings.weight"][tokens]
    T, D = x.shape
    Dh = D // n_heads
    n_rep = n_heads // n_kv_heads
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n_layers):
        p = lambda n: meta[f"layers.{i}.{n}"]  # noqa: E731
        h = rmsnorm(x, p("attention_norm.weight"), eps)
        q = (h @ p("attention.wq.weight").T).reshape(T, n_heads, Dh)
        k = (h @ p("attention.wk.weight").T).reshape(T, n_kv_heads, Dh)
        v = (h @ p("attention.wv.weight").T).reshape(T, n_kv_heads, Dh)
        q, k = rope_interleaved(q, theta), rope_interleaved(k, theta)
        k, v = np.repeat(k, n_rep, axis=1), np.repeat(v, n_rep, axis=1)  # repeat_kv
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(Dh) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        attn = np.einsum("hts,shd->thd", probs, v).reshape(T, D)
        x = x + attn @ p("attention.wo.weight").T
        h = rmsnorm(x, p("ffn_norm.weight"), eps)
        gate = h @ p("feed_forward.w1.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ p("feed_forward.w3.weight").T)) @ p("feed_forward.w2.weight").T
    return rmsnorm(x, meta["norm.weight"], eps) @ meta["output.weight"].T


# Meta's llama/generation.py chat_completion, transcribed (B_INST etc. are plain text).
def meta_chat_tokens(encode, dialog):
    """encode(text, bos, eos) -> ids. Returns the prompt tokens Meta builds for `dialog`."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
                  ] + dialog[2:]
    assert all(m["role"] == "user" for m in dialog[::2]) and all(m["role"] == "assistant" for m in dialog[1::2])
    tokens = sum([encode(f"{B_INST} {(p['content']).strip()} {E_INST} {(a['content']).strip()} ", True, True)
                  for p, a in zip(dialog[::2], dialog[1::2])], [])
    if dialog[-1]["role"] == "user":
        tokens += encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}", True, False)
    return tokens
