"""benchmarks.serve runs end to end at tiny scale on CPU, and its numbers agree with the workload it defines."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_serving_benchmark_smoke(tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--smoke", f"--out={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    workload = results["workload"]
    for engine in ("continuous", "static"):  # greedy, no stop tokens: every request runs to its max_tokens
        assert workload[engine]["requests"] == 6, workload[engine]
        assert workload[engine]["output_tokens"] == workload["max_output_tokens"]
    assert workload["continuous"]["prefilled_tokens"] == workload["prompt_tokens"]
    prefix = results["prefix"]
    assert prefix["cold_cached_tokens"] == 0 and prefix["warm_cached_tokens"] == prefix["prefix_tokens"] == 64
    assert prefix["warm_prefilled_tokens"] == prefix["suffix_tokens"]
    # 4 rows x 256 tokens x one softmax layer's K and V (2 heads x 16 dims, bf16)
    decode = results["decode"]
    assert decode["step_ms"] > 0 and decode["kv_bytes"] == 4 * 256 * (2 * 2 * 16 * 2)
    for name in ("", "pipelined_", "engine_sync_"):  # the synchronous step and the engine's steady states
        assert decode[f"{name}ratio_to_floor"] == decode[f"{name}step_ms"] / decode["floor_ms_measured_bw"] > 0
    assert "throughput continuous/static" in proc.stdout and "decode step 4 x 256" in proc.stdout
    assert "engine steady state per step: pipelined" in proc.stdout


def test_serving_profile_smoke(tmp_path):
    """--parts=profile at tiny scale on CPU: the decode step's wall time splits into the program and host work, the
    paged kernel runs at the old (33 pages) and the decode (64 pages) table width, and the warm request's parts add
    up to its TTFT with the whole prefix served from the cache."""
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--smoke", "--parts=profile", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = json.loads(out.read_text())["profile"]
    decode = profile["decode"]
    assert decode["program_ms"] > 0 and decode["table_width"] == 64
    assert abs(decode["step_wall_ms"] - decode["program_ms"] - decode["host_ms"]) < 1e-9
    # measured, not derived: the program is timed on its own, so it must fit inside the step's wall time
    assert 0 < decode["program_ms"] <= decode["step_wall_ms"] and decode["host_ms"] >= 0
    assert sorted(decode["paged_attention"]) == ["width_33", "width_64"]
    pipelined = decode["pipelined"]  # the engine's own overlapped steps at the same shape
    assert pipelined["ratio_to_floor"] == pipelined["step_ms"] / decode["floor_ms"] > 0 and "trace" in pipelined
    warm = profile["warm_prefix"]
    assert warm["warm_cached_tokens"] == 64
    assert {"prefix lookup", "snapshot restore", "prefill program", "first-token sampling"} <= set(warm["parts_ms"])
    assert abs(sum(warm["parts_ms"].values()) + warm["other_host_ms"] - warm["warm_ttft_ms"]) < 1e-6
    # each part is timed on its own: all positive, and together no longer than the TTFT they are parts of
    assert all(ms > 0 for ms in warm["parts_ms"].values()) and warm["other_host_ms"] >= 0
    assert "profile: decode step 4 x 256" in proc.stdout and "profile: warm request" in proc.stdout
    assert "profile: pipelined engine steady state" in proc.stdout
