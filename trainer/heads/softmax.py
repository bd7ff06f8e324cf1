"""Margin softmax across class shards, fused and chunked (docs/design.md §1-2).

For the global batch ``x`` (N rows, raw embeddings) and this rank's class
centres, computes per row i

    lse_i    = log sum_c exp(z_ic)      over the classes of ALL ranks
    target_i = z_{i, y_i}               (lives on exactly one rank)

with ``z_ic = s * cos_ic`` and ``z_{i,y_i} = s * f(cos_{i,y_i})``. Max and sum of
the softmax are combined with one all-reduce MAX and one all-reduce SUM.

Half-width state (a bfloat16 ``weight``): centres are widened to float32 a
chunk at a time and normalised there; the three GEMMs (logits, dL/dx^,
dL/dw^) take bfloat16 operands with float32 accumulation and result; the
margin, softmax and normalisation math stay in float32. The centre gradient
is stored in the weight's dtype (bfloat16: rounded to nearest, relative error
2^-9; the optimizer adds it in float32).

Memory: centres are visited in chunks and the [N, chunk] logits are recomputed
in the backward pass instead of being stored, so the extra memory is one chunk
plus the gradient of the centres actually used. With a list of sampled rows the
centre gradient is returned as a sparse COO tensor holding only those rows
(Partial FC: nothing is done per step for the other centres).

Backward (chain rule written out, g = incoming gradients, replicated on ranks):
    dL/dz_ic        = g_lse_i * softmax_ic + [c == y_i] * g_target_i
    dL/dcos_ic      = s * dL/dz_ic           (target: s * f'(cos) * dL/dz)
                      zeroed where the raw cosine was clamped
    dL/dx^, dL/dw^  = dcos @ w^,  dcos^T @ x^
    dL/dx           = (g - x^ <x^, g>) / |x|     (normalisation Jacobian)
The gradient w.r.t. ``x`` is this rank's share; the caller's all-gather sums
the shares of all ranks.

Margin hooks (``margins.Margin`` defaults are no-ops; ``adaptive.py`` uses them):
``cos_eps`` clamps every cosine to [-1 + eps, 1 - eps]; ``prepare(|x|, c_y)``
runs once per forward on the global batch (running statistics, per-row
margins); ``target_value``/``target_grads`` give f and (df/dc, df/d|x|) per row;
with ``needs_target_cos`` every row's target cosine is computed by its owner
and shared by one all-reduce SUM before the logit pass; ``modulates_negatives``
maps every non-target cosine (value and derivative). A norm-dependent target
adds ``s * df/d|x| * dL/dz_target * x^`` to dL/dx.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Tuple, cast

import torch

from trainer.collectives import ProcessGroup, all_reduce_, world_info
from trainer.heads.margins import Prep, SoftmaxMargin

_NORM_EPS = 1e-12


def _mm(a: torch.Tensor, b: torch.Tensor, low: Optional[torch.dtype]) -> torch.Tensor:
    """``a @ b`` in ``a``'s dtype; with ``low`` (bfloat16 state) the operands are rounded to
    ``low`` and the products summed in float32 (float32 result).

    CUDA: one ``torch.mm(..., out_dtype=float32)`` (bf16 tensor cores, fp32 accumulation).
    Elsewhere the rounded operands are widened back: the same products (a product of two
    bfloat16 values is exact in float32) summed in float32.
    """
    if low is None:
        return a @ b
    a_low, b_low = a.to(low), b.to(low)
    if a.is_cuda and _CUDA_MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a_low, b_low, out_dtype=a.dtype)
        except (RuntimeError, TypeError, NotImplementedError):
            _CUDA_MM_OUT_DTYPE[0] = False  # an older build: fall through, once
    return a_low.to(a.dtype) @ b_low.to(a.dtype)


_CUDA_MM_OUT_DTYPE = [True]


def _row_norm(t: torch.Tensor) -> torch.Tensor:
    """``|t_i|`` per row, [N, 1] (``Tensor.norm`` is partly unannotated in torch: one typed door)."""
    return cast(torch.Tensor, t.norm(dim=1, keepdim=True))  # pyright: ignore[reportUnknownMemberType]


def _sparse_rows(rows: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The sparse COO gradient holding ``values`` at the sorted, distinct ``rows`` (one typed door)."""
    return torch.sparse_coo_tensor(  # pyright: ignore[reportUnknownMemberType]
        rows.unsqueeze(0), values, shape, is_coalesced=True, check_invariants=False)


def _normalise(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    norm = _row_norm(t).clamp_min(_NORM_EPS)
    return t / norm, norm


def _vecdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product (``torch.linalg.vecdot``, unannotated in torch: one typed door)."""
    return cast(torch.Tensor, torch.linalg.vecdot(a, b))  # pyright: ignore[reportUnknownMemberType]


def _unnormalise_grad_(g_hat: torch.Tensor, t_hat: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Gradient through ``t_hat = t / |t|`` (row-wise), computed in place in ``g_hat``."""
    dot = _vecdot(t_hat, g_hat).unsqueeze(1)
    return g_hat.addcmul_(t_hat, dot, value=-1.0).div_(norm)


class _Chunks:
    """Iterates the centres used this step in chunks: ``(k0, k1, w_hat, w_norm)``."""

    def __init__(self, weight: torch.Tensor, rows: Optional[torch.Tensor], chunk: int, dtype: torch.dtype) -> None:
        self.weight, self.rows, self.chunk, self.dtype = weight, rows, chunk, dtype
        self.count = weight.shape[0] if rows is None else rows.numel()

    def __iter__(self) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
        for k0 in range(0, self.count, self.chunk):
            k1 = min(k0 + self.chunk, self.count)
            if self.rows is None:
                w = self.weight[k0:k1]
            else:
                w = self.weight.index_select(0, self.rows[k0:k1])
            w_hat, w_norm = _normalise(w.to(self.dtype))
            yield k0, k1, w_hat, w_norm


def _all_target_cos(x_hat: torch.Tensor, weight: torch.Tensor, rows: Optional[torch.Tensor], target_pos: torch.Tensor,
                    group: ProcessGroup, lo_c: float, hi_c: float) -> torch.Tensor:
    """Every row's clamped target cosine on every rank: the owner computes it, one all-reduce SUM."""
    owned = target_pos >= 0
    n_used = weight.shape[0] if rows is None else rows.numel()
    if n_used == 0:
        out = torch.zeros(x_hat.shape[0], dtype=x_hat.dtype, device=x_hat.device)
    else:
        pos = target_pos.clamp(0, n_used - 1)
        w = weight.index_select(0, pos if rows is None else rows.index_select(0, pos))
        w_hat, _ = _normalise(w.to(x_hat.dtype))
        cos = _vecdot(x_hat, w_hat).clamp_(lo_c, hi_c)
        out = torch.where(owned, cos, torch.zeros_like(cos))
    return all_reduce_(out, "sum", group)  # a no-op in one process


def _targets_in_chunk(target_pos: torch.Tensor, k0: int, k1: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(hit [N] bool, col [N, 1])``: rows whose target lies in chunk ``[k0, k1)`` and its
    column there (clamped into the chunk for the other rows, whose entries are
    gathered and written back unchanged): fixed shapes, no ``nonzero``."""
    hit = (target_pos >= k0) & (target_pos < k1)
    return hit, (target_pos - k0).clamp(0, k1 - k0 - 1).unsqueeze(1)


def _put_targets_(block: torch.Tensor, hit: torch.Tensor, col: torch.Tensor, values: torch.Tensor) -> None:
    """``block[i, col_i] = values_i`` for the rows with ``hit``; others keep their entry."""
    current = block.gather(1, col).squeeze(1)
    block.scatter_(1, col, torch.where(hit, values, current).unsqueeze(1))


class MarginSoftmaxParts(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        global_x: torch.Tensor,
        weight: torch.Tensor,
        rows: Optional[torch.Tensor],
        target_pos: torch.Tensor,
        margin: SoftmaxMargin,
        group: ProcessGroup,
        chunk: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        dtype = global_x.dtype
        s = margin.s
        lo_c, hi_c = -1.0 + margin.cos_eps, 1.0 - margin.cos_eps
        x_hat, x_norm = _normalise(global_x)
        n = x_hat.shape[0]
        owned = target_pos >= 0
        all_target_cos: Optional[torch.Tensor] = None
        if margin.needs_target_cos:
            all_target_cos = _all_target_cos(x_hat, weight.detach(), rows, target_pos, group, lo_c, hi_c)
        # Running state updated once per forward (global batch, identical on every rank).
        prep = margin.prepare(x_norm.squeeze(1), all_target_cos)
        run_max = torch.full((n,), float("-inf"), dtype=dtype, device=x_hat.device)
        run_sum = torch.zeros(n, dtype=dtype, device=x_hat.device)
        target_cos = torch.zeros(n, dtype=dtype, device=x_hat.device)
        low = weight.dtype if weight.dtype == torch.bfloat16 else None  # GEMM operand dtype
        for k0, k1, w_hat, _ in _Chunks(weight.detach(), rows, chunk, dtype):
            logits = _mm(x_hat, w_hat.t(), low).clamp_(lo_c, hi_c)
            hit, col = _targets_in_chunk(target_pos, k0, k1)
            cos_t = logits.gather(1, col).squeeze(1) if all_target_cos is None else all_target_cos
            target_cos = torch.where(hit, cos_t, target_cos)
            if margin.modulates_negatives:
                logits = margin.negatives(logits, prep, need_grad=False)[0]
            logits.mul_(s)
            _put_targets_(logits, hit, col, s * margin.target_value(cos_t, None, prep))
            new_max = torch.maximum(run_max, logits.max(dim=1).values)
            run_sum.mul_(torch.exp(run_max - new_max))
            run_sum.add_(logits.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1))
            run_max = new_max
        target = torch.where(owned, s * margin.target_value(target_cos, None, prep), torch.zeros_like(target_cos))

        _, world = world_info(group)
        if world > 1:
            global_max = all_reduce_(run_max.clone(), "max", group)
            # exp(-inf - finite) = 0 for an empty shard.
            packed = torch.cat([run_sum * torch.exp(run_max - global_max), target])
            all_reduce_(packed, "sum", group)
            run_sum, target = packed[:n], packed[n:]
            run_max = global_max
        lse = run_max + torch.log(run_sum)

        ctx.save_for_backward(x_hat, x_norm, weight, rows, target_pos, target_cos, lse)
        ctx.margin, ctx.chunk, ctx.prep = margin, chunk, prep
        return lse, target

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor
                 ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], None, None, None, None, None]:
        grad_lse, grad_target = grad_outputs
        rows: Optional[torch.Tensor]
        x_hat, x_norm, weight, rows, target_pos, target_cos, lse = ctx.saved_tensors
        margin: SoftmaxMargin = ctx.margin
        s, prep = margin.s, cast(Prep, ctx.prep)
        lo_c, hi_c = -1.0 + margin.cos_eps, 1.0 - margin.cos_eps
        dtype = x_hat.dtype
        need_x, need_w = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        grad_x_hat = torch.zeros_like(x_hat) if need_x else None
        grad_w: Optional[torch.Tensor] = None
        if need_w:
            n_used = weight.shape[0] if rows is None else rows.numel()
            # every row is written chunk by chunk below
            grad_w = torch.empty((n_used, weight.shape[1]), dtype=weight.dtype, device=weight.device)
        owned = target_pos >= 0
        f_prime, f_norm = margin.target_grads(target_cos, prep)
        # dL/dz at the target entry, excluding the softmax part added per chunk.
        grad_target = torch.where(owned, grad_target, torch.zeros_like(grad_target))
        # total dL/dz at each owned target (for the norm term of norm-aware margins)
        grad_z_target = torch.zeros_like(grad_target) if f_norm is not None else None
        target_value_all = margin.target_value(target_cos, None, prep)  # f at every row's target
        low = weight.dtype if weight.dtype == torch.bfloat16 else None

        for k0, k1, w_hat, w_norm in _Chunks(weight.detach(), rows, ctx.chunk, dtype):
            raw = _mm(x_hat, w_hat.t(), low)
            # torch.clamp passes gradient on [lo_c, hi_c] only (cosines of unit vectors leave
            # [-1, 1] by rounding at most; masking always costs no host sync).
            outside = (raw < lo_c) | (raw > hi_c)
            hit, col = _targets_in_chunk(target_pos, k0, k1)
            cos = raw.clamp_(lo_c, hi_c)
            mod_grad: Optional[torch.Tensor] = None
            if margin.modulates_negatives:
                cos, mod_grad = margin.negatives(cos, prep)
            logits = cos.mul_(s)
            _put_targets_(logits, hit, col, s * target_value_all)
            # softmax, times the incoming gradient of lse -> dL/dz
            grad_z = logits.sub_(lse.unsqueeze(1)).exp_().mul_(grad_lse.unsqueeze(1))
            grad_z_t = grad_z.gather(1, col).squeeze(1) + grad_target
            if grad_z_target is not None:
                grad_z_target = torch.where(hit, grad_z_t, grad_z_target)
            grad_cos = grad_z.mul_(s)
            if mod_grad is not None:
                grad_cos.mul_(mod_grad)
            _put_targets_(grad_cos, hit, col, s * f_prime * grad_z_t)
            grad_cos.masked_fill_(outside, 0.0)
            if grad_x_hat is not None:  # need_x
                if low is None:
                    grad_x_hat.addmm_(grad_cos, w_hat)
                else:
                    grad_x_hat.add_(_mm(grad_cos, w_hat, low))
            if grad_w is not None:  # need_w
                grad_w_hat = _mm(grad_cos.t(), x_hat, low)
                grad_w[k0:k1] = _unnormalise_grad_(grad_w_hat, w_hat, w_norm)

        grad_x = _unnormalise_grad_(grad_x_hat, x_hat, x_norm) if grad_x_hat is not None else None
        if grad_x is not None and f_norm is not None and grad_z_target is not None:
            # the target logit also depends on |x| (MagFace): d|x|/dx = x^
            grad_x.addcmul_(x_hat, (s * f_norm * grad_z_target).unsqueeze(1))
        if grad_w is not None and rows is not None:
            grad_w = _sparse_rows(rows, grad_w, weight.shape)
        return grad_x, grad_w, None, None, None, None, None


def margin_softmax_parts(
    global_x: torch.Tensor,
    weight: torch.Tensor,
    rows: Optional[torch.Tensor],
    target_pos: torch.Tensor,
    margin: SoftmaxMargin,
    group: ProcessGroup = None,
    chunk: int = 16384,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lse [N], target [N])``, both replicated on every rank. See the module docstring.

    rows: sorted local shard rows used this step (Partial FC sampling), or None for all.
    target_pos: per global row, the position of its class among the used centres
    of THIS rank, or -1 when another rank owns the class.
    """
    apply = cast(Callable[..., Tuple[torch.Tensor, torch.Tensor]],
                 MarginSoftmaxParts.apply)  # pyright: ignore[reportUnknownMemberType]
    return apply(global_x, weight, rows, target_pos, margin, group, int(chunk))
