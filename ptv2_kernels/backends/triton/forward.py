"""Forward kernel of prefix attention: one program per (query block, batch row, query head).

Online softmax over the row's prefix entry (read in place from the bank) and then over the token keys,
in the log2 domain (``exp2`` with ``softmax_scale * log2(e)`` folded into the scores), fp32
accumulators; attention dropout multiplies the probabilities entering the PV product only (the
normalizer is the un-dropped sum), prefix dropout masks the prefix K/V tile as it is loaded.
"""

import triton
import triton.language as tl

from ._hash import keep_from_row_hash, keep_mask, row_hash


@triton.jit
def load_tile(base, offs_r, stride_r, offs_d, rmask, dmask):
    """A (rows, BLOCK_D) tile at ``base + r * stride_r + d`` (last dim contiguous), zeros where masked."""
    ptrs = base + offs_r.to(tl.int64)[:, None] * stride_r + offs_d[None, :]
    return tl.load(ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def prefix_row_ids(b, hk, Hkv, P, offs_p):
    """Row numbers of STREAM_PREFIX_K/V for batch row b, kv head hk, prefix positions offs_p (int64)."""
    return (b.to(tl.int64) * Hkv + hk) * P + offs_p.to(tl.int64)


@triton.jit
def causal_end(pid_m, N, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last token key a query block can see: causal blocks stop at their own diagonal."""
    if CAUSAL:
        return tl.minimum(N, (pid_m + 1) * BLOCK_M)
    return N


@triton.jit
def token_visible(KPM, s_mb, b, offs_m, offs_n, N, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) visibility of token keys offs_n to queries offs_m: in range, not padding,
    and j <= i when causal."""
    nmask = offs_n < N
    if HAS_MASK:
        nmask = nmask & (tl.load(KPM + b * s_mb + offs_n, mask=nmask, other=0) != 0)
    visible = nmask[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    return visible


@triton.jit
def online_step(s, v, m_i, l_i, acc, rh, cols, drop_thr, drop_scale, pv_scale,
                DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step over a key block: ``s`` are log2-domain scores (-inf where invisible)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet stays at 0
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)  # the normalizer uses the un-dropped probabilities
    if DROPOUT:
        keep = keep_from_row_hash(rh[:, None], cols[None, :], drop_thr)
        p = tl.where(keep, p * drop_scale, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC) * pv_scale
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, PIDX, KPM, O, LSE,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_pkt, s_pkh, s_pkp, s_pvt, s_pvh, s_pvp, s_mb, s_ob, s_oh, s_on,
    Hq, Hkv, N, P, D, GROUP, qk_scale,
    drop_key, drop_thr, drop_scale, pk_key, pv_key, pdrop_thr, pdrop_scale, SIZE_BUCKET,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BANK: tl.constexpr,
    DROPOUT: tl.constexpr, PREFIX_DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(2) * Hq + tl.program_id(1)  # grid (query blocks, heads, batch)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = h // GROUP  # grouped-query attention: GROUP query heads share one kv head
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D  # head dims that are not a power of two are padded with masked lanes
    mmask = offs_m < N
    q = load_tile(Q + b * s_qb + h.to(tl.int64) * s_qh, offs_m, s_qn, offs_d, mmask, dmask)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # attention-dropout row hash, once per query row: row = (b * Hq + h) * N + i
    rh = row_hash(drop_key, (b * Hq + h) * N + offs_m.to(tl.int64))

    # 1) the prefix keys: always visible, read in place from bank entry t
    if HAS_BANK:
        t = tl.load(PIDX + b).to(tl.int64)
    else:
        t = 0
    pk_base = PK + t * s_pkt + hk.to(tl.int64) * s_pkh
    pv_base = PV + t * s_pvt + hk.to(tl.int64) * s_pvh
    for start in range(0, P, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < P
        kt = load_tile(pk_base, offs_n, s_pkp, offs_d, nmask, dmask)
        vt = load_tile(pv_base, offs_n, s_pvp, offs_d, nmask, dmask)
        k_scale = qk_scale
        v_scale = 1.0
        if PREFIX_DROPOUT:
            # this batch row's own dropout of the prefix elements: mask exactly, scale in fp32 after the dot
            prow = prefix_row_ids(b, hk, Hkv, P, offs_n)[:, None]
            kt = tl.where(keep_mask(pk_key, prow, offs_d[None, :], pdrop_thr), kt, 0.0)
            vt = tl.where(keep_mask(pv_key, prow, offs_d[None, :], pdrop_thr), vt, 0.0)
            k_scale = qk_scale * pdrop_scale
            v_scale = pdrop_scale
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * k_scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_i, l_i, acc = online_step(s, vt, m_i, l_i, acc, rh, offs_n.to(tl.int64), drop_thr, drop_scale,
                                    v_scale, DROPOUT, PREC)

    # 2) the token keys: padding mask, causal (j <= i) with fully masked blocks skipped
    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh
    for start in range(0, causal_end(pid_m, N, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        kt = load_tile(k_base, offs_n, s_kn, offs_d, nmask, dmask)
        vt = load_tile(v_base, offs_n, s_vn, offs_d, nmask, dmask)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        s = tl.where(token_visible(KPM, s_mb, b, offs_m, offs_n, N, HAS_MASK, CAUSAL), s, float("-inf"))
        m_i, l_i, acc = online_step(s, vt, m_i, l_i, acc, rh, (P + offs_n).to(tl.int64), drop_thr,
                                    drop_scale, 1.0, DROPOUT, PREC)

    # 3) normalize; a row that saw nothing has l = 0: output 0, lse = -inf
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_base = O + b * s_ob + h.to(tl.int64) * s_oh
    tl.store(o_base + offs_m.to(tl.int64)[:, None] * s_on + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mmask[:, None] & dmask[None, :])
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse, mask=mmask)
