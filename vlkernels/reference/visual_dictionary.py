"""Reference of SOHO's visual dictionary: nearest entry by squared L2 and the moving-average update."""
from __future__ import annotations

from typing import Optional

import torch

from vlkernels._deterministic import is_deterministic


def vd_nearest(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [N, D], codebook: [K, D] -> (index [N] int64, sqdist [N] float32, or float64 for float64 inputs).

    The nearest entry by squared L2 distance, the lowest index on ties, as SOHO computes it:
    |x|^2 + (|e|^2 - 2 x.e) (accumulated in fp32, or fp64 for fp64 inputs), a block of rows at a
    time so the distances never take more than 64 MiB. torch.min's NaN rule: a row with a NaN
    distance gets its first NaN entry, with sqdist NaN.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, codebook = x.to(acc), codebook.to(acc)
    code_sqnorm = codebook.square().sum(1)

    def nearest(rows):
        sqdist, index = (rows.square().sum(1, keepdim=True) + (code_sqnorm - 2 * rows @ codebook.T)).min(1)
        return index, sqdist

    rows_per_chunk = max(1, 2**24 // max(1, codebook.shape[0]))  # bounds the distance block to 64 MiB (fp32)
    # No out= (torch.func.vmap has no batching rule for it), and one block whenever the rows fit:
    # torch.compile(dynamic=True) then guards on N <= rows_per_chunk only, not on N.
    if x.shape[0] <= rows_per_chunk:
        return nearest(x)
    index, sqdist = zip(*(nearest(chunk) for chunk in x.split(rows_per_chunk)))
    return torch.cat(index), torch.cat(sqdist)


def vd_cluster_statistics(x: torch.Tensor, index: torch.Tensor, num_embeddings: int,
                          mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [N, D], index: [N], mask: [N] bool (True = counted) -> (counts [K], sums [K, D]) in fp32
    (fp64 for fp64 x): how many rows chose each entry and the sum of those rows.

    Masked-out rows go to an extra last bucket that is dropped: they are not read into any
    entry (their index may lie out of range, a NaN in them stays out), as in the kernels.

    index_add_ (float atomics on CUDA: the order of the additions varies from run to run), or in
    vlkernels' deterministic mode a segmented sum over the rows sorted by entry (fixed order)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    buckets = num_embeddings + 1
    bucket = index if mask is None else torch.where(mask, index, num_embeddings)
    ones = torch.ones(x.shape[0], dtype=acc, device=x.device)
    if is_deterministic():
        counts, sums = _sorted_cluster_statistics(x.to(acc), ones, bucket, buckets)
    else:
        counts = torch.zeros(buckets, dtype=acc, device=x.device).index_add_(0, bucket, ones)
        sums = torch.zeros(buckets, x.shape[1], dtype=acc, device=x.device).index_add_(0, bucket, x.to(acc))
    return counts[:num_embeddings], sums[:num_embeddings]


def _sorted_cluster_statistics(rows: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
                               num_embeddings: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weights [K], sum of rows [K, D]) by entry: a stable sort by entry, then one
    segment per entry summed in row order."""
    sorted_index, order = torch.sort(index, stable=True)
    bounds = torch.arange(num_embeddings + 1, device=index.device, dtype=index.dtype)
    lengths = torch.searchsorted(sorted_index, bounds).diff()  # rows of each entry
    return (torch.segment_reduce(weights[order], "sum", lengths=lengths),
            torch.segment_reduce(rows[order], "sum", lengths=lengths, axis=0))


def vd_apply_statistics_(codebook: torch.Tensor, cluster_size: torch.Tensor, embed_avg: torch.Tensor,
                         counts: torch.Tensor, sums: torch.Tensor, *, decay: float, eps: float = 1e-5) -> None:
    """SOHO's moving-average step, in place, from one step's counts [K] and sums [K, D]:
    cluster_size <- d*cluster_size + (1-d)*counts;  embed_avg <- d*embed_avg + (1-d)*sums;
    n = (cluster_size + eps) / (sum(cluster_size) + K*eps) * sum(cluster_size);  codebook = embed_avg / n,
    except where n is 0 (sum(cluster_size) = 0: no row counted yet), where the entry is kept.
    """
    cluster_size.mul_(decay).add_(counts.to(cluster_size.dtype), alpha=1 - decay)
    embed_avg.mul_(decay).add_(sums.to(embed_avg.dtype), alpha=1 - decay)
    total = cluster_size.sum()
    smoothed = ((cluster_size + eps) / (total + cluster_size.numel() * eps) * total)[:, None]
    # n == 0 is False for NaN: a NaN state propagates into the codebook.
    codebook.copy_(torch.where(smoothed == 0, codebook, embed_avg / smoothed))


def sum_across_processes(counts: torch.Tensor, sums: torch.Tensor, sync: bool = True,
                         process_group=None) -> None:
    """All-reduce one step's counts and sums over ``process_group`` (None: the default group) when
    ``sync`` and torch.distributed is initialised: every process of the group then updates its
    dictionary from the statistics of the group's whole batch."""
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts, group=process_group)
        torch.distributed.all_reduce(sums, group=process_group)


def vd_ema_update_(codebook, cluster_size, embed_avg, x, index, *, decay, eps=1e-5, mask=None, sync=True,
                   process_group=None) -> None:
    """codebook: [K, D], cluster_size: [K], embed_avg: [K, D] updated in place from x: [N, D],
    index: [N] (x's nearest entries) and mask: [N] bool (rows to count). With torch.distributed
    initialised and ``sync``, the counts and sums are all-reduced first over ``process_group``
    (None: the default group), so every process gets the same dictionary as one process on the
    group's whole batch."""
    counts, sums = vd_cluster_statistics(x, index, codebook.shape[0], mask)
    sum_across_processes(counts, sums, sync, process_group)
    vd_apply_statistics_(codebook, cluster_size, embed_avg, counts, sums, decay=decay, eps=eps)
