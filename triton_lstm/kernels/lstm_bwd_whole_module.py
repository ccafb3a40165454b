"""Backward chain of the whole-module launches, the reverse of ``lstm_fwd_stack.py`` and
``lstm_fwd_bidirectional.py``: a stack's layers in one persistent launch (a reverse wavefront: the top
layer leads, layer l takes its gradient of h_t from dG^{l+1}_t·W_ih^{l+1} in the kernel), or both
directions of a bidirectional layer in one. The kernel is ``lstm_bwd._lstm_bwd_kernel`` with ``LAYERS``
or ``DIRECTIONS`` > 1 on the grid's second axis; the weight gradients are ``weight_grads.py``'s GEMMs per
layer or direction, run by the callers (``triton_lstm/stack.py``, ``bidirectional.py`` and the GRU's)."""

from __future__ import annotations

import torch

from triton_lstm.kernels import common
from triton_lstm.kernels import backward_plans
from triton_lstm.kernels.backward_plans import bwd_launch_options, plan_bwd, tile_count
from triton_lstm.kernels.common import barrier_watch, dot_precision, unless_refused
from triton_lstm.kernels.lstm_bwd import _lstm_bwd_kernel, chain_results, gates_as_dg


def lstm_bwd_stack_gate_grads(
    grad_out: torch.Tensor,
    grad_h_n: torch.Tensor,
    grad_c_n: torch.Tensor,
    w_hh: torch.Tensor,
    w_ih_above: torch.Tensor,
    lengths: torch.Tensor | None,
    gates: torch.Tensor,
    c_all: torch.Tensor,
    tiling: tuple[int, int, int, int] | None = None,
    w_ch: torch.Tensor | None = None,
    cell: str = "lstm",
    dropout: tuple[torch.Tensor, float] | None = None,
    overwrite_gates: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The sequential part of a stack's backward in one persistent launch (a reverse wavefront: the top
    layer leads, layer l takes its gradient of h_t from dG^{l+1}_t·W_ih^{l+1} in the kernel).

    ``grad_out`` (T, B, H): the top layer's output gradient; ``grad_h_n``/``grad_c_n``, ``w_hh``,
    ``gates``, ``c_all``: per layer, stacked (L, …), as the stacked forward saved them; ``w_ih_above``
    (L - 1, 4H, H). Returns ``(grad_gates (L, T, B, 4H), grad_h0 (L, B, H) fp32, grad_c0 (L, B, H) fp32)``,
    or None when the layers' tiles do not fit the SMs at once, the kernel does not fit the device or the
    driver refuses the cooperative launch (nothing ran: the caller goes layer by layer). ``tiling`` =
    (BLOCK_B, BLOCK_H, BLOCK_K, num_warps) overrides the planner's (``benchmarks/tune.py --layers``);
    ``w_ch`` (L, 3H): the layers' peephole weights. ``cell`` "gru": a GRU stack (``w_hh`` (L, 3H, H),
    ``w_ih_above`` (L - 1, 3H, H), ``c_all`` its fp32 h, ``grad_c_n`` zeros; grad_c0 None). ``dropout``: the
    forward's dropout between layers, ``(mask (L - 1, T, B, H) uint8, scale)``. ``overwrite_gates``: dG
    takes the gates' place (``lstm_bwd.lstm_bwd_gate_grads``'s ``into``: each layer's programs read only
    their own tiles of its gates, the layer below only the dG above).
    """
    return _whole_module_chain(grad_out, grad_h_n, grad_c_n, w_hh, w_ih_above, lengths, gates, c_all,
                               layers=gates.shape[0], what="the stacked backward kernel", tiling=tiling, w_ch=w_ch,
                               cell=cell, dropout=dropout,
                               overwrite_gates=overwrite_gates)


def lstm_bwd_bidirectional_gate_grads(
    grad_out: torch.Tensor,
    grad_h_n: torch.Tensor,
    grad_c_n: torch.Tensor,
    w_hh: torch.Tensor,
    lengths: torch.Tensor | None,
    gates: torch.Tensor,
    c_all: torch.Tensor,
    w_ch: torch.Tensor | None = None,
    cell: str = "lstm",
    overwrite_gates: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The sequential part of a bidirectional layer's backward, both directions in one persistent launch.

    ``grad_out`` (T, B, 2H): the gradient of the layer's output, in time order; ``grad_h_n``,
    ``grad_c_n`` (2, B, H); ``w_hh`` (2, 4H, H); ``gates`` (2, T, B, 4H) and ``c_all`` (2, T + 1, B, H)
    fp32 as ``lstm_fwd_bidirectional`` saved them (step-indexed: the reverse direction's step s is time
    len_b − 1 − s). Returns ``(grad_gates (2, T, B, 4H) step-indexed, grad_h0 (2, B, H) fp32, grad_c0)``,
    or None when half the SMs cannot hold a direction's tiles, the kernel does not fit the device or the
    driver refuses the cooperative launch (nothing ran: the caller runs the directions one by one).
    ``w_ch`` (2, 3H): the directions' peephole weights. ``cell`` "gru": a GRU layer (``w_hh`` (2, 3H, H),
    ``c_all`` its fp32 h, ``grad_c_n`` zeros; grad_c0 None, as ``lstm_bwd_gate_grads``). ``overwrite_gates``: dG
    takes the gates' place, as for a stack.
    """
    return _whole_module_chain(grad_out, grad_h_n, grad_c_n, w_hh, w_hh, lengths, gates, c_all, directions=2,
                               what="the bidirectional backward kernel", w_ch=w_ch, cell=cell,
                               overwrite_gates=overwrite_gates)


def _whole_module_chain(grad_out, grad_h_n, grad_c_n, w_hh, w_ih_above, lengths, gates, c_all, *, layers=1,
                        directions=1, what, tiling=None, w_ch=None, cell="lstm", dropout=None,
                        overwrite_gates=False):
    """The chain kernel over a leading axis of ``layers`` (a stack, ``LAYERS``) or ``directions`` (both
    directions of a layer, ``DIRECTIONS``), in one persistent launch; None where it cannot run."""
    groups, T, B, four_h = gates.shape
    H = four_h // 4
    dtype, device = w_hh.dtype, w_hh.device
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count // groups if device.type == "cuda" else None
    if num_sms is not None and num_sms < 1:
        return None
    if tiling is not None:
        block_b, block_h, block_k, num_warps = tiling
        options = dict(BLOCK_K=block_k, num_warps=num_warps)
    else:
        try:
            # Tiles of at most 1024 elements: with the product from the layer above, 64 × 32 and 64 × 64
            # tiles spilled 96-280 bytes on sm_90 (bf16, H = 256, a stack); see also bwd_launch_options.
            _, block_b, block_h = plan_bwd(B, H, num_sms, "persistent", max_tile=1024)
        except ValueError:
            return None
        options = bwd_launch_options(H, block_b, block_h, w_hh.element_size(), whole_module=True)
    grad_gates = gates_as_dg(gates, overwrite_gates)
    if grad_gates is None:
        grad_gates = torch.empty(groups, T, B, four_h, dtype=dtype, device=device)
    dh = grad_h_n.to(torch.float32, copy=True).contiguous()
    dc = grad_c_n.to(torch.float32, copy=True).contiguous()
    counters = torch.zeros(groups + 1, dtype=torch.int32, device=device)  # a barrier counter per group, the flag
    # The grid's second axis: the directions (independent, one program each even under the interpreter), or
    # a stack's layers on a GPU (under the interpreter one program runs them top to bottom).
    grid = (tile_count(B, H, block_b, block_h), directions if directions > 1 else layers if device.type == "cuda" else 1)
    barrier_watch.check()
    prefetch, one_loop = backward_plans.chain_variants(dtype.itemsize, layers, cell, dropout is not None,
                                                       device.type != "cuda")

    def launch():
        _lstm_bwd_kernel[grid](
            grad_out.contiguous(), gates, c_all, w_hh, lengths if lengths is not None else counters, grad_gates, dh, dc,
            counters, w_ih_above, w_ch if w_ch is not None else w_hh, dropout[0] if dropout is not None else counters,
            dropout[1] if dropout is not None else 1.0, T, B, T - 1, T, 0, H=H,
            HAS_LENGTHS=lengths is not None, USE_BARRIER=True, DOT_PRECISION=dot_precision(dtype), BLOCK_B=block_b,
            BLOCK_H=block_h, SPIN_LIMIT=common.BARRIER_SPIN_LIMIT, LAYERS=layers, DIRECTIONS=directions,
            PEEPHOLE=w_ch is not None, CELL=cell, DROPOUT=dropout is not None, PREFETCH=prefetch, ONE_LOOP=one_loop,
            launch_cooperative_grid=True, **options,
        )
        return True

    if unless_refused(launch) is None:
        return None
    barrier_watch.watch(counters[groups:], f"{what} (tile {block_b}×{block_h}, {grid} programs)")
    return chain_results(grad_gates, w_hh, dh, dc, lengths, cell)
