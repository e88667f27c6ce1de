"""The GPU check in tiers that each fit one 10-minute command on a lent H100/H200 (``bench/run_gpu.sh``).

    bench/run_gpu.sh                     # tier 1 (the default): <= 480 s of GPU time, build included
    bench/run_gpu.sh tier2               # tier 2: racecheck, synccheck, initcheck, the full op grid
    bench/run_gpu.sh info tests-cuda     # any stages by name (also bench-train, memory, report)
    bench/run_gpu.sh --budgets [TIER]    # print each stage's GPU time budget and exit
    PTV2_RUN_GPU_DRY=1 bench/run_gpu.sh  # every stage's plumbing on this CPU, tiny shapes

Each stage runs as a child process under its own time limit (its budget; ``PTV2_T_<STAGE>`` overrides
one, e.g. ``PTV2_T_TESTS_TRITON=200``); one that runs out is interrupted (SIGINT first, so pytest and
the benchmarks still write what they have), the summary says which, and the next stage runs. The exit
status is non-zero when any stage failed or ran out.

Results: ``bench/results/<gpu>/<YYYYMMDD>-<sha>-<tier>/`` (dry runs: ``$TMPDIR/ptv2-dry-run/<tier>``):
``summary.txt``, ``facts.json`` and one log per stage, plus what the stages write (JUnit XML of the
tests, the ratio benchmark's JSON and table). When ``$OUT`` is set (a remote runner that returns what
is written there) the whole folder is packed after every stage into ``$OUT/ptv2-gpu-<tier>.tar.gz``
(extract it in the repository root) with ``$OUT/summary.txt`` beside it.

The extension is built on the GPU machine (stage ``build``: in place, for that GPU's architecture
only, about 20 s on 16 cores): a ``_C`` built here would not load there (the lent machine's Python is
3.12 and its driver's CUDA must be as new as the build's), and a fresh tree has none.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

REPO = Path(__file__).resolve().parents[1]
PY = os.environ.get("PYTHON") or sys.executable
GPU_BUDGET_S = 480  # one 10-minute command, less the machine's start, the transfers and the packing
KILL_GRACE_S = 15  # after SIGINT, before SIGKILL
ONE_CONFIG = {"PTV2_TRITON_AUTOTUNE": "one"}  # one Triton config per kernel: compiles, not tuning


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int  # GPU time limit of the stage on an H100/H200
    what: str
    argv: Callable[["Run"], Optional[List[str]]]  # the command (None: nothing to run, see skip_reason)
    env: dict = dataclasses.field(default_factory=dict)

    def limit_s(self, dry: bool = False) -> int:
        """The stage's time limit: its budget, twice that in a dry run (a 2-core CPU imports torch and
        runs the interpreter slower than a GPU machine's host), or ``PTV2_T_<STAGE>``."""
        knob = "PTV2_T_" + self.name.upper().replace("-", "_")
        if not os.environ.get(knob):
            return self.budget_s * (2 if dry else 1)
        try:
            return int(os.environ[knob])
        except ValueError:
            raise SystemExit(f"run_gpu.sh: {knob} must be a whole number of seconds, got {os.environ[knob]!r}")


@dataclasses.dataclass
class Run:
    tier: str
    dry: bool
    run_dir: Path
    out: Optional[Path]
    summary: List[str] = dataclasses.field(default_factory=list)
    failed: bool = False


# --------------------------------------------------------------------------------------------------
# the stages' commands


def _pytest(run: Run, name: str, *args: str, parallel: bool = False) -> List[str]:
    cmd = [PY, "-m", "pytest", *args, "-q", "-rs", "-p", "no:cacheprovider", "--durations=15",
           f"--junitxml={run.run_dir / (name + '.xml')}"]
    if parallel and not run.dry and _has_module("xdist"):
        cmd += ["-n", "8"]  # Triton compiles one kernel at a time per process: 8 processes, 8 compiles
    return cmd


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _dry_flag(run: Run) -> List[str]:
    """The flag that turns a stage's GPU command into its CPU plumbing check."""
    return ["--dry-run"] if run.dry else []


def _sanitize(tool: str) -> Callable[[Run], List[str]]:
    return lambda run: [PY, "csrc/sanitize.py", "--tools", tool] + _dry_flag(run)


def _bench_grid(run: Run) -> List[str]:
    return [PY, "-m", "pytest", "bench/bench_prefix_attention.py", "-q", "-rs", "-p", "no:cacheprovider",
            f"--benchmark-json={run.run_dir / 'prefix_attention_full.json'}",
            "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]


STAGES = {s.name: s for s in [
    Stage("facts", 20, "GPU, driver, toolkit and library versions -> facts.json",
          lambda run: [PY, str(Path(__file__)), "--facts", str(run.run_dir / "facts.json")]),
    Stage("build", 60, "ptv2_kernels._C in place for this GPU's architecture (when not importable)",
          lambda run: [PY, str(Path(__file__)), "--build"] + _dry_flag(run)),
    Stage("info", 20, "python -m ptv2_kernels.info", lambda run: [PY, "-m", "ptv2_kernels.info"]),
    Stage("tests-cuda", 50, "CUDA backend GPU tests and the HF GPU tests (no autotuning involved)",
          lambda run: _pytest(run, "tests-cuda", "-m", "gpu", "tests/gpu/test_cuda_gpu.py",
                              "tests/gpu/test_prefix_attention_gpu.py", "tests/gpu/test_hf_gpu.py",
                              "-k", "not triton")),
    Stage("tests-triton", 130, "Triton GPU tests, autotuning cut to one configuration per kernel",
          lambda run: _pytest(run, "tests-triton", "-m", "gpu", "tests/gpu/test_prefix_attention_gpu.py",
                              "tests/test_triton_backend.py", "-k", "not cuda", parallel=True),
          env=ONE_CONFIG),
    Stage("tune-twice", 40, "one case fully autotuned, run twice: the second call must hit the cache",
          lambda run: _pytest(run, "tune-twice", "-m", "gpu", "tests/gpu/test_triton_autotune_gpu.py")),
    Stage("memcheck", 60, "compute-sanitizer memcheck over csrc/sanitize.py's shapes", _sanitize("memcheck")),
    Stage("bench", 100, "the ratio benchmark at the four tier-1 shapes (bench/tier1_ratio.py)",
          lambda run: [PY, "bench/tier1_ratio.py", "--out", str(run.run_dir)] + _dry_flag(run),
          env=ONE_CONFIG),
    Stage("racecheck", 120, "compute-sanitizer racecheck over csrc/sanitize.py's shapes", _sanitize("racecheck")),
    Stage("synccheck", 60, "compute-sanitizer synccheck", _sanitize("synccheck")),
    Stage("initcheck", 60, "compute-sanitizer initcheck", _sanitize("initcheck")),
    Stage("grid", 145, "the full op grid (bench_prefix_attention.py, both grids, bf16 and fp16) as far "
          "as it gets", _bench_grid, env=dict(ONE_CONFIG, PTV2_BENCH_QUICK="0", PTV2_BENCH_BUDGET_S="0.1")),
    Stage("report", 15, "bench/report.py over this run's benchmark JSON",
          lambda run: [PY, "bench/report.py", str(run.run_dir / "prefix_attention_full.json"), "--no-plots"]),
    # not in a tier: the training-step suite and the CPU memory account
    Stage("bench-train", 540, "bench_train_step.py (one training step per model and method)",
          lambda run: [PY, "-m", "pytest", "bench/bench_train_step.py", "-q", "-rs", "-p", "no:cacheprovider",
                       f"--benchmark-json={run.run_dir / 'train_step.json'}"]),
    Stage("memory", 120, "bench/memory_account.py (CPU)", lambda run: [PY, "bench/memory_account.py"]),
]}

TIERS = {
    "tier1": ["facts", "build", "info", "tests-cuda", "tests-triton", "tune-twice", "memcheck", "bench"],
    "tier2": ["facts", "build", "racecheck", "synccheck", "initcheck", "grid", "report"],
}


def budget_table(stages: List[str]) -> str:
    lines = [f"  {name:13s} {STAGES[name].budget_s:4d} s  {STAGES[name].what}" for name in stages]
    total = sum(STAGES[name].budget_s for name in stages)
    return "\n".join(lines + [f"  {'total':13s} {total:4d} s  (GPU time; at most {GPU_BUDGET_S} s a tier)"])


# --------------------------------------------------------------------------------------------------
# running stages


def _run_child(argv: List[str], env: dict, limit_s: int, log: Path) -> tuple:
    """(exit status, or None when it ran out; seconds): the child's output goes to the log and stdout."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        child = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True, text=True, errors="replace")
        copier = threading.Thread(target=_copy_lines, args=(child.stdout, f), daemon=True)
        copier.start()
        try:
            rc = child.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            rc = None
            os.killpg(child.pid, signal.SIGINT)  # first: pytest and the benchmarks write what they have
            try:
                child.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        copier.join(timeout=5)
    return rc, time.monotonic() - t0


def _copy_lines(src, log) -> None:
    for line in src:
        log.write(line)
        log.flush()
        sys.stdout.write(line)
        sys.stdout.flush()


def _child_env(stage: Stage, run: Run) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", **stage.env)
    if run.dry:
        env.update(PTV2_BENCH_DEVICE="cpu", PTV2_BENCH_SMOKE="1", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    else:
        env.setdefault("PTV2_BENCH_DEVICE", "cuda")
    return env


def run_stage(stage: Stage, run: Run) -> str:
    """Run one stage; returns (and records) its summary line."""
    limit = stage.limit_s(run.dry)
    argv = stage.argv(run)
    print(f"\n=== {stage.name} (limit {limit} s; GPU budget {stage.budget_s} s): {' '.join(argv)}", flush=True)
    rc, dt = _run_child(argv, _child_env(stage, run), limit, run.run_dir / f"{stage.name}.log")
    if rc is None:
        state, run.failed = f"RAN OUT of its {limit} s", True
    elif rc != 0:
        state, run.failed = f"FAILED (exit {rc})", True
    else:
        state = "ok"
    line = f"{stage.name:13s} {state} in {dt:.0f} s (budget {stage.budget_s} s; log {stage.name}.log)"
    run.summary.append(line)
    _write_summary(run)
    pack(run)
    return line


def _write_summary(run: Run) -> None:
    head = f"# run_gpu.sh {run.tier}{' (dry run: CPU plumbing, nothing measured)' if run.dry else ''}, " \
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
    (run.run_dir / "summary.txt").write_text("\n".join([head] + run.summary) + "\n")


def pack(run: Run) -> Optional[Path]:
    """The run folder as one tarball in $OUT (paths relative to the repository root when it is there)."""
    if run.out is None:
        return None
    run.out.mkdir(parents=True, exist_ok=True)
    tar_path = run.out / f"ptv2-gpu-{run.tier}.tar.gz"
    try:
        arcname = str(run.run_dir.resolve().relative_to(REPO))
    except ValueError:  # a dry run outside the tree
        arcname = run.run_dir.name
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(run.run_dir, arcname=arcname)
    shutil.copy(run.run_dir / "summary.txt", run.out / "summary.txt")
    return tar_path


# --------------------------------------------------------------------------------------------------
# helpers the stages call (python bench/gpu_run.py --facts FILE | --build [--dry-run])


def _benchlib():
    """bench/benchlib.py (environment, GPU name, git SHA), imported only by the helpers that need torch."""
    sys.path.insert(0, str(REPO / "bench"))
    import benchlib

    return benchlib


def facts() -> dict:
    """What a result means nothing without: GPU, driver, toolkit, library versions, the git SHA."""
    out = _benchlib().environment()
    out["driver"] = _command_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    out["nvcc"] = _command_line(["nvcc", "--version"], last=True)
    out["compute_sanitizer"] = _command_line(["compute-sanitizer", "--version"], last=True)
    out["cpu_count"] = os.cpu_count()
    out["dry_run"] = _dry()
    return out


def _command_line(argv: List[str], last: bool = False) -> str:
    if shutil.which(argv[0]) is None:
        return f"{argv[0]} not found"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"{argv[0]} did not answer in 20 s"
    lines = [l.strip() for l in (done.stdout or done.stderr).splitlines() if l.strip()]
    return (lines[-1] if last else lines[0]) if lines else f"{argv[0]} printed nothing (exit {done.returncode})"


def build(dry: bool) -> int:
    """Build ptv2_kernels._C in place for the visible GPU when it is not importable (fail loudly)."""
    probe = [PY, "-c", "import ptv2_kernels._C"]
    if subprocess.run(probe, cwd=REPO, capture_output=True).returncode == 0:
        print("build: ptv2_kernels._C is already importable")
        return 0
    if dry:
        print("build: ptv2_kernels._C is not importable; on a GPU this stage runs "
              "`PTV2_CUDA_ARCHS=<the GPU's> python setup.py build_ext --inplace` (dry run: not compiled)")
        return 0
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    env = dict(os.environ, PTV2_CUDA_ARCHS=os.environ.get("PTV2_CUDA_ARCHS", f"{major}{minor}"))
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    cmd = [PY, "setup.py", "build_ext", "--inplace"]
    print(f"build: PTV2_CUDA_ARCHS={env['PTV2_CUDA_ARCHS']} {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
        return 1
    if subprocess.run(probe, cwd=REPO).returncode != 0:
        print("build: FAILED: setup.py finished but ptv2_kernels._C still does not import (see above)")
        return 1
    return 0


# --------------------------------------------------------------------------------------------------
# entry point


def _dry() -> bool:
    return os.environ.get("PTV2_RUN_GPU_DRY", "0") == "1"


def _run_dir(tier: str, dry: bool) -> Path:
    if os.environ.get("PTV2_RUN_DIR"):
        return Path(os.environ["PTV2_RUN_DIR"])
    if dry:  # never into bench/results
        return Path(os.environ.get("TMPDIR", "/tmp")) / "ptv2-dry-run" / tier
    bl = _benchlib()
    return (REPO / "bench" / "results" / bl.safe_name(bl.gpu_name())
            / f"{datetime.date.today():%Y%m%d}-{bl.git_sha()[:12]}-{tier}")


def _stages_of(args: List[str]) -> tuple:
    """(tier name, stage names) from the command line: a tier, stage names, or nothing (tier 1)."""
    if not args:
        return "tier1", TIERS["tier1"]
    if len(args) == 1 and args[0] in TIERS:
        return args[0], TIERS[args[0]]
    unknown = [a for a in args if a not in STAGES]
    if unknown:
        raise SystemExit(f"run_gpu.sh: unknown stage or tier {unknown[0]!r}; tiers: {', '.join(TIERS)}; "
                         f"stages: {', '.join(STAGES)}")
    return "stages", args


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--facts"]:
        Path(args[1]).write_text(json.dumps(facts(), indent=2) + "\n")
        print(Path(args[1]).read_text())
        return 0
    if args[:1] == ["--build"]:
        return build("--dry-run" in args)
    if args[:1] == ["--budgets"]:
        tier, stages = _stages_of(args[1:])
        print(f"{tier}:\n{budget_table(stages)}")
        return 0
    tier, stages = _stages_of(args)
    dry = _dry()
    if not dry:
        import torch

        if not torch.cuda.is_available():
            print(f"run_gpu.sh: torch sees no CUDA GPU here ({PY}); nothing to do "
                  "(PTV2_RUN_GPU_DRY=1 checks the plumbing on CPU)", file=sys.stderr)
            return 2
    run_dir = _run_dir(tier, dry)
    if dry and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    run = Run(tier, dry, run_dir, out)
    print(f"run_gpu.sh {tier}{' (DRY RUN on CPU)' if dry else ''}: results in {run_dir}\n"
          f"GPU time budgets:\n{budget_table(stages)}", flush=True)
    t0 = time.monotonic()
    for name in stages:
        run_stage(STAGES[name], run)
    run.summary.append(f"{'total':13s} {time.monotonic() - t0:.0f} s")
    _write_summary(run)
    tar = pack(run)
    print(f"\n=== summary ({run_dir})\n" + (run.run_dir / "summary.txt").read_text()
          + (f"packed: {tar}\n" if tar else ""))
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
