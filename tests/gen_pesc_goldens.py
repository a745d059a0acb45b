#!/usr/bin/env python3
"""PESC training goldens for tests/test_train.c (TEST torch_pesc_llama), computed
by transformers + torch with an adapter MoE written here from the Camelidae
paper (arXiv 2401.02731), independent of esft.h.

The model: tests/models/llama (LlamaForCausalLM, fp32 on its bf16 values, eager
attention, eval mode, one thread), frozen. After every decoder layer's MLP a
forward hook replaces the MLP output F by

    logits = u W_r^T              u = the MLP's input (post_attention_layernorm output)
    ids    = top-K(logits), w = softmax(logits[ids])
    y      = F + sum_j w_j * s * W_up,id_j GELU(W_down,id_j F)      (erf GELU)
    aux    = alpha * E * sum_i f_i P_i   f_i: share of the T K slots routed to i,
                                          P_i: mean over the T tokens of softmax(logits)_i

Each sample of data.jsonl runs alone (batch 1); the objective of the batch is
    ( sum_s CE_sum_s + n_s * aux_s ) / N,   aux_s = sum over layers,
    n_s = scored tokens of sample s, N = sum_s n_s,
the scaling esft_model_forward_backward documents (daux = grad_scale * n_scored).

It writes into tests/models/llama:
  pesc_init.safetensors    the starting routers and adapters (F32) under
                           Camelidae's names: router and W_down uniform
                           +-1/sqrt(D), W_up uniform +-0.1 (not the upcycling
                           0: every gradient is then non-zero from step 0)
  pesc_golden.safetensors  config (5) float64: E, K, R, scale, alpha
                           loss (1) float64: pooled mean CE at the start
                           aux (1) float64: sum_s n_s aux_s / N at the start
                           n_scored (1) int64: N
                           grad (n) float32: d objective / d block, the PESC
                             blocks of layers 0..L-1 in esft_model_trainable's
                             layout (router (E, D), then per expert W_down (R, D),
                             W_up (D, R))
                           adamw_losses (6) float64: the pooled mean CE before
                             each of 5 AdamW steps on the objective and after
                             the last (torch.optim.AdamW lr 1e-3, betas
                             0.9/0.95, eps 1e-8, wd 0.1, whole batch per step)

Rerun with:  python3 tests/gen_pesc_goldens.py
"""

import os
import sys

import numpy as np
import torch
from safetensors.numpy import save_file as np_save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_models import load_model  # noqa: E402
from gen_train_goldens import read_samples  # noqa: E402

MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
NAME = "llama"
E, K, R, SCALE, ALPHA = 4, 2, 4, 1.0, 0.05
STEPS = 5
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


class AdapterMoE:
    """One layer's router and adapters, applied by a forward hook on its MLP."""

    def __init__(self, D, g):
        b = 1.0 / np.sqrt(D)
        u = lambda shape, bound: torch.tensor(g.uniform(-bound, bound, size=shape).astype(np.float32))
        self.router = u((E, D), b).requires_grad_(True)
        self.down = [u((R, D), b).requires_grad_(True) for _ in range(E)]
        self.up = [u((D, R), 0.1).requires_grad_(True) for _ in range(E)]
        self.aux = None

    def params(self):
        out = [self.router]
        for e in range(E):
            out += [self.down[e], self.up[e]]
        return out

    def hook(self, mod, args, F):
        u = args[0][0]  # (T, D), batch 1
        F0 = F[0]
        T = u.shape[0]
        logits = u @ self.router.T
        probs = torch.softmax(logits, dim=-1)
        vals, ids = torch.topk(logits, K, dim=-1)
        w = torch.softmax(vals, dim=-1)
        y = F0.clone()
        for t in range(T):
            for j in range(K):
                e = int(ids[t, j])
                h = torch.nn.functional.gelu(F0[t] @ self.down[e].T)  # erf form
                y[t] = y[t] + w[t, j] * SCALE * (h @ self.up[e].T)
        f = torch.bincount(ids.reshape(-1), minlength=E).to(torch.float32) / (T * K)
        self.aux = ALPHA * E * torch.sum(f * probs.mean(dim=0))
        return y.unsqueeze(0)


def objective(model, adapters, samples):
    ce_total, aux_total, n_total = 0.0, 0.0, 0
    for ids, labels in samples:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        tgt = torch.tensor(labels[1:])
        n = int((tgt != -100).sum())
        ce = torch.nn.functional.cross_entropy(logits[:-1], tgt, ignore_index=-100, reduction="sum")
        aux = sum(a.aux for a in adapters)
        ce_total = ce_total + ce
        aux_total = aux_total + n * aux
        n_total += n
    return ce_total / n_total, aux_total / n_total, n_total


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    d = os.path.join(MODELS, NAME)
    model = load_model(d)
    for p in model.parameters():
        p.requires_grad_(False)
    D = model.config.hidden_size
    g = np.random.default_rng(2401)
    adapters = []
    for layer in model.model.layers:
        a = AdapterMoE(D, g)
        layer.mlp.register_forward_hook(a.hook)
        adapters.append(a)
    init = {}
    for l, a in enumerate(adapters):
        init[f"model.layers.{l}.mlp.moe_adapter.router.weight"] = a.router.detach().numpy().copy()
        for e in range(E):
            p = f"model.layers.{l}.mlp.moe_adapter.experts.expert_{e}"
            init[p + ".adapter_down.weight"] = a.down[e].detach().numpy().copy()
            init[p + ".adapter_up.weight"] = a.up[e].detach().numpy().copy()
    samples = read_samples(d)
    params = [p for a in adapters for p in a.params()]

    ce, aux, n = objective(model, adapters, samples)
    (ce + aux).backward()
    grad = np.concatenate([p.grad.reshape(-1).numpy() for p in params]).astype(np.float32)
    first = (float(ce.detach()), float(aux.detach()))

    opt = torch.optim.AdamW(params, **ADAMW)
    losses = []
    for step in range(STEPS + 1):
        opt.zero_grad()
        ce, aux, _ = objective(model, adapters, samples)
        losses.append(float(ce.detach()))
        if step == STEPS:
            break
        (ce + aux).backward()
        opt.step()
    assert losses[0] == first[0]
    np_save_file(init, os.path.join(d, "pesc_init.safetensors"), metadata={"format": "pt"})
    out = {
        "config": np.array([E, K, R, SCALE, ALPHA], dtype=np.float64),
        "loss": np.array([first[0]], dtype=np.float64),
        "aux": np.array([first[1]], dtype=np.float64),
        "n_scored": np.array([n], dtype=np.int64),
        "grad": grad,
        "adamw_losses": np.array(losses, dtype=np.float64),
    }
    path = os.path.join(d, "pesc_golden.safetensors")
    np_save_file(out, path, metadata={"format": "np", "torch": torch.__version__})
    print(f"{NAME}: loss {first[0]:.6f} aux {first[1]:.6f} -> {losses[-1]:.6f}  "
          f"{os.path.getsize(path) + os.path.getsize(os.path.join(d, 'pesc_init.safetensors'))} bytes")


if __name__ == "__main__":
    sys.exit(main())
