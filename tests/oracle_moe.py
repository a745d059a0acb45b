#!/usr/bin/env python3
"""oracle_moe.py - an independent numpy oracle for esft's MoE layer.

Builds tests/oracle_moe_driver.c with $CC, runs it on several small layers
(seeded xorshift32 weights, written with the results to a file), and recomputes
forward and backward here in float64, densely: every expert on every token,
combined through a (T, E) matrix of routing weights, the routing-weight and
softmax Jacobians as explicit matrices. The C layer instead permutes tokens by
expert and uses closed forms, so the two share no code and little structure.
Prints PASS/FAIL per case and the closing "N passed, N failed, N skipped".
"""
import os
import shlex
import subprocess
import sys

try:
    import numpy as np
except ImportError:
    print("SKIP oracle_moe: numpy not installed (pip install numpy)")
    print("0 passed, 0 failed, 1 skipped")
    sys.exit(0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("BUILD", os.path.join(ROOT, "build"))
CC = os.environ.get("CC", "cc")

# name, D, E, K, F, FS, T, renorm, alpha, aux_mode (1 = per sequence), seq_len, seed,
# train_router, train_shared, trainable experts
CASES = [
    ("plain_3_of_8_trainable", 16, 8, 3, 12, 10, 12, 0, 0.0, 0, 0, 11, 1, 1, "00100101"),
    ("renorm_aux_batch", 16, 8, 3, 12, 10, 12, 1, 0.1, 0, 0, 22, 1, 1, "11111111"),
    ("aux_per_sequence_experts_only", 16, 8, 3, 12, 10, 12, 0, 0.05, 1, 4, 33, 0, 0, "10000001"),
    ("renorm_aux_seq3_no_shared", 12, 6, 2, 8, 0, 9, 1, 0.3, 1, 3, 44, 1, 0, "111111"),
    ("top1_of_4_frozen_all", 8, 4, 1, 6, 6, 5, 0, 0.0, 0, 0, 55, 0, 0, "0000"),
]


def silu(h):
    return h / (1.0 + np.exp(-h))


def dsilu(h):
    s = 1.0 / (1.0 + np.exp(-h))
    return s * (1.0 + h * (1.0 - s))


def reference(c, x, dy, Wr, Wg, Wu, Wd, Sg, Su, Sd):
    """Forward and backward in float64. Returns y, aux, ids, dx, and a dict of grads."""
    T, D = x.shape
    E, K, renorm, alpha, mode, S = c["E"], c["K"], c["renorm"], c["alpha"], c["mode"], c["S"]
    logits = x @ Wr.T
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :K]  # ties -> lower id
    Jw = np.zeros((T, K, E))  # d w_j / d p_e per token
    w = np.zeros((T, K))
    for t in range(T):
        sel = p[t, ids[t]]
        s = sel.sum() if renorm else 1.0
        w[t] = sel / s
        for j in range(K):
            Jw[t, j, ids[t, j]] += 1.0 / s
            if renorm:
                Jw[t, j, ids[t]] -= sel[j] / s**2
    C = np.zeros((T, E))
    for t in range(T):
        C[t, ids[t]] = w[t]
    y = np.zeros((T, D))
    outs = []
    for e in range(E):
        H, U = x @ Wg[e].T, x @ Wu[e].T
        O = (silu(H) * U) @ Wd[e].T
        outs.append((H, U, O))
        y += C[:, e:e + 1] * O
    FS = Sg.shape[0]
    if FS:
        Hs, Us = x @ Sg.T, x @ Su.T
        y += (silu(Hs) * Us) @ Sd.T
    # aux loss over sequences (batch mode: one sequence of T tokens)
    if mode == 0:
        S = T
    n_seq = T // S
    aux, dp_aux = 0.0, np.zeros((T, E))
    if alpha > 0:
        for q in range(n_seq):
            rows = slice(q * S, (q + 1) * S)
            f = np.bincount(ids[rows].ravel(), minlength=E) / (S * K)
            P = p[rows].mean(axis=0)
            aux += alpha * E * (f * P).sum() / n_seq
            dp_aux[rows] = alpha * E * f / (S * n_seq)
    # backward
    g = {}
    dx = np.zeros((T, D))
    dC = np.zeros((T, E))
    g["gate"], g["up"], g["down"] = np.zeros_like(Wg), np.zeros_like(Wu), np.zeros_like(Wd)
    for e in range(E):
        H, U, O = outs[e]
        dC[:, e] = (dy * O).sum(axis=1)
        dO = C[:, e:e + 1] * dy
        dA = dO @ Wd[e]
        g["down"][e] = dO.T @ (silu(H) * U)
        dH, dU = dA * U * dsilu(H), dA * silu(H)
        g["gate"][e], g["up"][e] = dH.T @ x, dU.T @ x
        dx += dH @ Wg[e] + dU @ Wu[e]
    if FS:
        dA = dy @ Sd
        g["shared_down"] = dy.T @ (silu(Hs) * Us)
        dH, dU = dA * Us * dsilu(Hs), dA * silu(Hs)
        g["shared_gate"], g["shared_up"] = dH.T @ x, dU.T @ x
        dx += dH @ Sg + dU @ Su
    dlogits = np.zeros((T, E))
    for t in range(T):
        dw = dC[t, ids[t]]
        dp = Jw[t].T @ dw + dp_aux[t]
        Js = np.diag(p[t]) - np.outer(p[t], p[t])  # softmax Jacobian (symmetric)
        dlogits[t] = Js @ dp
    g["router"] = dlogits.T @ x
    dx += dlogits @ Wr
    return y, aux, ids, dx, g


def run_case(case, tmp):
    (name, D, E, K, F, FS, T, renorm, alpha, mode, S, seed, tr, ts, mask) = case
    exe = os.path.join(tmp, "oracle_moe_driver")
    out = os.path.join(tmp, name + ".bin")
    args = [exe] + [str(v) for v in (D, E, K, F, FS, T, renorm, alpha, mode, S, seed, tr, ts, mask, out)]
    subprocess.run(args, check=True)
    raw = open(out, "rb").read()
    off = [0]

    def take(n, dtype=np.float32):
        a = np.frombuffer(raw, dtype=dtype, count=n, offset=off[0])
        off[0] += 4 * n
        return a.astype(np.float64) if dtype == np.float32 else a

    x, dy = take(T * D).reshape(T, D), take(T * D).reshape(T, D)
    Wr = take(E * D).reshape(E, D)
    Wg, Wu = take(E * F * D).reshape(E, F, D), take(E * F * D).reshape(E, F, D)
    Wd = take(E * D * F).reshape(E, D, F)
    Sg, Su, Sd = take(FS * D).reshape(FS, D), take(FS * D).reshape(FS, D), take(D * FS).reshape(D, FS)
    y_c, aux_c = take(T * D).reshape(T, D), take(1)[0]
    ids_c = take(T * K, np.int32).reshape(T, K)
    dx_c = take(T * D).reshape(T, D)
    n = int(take(1, np.int32)[0])
    grads_c = take(n)
    assert off[0] == len(raw), "driver file has %d bytes, expected %d" % (len(raw), off[0])

    c = dict(E=E, K=K, renorm=renorm, alpha=alpha, mode=mode, S=S)
    y, aux, ids, dx, g = reference(c, x, dy, Wr, Wg, Wu, Wd, Sg, Su, Sd)
    # the trainable block in the layer's documented order
    parts = []
    for e in range(E):
        if mask[e] == "1":
            parts += [g["gate"][e].ravel(), g["up"][e].ravel(), g["down"][e].ravel()]
    if tr:
        parts.append(g["router"].ravel())
    if ts and FS:
        parts += [g["shared_gate"].ravel(), g["shared_up"].ravel(), g["shared_down"].ravel()]
    grads = np.concatenate(parts) if parts else np.zeros(0)

    problems = []
    if not np.array_equal(ids, ids_c):
        problems.append("routing ids differ")
    if grads.size != n:
        problems.append("trainable block has %d floats, expected %d" % (n, grads.size))
    # fp32 against float64: a few ulps per accumulated term; 1e-5 relative to the
    # largest magnitude of each quantity plus 1e-4 of the element itself.
    worst = 0.0
    for label, a, b in (("y", y_c, y), ("aux", np.array([aux_c]), np.array([aux])), ("dx", dx_c, dx),
                        ("grads", grads_c, grads)):
        if a.shape != b.shape or b.size == 0:
            continue
        scale = max(np.abs(b).max(), 1e-3)
        err = np.abs(a - b)
        bad = err > 1e-5 * scale + 1e-4 * np.abs(b)
        worst = max(worst, (err / scale).max())
        if bad.any():
            i = int(np.argmax(err - 1e-4 * np.abs(b)))
            problems.append("%s: %d of %d off, e.g. [%d] C %.8g numpy %.8g" %
                            (label, int(bad.sum()), b.size, i, a.ravel()[i], b.ravel()[i]))
    if np.abs(grads).max(initial=0.0) == 0.0 and n > 0:
        problems.append("all reference gradients are zero: nothing was compared")
    return problems, worst, n


def main():
    tmp = os.path.join(BUILD, "oracle")
    os.makedirs(tmp, exist_ok=True)
    exe = os.path.join(tmp, "oracle_moe_driver")
    src = os.path.join(ROOT, "tests", "oracle_moe_driver.c")
    cmd = shlex.split(CC) + ["-O2", "-std=c99", "-I" + ROOT, src, "-o", exe, "-lm"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        why = r.stderr if r.returncode != 0 else None
    except OSError as e:
        why = str(e)
    if why is not None:
        print("FAIL build_driver: " + " ".join(cmd))
        print("     " + why.replace("\n", "\n     "))
        print("0 passed, 1 failed, 0 skipped")
        return 1
    passed = failed = 0
    for case in CASES:
        try:
            problems, worst, n = run_case(case, tmp)
        except (subprocess.CalledProcessError, AssertionError, ValueError) as e:
            problems, worst, n = [str(e)], float("nan"), 0
        if problems:
            failed += 1
            print("FAIL %s" % case[0])
            for p in problems:
                print("     " + p)
        else:
            passed += 1
            print("PASS %s (trainable floats %d, worst error %.2e of scale)" % (case[0], n, worst))
    print("%d passed, %d failed, 0 skipped" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
