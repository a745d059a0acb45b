#!/usr/bin/env python3
"""oracle_pesc.py - an independent numpy (float64) oracle of the PESC adapter MoE
layer: forward (y, aux loss) and backward (dF, du, dW_r, dW_down, dW_up), with and
without dropout, plus the seeded upcycling init reproduced bit for bit.

It runs `$BUILD/tests/test_pesc --dump DIR`, which writes the seeded inputs, the
parameter block and esft.h's outputs, recomputes everything here from the inputs
with its own code (no esft.h logic: per-token loops as the paper writes them,
erf-GELU from math.erf, splitmix64 in numpy uint64) and compares.
Last line: "N passed, N failed, N skipped"; exit status 1 on any failure."""
import math
import os
import subprocess
import sys
import tempfile

passed = failed = skipped = 0


def result(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"PASS {name}")
    else:
        failed += 1
        print(f"FAIL {name}\n     {detail}")


def finish():
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    sys.exit(1 if failed else 0)


try:
    import numpy as np
except ImportError:
    print("SKIP oracle_pesc: numpy is not installed (pip install numpy)")
    skipped += 1
    finish()

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix(x):
    """splitmix64 on a uint64 array (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seed, first, n, bound):
    """The documented init stream: value i is from splitmix64(seed + i)."""
    with np.errstate(over="ignore"):
        idx = np.uint64(seed) + np.arange(first, first + n, dtype=np.uint64)
    r = (mix(idx) >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    return (np.float32(2.0) * r - np.float32(1.0)) * np.float32(bound)


def keep_mask(seed, e, t, D, p):
    """1 where column d of token t's input to expert e survives dropout p."""
    if p == 0.0:
        return np.ones(D)
    key = mix(np.uint64(seed) ^ np.uint64((e << 32) | t))
    with np.errstate(over="ignore"):
        h = mix(key + np.arange(D, dtype=np.uint64)) >> np.uint64(32)
    return (h.astype(np.float64) >= p * 4294967296.0).astype(np.float64)


erf = np.vectorize(math.erf)


def gelu(h):
    return 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))


def gelu_grad(h):
    return 0.5 * (1.0 + erf(h / math.sqrt(2.0))) + h * np.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)


def layer(meta, F, u, P, dy):
    """Forward and backward, token by token, in float64."""
    T, D, E, K, R = (meta[k] for k in ("T", "D", "E", "K", "R"))
    s, alpha, p, seed, daux = meta["scale"], meta["alpha"], meta["dropout"], meta["dseed"], meta["daux"]
    Wr = P[: E * D].reshape(E, D)
    base = E * D
    Wd = [P[base + e * 2 * R * D: base + e * 2 * R * D + R * D].reshape(R, D) for e in range(E)]
    Wu = [P[base + e * 2 * R * D + R * D: base + (e + 1) * 2 * R * D].reshape(D, R) for e in range(E)]
    y = F.copy()
    dF = dy.copy()  # the residual path
    du = np.zeros_like(u)
    dWr = np.zeros_like(Wr)
    dWd = [np.zeros_like(w) for w in Wd]
    dWu = [np.zeros_like(w) for w in Wu]
    probs = np.zeros((T, E))
    frac = np.zeros(E)
    dl = np.zeros((T, E))
    for t in range(T):
        logits = Wr @ u[t]
        pt = np.exp(logits - logits.max())
        probs[t] = pt / pt.sum()
        chosen = np.argsort(-logits, kind="stable")[:K]
        w = np.exp(logits[chosen] - logits[chosen].max())
        w /= w.sum()
        dw = np.zeros(K)
        for j, e in enumerate(chosen):
            frac[e] += 1.0 / (T * K)
            mask = keep_mask(seed, int(e), t, D, p) / (1.0 - p)
            x = F[t] * mask
            h = Wd[e] @ x
            g = gelu(h)
            a = s * (Wu[e] @ g)
            y[t] += w[j] * a
            dA = w[j] * dy[t]
            dw[j] = dy[t] @ a
            dWu[e] += s * np.outer(dA, g)
            dh = s * (Wu[e].T @ dA) * gelu_grad(h)
            dWd[e] += np.outer(dh, x)
            dF[t] += (Wd[e].T @ dh) * mask
        dl[t, chosen] += w * (dw - w @ dw)
    aux = alpha * E * float(frac @ probs.mean(axis=0))
    c = daux * alpha * E * frac / T
    for t in range(T):
        dl[t] += probs[t] * (c - probs[t] @ c)
        dWr += np.outer(dl[t], u[t])
        du[t] += Wr.T @ dl[t]
    dP = np.concatenate([dWr.ravel()] + [np.concatenate([dWd[e].ravel(), dWu[e].ravel()]) for e in range(E)])
    return y, aux, dF, du, dP


def close(name, got, want, atol, rtol):
    err = np.abs(got - want)
    tol = atol + rtol * np.abs(want)
    bad = err > tol
    i = int(np.argmax(err - tol))
    result(name, not bad.any(),
           f"{int(bad.sum())} of {bad.size} off; worst [{i}] esft {got.flat[i]:.9g} oracle {want.flat[i]:.9g}")


def main():
    build = os.environ.get("BUILD", "build")
    exe = os.path.join(build, "tests", "test_pesc")
    if not os.access(exe, os.X_OK):
        result("dump", False, f"{exe} not built (run make)")
        finish()
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([exe, "--dump", d], capture_output=True, text=True)
        if r.returncode != 0:
            result("dump", False, f"{exe} --dump failed: {r.stdout}{r.stderr}")
            finish()
        metas = []
        for line in open(os.path.join(d, "meta.txt")):
            f = line.split()
            m = {"case": f[0]}
            for k, v in zip(f[1::2], f[2::2]):
                m[k] = float(v) if "." in v or "e" in v else int(v)
            metas.append(m)

        def load(case, name):
            return np.fromfile(os.path.join(d, f"{case}_k.{name}.f32" if name in ("F", "u", "dy", "params", "y")
                                            else f"{case}_{name}.f32"), dtype=np.float32)

        for m in metas:
            cs = m["case"]
            for k in ("T", "D", "E", "K", "R", "dseed", "init_seed"):
                m[k] = int(m[k])
            T, D, E, R = m["T"], m["D"], m["E"], m["R"]
            # the upcycling init, bit for bit
            init = load(cs, "init")
            bound = 1.0 / math.sqrt(D)
            want = [uniform(m["init_seed"], 0, E * D, bound)]
            drawn = E * D
            for e in range(E):
                want.append(uniform(m["init_seed"], drawn, R * D, bound))
                want.append(np.zeros(D * R, dtype=np.float32))
                drawn += R * D
            want = np.concatenate(want)
            result(f"{cs}_init_bits", init.shape == want.shape and np.array_equal(init.view(np.uint32),
                                                                                  want.view(np.uint32)),
                   "the seeded init differs from splitmix64 uniform(+-1/sqrt(D)), W_up = 0")
            F = load(cs, "F").astype(np.float64).reshape(T, D)
            u = load(cs, "u").astype(np.float64).reshape(T, D)
            dy = load(cs, "dy").astype(np.float64).reshape(T, D)
            P = load(cs, "params").astype(np.float64)
            y, aux, dF, du, dP = layer(m, F, u, P, dy)
            tag = f"{cs}(dropout {m['dropout']:g})"
            close(f"{tag}_y", load(cs, "y").reshape(T, D), y, 1e-5, 1e-4)
            close(f"{tag}_aux", np.array([m["aux"]]), np.array([aux]), 1e-7, 1e-5)
            close(f"{tag}_dF", load(cs, "dF").reshape(T, D), dF, 1e-5, 1e-4)
            close(f"{tag}_du", load(cs, "du").reshape(T, D), du, 1e-5, 1e-4)
            got = load(cs, "dp")
            close(f"{tag}_dW_router", got[: E * D], dP[: E * D], 1e-5, 1e-4)
            close(f"{tag}_dW_experts", got[E * D:], dP[E * D:], 1e-5, 1e-4)
    finish()


main()
