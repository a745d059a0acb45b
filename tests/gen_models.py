#!/usr/bin/env python3
"""Tiny random Hugging Face MoE checkpoints plus transformers-computed goldens.

What it writes, under --out (default tests/models next to this file):

  <variant>/config.json            as save_pretrained writes it, plus the Hub-style
                                   "rope_theta"/"rope_scaling" keys (see MANIFEST.md)
  <variant>/*.safetensors          the weights (+ model.safetensors.index.json when sharded)
  <variant>/data.jsonl             3 samples {"input_ids": [...], "labels": [...]};
                                   one sample has no "labels" key (= input_ids, all scored)
  <variant>/golden.safetensors     logits, losses and the routing transformers used
  MANIFEST.md                      versions, conventions, every tensor name/dtype/shape

The C model forward is tested against these files without torch, so the files
are committed; this script is only needed to regenerate them:

    python3 tests/gen_models.py [--out tests/models] [--only NAME[,NAME...]]

Needs torch, transformers (v5: fused 3-D experts in memory), numpy, safetensors.
Everything is seeded and runs on the CPU in fp32 with eager attention, so a rerun
with the same versions reproduces the files (the manifest records the versions).

Goldens are computed by transformers itself: fp32, eval mode, attn_implementation
"eager", experts_implementation "eager", each sample run alone (batch 1, no
padding). bf16 variants run in fp32 on the bf16-rounded weights; the FP8 variant
runs in fp32 on the dequantised weights. After saving, each directory is loaded
back with from_pretrained (FP8: after dequantising the files on disk) and its
logits must equal the in-memory model's bit for bit, so the checkpoint on disk
is the one the goldens describe.
"""

import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import safetensors
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as pt_save_file
from transformers import AutoConfig, AutoModelForCausalLM

SIZE_LIMIT = 8 * 1024 * 1024  # the whole tree (training goldens included) is committed; keep clones cheap
FP8_BLOCK = 128               # DeepSeek-V3's weight_block_size
FP8_MAX = 448.0               # largest finite float8_e4m3fn
LENGTHS = (24, 9, 40)
# Prompt positions masked with -100 per sample; None = no "labels" key at all.
PROMPT_MASK = (5, None, 12)

YARN_V2 = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
           "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
YARN_V3 = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
FP8_QCONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
               "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}

DS_COMMON = dict(vocab_size=192, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=4,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 max_position_embeddings=64, first_k_dense_replace=1, rms_norm_eps=1e-6,
                 rope_theta=10000.0, bos_token_id=None, eos_token_id=None)

# What the dense variants share: two layers of width 64 over the same vocabulary.
DENSE_COMMON = dict(vocab_size=192, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=96, max_position_embeddings=64, bos_token_id=None,
                    eos_token_id=None)

VARIANTS = [
    dict(name="deepseek_v2_lite", model_type="deepseek_v2", dtype="fp32", seed=101,
         note="MLA without q_lora (q_proj), greedy top-k, 2 shared experts, layer 0 dense.",
         config=dict(DS_COMMON, intermediate_size=96, moe_intermediate_size=24, q_lora_rank=None,
                     n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                     topk_method="greedy", n_group=None, topk_group=None,
                     routed_scaling_factor=1.0, norm_topk_prob=False, rope_scaling=None)),
    dict(name="deepseek_v2_qlora_yarn", model_type="deepseek_v2", dtype="bf16", seed=102,
         note="q_lora (q_a_proj/q_a_layernorm/q_b_proj), group_limited_greedy, "
              "routed_scaling_factor 16, YaRN with mscale = mscale_all_dim = 0.707; samples "
              "of 24 and 40 tokens run past original_max_position_embeddings 16.",
         config=dict(DS_COMMON, intermediate_size=96, moe_intermediate_size=24, q_lora_rank=24,
                     qk_rope_head_dim=16, rope_theta=500.0,
                     n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                     topk_method="group_limited_greedy", n_group=4, topk_group=2,
                     routed_scaling_factor=16.0, norm_topk_prob=False, rope_scaling=YARN_V2)),
    dict(name="deepseek_v3_fp8", model_type="deepseek_v3", dtype="fp8", seed=103,
         note="sigmoid + e_score_correction_bias + noaux_tc group routing, norm_topk_prob, "
              "routed_scaling_factor 2.5; FP8 E4M3 weights with 128x128 block scale_inv; "
              "expert and dense MLP widths (144, 160) are not multiples of 128.",
         config=dict(DS_COMMON, intermediate_size=160, moe_intermediate_size=144, q_lora_rank=32,
                     n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                     topk_method="noaux_tc", n_group=4, topk_group=2,
                     routed_scaling_factor=2.5, norm_topk_prob=True, rope_scaling=None)),
    dict(name="deepseek_v3_bf16_tied", model_type="deepseek_v3", dtype="bf16", seed=104, shards=2,
         note="no q_lora, tied embeddings (no lm_head.weight on disk), 2 shards, "
              "V3-style YaRN (mscale = mscale_all_dim = 1.0), norm_topk_prob false.",
         config=dict(DS_COMMON, intermediate_size=96, moe_intermediate_size=24, q_lora_rank=None,
                     n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                     topk_method="noaux_tc", n_group=2, topk_group=1,
                     routed_scaling_factor=1.5, norm_topk_prob=False, tie_word_embeddings=True,
                     rope_scaling=YARN_V3)),
    dict(name="qwen2_moe", model_type="qwen2_moe", dtype="fp32", seed=105,
         note="qkv bias, GQA, shared expert with sigmoid shared_expert_gate, per-expert names.",
         config=dict(vocab_size=192, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=24,
                     shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                     norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                     use_sliding_window=False, max_position_embeddings=64, rope_theta=10000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=False,
                     bos_token_id=None, eos_token_id=None)),
    dict(name="qwen2_moe_fused", model_type="qwen2_moe", dtype="fp32", seed=106, fused=True,
         note="as qwen2_moe, saved with save_pretrained(save_original_format=False): "
              "experts as fused 3-D gate_up_proj / down_proj.",
         config=dict(vocab_size=192, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=24,
                     shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                     norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                     use_sliding_window=False, max_position_embeddings=64, rope_theta=10000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=False,
                     bos_token_id=None, eos_token_id=None)),
    dict(name="qwen3_moe", model_type="qwen3_moe", dtype="bf16", seed=107,
         note="GQA 4q/2kv, explicit head_dim 24 != hidden/heads, per-head q_norm/k_norm, "
              "norm_topk_prob true.",
         config=dict(vocab_size=192, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=24, intermediate_size=96,
                     moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                     norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                     use_sliding_window=False, max_position_embeddings=64, rope_theta=1000000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=False,
                     bos_token_id=None, eos_token_id=None)),
    dict(name="olmoe", model_type="olmoe", dtype="fp32", seed=108,
         note="q_norm/k_norm over the whole projection output, norm_topk_prob false, tied "
              "embeddings (no lm_head.weight on disk).",
         config=dict(vocab_size=192, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=24, num_experts=8,
                     num_experts_per_tok=2, norm_topk_prob=False, max_position_embeddings=64,
                     rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     clip_qkv=None, pad_token_id=None, bos_token_id=None, eos_token_id=None)),
    dict(name="mixtral", model_type="mixtral", dtype="fp32", seed=109, shards=2,
         note="GQA 4q/2kv, 4 experts top-2 (always renormalised), sliding_window null, 2 shards.",
         config=dict(vocab_size=192, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, intermediate_size=48,
                     num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                     max_position_embeddings=64, rope_theta=1000000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)),
    # Dense families (no MoE layer): what PESC upcycles.
    dict(name="llama", model_type="llama", dtype="bf16", seed=110,
         note="dense: GQA 4q/2kv, explicit head_dim 24 != hidden/heads, attention_bias true "
              "(q/k/v and o_proj biases), mlp_bias false, rope_theta 500000.",
         config=dict(DENSE_COMMON, num_key_value_heads=2, head_dim=24, attention_bias=True,
                     mlp_bias=False, rope_theta=500000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=False, pad_token_id=None)),
    dict(name="mistral", model_type="mistral", dtype="bf16", seed=111,
         note="dense: GQA 4q/2kv, head_dim not given (the config writes hidden/heads = 16), "
              "sliding_window 8: the 24- and 40-token samples run past it (asserted to change "
              "the logits).",
         config=dict(DENSE_COMMON, num_key_value_heads=2, head_dim=None, sliding_window=8,
                     rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    dict(name="qwen2", model_type="qwen2", dtype="fp32", seed=112,
         note="dense: q/k/v bias (o_proj none), MHA 4q/4kv, use_sliding_window false, tied "
              "embeddings (no lm_head.weight on disk).",
         config=dict(DENSE_COMMON, num_key_value_heads=4, use_sliding_window=False,
                     max_window_layers=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=True)),
]


# ---------------------------------------------------------------------------
# Building and initialising

def make_config(v):
    kw = dict(v["config"])
    rope_scaling = kw.pop("rope_scaling", None)
    rope_theta = kw.pop("rope_theta")
    # v5 configs keep RoPE in rope_parameters; the legacy rope_scaling kwarg is
    # still accepted and folded in (that is how Hub configs load).
    params = dict(rope_scaling) if rope_scaling else {"rope_type": "default"}
    params["rope_theta"] = rope_theta
    cfg = AutoConfig.for_model(v["model_type"], rope_parameters=params, **kw)
    cfg._attn_implementation = "eager"
    return cfg


def is_router(name):
    # The MoE router ("gate") is a bare weight matrix (E, D): mlp.gate.weight in
    # memory for every family here (mixtral's block_sparse_moe is renamed on load).
    return name.endswith("mlp.gate.weight")


@torch.no_grad()
def init_weights(model, seed):
    """Random weights with enough spread that a wrong norm, bias or routing is visible.

    transformers' default init (std 0.02, norms = 1, biases = 0) would let a C
    forward that skips a norm weight or a bias pass; routers get a large std so
    top-k choices are not near-ties that rounding could flip.
    """
    g = torch.Generator().manual_seed(seed)
    tied = bool(model.config.tie_word_embeddings)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    for name, p in model.named_parameters():
        if p.ndim == 1 and "norm" in name:
            p.copy_(1.0 + 0.1 * randn(p.shape))
        elif name.endswith(".bias"):
            p.copy_(0.05 * randn(p.shape))
        elif is_router(name):
            p.copy_(0.5 * randn(p.shape))
        elif "embed_tokens" in name:
            # Tied heads reuse this matrix for the logits: keep them O(1) there.
            p.copy_((0.1 if tied else 0.5) * randn(p.shape))
        else:
            p.copy_(0.08 * randn(p.shape))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            # Sigmoid scores live in (0, 1); +-0.1 moves choices without swamping them.
            b.copy_(0.1 * randn(b.shape))


@torch.no_grad()
def round_to_bf16(model):
    for t in list(model.parameters()) + [b for n, b in model.named_buffers()
                                         if n.endswith("e_score_correction_bias")]:
        t.copy_(t.to(torch.bfloat16).to(torch.float32))


def load_model(path):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                             experts_implementation="eager")
    return m.eval()


# ---------------------------------------------------------------------------
# Data and goldens

def make_samples(seed, vocab):
    g = np.random.default_rng(seed)
    samples = []
    for n, mask in zip(LENGTHS, PROMPT_MASK):
        ids = [int(x) for x in g.integers(0, vocab, size=n)]
        s = {"input_ids": ids}
        if mask is not None:
            s["labels"] = [-100] * mask + ids[mask:]
        samples.append(s)
    return samples


def moe_layers(model):
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


@torch.no_grad()
def run_goldens(model, samples):
    """Logits, losses and routing, each sample alone.

    Routing comes from a forward pre-hook on each MoE layer's `mlp.experts`
    module: its (hidden_states, top_k_index, top_k_weights) arguments are what
    the experts actually multiply with, after renormalisation and
    routed_scaling_factor, in the order the router produced them.
    """
    layers = moe_layers(model)
    captured = {l: [] for l in layers}
    router_logits = {l: [] for l in layers}
    handles = []
    for l in layers:
        def ghook(mod, args, out, l=l):
            router_logits[l].append(out[0].detach().clone())
        handles.append(model.model.layers[l].mlp.gate.register_forward_hook(ghook))
        def hook(mod, args, kwargs, l=l):
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            w = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            captured[l].append((idx.detach().clone(), w.detach().clone()))
        handles.append(model.model.layers[l].mlp.experts.register_forward_pre_hook(hook, with_kwargs=True))

    logits, losses, counts, labelled = [], [], [], []
    direct_sum = 0.0
    for s in samples:
        ids = torch.tensor([s["input_ids"]])
        lab = torch.tensor([s.get("labels", s["input_ids"])])
        out = model(input_ids=ids, labels=lab)
        lg = out.logits[0].float()
        logits.append(lg)
        tgt = lab[0, 1:]
        n = int((tgt != -100).sum())
        counts.append(n)
        losses.append(float(out.loss))
        ce = torch.nn.functional.cross_entropy(lg[:-1].double(), tgt, ignore_index=-100, reduction="sum")
        direct_sum += float(ce)
        labelled.append(lab[0] != -100)
    for h in handles:
        h.remove()

    n_tokens = sum(counts)
    # Pooled over samples: sum of HF per-sample means weighted by their counts.
    pooled = sum(l * n for l, n in zip(losses, counts)) / n_tokens
    assert abs(pooled - direct_sum / n_tokens) < 1e-5 * max(1.0, abs(pooled)), (pooled, direct_sum / n_tokens)
    golden = {
        "logits": torch.cat(logits, 0).numpy().astype(np.float32),
        "loss": np.array([pooled], dtype=np.float32),
        "n_tokens": np.array([n_tokens], dtype=np.int64),
        "loss_per_sample": np.array(losses, dtype=np.float32),
    }
    if not layers:
        return golden, []  # a dense model: no router, so no routing tensors

    E = model.config.num_experts if hasattr(model.config, "num_experts") else model.config.num_local_experts
    lab_mask = torch.cat(labelled)
    ids_all, w_all, c_all, c_lab, gaps = [], [], [], [], []
    for l in layers:
        assert len(captured[l]) == len(samples)
        idx = torch.cat([c[0] for c in captured[l]], 0)
        w = torch.cat([c[1] for c in captured[l]], 0).float()
        ids_all.append(idx.to(torch.int32))
        w_all.append(w)
        c_all.append(torch.bincount(idx.reshape(-1), minlength=E))
        c_lab.append(torch.bincount(idx[lab_mask].reshape(-1), minlength=E))
        gate = model.model.layers[l].mlp.gate
        bias = getattr(gate, "e_score_correction_bias", None)
        gaps.append(check_routing(model.config, torch.cat(router_logits[l], 0), bias, idx, w))
    golden.update({
        "moe_layers": np.array(layers, dtype=np.int64),
        "router_ids": torch.stack(ids_all).numpy().astype(np.int32),
        "router_weights": torch.stack(w_all).numpy().astype(np.float32),
        "router_counts_all": torch.stack(c_all).numpy().astype(np.int64),
        "router_counts_labelled": torch.stack(c_lab).numpy().astype(np.int64),
    })
    return golden, gaps


def check_routing(cfg, logits, bias, ids, weights):
    """Recompute routing from the router logits as MANIFEST.md describes it.

    Asserts the model chose the same experts with the same weights (so the
    written description is the one transformers runs) and returns the smallest
    score gaps at the top-k and top-group boundaries: large gaps mean a C
    forward with slightly different rounding still picks the same experts.
    """
    K = ids.shape[1]
    E = logits.shape[1]
    mt = cfg.model_type
    logits = logits.double()
    group_gap = float("inf")
    if mt == "deepseek_v3":
        s = logits.sigmoid()
        c = s + bias.double()
        G, TG = cfg.n_group, cfg.topk_group
        gs = c.view(-1, G, E // G).topk(2, dim=-1)[0].sum(-1)
        keep = gs.topk(TG, dim=-1)[1]
        mask = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, keep, True)
        gsort = gs.sort(dim=-1, descending=True)[0]
        group_gap = float((gsort[:, TG - 1] - gsort[:, TG]).min()) if TG < G else group_gap
        choice = c.masked_fill(~mask.repeat_interleave(E // G, 1), float("-inf"))
        sel = choice.topk(K, dim=-1)[1]
        w = s.gather(1, sel)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * cfg.routed_scaling_factor
    else:
        p = logits.softmax(-1)
        choice = p
        if mt == "deepseek_v2" and cfg.topk_method == "group_limited_greedy":
            G, TG = cfg.n_group, cfg.topk_group
            gs = p.view(-1, G, E // G).max(-1)[0]
            keep = gs.topk(TG, dim=-1)[1]
            mask = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, keep, True)
            gsort = gs.sort(dim=-1, descending=True)[0].log()
            group_gap = float((gsort[:, TG - 1] - gsort[:, TG]).min())
            choice = p.masked_fill(~mask.repeat_interleave(E // G, 1), 0.0)
        sel = choice.topk(K, dim=-1)[1]
        w = choice.gather(1, sel)
        if mt == "deepseek_v2":
            w = w * cfg.routed_scaling_factor  # norm_topk_prob is ignored by this class
        elif mt == "mixtral" or cfg.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
    srt = choice.sort(dim=-1, descending=True)[0]
    if mt != "deepseek_v3":
        # Softmax families: measure gaps as log-probability (= logit) differences.
        srt = srt.log()
    topk_gap = float((srt[:, K - 1] - srt[:, K]).min())
    # Same sets; compare weights after sorting each row by expert id.
    a_ids, a_ord = ids.long().sort(-1)
    b_ids, b_ord = sel.sort(-1)
    assert torch.equal(a_ids, b_ids), "routing description disagrees with transformers' choice"
    wa = weights.double().gather(1, a_ord)
    wb = w.gather(1, b_ord)
    err = float((wa - wb).abs().max() / wb.abs().max())
    assert err < 1e-5, f"routing weights disagree: rel err {err}"
    return topk_gap, group_gap


@torch.no_grad()
def logits_only(model, samples):
    return torch.cat([model(input_ids=torch.tensor([s["input_ids"]])).logits[0].float() for s in samples])


def assert_window_matters(model, samples, logits):
    """A sliding window shorter than a sample must change its logits, or the
    golden would not test the mask."""
    w = getattr(model.config, "sliding_window", None)
    if not w or max(len(s["input_ids"]) for s in samples) <= w:
        return
    model.config.sliding_window = None
    try:
        full = logits_only(model, samples)
    finally:
        model.config.sliding_window = w
    assert float((full - torch.from_numpy(logits)).abs().max()) > 1e-3, "the sliding window changes nothing"


# ---------------------------------------------------------------------------
# Files

def st_files(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors") and f != "golden.safetensors")


def read_tensors(d):
    out = {}
    for f in st_files(d):
        with safe_open(os.path.join(d, f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def tensor_table(d):
    """(name, dtype string, shape, file) for every tensor on disk."""
    rows = []
    for f in st_files(d):
        with safe_open(os.path.join(d, f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                rows.append((k, sl.get_dtype(), tuple(sl.get_shape()), f))
    return rows


def add_hub_rope_keys(d):
    """Write Hub-style "rope_theta"/"rope_scaling" next to v5's "rope_parameters".

    Released DeepSeek/Qwen/Mixtral configs carry top-level rope_theta and a
    rope_scaling dict (or null); v5's save_pretrained writes only rope_parameters.
    Both are present so a C reader can be tested on either; transformers reads
    rope_scaling first, and the reload check proves it reads the same model.
    """
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    rp = cfg.get("rope_parameters") or {}
    cfg["rope_theta"] = rp.get("rope_theta")
    if rp.get("rope_type", "default") == "default":
        cfg["rope_scaling"] = None
    else:
        cfg["rope_scaling"] = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type")}
        cfg["rope_scaling"]["type"] = rp["rope_type"]
    json.dump(cfg, open(p, "w"), indent=2, sort_keys=True)
    open(p, "a").write("\n")


def save_sharded(model, d, shards):
    if shards == 1:
        model.save_pretrained(d)
        return
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    # A little over half the bytes: save_pretrained then cuts exactly two shards.
    model.save_pretrained(d, max_shard_size=int(total * 0.55))
    n = len(st_files(d))
    assert n == shards, f"{d}: {n} shards, wanted {shards}"
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))


def fp8_eligible(name, t):
    # DeepSeek-V3 quantises every Linear weight except the router; embeddings,
    # lm_head, norms and e_score_correction_bias stay in their own dtype.
    return (t.ndim == 2 and name.endswith(".weight") and "embed_tokens" not in name
            and not name.startswith("lm_head") and not is_router(name) and "norm" not in name)


def fp8_quantise(w):
    """Blockwise E4M3: q * scale_inv[bi, bj] recovers block (bi, bj) of w."""
    out_f, in_f = w.shape
    rb, cb = math.ceil(out_f / FP8_BLOCK), math.ceil(in_f / FP8_BLOCK)
    scale_inv = torch.empty(rb, cb, dtype=torch.float32)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    for i in range(rb):
        for j in range(cb):
            blk = w[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK]
            s = float(blk.abs().max()) / FP8_MAX
            s = s if s > 0 else 1.0
            scale_inv[i, j] = s
            q[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK] = \
                (blk / scale_inv[i, j]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale_inv


def fp8_dequantise(q, scale_inv):
    s = scale_inv.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return q.to(torch.float32) * s[:q.shape[0], :q.shape[1]]


def dequantised_dir(src, dst):
    """A plain fp32 copy of an FP8 directory, for from_pretrained on the CPU."""
    os.makedirs(dst, exist_ok=True)
    t = read_tensors(src)
    deq = {}
    for k, v in t.items():
        if k.endswith("_scale_inv"):
            continue
        deq[k] = fp8_dequantise(v, t[k + "_scale_inv"]) if v.dtype == torch.float8_e4m3fn else v.float()
    pt_save_file(deq, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.pop("quantization_config", None)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)


# ---------------------------------------------------------------------------
# One variant

MIN_GAP = 1e-3  # logits (softmax routers) or biased sigmoid scores (noaux_tc)


def build_variant(v, out, tmp):
    """Build with the variant's seed, or the next of seed + 1000 i whose routing has no near-tie."""
    for attempt in range(50):
        r = build_variant_seed(v, out, tmp, v["seed"] + 1000 * attempt)
        if r["gap"] >= MIN_GAP and r["ggap"] >= MIN_GAP:
            return r
    raise RuntimeError(f"{v['name']}: no seed without near-tied routing")


def build_variant_seed(v, out, tmp, seed):
    name = v["name"]
    d = os.path.join(out, name)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    torch.manual_seed(seed)
    cfg = make_config(v)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                             experts_implementation="eager", dtype=torch.float32)
    model.eval()
    init_weights(model, seed)
    dtype = v["dtype"]
    if dtype == "bf16":
        round_to_bf16(model)

    if dtype == "fp8":
        # Quantise the per-expert checkpoint tensors (not the fused in-memory
        # ones): DeepSeek-V3 ships one scale_inv per 2-D expert matrix.
        plain = os.path.join(tmp, f"{name}_{seed}_fp32")
        model.save_pretrained(plain)
        t = read_tensors(plain)
        q_t = {}
        for k, w in t.items():
            if fp8_eligible(k, w):
                q, s = fp8_quantise(w)
                q_t[k] = q
                q_t[k + "_scale_inv"] = s
            else:
                q_t[k] = w
        pt_save_file(dict(sorted(q_t.items())), os.path.join(d, "model.safetensors"),
                     metadata={"format": "pt"})
        shutil.copy(os.path.join(plain, "config.json"), os.path.join(d, "config.json"))
        c = json.load(open(os.path.join(d, "config.json")))
        # transformers would route loading through its FP8 quantizer (GPU only);
        # the goldens come from the dequantised fp32 weights instead.
        c["quantization_config"] = FP8_QCONFIG
        json.dump(c, open(os.path.join(d, "config.json"), "w"), indent=2, sort_keys=True)
        deq = os.path.join(tmp, f"{name}_{seed}_deq")
        dequantised_dir(d, deq)
        model = load_model(deq)  # the golden model is the dequantised checkpoint
    elif v.get("fused"):
        model.save_pretrained(d, save_original_format=False)
    else:
        save_model = model
        if dtype == "bf16":
            save_model = copy.deepcopy(model).to(torch.bfloat16)
            # DeepSeek-V3 ships e_score_correction_bias in F32 next to BF16 weights.
            for n, b in save_model.named_buffers():
                if n.endswith("e_score_correction_bias"):
                    b.data = b.data.to(torch.float32)
        save_sharded(save_model, d, v.get("shards", 1))
    add_hub_rope_keys(d)

    samples = make_samples(seed, cfg.vocab_size)
    with open(os.path.join(d, "data.jsonl"), "w") as f:
        for s in samples:
            f.write(json.dumps(s, separators=(",", ":")) + "\n")
    golden, gaps = run_goldens(model, samples)
    np_save_file(golden, os.path.join(d, "golden.safetensors"), metadata={"format": "np"})

    # Reload check: what is on disk is what the goldens describe.
    if dtype == "fp8":
        deq2 = os.path.join(tmp, f"{name}_{seed}_deq_check")
        dequantised_dir(d, deq2)
        back = load_model(deq2)
    else:
        back = load_model(d)
    a = torch.from_numpy(golden["logits"])
    b = logits_only(back, samples)
    diff = float((a - b).abs().max())
    assert diff == 0.0, f"{name}: reloaded logits differ by {diff}"
    assert np.isfinite(golden["logits"]).all()
    # The in-memory model must also agree with a forward without labels.
    assert float((logits_only(model, samples) - a).abs().max()) == 0.0
    assert_window_matters(model, samples, golden["logits"])
    return dict(v=v, dir=d, cfg=json.load(open(os.path.join(d, "config.json"))),
                golden=golden, table=tensor_table(d), model=model, diff=diff,
                gap=min((g[0] for g in gaps), default=math.inf),
                ggap=min((g[1] for g in gaps), default=math.inf), seed=seed,
                versions=versions_line())


# ---------------------------------------------------------------------------
# Manifest

def dir_bytes(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def compact_names(table):
    """Collapse layer and expert indices into {l} / {e}, keeping exact dtype/shape."""
    groups = {}
    for name, dt, shape, f in table:
        key = name
        l = e = None
        m = re.search(r"\.layers\.(\d+)\.", key)
        if m:
            l = int(m.group(1))
            key = key[:m.start()] + ".layers.{l}." + key[m.end():]
        m = re.search(r"\.experts\.(\d+)\.", key)
        if m:
            e = int(m.group(1))
            key = key[:m.start()] + ".experts.{e}." + key[m.end():]
        g = groups.setdefault((key, dt, shape), [set(), set()])
        if l is not None:
            g[0].add(l)
        if e is not None:
            g[1].add(e)
    lines = []
    for (key, dt, shape), (ls, es) in sorted(groups.items()):
        where = []
        if ls:
            where.append("l=" + ",".join(map(str, sorted(ls))))
        if es:
            s = sorted(es)
            where.append(f"e={s[0]}..{s[-1]}" if s == list(range(s[0], s[-1] + 1)) else
                         "e=" + ",".join(map(str, s)))
        lines.append(f"    {key:<58} {dt:<8} {str(list(shape)):<12} {' '.join(where)}")
    return lines


KEY_FIELDS = ["model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size",
              "shared_expert_intermediate_size", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
              "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts", "num_local_experts",
              "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace", "decoder_sparse_step",
              "mlp_only_layers", "topk_method", "scoring_func", "n_group", "topk_group",
              "routed_scaling_factor", "norm_topk_prob", "rope_interleave", "attention_bias", "mlp_bias",
              "qkv_bias", "clip_qkv", "sliding_window", "use_sliding_window", "max_window_layers",
              "rms_norm_eps",
              "tie_word_embeddings", "max_position_embeddings", "rope_theta", "rope_scaling",
              "rope_parameters", "quantization_config", "hidden_act"]

NOTES = r"""
## Conventions shared by every variant

* Samples: `data.jsonl`, one JSON object per line, lengths 24, 9, 40. Sample 0 has
  `labels` with the first 5 positions -100, sample 1 has **no `labels` key**
  (labels = input_ids, every target scored), sample 2 masks the first 12.
* Each sample is run alone (batch 1, no padding, positions 0..L-1), fp32, eager
  attention, causal mask.
* `logits` F32 (P, V): the samples' logits concatenated in file order, P = 73.
* `loss` F32 (1,): Hugging Face shift convention (logits at t predict labels[t+1];
  targets equal to -100 are not scored), pooled over all scored targets of all
  3 samples. Computed as sum_i(HF per-sample mean loss_i * n_i) / sum_i n_i and
  asserted equal (1e-5) to a direct float64 sum of cross-entropies / count.
  `n_tokens` I64 (1,) = sum_i n_i; `loss_per_sample` F32 (3,) = HF's per-sample means.
* `moe_layers` I64 (M,): model layer indices holding an MoE block, ascending.
  Dense variants (llama, mistral, qwen2) have no MoE layer and their goldens no
  `moe_layers` and no `router_*` tensors: logits and losses only.
* `router_ids` I32 (M, P, K), `router_weights` F32 (M, P, K): captured by a
  forward **pre-hook on each MoE layer's `mlp.experts` module**; they are its
  `top_k_index` / `top_k_weights` arguments, i.e. exactly what the experts
  multiply into their outputs (after any renormalisation and
  routed_scaling_factor), in the order the router produced them. DeepSeek
  routers call `torch.topk(..., sorted=False)`, so their order is torch's CPU
  order and not necessarily by descending weight: compare as sets (ties
  judged by weight) if your order differs.
* `router_counts_all` I64 (M, E): selections per expert over all P positions;
  `router_counts_labelled` I64 (M, E): the same over positions t whose own
  label labels[t] != -100 (sample 1: all positions).
* config.json is what v5 `save_pretrained` writes (RoPE in `rope_parameters`,
  with `rope_theta` inside it) **plus** Hub-style top-level `rope_theta` and
  `rope_scaling` (null, or the dict with `"type"`), which released checkpoints
  use instead. They always agree; transformers reads `rope_scaling` first.
* bf16 variants: the model is built in fp32, every weight rounded to bf16, saved
  in bf16, and the goldens run in fp32 on those rounded values (so reading the
  bf16 file and widening to f32 gives exactly the weights the goldens used).
* The goldens use `experts_implementation="eager"` (the per-expert loop); the
  default v5 implementation on the CPU sums in another order and moves logits
  by ~2e-6, so compare with a tolerance (1e-4 abs is ample), not bitwise.
* Every variant's directory was reloaded with `from_pretrained` (FP8: after
  dequantising the files on disk) and reproduced the golden logits bit for bit.

## Per-family math the C side must reproduce (transformers VERSION_T)

### RMSNorm (all families)
`y = w * (x / sqrt(mean(x^2) + eps))`, computed in fp32; eps = `rms_norm_eps`
(1e-6 deepseek/qwen, 1e-5 olmoe/mixtral here). The norm weight multiplies
after normalising (no `1 + w`). DeepSeek's `q_a_layernorm` and
`kv_a_layernorm` use eps **1e-6 fixed** (constructed without rms_norm_eps).

### Decoder layer (all families)
`h = x + attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))`;
final `model.norm`, then `lm_head` (or `embed_tokens` when tied). SiLU-gated MLPs:
`down(silu(gate(x)) * up(x))`.

### Standard attention (qwen2_moe, qwen3_moe, olmoe, mixtral, llama, mistral, qwen2)
Scores `q·k * head_dim^-0.5`, causal softmax in fp32. GQA: kv head `h // (H/Hkv)`
serves query head h (repeat_kv = each kv head repeated for a contiguous group).
RoPE is the **half-split (rotate_half / NeoX) layout**: for pair i in 0..d/2-1,
(x[i], x[i+d/2]) is rotated by angle pos * theta^(-2i/d):
`x'[i] = x[i] cos - x[i+d/2] sin`, `x'[i+d/2] = x[i+d/2] cos + x[i] sin`.
* qwen2_moe: q/k/v projections have biases (o_proj none).
* qwen3_moe: `q_norm`/`k_norm` weights have shape (head_dim,), applied per head
  to q and k **before** RoPE (reshape (T, H*hd) -> (T, H, hd), RMSNorm over hd).
  head_dim is explicit (24 here, not hidden/heads = 16): q_proj is (H*hd, D),
  o_proj (D, H*hd).
* olmoe: `q_norm` weight is (H*hd,) = (hidden,) and `k_norm` (Hkv*hd,): RMSNorm
  over the **whole** projection output (all heads together) before the head
  split and before RoPE. `clip_qkv` null (no clamping).
* mixtral: sliding_window null = full causal attention.
* qwen2: q/k/v biases, o_proj none, as qwen2_moe; use_sliding_window false
  (then no layer has a window, whatever sliding_window and max_window_layers say).
* llama: attention_bias true here: q/k/v **and o_proj** have biases (mlp_bias
  false: the MLP has none); head_dim explicit (24 here, not hidden/heads = 16).
* mistral: head_dim = hidden/heads; sliding_window W = 8: query t attends to
  keys j with t - W < j <= t (transformers' `sliding_window_overlay`:
  kv_idx > q_idx - W), so the 24- and 40-token samples are windowed.

### Dense families (llama, mistral, qwen2)
Every layer's MLP is `mlp.{gate,up,down}_proj` of width intermediate_size
(SwiGLU as above); there is no router and no expert.

### DeepSeek MLA (deepseek_v2, deepseek_v3)
* config.json's `head_dim` is set by the config class to `qk_rope_head_dim`
  (**not** the attention head size). qk_head_dim = qk_nope + qk_rope.
* q = `q_proj(x)` (q_lora_rank null) or `q_b_proj(q_a_layernorm(q_a_proj(x)))`;
  per head split [nope (qk_nope) | rope (qk_rope)].
* `kv_a_proj_with_mqa(x)` -> [c_kv (kv_lora_rank) | k_rope (qk_rope)];
  `kv_b_proj(kv_a_layernorm(c_kv))` -> per head [k_nope (qk_nope) | v (v_head_dim)].
  k_rope is one head shared by all heads. Key = [k_nope | rope(k_rope)],
  query = [q_nope | rope(q_rope)].
* RoPE on the rope slices uses **interleaved pairs**: pair i is (x[2i], x[2i+1]),
  angle pos * inv_freq[i]. deepseek_v2 does it with complex multiplication
  (view_as_complex) and keeps the interleaved layout; deepseek_v3
  (`rope_interleave` true) writes the result de-interleaved ([all real parts |
  all imag parts]). Both apply the same permutation to q and k, so q·k and the
  logits are identical either way: a C side may keep pairs interleaved.
* Softmax scale = qk_head_dim^-0.5, times `mscale_yarn^2` when rope_scaling is
  YaRN with `mscale_all_dim` nonzero:
  `mscale_yarn = 0.1 * mscale_all_dim * ln(factor) + 1` (1 if factor <= 1).
* YaRN (transformers `_compute_yarn_parameters`, dim = qk_rope_head_dim,
  base = rope_theta, truncate true):
  `pos_freqs[i] = base^(2i/dim)`, `extra = 1/pos_freqs`, `inter = 1/(factor*pos_freqs)`;
  `corr(r) = dim * ln(orig_max / (r * 2 pi)) / (2 ln base)`;
  `low = max(floor(corr(beta_fast)), 0)`, `high = min(ceil(corr(beta_slow)), dim-1)`
  (if low == high, high += 0.001);
  `ramp[i] = clamp((i - low)/(high - low), 0, 1)` for i in 0..dim/2-1;
  `inv_freq = inter * ramp + extra * (1 - ramp)`.
  cos/sin are multiplied by `attention_factor = get_mscale(factor, mscale) /
  get_mscale(factor, mscale_all_dim)` (get_mscale(s, m) = 0.1 m ln s + 1), which
  is 1.0 when mscale == mscale_all_dim (both shipped DeepSeek configs). So with
  DeepSeek's values the only YaRN effects are inv_freq and the softmax scale.
  `original_max_position_embeddings` comes from rope_scaling; `max_position_embeddings`
  plays no part.

### Routers (E experts, K = num_experts_per_tok), router logits = x · gate.weight^T in fp32
* deepseek_v2 greedy: `p = softmax(logits)` over all E; top-K of p; weight =
  p * routed_scaling_factor. **No renormalisation: transformers' deepseek_v2
  ignores `norm_topk_prob` entirely.**
* deepseek_v2 group_limited_greedy: p = softmax over all E; experts split into
  n_group contiguous groups of E/n_group; group score = max p in the group;
  keep the top `topk_group` groups; p of other groups set to 0; top-K of the
  masked p; weight = p * routed_scaling_factor (no renormalisation).
* deepseek_v3 noaux_tc: `s = sigmoid(logits)`; `c = s + e_score_correction_bias`;
  group score = sum of the top-2 c in each group; keep top `topk_group` groups
  (others -inf); top-K of c chooses the experts; weight = s (without bias) of
  those experts; if norm_topk_prob: weight /= (sum of the K weights + 1e-20);
  then weight *= routed_scaling_factor.
* qwen2_moe / qwen3_moe / olmoe: p = softmax over all E (fp32), top-K;
  if norm_topk_prob: renormalise to sum 1. No scaling factor.
* mixtral: p = softmax over all E, top-K, **always** renormalised.
* MoE output = sum_k weight_k * expert_{id_k}(x) (+ shared experts, below).
* deepseek shared experts: one MLP `mlp.shared_experts` of width
  moe_intermediate_size * n_shared_experts, added unweighted.
* qwen2_moe shared expert: `mlp.shared_expert` (width
  shared_expert_intermediate_size) output multiplied by
  **sigmoid(mlp.shared_expert_gate(x))** (a (1, D) weight, no bias; one scalar
  per token), then added.
* deepseek layers l < first_k_dense_replace are dense `mlp.{gate,up,down}_proj`
  of width intermediate_size; qwen2_moe/qwen3_moe layer l is MoE when l is not
  in mlp_only_layers and (l+1) % decoder_sparse_step == 0 (all layers here).

### Expert weight layouts
* Per-expert (original Hub names, what `save_pretrained()` writes by default):
  `experts.{e}.gate_proj/up_proj/down_proj.weight` (deepseek, qwen) or mixtral's
  `block_sparse_moe.experts.{e}.w1` (gate, (F, D)), `w3` (up, (F, D)), `w2`
  (down, (D, F)), router `block_sparse_moe.gate.weight` (E, D). All Linear
  weights are (out, in), y = x W^T.
* Fused (qwen2_moe_fused, `save_pretrained(save_original_format=False)`; also
  the in-memory v5 layout for every family here):
  `mlp.experts.gate_up_proj` (E, 2F, D): rows 0..F-1 of expert e are **gate**
  (= gate_proj.weight), rows F..2F-1 are **up**; applied as
  `F.linear(x, gate_up_proj[e]).chunk(2)` -> (gate, up).
  `mlp.experts.down_proj` (E, D, F) (= down_proj.weight per expert, (out, in)).
  transformers builds gate_up_proj from the per-expert checkpoint by stacking
  experts (dim 0) and concatenating [gate; up] along dim 1.

### FP8 (deepseek_v3_fp8)
* Quantised: every 2-D `.weight` except `embed_tokens`, `lm_head`, norms and
  the router `mlp.gate.weight` (which stay F32 here); each has a sibling
  `<name>_scale_inv` (e.g. `model.layers.0.self_attn.q_a_proj.weight_scale_inv`)
  F32 of shape (ceil(out/128), ceil(in/128)).
* Dequantisation: `W[r, c] = float(q[r, c]) * scale_inv[r // 128, c // 128]`;
  a partial last block uses the same scale (the (144, 64) expert gate/up have
  2 x 1 blocks, the rows 128..143 form the partial block; down (64, 144) has
  1 x 2).
* q is float8_e4m3fn (safetensors "F8_E4M3": 1 sign, 4 exponent bits bias 7,
  3 mantissa bits, no infinities, 0x7F/0xFF = NaN, max 448, subnormals
  2^-6 * m/8). Quantised here as `q = e4m3(w / s)` with `s = amax(block)/448`.
* `e_score_correction_bias` stays F32. config.json has `quantization_config`
  as DeepSeek-V3 ships it. transformers was not asked to load the FP8 files
  (its FP8 quantizer wants a GPU); the goldens come from the dequantised weights
  loaded into DeepseekV3ForCausalLM in fp32, no activation quantisation.

### Tied embeddings and shards
* tie_word_embeddings true (deepseek_v3_bf16_tied, olmoe, qwen2): no `lm_head.weight`
  on disk; logits = final_norm(h) · embed_tokens.weight^T.
* Sharded (deepseek_v3_bf16_tied, mixtral): `model-00001-of-00002.safetensors`,
  `model-00002-of-00002.safetensors` and `model.safetensors.index.json`
  (`weight_map`: tensor name -> file name). A tensor is never split across shards.
"""


def versions_line():
    return (f"torch `{torch.__version__}`, transformers `{transformers.__version__}`, "
            f"numpy `{np.__version__}`, safetensors `{safetensors.__version__}`")


def table_row(r):
    v, g = r["v"], r["golden"]
    files = st_files(r["dir"])
    dense = "moe_layers" not in g
    layout = ("dense" if dense else "fused 3-D" if v.get("fused") else "per-expert") + \
             (f", {len(files)} shards" if len(files) > 1 else "") + \
             (", fp8 block scales" if v["dtype"] == "fp8" else "")
    moe = "" if dense else ",".join(map(str, g["moe_layers"]))
    E = "-" if dense else g["router_counts_all"].shape[1]
    K = "-" if dense else g["router_ids"].shape[2]
    return (f"| {v['name']} | {v['model_type']} | {v['dtype']} | {layout} | "
            f"{r['cfg']['num_hidden_layers']} ({moe}) | {E} | {K} | {g['logits'].shape[0]} | "
            f"{float(g['loss'][0]):.6f} |")


def variant_section(r):
    v, g, cfg = r["v"], r["golden"], r["cfg"]
    L = [f"## {v['name']}\n", f"Generated with {r['versions']}.\n", f"{v['note']}\n"]
    if "moe_layers" in g:
        L.append(f"Seed {r['seed']}. Smallest routing margins over all positions and MoE layers: "
                 f"top-k boundary {r['gap']:.3g}, group boundary {r['ggap']:.3g} "
                 "(logit units for softmax routers, biased-sigmoid units for noaux_tc).\n")
    else:
        L.append(f"Seed {r['seed']}. No MoE layer: the goldens hold no routing tensors.\n")
    L.append("Config fields that matter:\n")
    L.append("```")
    for k in KEY_FIELDS:
        if k in cfg:
            L.append(f"{k}: {json.dumps(cfg[k], sort_keys=True)}")
    L.append("```\n")
    files = st_files(r["dir"])
    L.append(f"Files: {', '.join(files)}"
             + (", model.safetensors.index.json" if len(files) > 1 else "")
             + ", config.json, data.jsonl, golden.safetensors\n")
    dts = sorted({row[1] for row in r["table"]})
    L.append(f"On-disk dtypes: {', '.join(dts)}. Tensors ({len(r['table'])}; "
             "{l} = layer index, {e} = expert index):\n")
    L.append("```")
    L.extend(compact_names(r["table"]))
    L.append("```\n")
    if len(files) > 1:
        idx = json.load(open(os.path.join(r["dir"], "model.safetensors.index.json")))
        per = {}
        for k, f in idx["weight_map"].items():
            per[f] = per.get(f, 0) + 1
        L.append("Shards: " + ", ".join(f"{f}: {n} tensors" for f, n in sorted(per.items())) + "\n")
    L.append("Goldens:\n")
    L.append("```")
    for k, a in g.items():
        L.append(f"{k:<24} {str(a.dtype):<8} {list(a.shape)}")
    L.append(f"loss = {float(g['loss'][0]):.8f}  n_tokens = {int(g['n_tokens'][0])}  "
             f"loss_per_sample = {[round(float(x), 6) for x in g['loss_per_sample']]}")
    L.append("```\n")
    return "\n".join(L)


def kept_entries(out):
    """The table rows and sections an earlier run wrote, by variant name, so that
    --only rewrites the manifest without dropping the variants it did not rebuild.
    A section without its own "Generated with" line takes the versions of the
    old manifest's header."""
    p = os.path.join(out, "MANIFEST.md")
    if not os.path.exists(p):
        return {}
    text = open(p).read()
    names = {v["name"] for v in VARIANTS}
    m = re.search(r"(?m)^\* (torch `[^\n]*)$", text)
    header_versions = m.group(1) if m else "unrecorded versions"
    rows = {}
    for line in text.splitlines():
        cells = line.split("|")
        if line.startswith("| ") and len(cells) > 2 and cells[1].strip() in names:
            rows[cells[1].strip()] = line
    kept = {}
    for chunk in re.split(r"(?m)^## ", text)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        if name not in names or name not in rows:
            continue
        body = chunk.split("\n", 1)[1].strip("\n")
        m = re.match(r"Generated with (.*)\.\n", body)
        versions = m.group(1) if m else header_versions
        if not m:
            body = f"Generated with {versions}.\n\n" + body
        kept[name] = dict(name=name, row=rows[name], versions=versions,
                          section=f"## {name}\n\n{body}\n")
    return kept


def write_manifest(out, results):
    kept = kept_entries(out)
    built = {r["v"]["name"]: r for r in results}
    entries = []
    for v in VARIANTS:
        r = built.get(v["name"])
        if r:
            entries.append(dict(name=v["name"], row=table_row(r), versions=r["versions"],
                                section=variant_section(r)))
        elif v["name"] in kept and os.path.isdir(os.path.join(out, v["name"])):
            entries.append(kept[v["name"]])
    groups = {}
    for e in entries:
        groups.setdefault(e["versions"], []).append(e["name"])
    L = []
    L.append("# Tiny checkpoints and goldens (MoE and dense)\n")
    L.append("Generated by `tests/gen_models.py` (rerun: `python3 tests/gen_models.py "
             "[--out tests/models] [--only NAME,...]`). Do not edit by hand.\n")
    for ver, names in groups.items():
        L.append(f"* {ver}" + (f": {', '.join(names)}" if len(groups) > 1 else ""))
    L.append(f"* size of the variant directories: "
             f"{sum(dir_bytes(os.path.join(out, e['name'])) for e in entries)} bytes\n")
    L.append("## Variants\n")
    L.append("| variant | family | weights | layout | layers (MoE) | E | K | P | loss |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    L.extend(e["row"] for e in entries)
    tv = sorted({ver.split("transformers `")[1].split("`")[0] for ver in groups if "transformers `" in ver})
    L.append(NOTES.replace("VERSION_T", " / ".join(tv)))
    L.extend(e["section"] for e in entries)
    with open(os.path.join(out, "MANIFEST.md"), "w") as f:
        f.write("\n".join(L) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"))
    ap.add_argument("--only", default="", help="comma-separated variant names; the manifest keeps the others' entries")
    args = ap.parse_args()
    torch.set_num_threads(1)  # reductions in one fixed order: reruns give identical bytes
    torch.use_deterministic_algorithms(True)
    want = [n for n in args.only.split(",") if n]
    variants = [v for v in VARIANTS if not want or v["name"] in want]
    os.makedirs(args.out, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            results.append(build_variant(v, args.out, tmp))
    write_manifest(args.out, results)

    print(f"{'variant':<24} {'dtype':<5} {'files':>5} {'bytes':>9} {'P':>4} {'M':>2} {'K':>2} "
          f"{'loss':>10} {'reload':>7} {'topk gap':>9} {'grp gap':>8}")
    for r in results:
        g = r["golden"]
        M = len(g["moe_layers"]) if "moe_layers" in g else 0
        K = g["router_ids"].shape[2] if "router_ids" in g else 0
        print(f"{r['v']['name']:<24} {r['v']['dtype']:<5} {len(st_files(r['dir'])):>5} "
              f"{dir_bytes(r['dir']):>9} {g['logits'].shape[0]:>4} {M:>2} "
              f"{K:>2} {float(g['loss'][0]):>10.6f} {r['diff']:>7.1g} "
              f"{r['gap']:>9.2e} {r['ggap']:>8.2e}")
    total = dir_bytes(args.out)
    print(f"total {total} bytes under {args.out}")
    assert total <= SIZE_LIMIT, f"tests/models is {total} bytes, over {SIZE_LIMIT}"


if __name__ == "__main__":
    sys.exit(main())
