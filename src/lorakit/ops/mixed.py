"""Many LoRA adapters in one batch, as pure tensor functions: each row b of a batch uses the adapter in slot[b].

    out[b] = base(x[b]) + s_j B_j A_j x[b],    j = slot[b];  slot 0 = no adapter (A_0 = B_0 = 0)

The adapters are stacked and zero-padded to the largest rank (padding adds exact zeros), with the scale folded
into B: A_stack (S, r_max, k), BT_stack (S, r_max, d) = (s_j B_j)ᵀ. Two ways to apply them, after Punica
(Chen et al. 2023, arXiv 2310.18547):

* BGMV (`bgmv_add_`): gather each row's factors, A_rows (N, r_max, k), then two batched GEMMs over the rows.
  It copies N r_max (k + d) weight values per call and nothing of x.
* SGMV (`sgmv_add_`): sort the rows by slot into padded segments, x_seg (S-1, L, T, k), multiply each segment by
  its own slot's factors in place in the stack (no weight copy), and scatter the result back. It copies the rows'
  activations (N T (k + d) values) instead, and skips the rows with no adapter.

Neither loops in Python over adapters or rows. `prefer_segments` picks one (measured on 2 CPU cores).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def stack_factors(
    factors: list[tuple[Tensor, Tensor, float] | None], dtype: torch.dtype, transpose_a: bool = False
) -> tuple[Tensor, Tensor]:
    """Stack adapters (A_j (r_j, k), B_j (d, r_j), s_j) into zero-padded tensors, slot 0 (and None entries) zero.

    Returns:
        A_stack (S, r_max, k) (or (S, k, r_max) with `transpose_a`, the layout an embedding gathers rows from)
        and BT_stack (S, r_max, d) = (s_j B_j)ᵀ, in `dtype`, S = len(factors) + 1. Padding with zeros leaves
        every product unchanged: (s B_j)[:, r_j:] = 0 meets A_j[r_j:] = 0.
    """
    present = [f for f in factors if f is not None]
    if not present:
        raise ValueError("stack_factors needs at least one adapter")
    k, d = present[0][0].shape[1], present[0][1].shape[0]
    r_max = max(a.shape[0] for a, _, _ in present)
    device = present[0][0].device
    a_stack = torch.zeros(len(factors) + 1, r_max, k, dtype=dtype, device=device)
    bt_stack = torch.zeros(len(factors) + 1, r_max, d, dtype=dtype, device=device)
    with torch.no_grad():
        for slot, entry in enumerate(factors, start=1):
            if entry is None:
                continue
            a, b, scale = entry
            r = a.shape[0]
            a_stack[slot, :r].copy_(a)
            bt_stack[slot, :r].copy_(b.t()).mul_(scale)
    if transpose_a:
        a_stack = a_stack.transpose(1, 2).contiguous()  # (S, k, r_max)
    return a_stack, bt_stack


GATHER_LIMIT = 1 << 22  # weight values (N r_max (k + d)) BGMV gathers per call before SGMV can be preferred


def prefer_segments(rows: int, tokens_per_row: int, r_max: int, features: int) -> bool:
    """Whether to use SGMV rather than BGMV for N = `rows` rows of T tokens, `features` = k + d.

    SGMV copies N T (k + d) activation values, BGMV N r_max (k + d) weight values, so SGMV can only win when
    T < r_max (decoding steps: T = 1). Even then BGMV's few large ops beat SGMV's dozen small index ops until
    the gather is large. Measured on 2 CPU cores, k = d = 1024, r = 16, one token per row: 32 rows, 8 adapters:
    BGMV 0.10 ms, SGMV 0.15 ms; 128 rows, 4 adapters: 1.0 vs 0.6 ms; 256 rows, 2 adapters: 30 vs 1.9 ms.
    """
    return tokens_per_row < r_max and rows * r_max * features > GATHER_LIMIT


def bgmv_add_(out: Tensor, x: Tensor, a_stack: Tensor, bt_stack: Tensor, slots: Tensor) -> Tensor:
    """out[b] += x[b] A_jᵀ (s_j B_j)ᵀ with j = slots[b], in place, by batched GEMMs over rows (BGMV).

    Args:
        out: (N, T, d) base output, contiguous, in the stacks' dtype. x: (N, T, k) in the same dtype.
        a_stack: (S, r_max, k). bt_stack: (S, r_max, d). slots: (N,) int64 in [0, S).
    """
    a_rows = a_stack.index_select(0, slots)  # (N, r_max, k)
    bt_rows = bt_stack.index_select(0, slots)  # (N, r_max, d)
    h = torch.bmm(x, a_rows.transpose(1, 2))  # (N, T, r_max)
    return out.baddbmm_(h, bt_rows)


def segment_layout(slots: Tensor, n_slots: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Rows with an adapter, grouped by slot: (rows, segment, position, L).

    rows (M,): the batch rows whose slot is not 0, sorted by slot (stable); segment (M,) = slot - 1;
    position (M,): the row's index inside its segment; L: the longest segment (0 if no row has an adapter).
    """
    rows = torch.nonzero(slots, as_tuple=True)[0]
    row_slots = slots.index_select(0, rows)
    row_slots, order = torch.sort(row_slots, stable=True)
    rows = rows.index_select(0, order)
    counts = torch.bincount(row_slots, minlength=n_slots)[1:]  # (S-1,) rows per adapter slot
    if rows.numel() == 0:
        return rows, row_slots, row_slots, 0
    segment = row_slots - 1
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(rows.numel(), device=slots.device) - starts.index_select(0, segment)
    return rows, segment, position, int(counts.max())


def sgmv_add_(out: Tensor, x: Tensor, a_stack: Tensor, bt_stack: Tensor, slots: Tensor) -> Tensor:
    """out[b] += x[b] A_jᵀ (s_j B_j)ᵀ with j = slots[b], in place, per segment of rows sharing a slot (SGMV).

    The rows are packed into zero-padded segments x_seg (S-1, L T, k), one per adapter slot, so each segment
    multiplies its slot's factors where they lie in the stack; rows of slot 0 are not computed at all.
    Same arguments as `bgmv_add_`.
    """
    n, t, k = x.shape
    n_slots, r_max, d = bt_stack.shape
    rows, segment, position, longest = segment_layout(slots, n_slots)
    if longest == 0:
        return out
    x_seg = x.new_zeros(n_slots - 1, longest, t, k)
    x_seg[segment, position] = x.index_select(0, rows)  # (S-1, L, T, k)
    h = torch.bmm(x_seg.view(n_slots - 1, longest * t, k), a_stack[1:].transpose(1, 2))  # (S-1, L T, r_max)
    y = torch.bmm(h, bt_stack[1:]).view(n_slots - 1, longest, t, d)  # (S-1, L, T, d)
    return out.index_add_(0, rows, y[segment, position])


def embedding_rows_add_(out: Tensor, ids: Tensor, at_stack: Tensor, bt_stack: Tensor, slots: Tensor) -> Tensor:
    """out[b] += A_j[:, ids[b]]ᵀ (s_j B_j)ᵀ with j = slots[b], in place: an embedding adapter per row.

    Args:
        out: (N, T, d) base embeddings, contiguous, in the stacks' dtype. ids: (N, T) token ids.
        at_stack: (S, vocab, r_max) (stack_factors(..., transpose_a=True)). bt_stack: (S, r_max, d).
    """
    h = at_stack[slots.unsqueeze(1), ids]  # (N, T, r_max): row ids[b, t] of A_{slot b}ᵀ
    return out.baddbmm_(h, bt_stack.index_select(0, slots))
