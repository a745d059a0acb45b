#!/usr/bin/env python3
"""oracle_safetensors.py - esft's safetensors reader and writer against the
reference implementation (the `safetensors` Python package, Rust inside).

Both ways, bit for bit:
  * files the reference writes (F32, F16 - all 65536 bit patterns -, BF16 - all
    65536 -, I32, I64, U8, F64, scalars, empty tensors, UTF-8 names, metadata)
    are read by esft with identical bytes, and F16/BF16 widen to the exact fp32;
  * files esft writes load in the reference with identical values; esft's
    fp32 -> F16 rounding equals numpy's, fp32 -> BF16 equals a round-to-nearest-
    even oracle computed here from exact distances;
  * a reference file copied through esft's reader and writer loads unchanged;
  * malformed variants are rejected by both, valid ones accepted by both;
  * the `esft` command on a sharded checkpoint the reference writes: inspect,
    extract, change the experts here, merge; the reference then loads a
    checkpoint where exactly those experts changed (exit codes 0/1/2 too).

The C side is tests/safetensors_tool.c, built here with $CC. Prints PASS/FAIL per
check and the closing "N passed, N failed, N skipped" line."""
import glob
import json
import os
import struct
import subprocess
import sys
import tempfile
import traceback

BUILD = os.environ.get("BUILD", "build")
CC = os.environ.get("CC", "cc")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
counts = {"passed": 0, "failed": 0, "skipped": 0}


def finish():
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    sys.exit(1 if counts["failed"] else 0)


try:
    import numpy as np
    import safetensors
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
except ImportError as e:  # CI installs them; say so instead of failing obscurely
    print(f"SKIP oracle_safetensors: {e} (pip install numpy safetensors)")
    counts["skipped"] += 1
    finish()


def run_test(fn):
    try:
        fn()
        print(f"PASS {fn.__name__}")
        counts["passed"] += 1
    except Exception as e:  # a failed check or a crash of the tool
        print(f"FAIL {fn.__name__}: {e}")
        for line in traceback.format_exc().splitlines()[-4:]:
            print("     " + line)
        counts["failed"] += 1


def build_tool(out_dir):
    exe = os.path.join(out_dir, "safetensors_tool")
    src = os.path.join(ROOT, "tests", "safetensors_tool.c")
    cmd = [CC, "-std=c99", "-O1", "-Wall", "-Wextra", "-Werror", "-I", ROOT, src, "-o", exe, "-lm"]
    subprocess.run(cmd, check=True)
    return exe


def tool(*args, check=True):
    r = subprocess.run([TOOL, *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"safetensors_tool {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def dump(path):
    """{name: (dtype, shape, raw bytes, fp32 bits or ints or None)}, {key: value}."""
    tensors, meta = {}, {}
    for line in tool("dump", path).stdout.splitlines():
        f = line.split(" ")
        if f[0] == "M":
            meta[bytes.fromhex(f[1]).decode()] = bytes.fromhex(f[2]).decode()
            continue
        name = bytes.fromhex(f[1]).decode()
        shape = () if f[3] == "-" else tuple(int(x) for x in f[3].split(","))
        raw = b"" if f[4] == "-" else bytes.fromhex(f[4])
        conv = None
        if f[5] != "-" and f[2] in ("F32", "F16", "BF16"):
            conv = np.frombuffer(bytes.fromhex(f[5]), dtype=">u4").astype(np.uint32)
        elif f[5] != "-":
            conv = [int(x) for x in f[5].split(",")]
        tensors[name] = (f[2], shape, raw, conv)
    return tensors, meta


NP_NAMES = {np.float32: "F32", np.float16: "F16", np.int32: "I32", np.int64: "I64",
            np.uint8: "U8", np.float64: "F64"}
SPEC_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "I64": "int64"}


def reference_serialize(tensors, metadata):
    """Reference bytes for {name: (dtype, shape, raw bytes)} (any dtype, BF16 too)."""
    keep = []
    if hasattr(safetensors, "TensorSpec"):
        specs = {}
        for name, (dt, shape, raw) in tensors.items():
            buf = np.frombuffer(raw, dtype=np.uint8).copy() if raw else np.zeros(1, np.uint8)
            keep.append(buf)
            specs[name] = safetensors.TensorSpec(dtype=SPEC_DTYPES[dt], shape=list(shape),
                                                 data_ptr=buf.ctypes.data, data_len=len(raw))
        return bytes(safetensors.serialize(specs, metadata))
    return bytes(safetensors.serialize(
        {n: {"dtype": SPEC_DTYPES[dt], "shape": list(s), "data": raw} for n, (dt, s, raw) in tensors.items()},
        metadata))


def special_f32():
    bits = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F7FFFFF,
            0x00000001, 0x807FFFFF, 0x3F800000, 0x3F808000, 0x477FF000, 0x33000000]
    rng = np.random.default_rng(7)
    rand = rng.integers(0, 2**32, size=500, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([np.array(bits, dtype=np.uint32), rand]).view(np.float32)


def test_reads_reference_files_bit_exactly():
    all_f16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    arrays = {
        "model.layers.1.mlp.experts.3.gate_proj.weight": special_f32().reshape(1, -1),
        "f16.all_bit_patterns": all_f16.reshape(256, 256),
        "i32": np.array([0, -1, 2**31 - 1, -2**31, 7], dtype=np.int32),
        "i64": np.array([[0, -1], [2**63 - 1, -2**63]], dtype=np.int64),
        "u8": np.arange(10, dtype=np.uint8),
        "f64": np.array([1.5, -2.25], dtype=np.float64),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float16),
        "caf\u00e9 \u2713": np.ones(3, dtype=np.float32),
    }
    meta = {"format": "pt", "note": "caf\u00e9 \"quoted\" \\ back", "esft_expert_config": "{\"experts\": {}}"}
    path = os.path.join(TMP, "ref.safetensors")
    save_file(arrays, path, metadata=meta)
    got, got_meta = dump(path)
    assert got_meta == meta, f"metadata {got_meta} != {meta}"
    assert set(got) == set(arrays), f"names {sorted(got)}"
    for name, a in arrays.items():
        dt, shape, raw, conv = got[name]
        assert dt == NP_NAMES[a.dtype.type], f"{name}: dtype {dt}"
        assert shape == a.shape, f"{name}: shape {shape} != {a.shape}"
        assert raw == a.astype(a.dtype.newbyteorder("<")).tobytes(), f"{name}: bytes differ"
        if dt in ("F32", "F16"):
            want = a.astype(np.float32).reshape(-1).view(np.uint32)
            bad = np.nonzero(conv != want)[0]
            assert bad.size == 0, f"{name}: fp32 of element {bad[:5]} {conv[bad[:5]]} != {want[bad[:5]]}"
        if dt in ("I32", "I64"):
            assert conv == [int(x) for x in a.reshape(-1)], f"{name}: ints {conv}"


def test_reads_reference_bf16_all_bit_patterns():
    u16 = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    data = reference_serialize({"b": ("BF16", (65536,), u16.astype("<u2").tobytes())}, {"format": "pt"})
    path = os.path.join(TMP, "bf16.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    got, _ = dump(path)
    dt, shape, raw, conv = got["b"]
    assert dt == "BF16" and shape == (65536,)
    assert raw == u16.astype("<u2").tobytes()
    want = u16.astype(np.uint32) << 16
    bad = np.nonzero(conv != want)[0]
    assert bad.size == 0, f"bf16 {bad[:5]} widened to {conv[bad[:5]]}"


def rne_bf16_oracle(x):
    """fp32 -> bf16 bits by exact distance to the two neighbours, ties to even."""
    u = int(np.array(x, dtype=np.float32).view(np.uint32))
    sign, a = u & 0x80000000, u & 0x7FFFFFFF
    if a > 0x7F800000:
        return None  # NaN: checked separately
    lo = a & 0xFFFF0000
    def val(b):
        return 2.0 ** 128 if b >= 0x7F800000 else float(np.array(b, dtype=np.uint32).view(np.float32))
    if lo == a or a >= 0x7F800000:
        r = lo
    else:
        d_lo, d_hi = val(a) - val(lo), val(lo + 0x10000) - val(a)
        r = lo if d_lo < d_hi or (d_lo == d_hi and not (lo >> 16) & 1) else lo + 0x10000
    return (sign | r) >> 16


def test_reference_loads_files_we_write():
    path = os.path.join(TMP, "ours.safetensors")
    tool("write", path)
    src = np.fromfile(path + ".f32", dtype="<f4")
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        keys = set(f.keys())
        f32 = f.get_tensor("values.f32")
        f16 = f.get_tensor("values.f16")
        i32 = f.get_tensor("ints.i32")
        i64 = f.get_tensor("ints.i64")
        scalar = f.get_tensor("scalar")
    assert meta == {"format": "pt", "note": "written by esft \"quoted\" \\ and \u00e9",
                    "esft_expert_config": "{\"experts\": {\"1\": [3]}}"}, meta
    assert keys == {"values.f32", "values.f16", "values.bf16", "ints.i32", "ints.i64", "scalar", "empty \u2713"}, keys
    assert f32.shape == (64, 64) and np.array_equal(f32.reshape(-1).view(np.uint32), src.view(np.uint32))
    with np.errstate(over="ignore"):
        want16 = src.astype(np.float16).view(np.uint16)  # numpy rounds to nearest even
    bad = np.nonzero(f16.view(np.uint16) != want16)[0]
    assert bad.size == 0, f"F16 of {src[bad[:3]]}: {f16.view(np.uint16)[bad[:3]]} != numpy {want16[bad[:3]]}"
    assert i32.tolist() == [0, 1, -1, 2**31 - 1, -2**31, 42, -42]
    assert i64.tolist() == [[0, -1], [9007199254740993, -2**63]]
    assert scalar.shape == () and scalar.view(np.uint32) == src[7:8].view(np.uint32)[0]
    raw = {name: info for name, info in safetensors.deserialize(open(path, "rb").read())}
    bf = np.frombuffer(bytes(raw["values.bf16"]["data"]), dtype="<u2")
    assert raw["values.bf16"]["shape"] == [16, 16, 16] and raw["values.bf16"]["dtype"] in ("BF16", "bfloat16")
    assert raw["empty \u2713"]["shape"] == [0, 5] and len(raw["empty \u2713"]["data"]) == 0
    for i, x in enumerate(src):
        want = rne_bf16_oracle(x)
        if want is None:  # NaN stays NaN with its sign
            assert (bf[i] & 0x7F80) == 0x7F80 and (bf[i] & 0x7F) and (bf[i] >> 15) == (src[i:i+1].view(np.uint32)[0] >> 31)
        else:
            assert bf[i] == want, f"bf16 of {x!r} (bits {src[i:i+1].view(np.uint32)[0]:08x}): {bf[i]:04x} != {want:04x}"


def test_copy_through_esft_loads_unchanged():
    src = os.path.join(TMP, "ref.safetensors")
    if not os.path.exists(src):
        test_reads_reference_files_bit_exactly()
    out = os.path.join(TMP, "copy.safetensors")
    tool("copy", src, out)
    a, b = load_file(src), load_file(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k
    with safe_open(src, framework="numpy") as f1, safe_open(out, framework="numpy") as f2:
        assert f1.metadata() == f2.metadata()
    assert not glob.glob(glob.escape(out) + ".tmp*"), "temp file left behind"


def file_bytes(header, data, pad=True):
    h = header.encode()
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def test_bad_files_rejected_by_both_valid_accepted_by_both():
    t = '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]}'
    good = file_bytes("{" + t + "}", bytes(12))
    cases = {
        "valid": (good, True),
        "valid_empty_header": (file_bytes("{}", b""), True),
        "valid_metadata_and_zero_size": (file_bytes('{"__metadata__":{"k":"v"},"z":{"dtype":"BF16","shape":[0,3],"data_offsets":[0,0]}}', b""), True),
        "truncated_data": (good[:-1], False),
        "truncated_length": (good[:5], False),
        "header_length_beyond_file": (struct.pack("<Q", 10**6) + good[8:], False),
        "overlapping_offsets": (file_bytes('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[2],"data_offsets":[4,8]}}', bytes(8)), False),
        "gap_between_tensors": (file_bytes('{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"F16","shape":[2],"data_offsets":[6,10]}}', bytes(10)), False),
        "unknown_dtype": (file_bytes('{"a":{"dtype":"F99","shape":[2],"data_offsets":[0,8]}}', bytes(8)), False),
        "shape_times_dtype_not_span": (file_bytes('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', bytes(8)), False),
        "trailing_bytes": (good + bytes(8), False),
        "not_json": (file_bytes("{not json}", b""), False),
        "negative_offset": (file_bytes('{"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}', bytes(8)), False),
        "metadata_not_string": (file_bytes('{"__metadata__":{"k":1}}', b""), False),
    }
    disagree = []
    for name, (data, valid) in cases.items():
        path = os.path.join(TMP, f"case_{name}.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        try:
            safetensors.deserialize(data)
            ref_ok = True
        except Exception:
            ref_ok = False
        ours_ok = tool("check", path, check=False).returncode == 0
        if ref_ok != valid or ours_ok != valid:
            disagree.append(f"{name}: expected {'valid' if valid else 'invalid'}, reference {ref_ok}, esft {ours_ok}")
    assert not disagree, "; ".join(disagree)


def test_cli_extract_merge_on_reference_checkpoint():
    esft = os.path.join(BUILD, "esft")
    if not os.path.exists(esft):
        raise AssertionError(f"{esft} not built (make all)")
    base, rng = os.path.join(TMP, "cli_base"), np.random.default_rng(3)
    os.makedirs(base)
    shards = [{}, {}]
    for l in range(1, 4):
        shard = shards[0 if l < 3 else 1]
        shard[f"model.layers.{l}.mlp.gate.weight"] = rng.standard_normal((4, 8)).astype(np.float32)
        shard[f"model.layers.{l}.self_attn.q_proj.weight"] = rng.standard_normal((8, 8)).astype(np.float16)
        for e in range(4):
            for p, shape in (("gate_proj", (6, 8)), ("up_proj", (6, 8)), ("down_proj", (8, 6))):
                shard[f"model.layers.{l}.mlp.experts.{e}.{p}.weight"] = rng.standard_normal(shape).astype(np.float16)
    shards[0]["model.embed_tokens.weight"] = rng.standard_normal((16, 8)).astype(np.float32)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for f, d in zip(files, shards):
        save_file(d, os.path.join(base, f), metadata={"format": "pt"})
        weight_map.update({k: f for k in d})
    with open(os.path.join(base, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, fh)
    cfg = os.path.join(TMP, "cli_cfg.json")
    with open(cfg, "w") as fh:
        fh.write('{"experts": {"1": [2], "3": [0, 3]}, "shared_experts": false, "non_expert_modules": false}')

    def esft_run(*args):
        return subprocess.run([esft, *args], capture_output=True, text=True)
    r = esft_run("inspect", base, "--summary")
    assert r.returncode == 0 and "layer 1 experts: 0-3 (4)" in r.stdout, r.stdout + r.stderr
    ex, tr, out = (os.path.join(TMP, n) for n in ("cli_ex.safetensors", "cli_tr.safetensors", "cli_out"))
    r = esft_run("extract", base, "--config", cfg, "-o", ex, "-q")
    assert r.returncode == 0, r.stderr
    experts = load_file(ex)
    want = {f"model.layers.{l}.mlp.experts.{e}.{p}.weight" for l, e in ((1, 2), (3, 0), (3, 3))
            for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(experts) == want, sorted(experts)
    with safe_open(ex, framework="numpy") as f:
        assert json.loads(f.metadata()["esft_expert_config"])["experts"] == {"1": [2], "3": [0, 3]}
    trained = {k: (v + np.float16(0.5)).astype(np.float16) for k, v in experts.items()}
    save_file(trained, tr, metadata={"format": "pt"})
    r = esft_run("merge", base, tr, "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    with open(os.path.join(out, "model.safetensors.index.json")) as fh:
        assert json.load(fh)["weight_map"] == weight_map
    for f, d in zip(files, shards):
        got = load_file(os.path.join(out, f))
        assert set(got) == set(d)
        for k, v in d.items():
            expect = trained.get(k, v)
            assert got[k].dtype == v.dtype and got[k].tobytes() == expect.tobytes(), k
    assert esft_run("merge", base, tr).returncode == 2
    bad = os.path.join(TMP, "cli_bad.safetensors")
    with open(bad, "wb") as fh:
        fh.write(file_bytes('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', bytes(8)))
    r = esft_run("inspect", bad)
    assert r.returncode == 1 and "data_offsets span 8" in r.stderr, r.stderr
    wrong = os.path.join(TMP, "cli_wrong.safetensors")
    save_file({"model.layers.1.mlp.experts.2.up_proj.weight": np.zeros((6, 8), np.float32)}, wrong)
    r = esft_run("merge", base, wrong, "-o", os.path.join(TMP, "cli_wrong_out"))
    assert r.returncode == 1 and "trained F32 [6, 8], base F16 [6, 8]" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(TMP, "cli_wrong_out", files[0]))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="esft_oracle_st_") as TMP:
        try:
            TOOL = build_tool(TMP)
        except Exception as e:
            print(f"FAIL build_safetensors_tool: {e}")
            counts["failed"] += 1
            finish()
        for fn in (test_reads_reference_files_bit_exactly, test_reads_reference_bf16_all_bit_patterns,
                   test_reference_loads_files_we_write, test_copy_through_esft_loads_unchanged,
                   test_bad_files_rejected_by_both_valid_accepted_by_both,
                   test_cli_extract_merge_on_reference_checkpoint):
            run_test(fn)
    finish()
