#!/usr/bin/env python3
"""The baseline for bench/bench_stats.c: ESFT's own router-statistics pipeline.

A faithful re-implementation of what deepseek-ai/ESFT's generate_expert_config.py
does per routing-log line: split on "\\t\\t", int() every id, float() every weight,
then two np.add.at calls per line (gate sums, and token counts as 1/TOP_K each).
Timed on the same bytes the C benchmark reads, from memory, single thread, in
thread CPU time (time.thread_time, as the C side), so other processes on a shared
machine do not count.

Usage: esft_python_baseline.py LOGDIR [REPEATS]
Prints (one "key value" per line, read by bench_stats.c):
  files N / bytes N / assignments N / checksum N   (checked against the C side)
  parse_mb_s X        parse + accumulate, MB/s (1 MB = 1e6 bytes), median of REPEATS
  pipeline_massign_s X  the same run counted in M assignments/s
  accum_massign_s X   the np.add.at calls alone, M assignments/s, median of REPEATS
"""
import os
import sys
import time

import numpy as np

TOP_K = 6
N_EXPERTS = 64


def parse_line(line):
    # ESFT: ids and weights are separated by two tabs; each list by one tab.
    ids_text, weights_text = line.split("\t\t")
    ids = [int(x) for x in ids_text.split("\t")]
    weights = [float(x) for x in weights_text.split("\t")]
    return ids, weights


def accumulate(gate, token, layer, ids, weights):
    np.add.at(gate[layer], ids, weights)
    np.add.at(token[layer], ids, np.ones_like(weights) / TOP_K)


def load(logdir):
    texts = []
    layer = 1
    while True:
        path = os.path.join(logdir, "expert_weights_%d.txt" % layer)
        if not os.path.exists(path):
            break
        with open(path, "rb") as f:
            texts.append((layer, f.read()))
        layer += 1
    return texts


def run_pipeline(texts, n_layers):
    gate = np.zeros((n_layers + 1, N_EXPERTS))
    token = np.zeros((n_layers + 1, N_EXPERTS))
    for layer, raw in texts:
        # ESFT reads with open(...).readlines(): decode, then one line per sample.
        for line in raw.decode("utf-8").splitlines():
            ids, weights = parse_line(line)
            accumulate(gate, token, layer, ids, weights)
    return gate, token


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: esft_python_baseline.py LOGDIR [REPEATS]")
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    texts = load(sys.argv[1])
    if not texts:
        sys.exit("no expert_weights_<L>.txt in " + sys.argv[1])
    n_layers = len(texts)
    n_bytes = sum(len(raw) for _, raw in texts)

    # Validation data (untimed): exact integer counts, to compare with the C side.
    parsed = []
    counts = np.zeros((n_layers + 1, N_EXPERTS), dtype=np.int64)
    for layer, raw in texts:
        for line in raw.decode("utf-8").splitlines():
            ids, weights = parse_line(line)
            if len(ids) != len(weights):
                sys.exit("ids and weights differ in length")
            parsed.append((layer, ids, weights))
            counts[layer] += np.bincount(np.asarray(ids), minlength=N_EXPERTS)
    n_assign = int(counts.sum())
    weights_of = np.arange(counts.size, dtype=np.int64).reshape(counts.shape) + 1
    checksum = int((counts * weights_of).sum())

    _, token = run_pipeline(texts, n_layers)
    if not np.allclose(token * TOP_K, counts):
        sys.exit("pipeline token counts disagree with bincount")

    parse_times, accum_times = [], []
    for _ in range(repeats):
        t0 = time.thread_time()
        run_pipeline(texts, n_layers)
        parse_times.append(time.thread_time() - t0)

        gate = np.zeros((n_layers + 1, N_EXPERTS))
        token = np.zeros((n_layers + 1, N_EXPERTS))
        t0 = time.thread_time()
        for layer, ids, weights in parsed:
            accumulate(gate, token, layer, ids, weights)
        accum_times.append(time.thread_time() - t0)

    print("files %d" % len(texts))
    print("bytes %d" % n_bytes)
    print("assignments %d" % n_assign)
    print("checksum %d" % checksum)
    print("parse_mb_s %.3f" % (n_bytes / median(parse_times) / 1e6))
    print("pipeline_massign_s %.3f" % (n_assign / median(parse_times) / 1e6))
    print("accum_massign_s %.3f" % (n_assign / median(accum_times) / 1e6))


if __name__ == "__main__":
    main()
