"""bench/report.py on synthetic results, and the largest-batch search on a simulated GPU (CPU only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import report  # noqa: E402

GPU = "NVIDIA H100 80GB HBM3"
MACHINE = {"ptv2": {"device": "cuda", "gpu": GPU, "torch": "2.13.0", "cuda": "12.8", "triton": "3.9.0",
                    "transformers": "5.24.0", "peft": "0.21.2", "git_sha": "abc123", "quick": True}}


def _op(provider, N, P, pad, median_us, grid="ptv2", mode="fwd+bwd", peak=None, tflops=None):
    B, Hq, Hkv, D, causal = (32, 16, 16, 64, False) if grid == "ptv2" else (4, 32, 8, 128, True)
    return {"subject": "prefix_attention", "grid": grid, "provider": provider, "mode": mode, "B": B, "Hq": Hq,
            "Hkv": Hkv, "N": N, "P": P, "D": D, "causal": causal, "padding": pad, "dtype": "bfloat16",
            "median_us": median_us, "p20_us": median_us * 0.98, "p80_us": median_us * 1.02, "tflops": tflops,
            "peak_mem_bytes": peak, "gpu": GPU}


def _step(model, method, B, sps, peak, subject="train_step", max_batch=None):
    r = {"subject": subject, "model": model, "method": method, "B": B, "N": 512, "P": 128,
         "samples_per_s": sps, "peak_mem_bytes": peak, "gpu": GPU, "autocast": "bf16", "trainable_params": 10}
    if max_batch is not None:
        r["max_batch"] = max_batch
    return r


def _bench(extra):
    return {"name": f"test[{extra['subject']}]", "group": "g", "stats": {"median": extra.get("median_us", 1.0) * 1e-6},
            "extra_info": extra}


def synthetic():
    infos = []
    for N in (128, 256, 512):
        for P in (16, 128):
            for pad in (0.0, 0.3):
                ours = 100.0 * N / 128
                infos.append(_op("ptv2-triton", N, P, pad, ours, peak=2**20, tflops=200.0))
                infos.append(_op("peft-route", N, P, pad, ours * 2.5, peak=3 * 2**20))
                # preconcat is faster than us on one shape only: the target is missed by 0.1
                infos.append(_op("sdpa-preconcat", N, P, pad, ours * (0.9 if (N, P, pad) == (512, 128, 0.3) else 1.2)))
    for N in (1024, 4096):
        infos.append(_op("ptv2-triton", N, 16, 0.0, 1000.0, grid="decoder", mode="fwd", tflops=400.0 if N == 4096 else 300.0))
    for method, sps, peak in (("ptv2", 300.0, 10 * 2**30), ("peft", 150.0, 20 * 2**30),
                              ("reference", 100.0, 30 * 2**30), ("finetune", 120.0, 25 * 2**30),
                              ("ptv2-top-half", 520.0, 8 * 2**30)):
        for B in (8, 32):
            infos.append(_step("bert-large", method, B, sps * (1 if B == 32 else 0.8), peak * B / 32))
    infos.append(_step("bert-large", "ptv2", 200, 320.0, 70 * 2**30, "max_batch", 200))
    infos.append(_step("bert-large", "peft", 100, 150.0, 70 * 2**30, "max_batch", 100))
    return {"machine_info": MACHINE, "benchmarks": [_bench(e) for e in infos]}


def test_report_on_synthetic_results(tmp_path):
    res = tmp_path / "results" / "nvidia-h100" / "run"
    res.mkdir(parents=True)
    (res / "op.json").write_text(json.dumps(synthetic()))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Bench\n\nintro\n\n{report.BEGIN}\nold results\n{report.END}\n\nfooter\n")
    assert report.main([str(res), "--readme", str(readme)]) == 0

    text = (res / "report.md").read_text()
    assert "prefix_attention fwd+bwd, ptv2 grid, bfloat16" in text
    assert "| 512 | 128 | 30% |" in text
    assert "Training step" in text and "Largest batch" in text
    assert "| bert-large | 32 | ptv2-top-half | 520.0 | 8.0 | 3.5 |" in text  # the frozen-trunk row beside the others
    pngs = sorted(p.name for p in res.glob("*.png"))
    assert any(p.startswith("speedup_ptv2_bfloat16") for p in pngs), pngs
    assert any(p.startswith("memory_bert-large") for p in pngs), pngs

    status = {k: (s, v, gap) for k, _, s, v, gap, _ in report.evaluate_targets(report.load([res]))}
    assert status["op_vs_peft"][0] == "met" and status["op_vs_peft"][1] == pytest.approx(2.5)
    assert status["op_vs_preconcat"][0] == "missed"
    assert status["op_vs_preconcat"][2] == pytest.approx(0.1)
    assert status["decoder_tflops"][0] == "met"  # only N >= 4k counts
    assert status["step_memory"][0] == "met" and status["step_memory"][1] == pytest.approx(0.5)
    assert status["max_batch"][0] == "met" and status["max_batch"][1] == pytest.approx(2.0)
    assert status["step_vs_peft"][0] == "met"
    assert status["step_vs_finetune"][0] == "met" and status["step_vs_finetune"][1] == pytest.approx(2.5)

    new = readme.read_text()
    assert new.startswith("# Bench\n\nintro\n\n") and new.rstrip().endswith("footer")
    assert "old results" not in new and "MISSED" in new and "MET" in new
    assert "(results/nvidia-h100/run/speedup_ptv2_bfloat16" in new  # image links relative to the README


def test_report_lists_every_benchmarked_method():
    import train_methods as M

    assert report.METHODS == M.METHODS


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-llama"])
def test_top_half_step_replays_the_trunk_it_would_run(backbone):
    """The step benchmark's frozen-trunk method computes the live model's loss from its replayed trunk
    output, and trains the prefix and head only."""
    import torch
    import train_methods as M

    torch.manual_seed(0)
    cfg = M.backbone_config(backbone)
    m = M.setup_method("ptv2-top-half", M.build_backbone(cfg, "cpu"), prefix_len=5)
    m.model.eval()  # no dropout: the two losses are one function
    batch = M.make_batch(cfg, 3, 11, "cpu", padding=0.3)
    replayed, live = m.loss(batch), m.model(**batch).loss
    assert m.trunk_output and torch.allclose(replayed, live, rtol=1e-5, atol=1e-6)
    trains = {n.split(".")[0] for n, p in m.model.named_parameters() if p.requires_grad}
    assert "backbone" not in trains and len(m.params) == sum(p.requires_grad for p in m.model.parameters())


def test_report_without_results_fails_cleanly(tmp_path):
    (tmp_path / "empty.json").write_text(json.dumps({"benchmarks": []}))
    assert report.main([str(tmp_path)]) == 1


def test_cpu_results_never_meet_targets(tmp_path):
    data = synthetic()
    for b in data["benchmarks"]:
        b["extra_info"]["gpu"] = "cpu"
    (tmp_path / "cpu.json").write_text(json.dumps(data))
    assert all(s == "no data" for _, _, s, _, _, _ in report.evaluate_targets(report.load([tmp_path])))


class _FakeTrainer:
    """A 'GPU' where a step at batch B needs B units of memory out of ``capacity``."""

    def __init__(self, capacity):
        import torch

        self.capacity, self.calls, self.torch = capacity, [], torch
        self.opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    def batch(self, B):
        return B

    def step_fn(self, B):
        def step():
            self.calls.append(B)
            if B > self.capacity:
                raise self.torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {B} units")
        return step


@pytest.mark.parametrize("capacity", [1, 5, 8, 100, 1000, 3000])
def test_largest_batch_search(capacity, monkeypatch):
    bts = pytest.importorskip("bench_train_step")
    monkeypatch.setattr(bts.benchlib, "free_memory", lambda: None)
    t = _FakeTrainer(capacity)
    best, probes, capped = bts.largest_batch(t, start=8, cap=4096, budget_s=60)
    assert capped is None
    assert best <= capacity and capacity - best <= max(1, best // 32)
    assert all(ok == (b <= capacity) for b, ok in probes)
    assert len(probes) <= 25


def test_largest_batch_cap():
    bts = pytest.importorskip("bench_train_step")
    best, probes, capped = bts.largest_batch(_FakeTrainer(10**6), start=8, cap=64, budget_s=60)
    assert best == 64 and "cap" in capped


def test_flop_formula_and_padding_pattern():
    bpa = pytest.importorskip("bench_prefix_attention")
    B, H, N, P, D = 32, 16, 512, 128, 64
    fwd = bpa.attention_flops(B, H, N, P, D, causal=False)
    assert fwd == 4 * B * H * N * (N + P) * D
    assert bpa.attention_flops(B, H, N, P, D, causal=True) == 4 * B * H * N * (N / 2 + P) * D
    assert bpa.attention_flops(B, H, N, P, D, False, "bwd") == 2.5 * fwd
    assert bpa.attention_flops(B, H, N, P, D, False, "fwd+bwd") == 3.5 * fwd
    lens = bpa.lengths_for(32, 512, 0.3)
    assert lens[0] == 512 and min(lens) == round(0.4 * 512)
    assert abs(1 - sum(lens) / (32 * 512) - 0.3) < 0.01
    assert bpa.lengths_for(4, 128, 0.0) == [128] * 4


def test_timing_plan_and_percentiles(monkeypatch):
    import benchlib

    monkeypatch.setenv("PTV2_BENCH_DEVICE", "cuda")  # the GPU plan (a CPU smoke run caps rounds at 3)
    assert benchlib.percentile([1, 2, 3, 4, 5], 50) == 3
    assert benchlib.percentile([1, 2, 3, 4, 5], 20) == pytest.approx(1.8)
    rounds, iters = benchlib.plan(10e-6, budget_s=0.25, max_rounds=30, min_rounds=5)
    assert iters * 10e-6 >= 1e-3 and rounds == 30  # short calls: >= 1 ms rounds, capped
    rounds, iters = benchlib.plan(0.2, budget_s=0.25, max_rounds=30, min_rounds=5)
    assert iters == 1 and rounds == 5  # long calls: one per round, at least min_rounds
    assert benchlib.safe_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_cuda_event_clock_and_gpu_timing_path(monkeypatch):
    """The GPU branch of run_benchmark with CUDA events simulated by a clock that advances 1 ms per
    call of the timed function: rounds are measured on the 'GPU timeline'."""
    import torch

    import benchlib

    now = {"t": 0.0}

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = now["t"]

        def synchronize(self):
            pass

        def elapsed_time(self, other):  # milliseconds, as torch.cuda.Event does
            return (other.t - self.t) * 1e3

    monkeypatch.setenv("PTV2_BENCH_DEVICE", "cuda")
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(benchlib, "HAS_GPU", True)

    def fn():
        now["t"] += 1e-3

    class FakeBenchmark:  # pytest-benchmark's pedantic: timer() around `iterations` calls per round
        def __init__(self):
            self.extra_info, self.stats = {}, None

        def pedantic(self, target, rounds, iterations, warmup_rounds=0):
            timer, data = self._timer, []
            for _ in range(rounds):
                t0 = timer()
                for _ in range(iterations):
                    target()
                data.append((timer() - t0) / iterations)
            self.stats = type("M", (), {"stats": type("S", (), {"data": data})()})()

    b = FakeBenchmark()
    res = benchlib.run_benchmark(b, fn, warmup=1, budget_s=0.02)
    assert res["timer"] == "cuda-events"
    assert res["median_us"] == pytest.approx(1000.0) and res["p20_us"] == pytest.approx(1000.0)
    assert b.extra_info["median_us"] == res["median_us"]


# --------------------------------------------------------------------------------------------------
# CPU results

CPU_MACHINE = {"ptv2": {"device": "cpu", "gpu": None, "cpu": "AMD EPYC 7763 64-Core Processor", "threads": 1,
                        "torch": "2.13.0", "cuda": None, "triton": "3.9.0", "transformers": "5.24.0",
                        "peft": "0.21.2", "git_sha": "abc123", "quick": False, "smoke": False}}


def _cpu_op(provider, grid, D, N, P, pad, median_us, mode="fwd+bwd"):
    B, H = (1, 1) if grid == "host" else (32, 12)
    return {"subject": "prefix_attention", "grid": grid, "provider": provider, "mode": mode, "B": B, "Hq": H,
            "Hkv": H, "N": N, "P": P, "D": D, "causal": False, "padding": pad, "dtype": "float32",
            "median_us": median_us, "p20_us": median_us * 0.97, "p80_us": median_us * 1.04,
            "peak_mem_bytes": int(median_us * 100), "device": "cpu"}


def _cpu_step(method, N, median_us, peak_rss):
    return {"subject": "train_step", "model": "minilm", "method": method, "B": 32, "N": N, "P": 16,
            "median_us": median_us, "p20_us": median_us * 0.98, "p80_us": median_us * 1.02,
            "samples_per_s": 32 / (median_us * 1e-6), "peak_rss_bytes": peak_rss,
            "peak_rss_growth_bytes": peak_rss - 500 * 2**20, "trainable_params": 74498, "device": "cpu"}


def cpu_synthetic(smoke=False):
    """A CPU run where ptv2 is 0.9x the PEFT route everywhere and 1.0x pre-concat SDPA, except at one
    point (1.2x); the host shape is 3x SDPA's; the step is 0.8x the route's time and 0.9x its RSS."""
    infos = []
    for grid, D in (("minilm", 32), ("bert-base", 64)):
        for N in (64, 128, 256):
            for P, pad in ((16, 0.0), (64, 0.3)):
                ours = 1000.0 * N / 64 * D / 32
                slow = (grid, N, P) == ("bert-base", 256, 64)
                for mode in ("fwd+bwd", "fwd"):
                    infos.append(_cpu_op("ptv2-flash", grid, D, N, P, pad, ours * (1.2 if slow else 1.0), mode))
                    infos.append(_cpu_op("ptv2-torch", grid, D, N, P, pad, ours * 2, mode))
                    infos.append(_cpu_op("peft-route", grid, D, N, P, pad, ours / 0.9 * (1.2 if slow else 1.0), mode))
                    infos.append(_cpu_op("sdpa-preconcat", grid, D, N, P, pad, ours, mode))
    infos.append(_cpu_op("ptv2-flash", "host", 8, 8, 2, 0.0, 150.0))
    infos.append(_cpu_op("sdpa-preconcat", "host", 8, 8, 2, 0.0, 50.0))
    for N in (64, 128):
        for method, t, rss in (("ptv2", 0.8, 0.9), ("peft-route", 1.0, 1.0), ("finetune", 1.5, 1.6)):
            infos.append(_cpu_step(method, N, 1e6 * N / 64 * t, int(1000 * 2**20 * rss)))
    machine = json.loads(json.dumps(CPU_MACHINE))
    machine["ptv2"]["smoke"] = smoke
    return {"machine_info": machine, "benchmarks": [_bench(e) for e in infos]}


def test_cpu_report_on_synthetic_results(tmp_path):
    res = tmp_path / "results" / "cpu" / "amd-epyc-7763" / "run"
    res.mkdir(parents=True)
    (res / "cpu.json").write_text(json.dumps(cpu_synthetic()))
    assert report.main([str(res)]) == 0

    text = (res / "report.md").read_text()
    assert "#### CPU (AMD EPYC 7763 64-Core Processor, 1 thread(s))" in text
    assert "prefix_attention fwd+bwd, CPU, float32" in text and "prefix_attention fwd, CPU, float32" in text
    # one grid point: times with units, ratios of ptv2-flash's time over each baseline's, peak memory
    assert ("| bert-base | 32 | 12 | 64 | 256 | 64 | 30% | 9.6 ms | 16.0 ms | 10.7 ms | 8.0 ms | 0.90x | 1.20x |"
            in text), text
    assert "| host | 1 | 1 | 8 | 8 | 2 | 0% | 150 us | - | - | 50 us | - | 3.00x |" in text
    assert "| minilm | 32 | 128 | 16 | ptv2 | 1.60 s |" in text and "| 0.80x | 900.0 |" in text
    assert "#### Targets" not in text and not list(res.glob("*.png"))  # GPU sections need GPU results

    status = {k: (s, v, gap) for k, _, s, v, gap, _ in report.evaluate_cpu_targets(report.load([res]))}
    assert status["cpu_op_vs_preconcat"][0] == "missed" and status["cpu_op_vs_preconcat"][1] == pytest.approx(1.2)
    assert status["cpu_op_vs_preconcat"][2] == pytest.approx(0.15)
    assert status["cpu_op_vs_peft"][0] == "met" and status["cpu_op_vs_peft"][1] == pytest.approx(0.9)
    assert status["cpu_host"][0] == "missed" and status["cpu_host"][1] == pytest.approx(3.0)
    assert status["cpu_step_time"][0] == "met" and status["cpu_step_time"][1] == pytest.approx(0.8)
    assert status["cpu_step_rss"][0] == "met" and status["cpu_step_rss"][1] == pytest.approx(0.9)


def test_cpu_smoke_results_never_meet_targets(tmp_path):
    (tmp_path / "smoke.json").write_text(json.dumps(cpu_synthetic(smoke=True)))
    results = report.evaluate_cpu_targets(report.load([tmp_path]))
    assert all(s == "no data" and "smoke" in why for _, _, s, _, _, why in results)


def test_cpu_grid_and_smoke_knob(monkeypatch):
    import torch

    bpa = pytest.importorskip("bench_prefix_attention")
    monkeypatch.setenv("PTV2_BENCH_DEVICE", "cpu")
    monkeypatch.delenv("PTV2_BENCH_SMOKE", raising=False)
    monkeypatch.delenv("PTV2_RUN_GPU_DRY", raising=False)
    cases = bpa._all_cases(torch.device("cpu"), False)
    assert len(cases) == 2 * 3 * 2 * 2 + 1 and {c[0] for c in cases} == {"minilm", "bert-base", "host"}
    assert all(c[1:4] == (32, 12, 12) and c[-1] == torch.float32 for c in cases if c[0] != "host")
    monkeypatch.setenv("PTV2_BENCH_SMOKE", "1")
    assert {c[0] for c in bpa._all_cases(torch.device("cpu"), False)} == {"ptv2", "decoder"}


def test_cpu_peak_memory_counts_live_tensor_bytes(monkeypatch):
    import torch

    import benchlib

    monkeypatch.setenv("PTV2_BENCH_DEVICE", "cpu")
    x = torch.ones(1024)  # 4 KiB that exist before: not counted

    def fn():
        a = x * 2  # 4 KiB
        b = torch.zeros(4096)  # 16 KiB, alive with a: the peak
        del a, b
        return x + 1  # 4 KiB returned

    assert benchlib.peak_memory_delta(fn) == 20 * 1024


def test_record_samples_replays_measured_durations():
    import benchlib

    class FakeBenchmark:  # pytest-benchmark's pedantic: the timer read around every round
        def __init__(self):
            self.extra_info, self.stats = {}, None

        def pedantic(self, target, rounds, iterations=1, warmup_rounds=0):
            data = []
            for _ in range(rounds):
                t0 = self._timer()
                target()
                data.append(self._timer() - t0)
            self.stats = type("M", (), {"stats": type("S", (), {"data": data})()})()

    b = FakeBenchmark()
    res = benchlib.record_samples(b, [0.5, 0.1, 0.3], "perf_counter in a fresh process")
    assert b.stats.stats.data == pytest.approx([0.5, 0.1, 0.3])
    assert res["median_us"] == pytest.approx(3e5) and res["rounds"] == 3 and b.extra_info["timer"].startswith("perf")
