"""CPU memory account: what autograd keeps for backward, ptv2 vs PEFT prefix tuning (issue #6).

Runs in CI without a GPU (about half a minute). Every tensor saved for backward is recorded through
``torch.autograd.graph.saved_tensors_hooks`` (bench/memory_account.py) and attributed to a layer;
storages are counted once and weights are not counted. The claims checked:

- the op keeps nothing beyond its inputs but its output, its LSE and the mask: no per-row prefix,
  no ``[prefix; tokens]`` concatenation, no probabilities (with attention dropout the CPU default keeps
  all probabilities, as SDPA's math path does: the CPU flash kernel has no dropout);
- in a model (MiniLM-shaped BERT, random weights), ptv2 never holds the prefix per row or a
  concatenation in any layer, while PEFT's path (and the authors' formulation) holds concatenations
  in every layer, and ptv2 saves fewer bytes in total and in every layer after the first;
- the bytes ptv2 saves grow with P by exactly the prefix itself (once, not per row), PEFT's by at
  least B copies of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import memory_account as MA  # noqa: E402

pytest.importorskip("transformers")

# B, N, P differ from every model dimension (and P + N too), so shapes identify what they hold.
B, N, P = 3, 23, 11
L, H, D = 6, 12, 32  # MiniLM-L6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny shapes: one thread is fastest and immune to a loaded machine's oversubscription.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_op_keeps_only_output_lse_and_mask(causal):
    b, hq, hkv, n, p, d = 3, 4, 2, 23, 11, 16
    op = MA.op_account(b, hq, hkv, n, p, d, causal=causal, mask=True)
    ref = MA.op_account(b, hq, hkv, n, p, d, causal=causal, mask=True, reference=True)
    print(f"\nop saves {op.total_bytes} bytes beyond its inputs; the reference formulation {ref.total_bytes}")
    print(op.table())
    assert MA.flag_prefix_copies(op, b, n, p, d) == []
    assert MA.flag_prefix_copies(ref, b, n, p, d), "the reference formulation should hold [prefix; tokens]"
    expected = b * hq * n * d * 4 + b * hq * n * 4 + b * n  # out (fp32), lse (fp32), mask (bool)
    assert op.total_bytes == expected, op.table()
    assert op.total_bytes < ref.total_bytes


@pytest.fixture(scope="module")
def accounts():
    pytest.importorskip("peft")
    return {m: MA.model_account(m, B, N, P) for m in ("ptv2", "peft", "reference")}


def _describe(flagged, limit=5):
    return "\n".join(f"  {r.layer} {r.shape} {r.dtype}: {why}" for r, why in flagged[:limit])


def test_ptv2_never_holds_the_prefix_per_row(accounts):
    flagged = MA.flag_prefix_copies(accounts["ptv2"], B, N, P, D)
    assert flagged == [], "ptv2 saved per-row prefix copies or concatenations:\n" + _describe(flagged)


@pytest.mark.parametrize("method", ["peft", "reference"])
def test_materializing_paths_hold_concatenations_in_every_layer(accounts, method):
    flagged = MA.flag_prefix_copies(accounts[method], B, N, P, D)
    layers = {r.layer for r, why in flagged if why.startswith("[prefix; tokens]")}
    assert layers == {f"layer{i}" for i in range(L)}, f"{method}: concatenations found in {sorted(layers)}"


def test_ptv2_saves_fewer_bytes_than_peft(accounts):
    rows = []
    per = {m: a.per_layer() for m, a in accounts.items()}
    for name in per["peft"]:
        rows.append(f"{name:>10s} " + " ".join(f"{per[m].get(name, 0):>11d}" for m in per))
    print("\n     layer " + " ".join(f"{m:>11s}" for m in per) + "\n" + "\n".join(rows))
    print("     total " + " ".join(f"{a.total_bytes:>11d}" for a in accounts.values()))
    ptv2, peft, ref = (accounts[m] for m in ("ptv2", "peft", "reference"))
    assert ptv2.total_bytes < peft.total_bytes
    assert ptv2.total_bytes < ref.total_bytes
    # Layer 0 also owns the whole (2L, H, P, D) prefix, saved once for all layers.
    for i in range(1, L):
        assert per["ptv2"][f"layer{i}"] < per["peft"][f"layer{i}"], f"layer{i}"


def test_prefix_bytes_do_not_scale_with_batch(accounts):
    """What ptv2 saves grows with P by the prefix itself, once, plus, with attention dropout, the
    probabilities of the added keys and their dropout mask (kept for backward on the CPU); PEFT's by
    B copies."""
    wider = P + 11
    grow = {m: MA.model_account(m, B, N, wider).total_bytes - accounts[m].total_bytes for m in ("ptv2", "peft")}
    prefix_bytes = 2 * L * H * (wider - P) * D * 4  # the added prefix positions of every layer, fp32, once
    probability_bytes = L * B * H * N * (wider - P) * 4
    mask_bytes = L * B * H * N * (wider - P)  # attention dropout's keep mask, one bool per probability
    print(f"\nP {P} -> {wider}: ptv2 saves {grow['ptv2']} more bytes, PEFT {grow['peft']} "
          f"(the prefix itself grows by {prefix_bytes} bytes)")
    assert grow["ptv2"] == prefix_bytes + probability_bytes + mask_bytes
    assert grow["peft"] >= B * prefix_bytes + probability_bytes
    no_dropout = MA.minilm_config()
    no_dropout.attention_probs_dropout_prob = 0.0  # the flash path keeps no probabilities
    base, wide = (MA.model_account("ptv2", B, N, p, config=no_dropout).total_bytes for p in (P, wider))
    assert wide - base == prefix_bytes


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-roberta"])
def test_peft_baseline_computes_what_ptv2_computes(backbone):
    """The PEFT baseline of the account and the benchmarks (PEFT's own cache, through the
    transformers-5 shim when needed) gives the logits ``from_peft`` gives on the fused op: the
    comparison is between two ways of computing one function."""
    pytest.importorskip("peft")
    import train_methods as M
    from ptv2_kernels.hf.peft import from_peft

    torch.manual_seed(0)
    cfg = M.backbone_config(backbone)
    model = M.build_backbone(cfg, "cpu", attn_implementation="eager")
    model.eval()
    m = M.setup_method("peft", model, prefix_len=5)
    batch = M.make_batch(cfg, 3, 11, "cpu", padding=0.3)
    with torch.no_grad():
        want = M.peft_forward(m.model, batch).logits
        from_peft(m.model)
        got = m.model(**batch).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
