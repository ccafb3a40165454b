"""Pieces shared by the kernels: the products, the loads, the grid barrier and its watch, launch helpers."""

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources


def _interpreter_numpy_compatibility() -> None:
    """Under TRITON_INTERPRET=1, Triton before 3.8 converts a loop bound such as ``range(T)`` with
    ``int()`` on a one-element numpy array, which numpy 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"): every kernel with a runtime loop bound failed. Triton 3.8 squeezes
    the array first; this applies that same fix to the older interpreters, and only to them."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    if (major, minor) >= (3, 8):
        return
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "squeezes_index", False):
        return

    def index(self):
        return int(self.handle.data.squeeze())

    def patch_lang_tensor(tensor, *scope):
        original(tensor, *scope)
        if scope:  # Triton 3.5-3.7 patch through a scope that undoes it after the launch
            scope[0].set_attr(tensor, "__index__", index)
        else:  # earlier ones patch the class for good
            tensor.__index__ = index

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


_interpreter_numpy_compatibility()

sigmoid = tl.sigmoid


@triton.jit
def tanh(x):
    # Built from exp: libdevice's tanh does not run under the interpreter. exp(-2|x|) never overflows,
    # so saturated pre-activations (|x| ~ 1e4) give exactly ±1. Near 0, (1 - e) / (1 + e) loses the
    # relative accuracy of exp's rounding, so |x| < 0.125 uses the odd Taylor series to x⁹ instead
    # (truncation < 2e-11 relative there).
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    from_exp = (1.0 - e) / (1.0 + e)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    magnitude = tl.where(a < 0.125, series, from_exp)
    return tl.where(x >= 0, magnitude, -magnitude)


@triton.jit
def grid_barrier(counter_ptr, target, failed_ptr, SPIN_LIMIT: tl.constexpr):
    """Waits until ``target`` arrivals have been counted at ``counter_ptr``, after arriving once; gives
    up after ``SPIN_LIMIT`` polls, sets ``*failed_ptr`` and returns True (False once passed).

    Arrive: the CTA barrier orders every thread's earlier stores before thread 0's gpu-scope release add
    (release is cumulative in the PTX memory model, so it publishes them all). Wait: spin on an acquire
    read, which pairs with the other programs' releases; the CTA barrier after it extends the acquire
    to every thread of the program. The counter only grows (targets are programs × steps done), so it is
    zeroed once per launch, never inside one. Every program must be co-resident (a cooperative launch):
    a program spinning here waits for all the others to arrive.

    The bound: if the grid is not all resident after all (MPS, a virtualized GPU, a debugger), waiting
    forever would hang the process; one poll is an L2 round trip (~0.5–1 µs), so the default bound of
    2²⁵ polls gives up after tens of seconds, far beyond any real step. The caller then stops waiting at
    barriers and poisons its outputs, and the launcher reports the flag (``BarrierWatch``).

    After the barrier, plain loads of what other programs stored before it are correct by the PTX memory
    model (release → acquire → CTA barrier), L1 or not; the kernels still read such data with ".cg"
    (L2 only) as a second guard, except where Triton stages fp32 dot operands through cp.async, which
    drops the cache modifier.
    """
    barrier_arrive(counter_ptr)
    return wait_for(counter_ptr, target, failed_ptr, SPIN_LIMIT)


@triton.jit
def barrier_arrive(counter_ptr):
    """``grid_barrier``'s arrival alone (a program that has work to do before it waits): every thread's
    stores so far are published with the counter's increment."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def wait_for(counter_ptr, target, failed_ptr, SPIN_LIMIT: tl.constexpr):
    """Waits, without arriving, until the barrier counter at ``counter_ptr`` (another group of programs')
    has reached ``target``: their stores before their arrivals are then visible to this program (the
    acquire and CTA barrier of ``grid_barrier``'s wait, which is this). Gives up as ``grid_barrier`` does."""
    polls = 0
    while (tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target) & (polls < SPIN_LIMIT):
        polls += 1
    tl.debug_barrier()
    gave_up = polls >= SPIN_LIMIT
    if gave_up:
        tl.atomic_xchg(failed_ptr, 1)
    return gave_up


# Polls before a grid barrier gives up (see grid_barrier); a module constant so that tests can lower it.
BARRIER_SPIN_LIMIT = 1 << 25


class BarrierWatch:
    """Reports persistent launches whose grid barrier gave up, without a host sync per launch.

    After each launch, the launch's failure flag is copied (non-blocking) into pinned host memory behind
    a CUDA event; ``check()`` — called before every persistent launch — reads the flags of launches that
    have finished and raises for any that failed. So a failure surfaces at the next launch (its own
    outputs already hold NaN). Under the interpreter the flag is read at once. During CUDA graph capture
    nothing is watched (the captured launches' flags are not read). The pinned copy is read with
    ``.numpy()`` once its event has completed: a plain CPU read, no device sync. ``what`` describes the
    launch for the error message: a string, or a function returning one, called only if it failed (a
    plan's repr costs microseconds of host time on every launch otherwise).
    """

    def __init__(self) -> None:
        self._pending: list[tuple[object, torch.Tensor, str | Callable[[], str]]] = []

    def watch(self, failed: torch.Tensor, what: str | Callable[[], str]) -> None:
        if failed.device.type != "cuda":
            # The interpreter: the launch ran synchronously on the CPU, nothing to wait for.
            if failed.numpy()[0]:
                raise RuntimeError(self._message(what))
            return
        if torch.cuda.is_current_stream_capturing():
            return
        host = torch.empty(1, dtype=failed.dtype, pin_memory=True)
        host.copy_(failed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, host, what))

    def check(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return  # querying an event is not permitted while the stream captures a graph; checked later
        pending, self._pending = self._pending, []
        for index, (event, host, what) in enumerate(pending):
            if not event.query():
                self._pending.append((event, host, what))
            elif host.numpy()[0]:
                self._pending.extend(pending[index + 1:])
                raise RuntimeError(self._message(what))

    @staticmethod
    def _message(what: str | Callable[[], str]) -> str:
        what = what if isinstance(what, str) else what()
        return (
            f"triton_lstm: a grid barrier of {what} gave up waiting: the programs of a persistent launch were "
            "not all running at once (a GPU shared through MPS, a virtualized GPU, a debugger?). That "
            "launch's outputs are invalid (NaN). Set TRITON_LSTM_PERSISTENT=0 (forward) and "
            "TRITON_LSTM_PERSISTENT_BWD=0 (backward) to use one launch per time step instead."
        )


barrier_watch = BarrierWatch()


@triton.jit
def recurrent_product_resident(h_prev_ptr, rows, mask_b, offs_k, w_i, w_f, w_g, w_o, K: tl.constexpr,
                               DOT_PRECISION: tl.constexpr, GATES: tl.constexpr, GATE_BIT: tl.constexpr = 0):
    """h_{t-1}·W_hhᵀ for one tile, per gate, from the program's resident W_hh slice (``w_*``: K × BLOCK_H,
    ``offs_k`` the whole K padded). Rows past B and columns past K load as zeros: that is how tl.dot's
    16-wide minimum pads. h_{t-1} was written by other programs: ".cg" loads skip L1. ``GATES``: 4 (the
    LSTM's i, f, g, o) or 3 (the GRU's r, z, n; the fourth accumulator stays zero and ``w_o`` is unread).
    ``GATE_BIT`` > 0: ``w_i`` is the four gates' interleaved K × 4·BLOCK_H slice (``interleaved_gate_rows``),
    one dot for all of them; ``w_f``, ``w_g``, ``w_o`` are unread."""
    BLOCK_H: tl.constexpr = w_i.shape[1] // 4 if GATE_BIT > 0 else w_i.shape[1]
    zero = tl.zeros((rows.shape[0], BLOCK_H), dtype=tl.float32)
    return accumulate_product_resident(zero, zero, zero, zero, h_prev_ptr, rows, mask_b, offs_k, w_i, w_f, w_g, w_o,
                                       K, DOT_PRECISION, GATES, GATE_BIT)


@triton.jit
def accumulate_product_resident(acc_i, acc_f, acc_g, acc_o, h_prev_ptr, rows, mask_b, offs_k, w_i, w_f, w_g, w_o,
                                K: tl.constexpr, DOT_PRECISION: tl.constexpr, GATES: tl.constexpr,
                                GATE_BIT: tl.constexpr = 0):
    """``recurrent_product_resident`` added onto the accumulators ``acc_*`` (a stack's layer adds its input
    product and its recurrent product onto its gate inputs)."""
    h_blk = tl.load(
        h_prev_ptr + rows[:, None] * K + offs_k[None, :],
        mask=mask_b[:, None] & (offs_k < K)[None, :],
        other=0.0,
        cache_modifier=".cg",
    )
    if GATE_BIT > 0:
        product = tl.dot(h_blk, w_i, input_precision=DOT_PRECISION)
        p_i, p_f, p_g, p_o = split_interleaved_gates(product, rows.shape[0], w_i.shape[1] // 4, GATE_BIT)
        acc_i, acc_f, acc_g, acc_o = acc_i + p_i, acc_f + p_f, acc_g + p_g, acc_o + p_o
    else:
        acc_i = tl.dot(h_blk, w_i, acc_i, input_precision=DOT_PRECISION)
        acc_f = tl.dot(h_blk, w_f, acc_f, input_precision=DOT_PRECISION)
        acc_g = tl.dot(h_blk, w_g, acc_g, input_precision=DOT_PRECISION)
        if GATES == 4:
            acc_o = tl.dot(h_blk, w_o, acc_o, input_precision=DOT_PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def recurrent_product_streamed(
    h_prev_ptr,
    w_hh_ptr,
    rows,
    mask_b,
    offs_h,
    mask_h,
    H: tl.constexpr,
    K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATES: tl.constexpr,
    GATE_BIT: tl.constexpr = 0,
):
    """h_{t-1}·W_hhᵀ for one (batch block × hidden block) tile, per gate, reading W_hh in BLOCK_K chunks.

    ``h_prev_ptr`` points at h_{t-1} (B, K). Rows past B and columns past K load as zeros, so tl.dot's
    16-wide minimum pads B and K. h_{t-1} was written by other programs: ".cg" loads skip L1, which is
    not coherent across SMs. Returns the four fp32 accumulators (i, f, g, o); with ``GATES`` = 3 (a GRU's
    (3H, K) W_hh: r, z, n) the fourth stays zero.
    """
    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    return accumulate_product_streamed(zero, zero, zero, zero, h_prev_ptr, w_hh_ptr, rows, mask_b, offs_h, mask_h, H, K,
                                       DOT_PRECISION, BLOCK_K, GATES, GATE_BIT)


@triton.jit
def accumulate_product_streamed(acc_i, acc_f, acc_g, acc_o, h_prev_ptr, w_ptr, rows, mask_b, offs_h, mask_h,
                                H: tl.constexpr, K: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                                GATES: tl.constexpr, GATE_BIT: tl.constexpr = 0):
    """``recurrent_product_streamed`` added onto the accumulators ``acc_*``: h·Wᵀ for any (B, K) h and
    (4H, K) W (a stack's layer adds its input product and its recurrent product onto its gate inputs).
    ``GATE_BIT`` > 0: one dot per K chunk for the four gates (``interleaved_gate_rows``), not four."""
    if GATE_BIT > 0:
        BLOCK_B: tl.constexpr = rows.shape[0]
        BLOCK_H: tl.constexpr = offs_h.shape[0]
        # offs_h is the hidden block's units in order: its first one places the block.
        gate, unit = interleaved_gate_rows(tl.min(offs_h, axis=0), BLOCK_H, GATE_BIT)
        w_rows = (gate * H + unit).to(tl.int64)[None, :] * K
        mask_n = (unit < H) & (gate < GATES)  # a GRU's fourth gate: zero columns
        acc = tl.zeros((BLOCK_B, 4 * BLOCK_H), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            h_blk = tl.load(h_prev_ptr + rows[:, None] * K + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :],
                            other=0.0, cache_modifier=".cg")
            w_blk = tl.load(w_ptr + w_rows + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(h_blk, w_blk, acc, input_precision=DOT_PRECISION)
        p_i, p_f, p_g, p_o = split_interleaved_gates(acc, BLOCK_B, BLOCK_H, GATE_BIT)
        acc_i, acc_f, acc_g, acc_o = acc_i + p_i, acc_f + p_f, acc_g + p_g, acc_o + p_o
    else:
        w_cols = offs_h.to(tl.int64)[None, :] * K  # W row j is gate unit j; the dot needs its transpose
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            h_blk = tl.load(
                h_prev_ptr + rows[:, None] * K + offs_k[None, :],
                mask=mask_b[:, None] & mask_k[None, :],
                other=0.0,
                cache_modifier=".cg",
            )
            # W is read-only while the kernel runs: its loads may use L1.
            w_ptrs = w_ptr + w_cols + offs_k[:, None]
            w_mask = mask_k[:, None] & mask_h[None, :]
            acc_i = tl.dot(h_blk, tl.load(w_ptrs, mask=w_mask, other=0.0), acc_i, input_precision=DOT_PRECISION)
            acc_f = tl.dot(h_blk, tl.load(w_ptrs + H * K, mask=w_mask, other=0.0), acc_f, input_precision=DOT_PRECISION)
            acc_g = tl.dot(h_blk, tl.load(w_ptrs + 2 * H * K, mask=w_mask, other=0.0), acc_g, input_precision=DOT_PRECISION)
            if GATES == 4:
                acc_o = tl.dot(h_blk, tl.load(w_ptrs + 3 * H * K, mask=w_mask, other=0.0), acc_o,
                               input_precision=DOT_PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def interleaved_gate_rows(h_start, BLOCK_H: tl.constexpr, GATE_BIT: tl.constexpr):
    """The (gate, hidden unit) of each column of a gate-interleaved product: one (BLOCK_B × 4·BLOCK_H)
    dot for the four gates of hidden units h_start … h_start + BLOCK_H − 1, where separate dots would
    be four narrow ones (N = BLOCK_H: a quarter of the tensor-core instructions per dot, and on sm_90 no
    warp left to repeat another's rows). Column n's bit 0 and bit ``GATE_BIT`` are the gate's low and
    high bits (i, f, g, o = 0, 1, 2, 3); its other bits, in order, the unit. Placing the gate bits where
    the MMA layout keeps columns in one thread (bit 0: the two columns a thread holds; ``GATE_BIT``: a
    register bit of the layout, ``forward_plans.gate_bit``) makes ``split_interleaved_gates`` free of
    data movement. Any ``GATE_BIT`` in 1 … log2(4·BLOCK_H) − 1 computes the same product."""
    n = tl.arange(0, 4 * BLOCK_H)
    LOW: tl.constexpr = 1 << GATE_BIT
    gate = ((n // LOW) % 2) * 2 + n % 2
    unit = h_start + (n // (2 * LOW)) * (LOW // 2) + (n % LOW) // 2
    return gate, unit


@triton.jit
def split_interleaved_gates(acc, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, GATE_BIT: tl.constexpr):
    """The four (BLOCK_B × BLOCK_H) gate tiles (i, f, g, o) of a gate-interleaved product's accumulator
    (columns as ``interleaved_gate_rows`` orders them)."""
    LOW: tl.constexpr = 1 << GATE_BIT
    # Column bits (high → low): unit's high bits, gate's high bit, unit's low bits, gate's low bit.
    split = tl.reshape(acc, (BLOCK_B, 4 * BLOCK_H // (2 * LOW), 2, LOW // 2, 2))
    split = tl.reshape(tl.permute(split, (0, 1, 3, 2, 4)), (BLOCK_B, BLOCK_H, 2, 2))
    low_0, low_1 = tl.split(split)  # gate low bit 0: (i, g); 1: (f, o)
    acc_i, acc_g = tl.split(low_0)
    acc_f, acc_o = tl.split(low_1)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def load_gate_inputs(projected_ptr, step, B, rows, offs_h, mask_bh, H: tl.constexpr, GATES: tl.constexpr,
                     SAVE: tl.constexpr):
    """This tile's slice of the input projection at ``step`` (x_t·W_ihᵀ + biases), per gate, in fp32.
    It does not depend on h, so the persistent kernel loads step t+1's before it waits at the barrier.
    ``GATES`` = 3: a GRU's projection (r, z, n), the fourth value zero.

    Its rows: in a training forward (``SAVE``) the gate buffer's, 4H wide, which the kernel overwrites
    with the gates (a GRU's 3H-wide projection in their first 3H columns: ``lstm_fwd.in_gate_layout``);
    in an inference forward, which keeps no gates, GATES·H wide."""
    width: tl.constexpr = 4 * H if SAVE else GATES * H
    # Two spellings of one offset, because ptxas allocates registers differently for them: as a sum of
    # products the GRU's streamed gate-dot plans that loop over hidden blocks spill 40 bytes at 168
    # registers (Triton 3.9, H = 2048), as one product the LSTM's stacked peephole plans spill 40 bytes
    # (Triton 3.4, H = 2048); each cell takes the one that builds clean (benchmarks/compile_check.py).
    if GATES == 4:
        x_ptrs = projected_ptr + step * B * width + rows[:, None] * width + offs_h[None, :]
    else:
        x_ptrs = projected_ptr + (step * B + rows[:, None]) * width + offs_h[None, :]
    return load_gates(x_ptrs, mask_bh, H, GATES)


@triton.jit
def load_gates(ptrs, mask, H: tl.constexpr, GATES: tl.constexpr):
    """``load_four_gates``, or with ``GATES`` = 3 (a GRU's r, z, n) the three and a zero fourth."""
    if GATES == 4:
        return load_four_gates(ptrs, mask, H)
    else:
        x_r = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x_z = tl.load(ptrs + H, mask=mask, other=0.0).to(tl.float32)
        x_n = tl.load(ptrs + 2 * H, mask=mask, other=0.0).to(tl.float32)
        return x_r, x_z, x_n, tl.zeros_like(x_n)


@triton.jit
def load_four_gates(ptrs, mask, H: tl.constexpr):
    """The four gates' tiles at ``ptrs`` (gate i's columns) and H, 2H, 3H after them, in fp32."""
    x_i = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x_f = tl.load(ptrs + H, mask=mask, other=0.0).to(tl.float32)
    x_g = tl.load(ptrs + 2 * H, mask=mask, other=0.0).to(tl.float32)
    x_o = tl.load(ptrs + 3 * H, mask=mask, other=0.0).to(tl.float32)
    return x_i, x_f, x_g, x_o


@triton.jit
def c_slot(step, SAVE: tl.constexpr):
    """Where c after ``step`` steps lives: every step's c when SAVE (the backward needs them), else two
    slots used in turn (an inference forward keeps nothing per step)."""
    if SAVE:
        return step
    else:
        return step % 2


@triton.jit
def load_own_state(h_ptr, c_ptr, step, B, rows, offs_h, mask_bh, H: tl.constexpr, K: tl.constexpr, LOAD_H: tl.constexpr,
                   SAVE: tl.constexpr):
    """(h_{t-1}, c_{t-1}) of this tile in fp32, from the buffers (for kernels that do not keep them in
    registers across steps). h is read only with LOAD_H (K == H); c otherwise stands in for it."""
    state_offs = rows[:, None] * H + offs_h[None, :]
    # c_{t-1} of these units was written by this same program; ".cg" keeps the read off L1 all the same.
    c_prev = tl.load(c_ptr + c_slot(step, SAVE) * B * H + state_offs, mask=mask_bh, other=0.0, cache_modifier=".cg")
    h_prev = c_prev
    if LOAD_H:
        h_prev = tl.load(h_ptr + step * B * K + state_offs, mask=mask_bh, other=0.0, cache_modifier=".cg").to(tl.float32)
    return h_prev, c_prev


def refused_cooperative_launch(error: RuntimeError) -> bool:
    """Whether a launch failed because the driver would not start a cooperative grid ("too many blocks in
    cooperative launch": it cannot all be resident at once). Nothing ran; the caller may launch per step."""
    return "cooperative" in str(error)


def unless_refused(launch):
    """``launch()``'s result, or None where its kernel did not fit the device (OutOfResources while
    loading it) or the driver refused its cooperative grid: both before anything ran, so the caller can
    fall back to more launches."""
    try:
        return launch()
    except OutOfResources:
        return None
    except RuntimeError as error:
        if not refused_cooperative_launch(error):
            raise
        return None


def dot_precision(dtype: torch.dtype, exact_fp32: str = "ieee") -> str:
    """tl.dot's input_precision: fp32 dots are TF32 where PyTorch allows TF32 for matmuls, else
    ``exact_fp32`` ("ieee": FMA units; "tf32x3": three TF32 tensor-core products, fp32-level accuracy).
    16-bit dots ignore it."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else exact_fp32
    return "ieee"
