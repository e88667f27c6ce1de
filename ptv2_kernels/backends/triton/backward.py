"""Backward kernels of prefix attention.

- ``_bwd_preprocess``: delta = rowsum(dO * O) - grad_lse, and lse moved to the log2 domain with rows that
  saw nothing set to +inf (so every recomputed probability of such a row is exactly 0).
- ``_bwd_dkdv_kernel``: token dK/dV, one program per (key block, batch row, kv head), looping over the
  query blocks of the GROUP query heads that share the kv head.
- ``_bwd_dq_kernel``: dQ, one program per (query block, batch row, query head), over prefix then tokens.
- ``_bwd_dprefix_kernel``: dprefix_k/dprefix_v reduced over the batch inside the kernel: for one kv head
  the B * GROUP * N query rows are one long sequence against the P prefix keys, cut into
  ``num_programs(2)`` chunks; each program accumulates its chunk in fp32 registers and adds it into the
  fp32 (T, Hkv, P, D) buffer with atomics (flushing whenever the bank entry changes). With
  ``DETERMINISTIC`` each chunk adds into its own slice of a (chunks, T, Hkv, P, D) buffer instead, and
  the host sums the slices in a fixed order.
"""

import triton
import triton.language as tl

from ._hash import keep_from_row_hash, keep_mask, row_hash
from .forward import causal_end, load_tile, prefix_row_ids, token_visible


@triton.jit
def _bwd_preprocess(O, DO, GLSE, LSE, DELTA, LSE2,
                    s_ob, s_oh, s_on, s_db, s_dh, s_dn, Hq, N, D,
                    HAS_GLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(2) * Hq + tl.program_id(1)  # grid (row blocks, heads, batch)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < N
    dmask = offs_d < D
    o = load_tile(O + b * s_ob + h * s_oh, offs_m, s_on, offs_d, mmask, dmask).to(tl.float32)
    do = load_tile(DO + b * s_db + h * s_dh, offs_m, s_dn, offs_d, mmask, dmask).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = bh.to(tl.int64) * N + offs_m
    if HAS_GLSE:
        delta = delta - tl.load(GLSE + row, mask=mmask, other=0.0)
    tl.store(DELTA + row, delta, mask=mmask)
    lse = tl.load(LSE + row, mask=mmask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(LSE2 + row, lse2, mask=mmask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, KPM, DK, DV,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn, s_mb,
    s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,
    Hq, Hkv, N, P, D, GROUP, qk_scale, sm_scale, drop_key, drop_thr, drop_scale, SIZE_BUCKET,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(2) * Hkv + tl.program_id(1)  # grid (row blocks, heads, batch)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    nmask = offs_n < N
    kt = load_tile(K + b * s_kb + hk * s_kh, offs_n, s_kn, offs_d, nmask, dmask)
    vt = load_tile(V + b * s_vb + hk * s_vh, offs_n, s_vn, offs_d, nmask, dmask)
    if HAS_MASK:
        nmask = nmask & (tl.load(KPM + b * s_mb + offs_n, mask=nmask, other=0) != 0)
    cols = (P + offs_n).to(tl.int64)  # attention-dropout columns: tokens come after the prefix
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if CAUSAL:
        start_m = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # earlier query blocks see none of these keys
    else:
        start_m = 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bhq = b * Hq + h
        q_base = Q + b * s_qb + h * s_qh
        do_base = DO + b * s_db + h * s_dh
        for sm in range(start_m, N, BLOCK_M):
            offs_m = sm + tl.arange(0, BLOCK_M)
            mmask = offs_m < N
            q = load_tile(q_base, offs_m, s_qn, offs_d, mmask, dmask)
            do = load_tile(do_base, offs_m, s_dn, offs_d, mmask, dmask)
            lse2 = tl.load(LSE2 + bhq * N + offs_m, mask=mmask, other=float("inf"))
            delta = tl.load(DELTA + bhq * N + offs_m, mask=mmask, other=0.0)
            # transposed probabilities (keys x queries), recomputed from the saved lse
            pT = tl.exp2(tl.dot(kt, tl.trans(q), input_precision=PREC) * qk_scale - lse2[None, :])
            visible = nmask[:, None]
            if CAUSAL:
                visible = visible & (offs_m[None, :] >= offs_n[:, None])
            pT = tl.where(visible, pT, 0.0)
            dpT = tl.dot(vt, tl.trans(do), input_precision=PREC)
            if DROPOUT:
                rh = row_hash(drop_key, bhq * N + offs_m.to(tl.int64))
                keepT = keep_from_row_hash(rh[None, :], cols[:, None], drop_thr)
                pdT = tl.where(keepT, pT * drop_scale, 0.0)
                dpT = tl.where(keepT, dpT * drop_scale, 0.0)
            else:
                pdT = pT
            dv += tl.dot(pdT.to(q.dtype), do, input_precision=PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    dk = dk * sm_scale
    smask = (offs_n < N)[:, None] & dmask[None, :]
    tl.store(DK + b * s_dkb + hk * s_dkh + offs_n.to(tl.int64)[:, None] * s_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=smask)
    tl.store(DV + b * s_dvb + hk * s_dvh + offs_n.to(tl.int64)[:, None] * s_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=smask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, PIDX, KPM, DO, LSE2, DELTA, DQ,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_pkt, s_pkh, s_pkp, s_pvt, s_pvh, s_pvp, s_mb, s_db, s_dh, s_dn, s_dqb, s_dqh, s_dqn,
    Hq, Hkv, N, P, D, GROUP, qk_scale, sm_scale,
    drop_key, drop_thr, drop_scale, pk_key, pv_key, pdrop_thr, pdrop_scale, SIZE_BUCKET,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BANK: tl.constexpr,
    DROPOUT: tl.constexpr, PREFIX_DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(2) * Hq + tl.program_id(1)  # grid (row blocks, heads, batch)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    mmask = offs_m < N
    q = load_tile(Q + b * s_qb + h * s_qh, offs_m, s_qn, offs_d, mmask, dmask)
    do = load_tile(DO + b * s_db + h * s_dh, offs_m, s_dn, offs_d, mmask, dmask)
    row = bh.to(tl.int64) * N + offs_m
    lse2 = tl.load(LSE2 + row, mask=mmask, other=float("inf"))
    delta = tl.load(DELTA + row, mask=mmask, other=0.0)
    rh = row_hash(drop_key, row)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # prefix keys (this row's dropout of the prefix elements applied to the loaded tiles)
    if HAS_BANK:
        t = tl.load(PIDX + b).to(tl.int64)
    else:
        t = 0
    pk_base = PK + t * s_pkt + hk * s_pkh
    pv_base = PV + t * s_pvt + hk * s_pvh
    for start in range(0, P, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < P
        kt = load_tile(pk_base, offs_n, s_pkp, offs_d, nmask, dmask)
        vt = load_tile(pv_base, offs_n, s_pvp, offs_d, nmask, dmask)
        pscale = 1.0
        if PREFIX_DROPOUT:
            prow = prefix_row_ids(b, hk, Hkv, P, offs_n)[:, None]
            kt = tl.where(keep_mask(pk_key, prow, offs_d[None, :], pdrop_thr), kt, 0.0)
            vt = tl.where(keep_mask(pv_key, prow, offs_d[None, :], pdrop_thr), vt, 0.0)
            pscale = pdrop_scale
        p = tl.exp2(tl.dot(q, tl.trans(kt), input_precision=PREC) * (qk_scale * pscale) - lse2[:, None])
        p = tl.where(nmask[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC) * pscale
        if DROPOUT:
            keep = keep_from_row_hash(rh[:, None], offs_n.to(tl.int64)[None, :], drop_thr)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(q.dtype), kt, input_precision=PREC) * pscale

    # token keys
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    for start in range(0, causal_end(pid_m, N, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        kt = load_tile(k_base, offs_n, s_kn, offs_d, nmask, dmask)
        vt = load_tile(v_base, offs_n, s_vn, offs_d, nmask, dmask)
        p = tl.exp2(tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale - lse2[:, None])
        p = tl.where(token_visible(KPM, s_mb, b, offs_m, offs_n, N, HAS_MASK, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        if DROPOUT:
            keep = keep_from_row_hash(rh[:, None], (P + offs_n).to(tl.int64)[None, :], drop_thr)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(q.dtype), kt, input_precision=PREC)
    dq = dq * sm_scale
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m.to(tl.int64)[:, None] * s_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


@triton.jit
def _dprefix_flush(DPK, DPV, offs, dk, dv, mask, DETERMINISTIC: tl.constexpr):
    """Adds a chunk's partial sums at ``offs``: into the chunk's own slice, or with atomics."""
    if DETERMINISTIC:
        # only this program writes this slice, so a plain read-modify-write cannot race; it adds
        # rather than stores because unsorted rows (prefix_index [0, 1, 0]) revisit an entry
        tl.store(DPK + offs, tl.load(DPK + offs, mask=mask) + dk, mask=mask)
        tl.store(DPV + offs, tl.load(DPV + offs, mask=mask) + dv, mask=mask)
    else:
        tl.atomic_add(DPK + offs, dk, mask=mask, sem="relaxed")
        tl.atomic_add(DPV + offs, dv, mask=mask, sem="relaxed")


@triton.jit
def _bwd_dprefix_kernel(
    Q, PK, PV, PIDX, DO, LSE2, DELTA, DPK, DPV,
    s_qb, s_qh, s_qn, s_pkt, s_pkh, s_pkp, s_pvt, s_pvh, s_pvp, s_db, s_dh, s_dn,
    B, Hq, Hkv, N, P, D, T, GROUP, qk_scale, sm_scale,
    drop_key, drop_thr, drop_scale, pk_key, pv_key, pdrop_thr, pdrop_scale, SIZE_BUCKET,
    HAS_BANK: tl.constexpr, DROPOUT: tl.constexpr, PREFIX_DROPOUT: tl.constexpr,
    DETERMINISTIC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_p = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    n_chunks = tl.num_programs(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    pmask = offs_p < P
    dmask = offs_d < D
    # work units: (b, g, query block), b outermost so a chunk sees few bank entries
    n_mb = tl.cdiv(N, BLOCK_M)
    per_b = GROUP * n_mb
    units = B * per_b
    per_chunk = tl.cdiv(units, n_chunks)
    u0 = chunk * per_chunk
    u1 = tl.minimum(u0 + per_chunk, units)
    if HAS_BANK:
        cur_t = tl.load(PIDX + tl.minimum(u0 // per_b, B - 1)).to(tl.int64)
    else:
        cur_t = tl.zeros([], tl.int64)
    dk = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    # fp32 accumulator layout: contiguous (T, Hkv, P, D), or (chunks, T, Hkv, P, D) when deterministic
    acc_offs = (hk * P + offs_p.to(tl.int64)[:, None]) * D + offs_d[None, :]
    if DETERMINISTIC:
        acc_offs += chunk.to(tl.int64) * T * Hkv * P * D
    smask = pmask[:, None] & dmask[None, :]
    for u in range(u0, u1):
        b = (u // per_b).to(tl.int64)
        g = (u % per_b) // n_mb
        mb = u % n_mb
        if HAS_BANK:
            t = tl.load(PIDX + b).to(tl.int64)
            if t != cur_t:  # rows of another task: hand the partial sums to their own entry
                _dprefix_flush(DPK, DPV, cur_t * Hkv * P * D + acc_offs, dk * sm_scale, dv, smask, DETERMINISTIC)
                dk = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
                dv = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
                cur_t = t
        h = hk * GROUP + g
        bhq = b * Hq + h
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = offs_m < N
        q = load_tile(Q + b * s_qb + h * s_qh, offs_m, s_qn, offs_d, mmask, dmask)
        do = load_tile(DO + b * s_db + h * s_dh, offs_m, s_dn, offs_d, mmask, dmask)
        row = bhq * N + offs_m
        lse2 = tl.load(LSE2 + row, mask=mmask, other=float("inf"))
        delta = tl.load(DELTA + row, mask=mmask, other=0.0)
        # the prefix tile is re-read per unit (an L2 hit) rather than held in registers across the loop
        kb = load_tile(PK + cur_t * s_pkt + hk * s_pkh, offs_p, s_pkp, offs_d, pmask, dmask)
        vb = load_tile(PV + cur_t * s_pvt + hk * s_pvh, offs_p, s_pvp, offs_d, pmask, dmask)
        pscale = 1.0
        if PREFIX_DROPOUT:
            # batch row b's own mask of the prefix elements
            prow = prefix_row_ids(b, hk, Hkv, P, offs_p)[:, None]
            keep_k = keep_mask(pk_key, prow, offs_d[None, :], pdrop_thr)
            keep_v = keep_mask(pv_key, prow, offs_d[None, :], pdrop_thr)
            kb = tl.where(keep_k, kb, 0.0)
            vb = tl.where(keep_v, vb, 0.0)
            pscale = pdrop_scale
        # transposed (prefix keys x query rows), as in the token dK/dV kernel: no register transposes
        pT = tl.exp2(tl.dot(kb, tl.trans(q), input_precision=PREC) * (qk_scale * pscale) - lse2[None, :])
        pT = tl.where(pmask[:, None], pT, 0.0)
        dpT = tl.dot(vb, tl.trans(do), input_precision=PREC) * pscale
        if DROPOUT:
            rh = row_hash(drop_key, row)
            keepT = keep_from_row_hash(rh[None, :], offs_p.to(tl.int64)[:, None], drop_thr)
            pdT = tl.where(keepT, pT * drop_scale, 0.0)
            dpT = tl.where(keepT, dpT * drop_scale, 0.0)
        else:
            pdT = pT
        dsT = pT * (dpT - delta[None, :])
        dv_u = tl.dot(pdT.to(q.dtype), do, input_precision=PREC)
        dk_u = tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
        if PREFIX_DROPOUT:
            dv_u = tl.where(keep_v, dv_u * pscale, 0.0)
            dk_u = tl.where(keep_k, dk_u * pscale, 0.0)
        dk += dk_u
        dv += dv_u
    if u1 > u0:
        _dprefix_flush(DPK, DPV, cur_t * Hkv * P * D + acc_offs, dk * sm_scale, dv, smask, DETERMINISTIC)
