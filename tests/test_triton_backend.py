"""The Triton backend (``ptv2_kernels.backends.triton``) called directly through the backend interface.

Without a GPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set before triton
is imported), so shapes stay tiny; with a GPU the same tests run the compiled kernels. Every case
compares the forward (output and LSE) and the five gradients with the float64 reference
(``ptv2_kernels.reference``, same dropout masks for the same seed), with a bound derived from what
plain PyTorch gets wrong in the same dtype, and prints max and mean errors.
"""

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ptv2_kernels import dropout as D  # noqa: E402
from ptv2_kernels.backends.base import Params, Problem  # noqa: E402
from ptv2_kernels.backends.triton import BACKEND  # noqa: E402
from helpers import Case, check_against_reference, deterministic_algorithms, make_inputs, run  # noqa: E402
from ptv2_kernels import prefix_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WHY = BACKEND.reason(Problem(torch.device(DEVICE), torch.float32, 16, frozenset()))
# With a GPU every case runs the compiled kernels: those are GPU cases, selected by `-m gpu` (and a
# missing Triton there fails instead of skipping); without one they run under the interpreter.
if DEVICE == "cuda" and WHY is not None:
    pytest.fail(f"triton backend missing on a GPU machine: {WHY}", pytrace=False)
pytestmark = [pytest.mark.skipif(WHY is not None, reason=f"triton backend unavailable: {WHY}")] + \
    ([pytest.mark.gpu] if DEVICE == "cuda" else [])
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------
# the dropout hash helpers


if WHY is None:
    import triton
    import triton.language as tl

    from ptv2_kernels.backends.triton._hash import keep_mask, signed32

    @triton.jit
    def _keep_grid(out, key, row0, col_step, thr, BR: tl.constexpr, BC: tl.constexpr):
        rows = row0 + tl.arange(0, BR).to(tl.int64)
        cols = tl.arange(0, BC).to(tl.int64) * col_step
        keep = keep_mask(key, rows[:, None], cols[None, :], thr)
        tl.store(out + tl.arange(0, BR)[:, None] * BC + tl.arange(0, BC)[None, :], keep.to(tl.int8))

    @triton.jit
    def _dot_probe(A, B, C):
        r = tl.arange(0, 16)
        c = tl.dot(tl.load(A + r[:, None] * 16 + r[None, :]), tl.load(B + r[:, None] * 16 + r[None, :]))
        tl.store(C + r[:, None] * 16 + r[None, :], c)


def _dot_broken(dtype):
    """Whether this Triton computes a plain tl.dot in ``dtype`` wrong here (the 3.9 interpreter does for
    bfloat16: it multiplies the raw 16-bit patterns), so kernel results in ``dtype`` mean nothing."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    c = torch.empty(16, 16, device=DEVICE)
    _dot_probe[(1,)](a, b, c)
    return not torch.allclose(c.cpu(), a.float().cpu() @ b.float().cpu(), atol=1e-2, rtol=1e-2)


def test_hash_helpers_match_torch_dropout_bit_for_bit():
    cases = [(0, D.STREAM_ATTENTION, 0.1, 0, 1), (12345, D.STREAM_PREFIX_K, 0.5, 2**31 - 8, 3),
             (2**62 - 1, D.STREAM_PREFIX_V, 0.9, 2**33 + 5, 7919), (987654321, D.STREAM_ATTENTION, 0.0, 77, 1),
             (42, D.STREAM_ATTENTION, 1.0, 5, 1), (2**40 + 3, D.STREAM_PREFIX_K, 0.25, 2**32 - 16, 2**20 + 1)]
    for seed, stream, p, row0, col_step in cases:
        key = D.stream_key(seed, stream)
        out = torch.empty(32, 64, dtype=torch.int8, device=DEVICE)
        _keep_grid[(1,)](out, signed32(key), row0, col_step, D.drop_threshold(p), BR=32, BC=64)
        rows = torch.arange(row0, row0 + 32, dtype=torch.int64).view(-1, 1)
        cols = torch.arange(64, dtype=torch.int64) * col_step
        want = ~D.dropped(key, rows, cols, p)
        assert torch.equal(out.cpu().bool(), want), f"seed={seed} stream={stream} p={p} row0={row0}"


# ----------------------------------------------------------------------------------------------------
# forward and gradients against the float64 reference


def check(case: Case, dtype=torch.float32):
    return check_against_reference(case, "triton", dtype, device=DEVICE)


@pytest.fixture
def force_chunks(monkeypatch):
    from ptv2_kernels.backends.triton import launch

    def set_(n):
        monkeypatch.setattr(launch, "DPREFIX_CHUNKS", n or None)

    return set_


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launched through ``launch.kernels()``, in order: (kind, keyword arguments)."""
    from ptv2_kernels.backends.triton import launch

    seen = []
    real = launch.kernels()

    class Spy:
        def __init__(self, kind, fn):
            self.kind, self.fn = kind, fn

        def __getitem__(self, grid):
            def call(*args, **kwargs):
                seen.append((self.kind, kwargs))
                return self.fn[grid](*args, **kwargs)

            return call

    monkeypatch.setattr(launch, "kernels", lambda: {k: (Spy(k, f), b) for k, (f, b) in real.items()})
    return seen


ODD = [
    Case(B=1, Hq=1, Hkv=1, N=1, P=1, D=8),
    Case(B=3, N=7, P=13, D=24),
    Case(B=1, Hq=1, Hkv=1, N=97, P=1, D=40),
    Case(B=2, N=7, P=0, D=16),
    Case(B=1, Hq=1, Hkv=1, N=129, P=17, D=72),
    Case(B=1, Hq=1, Hkv=1, N=13, P=7, D=128),
]
FEATURES = [
    Case(mask=True, empty_rows=True, P=0),
    Case(mask=True, empty_rows=True, P=3, N=13),
    Case(causal=True, N=19, P=3),
    Case(causal=True, mask=True, empty_rows=True, N=13, P=0),
    Case(Hq=6, Hkv=2, N=9),
    Case(Hq=4, Hkv=1, causal=True, mask=True, N=17),
    Case(T=3, B=4, grad_lse=False),
    Case(T=3, B=5, Hq=4, Hkv=2, N=9, mask=True, causal=True, chunks=3, index=(2, 2, 0, 1, 1)),
    Case(dropout_p=0.3, N=13),
    Case(prefix_dropout_p=0.25, P=7),
    Case(dropout_p=0.2, prefix_dropout_p=0.15, T=3, B=3, Hq=4, Hkv=2, mask=True, causal=True, N=11,
         chunks=2),
    Case(transposed=True, Hq=4, Hkv=2),
    Case(needs=(False, False, False, True, True), B=3, chunks=4),
    Case(needs=(True, False, True, False, False), T=2, B=3),
    Case(needs=(False, False, False, False, True), prefix_dropout_p=0.5, mask=True),
    Case(needs=(False, True, False, False, False), dropout_p=0.1, causal=True),
    Case(needs=(False, False, False, True, False), P=0),
]


@pytest.mark.parametrize("case", ODD + FEATURES, ids=str)
def test_float32_against_reference(case, force_chunks):
    """Forward and the five gradients against the float64 reference, through the op."""
    force_chunks(case.chunks)
    check(case, torch.float32)


HALF = [Case(B=2, N=13, P=7, D=32), Case(dropout_p=0.2, prefix_dropout_p=0.1, T=2, B=3, Hq=4, Hkv=2,
                                           mask=True, causal=True, N=9)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", HALF, ids=str)
def test_half_precision_against_reference(case, dtype):
    if _dot_broken(dtype):
        pytest.skip(f"this Triton ({'interpreter' if DEVICE == 'cpu' else DEVICE}) computes tl.dot in {dtype} "
                    "wrong even in a 16x16 probe kernel: nothing to test here")
    check(case, dtype)


def test_rows_that_see_nothing_have_zero_gradients():
    c = Case(B=2, N=5, P=0, mask=True, empty_rows=True, causal=True)
    _, _, grads = check(c)
    for g in grads[:3]:
        assert torch.isfinite(g).all()
    assert torch.equal(grads[0][-1].cpu(), torch.zeros_like(grads[0][-1].cpu()))
    assert torch.equal(grads[1][-1].cpu(), torch.zeros_like(grads[1][-1].cpu()))


def test_prefix_only_runs_only_the_prefix_kernel(launches):
    c = Case(needs=(False, False, False, True, True))
    _, _, grads = check(c)
    launched = [kind for kind, _ in launches]
    assert launched.count("fwd") == 1 and "dq" not in launched and "dkdv" not in launched
    assert launched.count("dprefix") == 1 and "dprefix_det" not in launched  # atomics unless asked
    assert grads[:3] == [None, None, None]


def test_dropout_is_deterministic_and_seeded():
    c = Case(dropout_p=0.5, prefix_dropout_p=0.5, N=9)
    _, xs, _, _ = make_inputs(c, device=DEVICE)
    q, k, v, pk, pv = (x.detach() for x in xs)
    pk, pv = pk[None], pv[None]  # the backend interface takes a bank of one
    run = lambda seed: BACKEND.forward(q, k, v, pk, pv, None, None,  # noqa: E731
                                       Params(False, 0.25, 0.5, 0.5, seed))[0]
    a, b, other = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, other)


# ----------------------------------------------------------------------------------------------------
# deterministic mode: under torch.use_deterministic_algorithms(True) each dprefix chunk adds into its
# own slice of a (chunks, T, Hkv, P, D) buffer (no atomics) and the host sums the slices


DETERMINISTIC = [
    Case(T=2, B=3, index=(1, 0, 1), chunks=1),  # one chunk leaves entry 1 and comes back to it
    Case(T=2, B=3, Hq=4, Hkv=2, N=9, index=(1, 0, 1), mask=True, causal=True, dropout_p=0.2,
         prefix_dropout_p=0.25, chunks=2),
    Case(B=3, chunks=4),  # more chunks than query blocks: an empty chunk leaves its slice at zero
    Case(needs=(False, False, False, True, False), T=3, B=4, P=17),  # the backend's chunks, 2 prefix blocks
]


@pytest.mark.parametrize("case", DETERMINISTIC, ids=str)
def test_deterministic_prefix_gradient_against_reference(case, force_chunks, launches):
    force_chunks(case.chunks)
    with deterministic_algorithms():
        check(case)
    dprefix = [(kind, kw["DETERMINISTIC"]) for kind, kw in launches if kind.startswith("dprefix")]
    assert dprefix == [("dprefix_det", True)], "the atomic dprefix path ran in deterministic mode"


def test_deterministic_prefix_gradient_is_bitwise_reproducible(force_chunks):
    if DEVICE == "cuda":  # enough chunks and bank switches for atomics to reorder on a GPU
        case = Case(T=3, B=32, Hq=8, Hkv=4, N=128, P=24, D=64, prefix_dropout_p=0.1)
    else:
        case = Case(T=3, B=5, Hq=4, Hkv=2, N=9, index=(2, 0, 2, 1, 0), prefix_dropout_p=0.25, chunks=3)
    force_chunks(case.chunks)
    _, inputs, mask, index = make_inputs(case, device=DEVICE)
    with deterministic_algorithms():
        first, second = (run(prefix_attention, inputs, mask, index, case, backend="triton")[2] for _ in range(2))
    for name, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_dprefix_chunks_are_bounded_by_the_device_not_the_batch(monkeypatch):
    """The deterministic buffer is (chunks, T, Hkv, P, D): chunks must not grow with B."""
    from types import SimpleNamespace

    from ptv2_kernels.backends.triton import launch

    monkeypatch.setattr(launch, "_num_sms", lambda device: 132)
    for B in (1, 64, 10**6):
        c = SimpleNamespace(P=100, B=B, G=4, N=512, Hkv=8)
        n_pb, hkv, chunks = launch.dprefix_grid(c, 64, 64, torch.device("cuda"))
        assert (n_pb, hkv) == (2, 8) and chunks <= triton.cdiv(3 * 132, n_pb * hkv), (B, chunks)


def test_deterministic_blocks_are_chosen_by_rule_not_by_timing():
    from ptv2_kernels.backends.triton import configs

    # head dim 32: a spill-free deterministic config exists for every prefix block (32, 64, 128)
    pick = lambda P, bd=32, elem=2: configs.untimed_dprefix_config(P, bd, elem).kwargs["BLOCK_P"]  # noqa: E731
    assert pick(5) == 32 and pick(64) == 64 and pick(100) == 128  # the smallest block holding the prefix
    assert pick(300) == 128  # none holds it: the largest
    assert pick(100, bd=64) == 64  # 128 x 64 spills there on the deterministic path: pruned
    fp32 = configs.untimed_dprefix_config(100, 128, 4)
    assert fp32 in configs.kept_configs("dprefix", configs.DPREFIX_CONFIGS, 128, 4, "det")
    assert configs.untimed_dprefix_config(100, 128, 4) is fp32


def test_pruning_drops_configs_that_spill_for_the_launch():
    """configs.SPILLS (measured with ptxas) prunes per head dim, dtype and flags: at head dim 128 the
    forward's big 16-bit tiles spill only when dropout's hash is compiled in."""
    from ptv2_kernels.backends.triton import configs

    q = torch.empty(1, 1, 16, 128, dtype=torch.bfloat16)
    prune = configs.make_prune("fwd")
    plain = prune(configs.FWD_CONFIGS, {"Q": q}, BLOCK_D=128, DROPOUT=False, PREFIX_DROPOUT=False)
    dropout = prune(configs.FWD_CONFIGS, {"Q": q}, BLOCK_D=128, DROPOUT=True, PREFIX_DROPOUT=False)
    assert configs.FWD_CONFIGS[0] in plain and configs.FWD_CONFIGS[0] not in dropout
    assert configs.FWD_CONFIGS[1] not in plain  # 128 x 32 with 4 warps spills even without dropout
    assert dropout == [configs.FWD_CONFIGS[3]]
    # every entry names a real config, element size, variant and head-dim block
    assert all(kind in configs.CONFIGS and i < len(configs.CONFIGS[kind]) and elem in (2, 4)
               and variant in ("all", "nodrop", "det") and set(blocks) <= {16, 32, 64, 128}
               for (kind, i, elem, variant), blocks in configs.SPILLS.items())


# ----------------------------------------------------------------------------------------------------
# declaration


def test_declaration_and_reasons(monkeypatch):
    from ptv2_kernels.backends import base

    assert BACKEND.name == "triton"
    assert set(BACKEND.dtypes) == {torch.float16, torch.bfloat16, torch.float32}
    assert BACKEND.features == frozenset(base.FEATURES)
    assert all(BACKEND.supports_head_dim(d) for d in range(8, 129, 8))
    assert not any(BACKEND.supports_head_dim(d) for d in (4, 12, 136, 256))
    assert BACKEND.availability() is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in BACKEND.device_reason(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert BACKEND.device_reason(torch.device("cpu")) is None
    prob = base.Problem(torch.device("cpu"), torch.float64, 16, frozenset())
    assert "float64" in BACKEND.reason(prob)


def test_import_without_triton_reports_why():
    code = ("import sys; sys.modules['triton'] = None\n"
            "from ptv2_kernels.backends.triton import BACKEND\n"
            "print(BACKEND.availability())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr
    assert "triton" in res.stdout and "cannot be imported" in res.stdout


def test_autotuning_keys_on_size_buckets(monkeypatch):
    """Dynamic padding gives a new sequence length almost every batch: autotuning keys on the length
    rounded up to a power of two (rows for dprefix), never on the exact N or B."""
    from ptv2_kernels.backends.triton import configs, launch
    assert [launch.size_bucket(n) for n in (1, 16, 17, 100, 128, 129, 4000)] == [16, 16, 32, 128, 128, 256, 4096]
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    launch.kernels.cache_clear()
    try:
        tuned = launch.kernels()
    finally:
        launch.kernels.cache_clear()
    assert set(tuned) == {"fwd", "dkdv", "dq", "dprefix", "dprefix_det"}
    det, fixed = tuned.pop("dprefix_det")  # deterministic mode is never timed: the raw kernel
    assert fixed == {} and det is tuned["dprefix"][0].fn
    for kind, (fn, fixed) in tuned.items():
        assert fixed == {} and "SIZE_BUCKET" in fn.keys and not {"N", "B"} & set(fn.keys), (kind, fn.keys)
        assert "SIZE_BUCKET" in fn.arg_names and all(k in fn.arg_names for k in fn.keys)


def test_autotune_knob_keeps_one_config_or_names_itself(monkeypatch):
    """PTV2_TRITON_AUTOTUNE=one (the tier-1 GPU run) hands the autotuner one config: nothing is timed."""
    from ptv2_kernels.backends.triton import configs

    q = torch.empty(2, 2, 16, 64, dtype=torch.float16)
    prune = configs.make_prune("fwd")
    full = prune(configs.FWD_CONFIGS, {"Q": q}, BLOCK_D=64)
    monkeypatch.setenv(configs.AUTOTUNE_KNOB, "one")
    assert prune(configs.FWD_CONFIGS, {"Q": q}, BLOCK_D=64) == full[:1] and len(full) > 1
    monkeypatch.setenv(configs.AUTOTUNE_KNOB, "fastest")
    with pytest.raises(ValueError, match="PTV2_TRITON_AUTOTUNE must be 'full' or 'one'"):
        prune(configs.FWD_CONFIGS, {"Q": q}, BLOCK_D=64)
