"""The backward chain's products (``lstm_bwd._chain``): a row block of the pre-activation gate gradients dG
times a tile's columns of a (gates·H, H) weight, over the gate columns in BLOCK_K chunks — dG_{t+1}·W_hh,
and in a stack the layer above's dG^{l+1}_t·W_ih^{l+1} — alone (``gate_product``) or both in one loop
(``stacked_gate_products``)."""

import triton
import triton.language as tl


@triton.jit
def gate_product(acc, dg_ptrs, mask_b, w_ptr, offs_h, mask_h, H: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_K: tl.constexpr, columns, SIDE: tl.constexpr):
    """acc + dG·W on this tile's units: a row block of dG (``dg_ptrs``: its rows, at column 0) times the
    tile's columns of a (4H, H) weight, over the 4H gate columns in BLOCK_K chunks; W rows at or past
    ``columns`` count as zeros. ``SIDE``: "lstm", or a GRU's (3H, H) weight (r, z, n) against its dG row
    (dR, dZ, dN, dN ⊙ r): "gru_hidden" (W_hh: row k meets dG column k, past 2H column k + H) or
    "gru_input" (W_ih: the first 3H columns)."""
    GATE_ROWS: tl.constexpr = 4 * H if SIDE == "lstm" else 3 * H
    for k0 in range(0, GATE_ROWS, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < GATE_ROWS
        dg_cols = offs_k
        if SIDE == "gru_hidden":
            dg_cols = tl.where(offs_k < 2 * H, offs_k, offs_k + H)
        acc = _chunk_product(acc, dg_ptrs, dg_cols, mask_b, w_ptr, offs_k, mask_k, columns, offs_h, mask_h, H,
                             DOT_PRECISION)
    return acc


@triton.jit
def stacked_gate_products(recurrent_dg_ptr, w_hh_ptr, recurrent_columns, above_dg_ptr, w_ih_above_ptr, from_above,
                          gate_row_offs, mask_b, offs_h, mask_h, H: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_K: tl.constexpr, CELL: tl.constexpr):
    """A stack layer's dG_{t+1}·W_hh and, where ``from_above``, dG^{l+1}_t·W_ih^{l+1}, on this tile's units, in
    one loop over both products' chunks of the gate columns (each ``gate_product``'s, at a base pointer
    selected by the chunk index): one software pipeline, the second product's first chunks in flight while
    the first one's last ones multiply, where two loops drain between them. ``recurrent_dg_ptr`` and
    ``above_dg_ptr``: the two dG rows' step (their rows at ``gate_row_offs``); ``recurrent_columns``: as
    ``gate_product``'s ``columns`` (0 past the last step)."""
    GATE_ROWS: tl.constexpr = 4 * H if CELL == "lstm" else 3 * H
    CHUNKS: tl.constexpr = (GATE_ROWS + BLOCK_K - 1) // BLOCK_K
    acc = tl.zeros((gate_row_offs.shape[0], offs_h.shape[0]), dtype=tl.float32)
    for j in range(0, tl.where(from_above, 2 * CHUNKS, CHUNKS)):
        is_recurrent = j < CHUNKS
        offs_k = tl.where(is_recurrent, j, j - CHUNKS) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < GATE_ROWS
        dg_cols = offs_k
        if CELL == "gru":  # W_hh's row k meets dG column k, past 2H column k + H; W_ih's row k column k
            dg_cols = tl.where(is_recurrent & (offs_k >= 2 * H), offs_k + H, offs_k)
        acc = _chunk_product(acc, tl.where(is_recurrent, recurrent_dg_ptr, above_dg_ptr) + gate_row_offs, dg_cols,
                             mask_b, tl.where(is_recurrent, w_hh_ptr, w_ih_above_ptr), offs_k, mask_k,
                             tl.where(is_recurrent, recurrent_columns, GATE_ROWS), offs_h, mask_h, H, DOT_PRECISION)
    return acc


@triton.jit
def _chunk_product(acc, dg_ptrs, dg_cols, mask_b, w_ptr, offs_k, mask_k, columns, offs_h, mask_h, H: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """acc + one BLOCK_K chunk of dG·W: W's rows ``offs_k`` against dG's columns ``dg_cols`` (a GRU's W_hh
    meets its dG row past a gap); W rows at or past ``columns`` count as zeros. dG was written by other
    programs: .cg loads skip L1."""
    dg_blk = tl.load(dg_ptrs + dg_cols[None, :], mask=mask_b[:, None] & (mask_k & (offs_k < columns))[None, :],
                     other=0.0, cache_modifier=".cg")
    w_blk = tl.load(w_ptr + offs_k.to(tl.int64)[:, None] * H + offs_h[None, :], mask=mask_k[:, None] & mask_h[None, :],
                    other=0.0)
    return tl.dot(dg_blk, w_blk, acc, input_precision=DOT_PRECISION)
