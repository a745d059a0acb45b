#!/usr/bin/env python3
"""oracle_per_sample.py - an independent numpy oracle for `esft stats`.

Parses ESFT routing logs itself (no C code) and computes, per (layer, expert):
  pooled     token = count_e / (K * N)            gate = sum of e's weights / N
  per-sample token = mean_s count_s,e / (K * N_s) gate = mean_s sum_s,e / N_s
(ESFT paper Eq. 6-7 for per-sample: the mean over samples of the per-sample
value). Then runs `$BUILD/esft stats LOGDIR -o out.json --norm ... --decimals -1`
and compares every value with tolerance 1e-9 (the library keeps weight sums in
fixed point with resolution 2^-32 ~ 2.3e-10 per weight).

Weights are fp32 in the library's API, so the oracle converts each parsed
weight to float32 as well; everything else is float64.

Cases: the real translation logs ($ESFT_DATA/translation, skipped when unset)
and generated logs with very uneven sample lengths, absent layers, CRLF
endings and weights in every notation Python's float() accepts.
Prints PASS/FAIL/SKIP lines and "N passed, N failed, N skipped"; exits 1 on any
failure. SKIPs everything (exit 0) when numpy is missing.
"""
import json
import os
import random
import subprocess
import sys
import tempfile

TOL = 1e-9
BUILD = os.environ.get("BUILD", "build")
ESFT = os.path.join(BUILD, "esft")

passed = failed = skipped = 0


def report(status, name, why=""):
    global passed, failed, skipped
    if status == "PASS":
        passed += 1
    elif status == "FAIL":
        failed += 1
    else:
        skipped += 1
    print(f"{status} {name}" + (f": {why}" if why else ""))
    sys.stdout.flush()


def finish():
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    sys.exit(1 if failed else 0)


try:
    import numpy as np
except ImportError:
    for name in ("translation_per_sample", "translation_pooled", "synthetic_per_sample",
                 "synthetic_pooled", "per_sample_differs_from_pooled", "rounded_text_matches_python"):
        report("SKIP", name, "numpy is missing (pip install numpy)")
    finish()


def parse_log(path, k):
    """One sample per line: ids (token-major), '\\t\\t', weights. Returns a list
    of (ids int64 (T, k), weights float64-of-float32 (T, k))."""
    samples = []
    with open(path, "rb") as f:
        raw = f.read().decode("ascii")
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for line in lines:
        if line.endswith("\r"):
            line = line[:-1]
        left, right = line.split("\t\t")
        ids = np.array([int(x) for x in left.split("\t")], dtype=np.int64)
        w = np.array([float(x) for x in right.split("\t")], dtype=np.float64)
        w = w.astype(np.float32).astype(np.float64)
        assert ids.size == w.size and ids.size % k == 0, path
        samples.append((ids.reshape(-1, k), w.reshape(-1, k)))
    return samples


def oracle_scores(logdir, layers, experts, k):
    """{norm: {"token_scores": {layer: {e: v}}, "gate_scores": ...}} for both norms."""
    out = {n: {"token_scores": {}, "gate_scores": {}} for n in ("pooled", "per-sample")}
    for layer in range(layers):
        path = os.path.join(logdir, f"expert_weights_{layer}.txt")
        if not os.path.exists(path):
            continue
        samples = parse_log(path, k)
        count = np.zeros(experts)
        wsum = np.zeros(experts)
        n_tokens = 0
        tok_frac = np.zeros(experts)
        gate_frac = np.zeros(experts)
        for ids, w in samples:
            c = np.bincount(ids.ravel(), minlength=experts).astype(np.float64)
            g = np.bincount(ids.ravel(), weights=w.ravel(), minlength=experts)
            n = ids.shape[0]
            count += c
            wsum += g
            n_tokens += n
            tok_frac += c / (k * n)
            gate_frac += g / n
        s = len(samples)
        res = {"pooled": (count / (k * n_tokens), wsum / n_tokens),
               "per-sample": (tok_frac / s, gate_frac / s)}
        for norm, (tok, gate) in res.items():
            out[norm]["token_scores"][str(layer)] = {str(e): float(tok[e]) for e in range(experts)}
            out[norm]["gate_scores"][str(layer)] = {str(e): float(gate[e]) for e in range(experts)}
    return out


def run_esft(logdir, norm, layers, experts, k, out_path):
    cmd = [ESFT, "stats", logdir, "-o", out_path, "--norm", norm, "--decimals", "-1",
           "--layers", str(layers), "--experts", str(experts), "--top-k", str(k), "-q"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        return None, f"exit {r.returncode}: {r.stderr.strip()[:300]}"
    with open(out_path) as f:
        return json.load(f), ""


def compare(name, got, want):
    """Every value of both tables; the same layers and experts."""
    worst, where, n = 0.0, "", 0
    for table in ("token_scores", "gate_scores"):
        if set(got.get(table, {})) != set(want[table]):
            return report("FAIL", name, f"{table}: layers {sorted(got.get(table, {}))} vs {sorted(want[table])}")
        for layer, row in want[table].items():
            if set(got[table][layer]) != set(row):
                return report("FAIL", name, f"{table} layer {layer}: experts differ")
            for e, v in row.items():
                d = abs(got[table][layer][e] - v)
                n += 1
                if d > worst:
                    worst, where = d, f"{table}[{layer}][{e}] esft {got[table][layer][e]!r} oracle {v!r}"
    if worst > TOL:
        return report("FAIL", name, f"worst |diff| {worst:.3g} > {TOL:g} at {where}")
    report("PASS", name, f"{n} values, worst |diff| {worst:.2g}")


def check_dir(label, logdir, layers, experts, k, tmp):
    want = oracle_scores(logdir, layers, experts, k)
    got = {}
    for norm in ("per-sample", "pooled"):
        name = f"{label}_{norm.replace('-', '_')}"
        got[norm], why = run_esft(logdir, norm, layers, experts, k, os.path.join(tmp, f"{label}_{norm}.json"))
        if got[norm] is None:
            report("FAIL", name, why)
        else:
            compare(name, got[norm], want[norm])
    return want


def check_rounded_text(logdir, layers, experts, k, tmp):
    """--decimals D writes exactly what Python's json.dump writes for round(v, D)
    of the full-precision values (ESFT's own files are round(v, 4) dumped)."""
    full, why = run_esft_raw(logdir, "-1", layers, experts, k, os.path.join(tmp, "full.json"))
    if full is None:
        return report("FAIL", "rounded_text_matches_python", why)
    full = json.loads(full)
    bad = []
    for d in (0, 2, 4, 6, 8):
        text, why = run_esft_raw(logdir, str(d), layers, experts, k, os.path.join(tmp, f"r{d}.json"))
        want = json.dumps({t: {l: {e: round(v, d) for e, v in row.items()} for l, row in full[t].items()}
                           for t in full})
        if text != want:
            at = next((i for i, (a, b) in enumerate(zip(text or "", want)) if a != b), min(len(text or ""), len(want)))
            bad.append(f"decimals {d}: differs at byte {at}: {(text or why)[at:at + 30]!r} vs {want[at:at + 30]!r}")
    report("FAIL" if bad else "PASS", "rounded_text_matches_python", "; ".join(bad) or "decimals 0, 2, 4, 6, 8")


def run_esft_raw(logdir, decimals, layers, experts, k, out_path):
    cmd = [ESFT, "stats", logdir, "-o", out_path, "--decimals", decimals,
           "--layers", str(layers), "--experts", str(experts), "--top-k", str(k), "-q"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        return None, f"exit {r.returncode}: {r.stderr.strip()[:300]}"
    with open(out_path) as f:
        return f.read(), ""


def write_synthetic(logdir, layers, experts, k, seed):
    """Logs with very uneven samples (1 to 900 tokens), so per-sample and
    pooled differ a lot; layer 2 absent; weights in many notations."""
    rng = random.Random(seed)
    os.makedirs(logdir, exist_ok=True)
    notations = [lambda w: f"{w:.4f}", repr, lambda w: f"{w:.6e}", lambda w: f"{w:.2f}",
                 lambda w: "0" if w < 0.05 else f"{w:.3f}"]
    for layer in range(layers):
        if layer == 2:
            continue
        eol = "\r\n" if layer == 3 else "\n"
        lines = []
        for s in range(rng.randint(1, 12)):
            t = rng.choice([1, 2, 3, rng.randint(1, 900)])
            ids, ws = [], []
            for _ in range(t):
                # skewed routing: low ids more often in long samples
                chosen = rng.sample(range(experts), k) if t < 50 else \
                    sorted(set(int(rng.expovariate(0.3)) % experts for _ in range(4 * k)))[:k]
                while len(chosen) < k:
                    e = rng.randrange(experts)
                    if e not in chosen:
                        chosen.append(e)
                ids += chosen
                ws += [rng.choice(notations)(rng.random()) for _ in range(k)]
            lines.append("\t".join(map(str, ids)) + "\t\t" + "\t".join(ws))
        if layer == layers - 1:
            # a rarely chosen expert: scores below 1e-4, which Python writes with an exponent
            lines = []
            for s in range(3):
                ids, ws = [], []
                for t in range(900):
                    chosen = rng.sample(range(experts - 1), k)
                    if s == 1 and t == 7:
                        chosen[0] = experts - 1
                    ids += chosen
                    ws += ["0.0001" if e == experts - 1 else f"{rng.random():.4f}" for e in chosen]
                lines.append("\t".join(map(str, ids)) + "\t\t" + "\t".join(ws))
        with open(os.path.join(logdir, f"expert_weights_{layer}.txt"), "w", newline="") as f:
            f.write(eol.join(lines) + (eol if layer != 4 else ""))


def main():
    if not os.access(ESFT, os.X_OK):
        report("FAIL", "esft_binary", f"{ESFT} not built (run make)")
        finish()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.environ.get("ESFT_DATA")
        if data and os.path.isdir(os.path.join(data, "translation")):
            check_dir("translation", os.path.join(data, "translation"), 27, 64, 6, tmp)
        else:
            report("SKIP", "translation_per_sample", "ESFT_DATA is unset")
            report("SKIP", "translation_pooled", "ESFT_DATA is unset")

        logdir = os.path.join(tmp, "synthetic")
        write_synthetic(logdir, 6, 16, 4, seed=11)
        want = check_dir("synthetic", logdir, 6, 16, 4, tmp)
        # the two norms must really differ on uneven samples (the flag does something)
        diff = max(abs(want["pooled"]["token_scores"][l][e] - want["per-sample"]["token_scores"][l][e])
                   for l in want["pooled"]["token_scores"] for e in want["pooled"]["token_scores"][l])
        report("PASS" if diff > 1e-3 else "FAIL", "per_sample_differs_from_pooled", f"max difference {diff:.3g}")
        check_rounded_text(logdir, 6, 16, 4, tmp)
    finish()


if __name__ == "__main__":
    main()
