"""Consistent Self-Attention (StoryDiffusion, Zhou et al. 2024, arXiv 2405.01434): token sampling, keys and values
over the other frames of a story, the reference bank, and the sliding window of Algorithm 1. Plain torch.

Notation (paper, Sec. 3.1): I_i are the normed hidden states of frame i in one self-attention layer, S_j the tokens
sampled from frame j, P_i = [I_i ; S_j for the other frames j] and O_i = Attention(Q_i, K_{P_i}, V_{P_i}).
Here the keys and values of every frame are projected once and the sampled rows gathered (exactly equal to
projecting P_i per frame as the reference code does, and cheaper).
"""
from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Sequence

import torch

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_count(n_tokens: int, rate: float) -> int:
    """|S_j| = round(rate * N): the fixed-count form of the reference's Bernoulli(rate) token draw."""
    return max(0, min(n_tokens, int(round(rate * n_tokens))))


def stable_seed(*parts) -> int:
    """A 63-bit seed from ints, floats and strings that is the same in every process (Python's hash() is salted)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        if isinstance(part, float):
            digest.update(struct.pack("<d", part))
        else:
            digest.update(repr(part).encode())
        digest.update(b"|")
    return int.from_bytes(digest.digest(), "little") >> 1


def sample_tokens(n_tokens: int, rate: float, seed: int) -> torch.Tensor:
    """S_j (Sec. 3.1): round(rate * N) token indices of one frame, uniform without replacement, sorted, seeded."""
    count = sample_count(n_tokens, rate)
    if count == n_tokens:
        return torch.arange(n_tokens)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_tokens, generator=generator)[:count].sort().values


def uniform(seed: int) -> float:
    """A deterministic draw in [0, 1) for the reference's random skip of consistency on a layer call."""
    return (seed % (1 << 53)) / float(1 << 53)


def default_attention(heads: int) -> Attention:
    """Multi-head scaled dot-product attention on [B, N, heads * dim] tensors (what the host's attention computes)."""
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, inner = q.shape
        split = [t.reshape(t.shape[0], t.shape[1], heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*split)
        return out.transpose(1, 2).reshape(b, n, inner)
    return attend


def key_value_index(n_tokens: int, own: int, sources: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Rows of P_i in a flat token pool: frame i's own N tokens, then each source's sampled rows (offset, indices)."""
    parts = [torch.arange(n_tokens) + own * n_tokens]
    parts.extend(offset + indices for offset, indices in sources)
    return torch.cat(parts)


def consistent_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention: Attention,
                              sources: Sequence[Sequence[int]], samples: dict[int, torch.Tensor],
                              bank_k: torch.Tensor | None = None, bank_v: torch.Tensor | None = None,
                              bank_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
                              budget_bytes: int | None = None, heads: int = 0) -> torch.Tensor:
    """Eq. (3)-(4): O_i = Attention(Q_i, K[I_i ; S_j, j in sources_i ; bank], V[...]) for every row i of q.

    q: [R, Nq, D], k, v: [R, L, D], projected. The queries may be a subset of a row's tokens (a DiT's image tokens,
    whose keys also hold the frame's own text tokens); every row keeps all L of its own keys. sources[i]: rows
    j != i whose sampled tokens samples[j] (indices into row j's L keys) frame i attends to. bank_k/bank_v: [M, D]
    projected bank tokens; bank_spans[i]: (start, length) slices of them for row i. Rows whose key/value length
    agrees are gathered and attended together; with `budget_bytes`, only as many rows per call as their gathered
    keys and values (and, with `heads`, their fp32 attention logits, for a host attention that makes them) fit in
    (at least one), so memory is bounded whatever the number of frames.
    """
    rows, n_keys, dim = k.shape
    pool_k, pool_v = k.reshape(rows * n_keys, dim), v.reshape(rows * n_keys, dim)
    base = rows * n_keys
    if bank_k is not None and bank_k.shape[0]:
        pool_k, pool_v = torch.cat([pool_k, bank_k.to(k.dtype)]), torch.cat([pool_v, bank_v.to(v.dtype)])
    groups: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for i in range(rows):
        if i in sources[i]:
            raise ValueError(f"consistent self-attention: frame {i} may not sample its own tokens")
        picked = [(j * n_keys, samples[j]) for j in sources[i]]
        for start, length in (bank_spans[i] if bank_spans else ()):
            picked.append((base + start, torch.arange(length)))
        index = key_value_index(n_keys, i, picked)
        groups.setdefault(index.numel(), []).append((i, index))
    if len(groups) == 1 and next(iter(groups)) == n_keys:
        return attention(q, k, v)

    def step(n_keys_of_group: int) -> int:
        return rows if budget_bytes is None else rows_within(budget_bytes, n_keys_of_group, dim, k.element_size(),
                                                             heads * q.shape[1])

    if len(groups) == 1 and step(next(iter(groups))) >= rows:  # the usual batch: one gather, one call, no scatter
        index = torch.stack([ix for _, ix in next(iter(groups.values()))]).to(k.device)
        return attention(q, _gather(pool_k, index), _gather(pool_v, index))
    out = torch.empty_like(q)
    for length, members in groups.items():
        size = step(length)
        for first in range(0, len(members), size):
            chunk = members[first:first + size]
            rows_of = [i for i, _ in chunk]
            index = torch.stack([ix for _, ix in chunk]).to(k.device)
            out[rows_of] = attention(q[rows_of], _gather(pool_k, index), _gather(pool_v, index))
    return out


def consistent_joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention: Attention,
                               sources: Sequence[Sequence[int]], samples: dict[int, torch.Tensor],
                               bank_k: torch.Tensor | None = None, bank_v: torch.Tensor | None = None,
                               bank_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
                               budget_bytes: int | None = None) -> torch.Tensor:
    """The same Eq. (3)-(4) on heads-first tensors, as DiTs hand them over: q [R, H, Nq, D] (a view of the image
    queries is fine), k, v [R, H, L, D], bank_k/bank_v [H, M, D]. Keys of a row are its own L keys followed by the
    sampled keys of its sources and its bank spans, gathered per row (no copy of the whole batch in another
    layout); rows are attended as many per call as `budget_bytes` holds. Returns [R, Nq, H * D] as the host's
    attention does."""
    rows, heads, _, dim = k.shape
    lengths = [k.shape[2] + sum(samples[j].numel() for j in sources[i])
               + sum(length for _, length in (bank_spans[i] if bank_spans else ())) for i in range(rows)]
    for i in range(rows):
        if i in sources[i]:
            raise ValueError(f"consistent self-attention: frame {i} may not sample its own tokens")

    def keys_of(i: int, t: torch.Tensor, bank: torch.Tensor | None) -> torch.Tensor:
        parts = [t[i]] + [t[j].index_select(1, samples[j].to(t.device)) for j in sources[i]]
        parts += [bank[:, start:start + length].to(t.dtype) for start, length in (bank_spans[i] if bank_spans else ())]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    out = None
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length, []).append(i)
    for length, members in groups.items():
        size = rows if budget_bytes is None else rows_within(budget_bytes, length, heads * dim, k.element_size(),
                                                             heads * q.shape[2])
        for first in range(0, len(members), size):
            chunk = members[first:first + size]
            kk = torch.stack([keys_of(i, k, bank_k) for i in chunk])
            vv = torch.stack([keys_of(i, v, bank_v) for i in chunk])
            qq = q[chunk[0]:chunk[-1] + 1] if chunk == list(range(chunk[0], chunk[-1] + 1)) else q[chunk]
            part = attention(qq, kk, vv)
            if len(groups) == 1 and len(chunk) == rows:
                return part
            if out is None:
                out = part.new_empty(rows, *part.shape[1:])
            out[chunk] = part
    return out


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention: Attention,
                     sources: Sequence[Sequence[int]], samples: dict[int, torch.Tensor],
                     sample_labels: dict[int, torch.Tensor], query_labels: Sequence[torch.Tensor],
                     bank_k: torch.Tensor | None = None, bank_v: torch.Tensor | None = None,
                     bank_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
                     bank_labels: torch.Tensor | None = None, share_background: bool = True,
                     heads_first: bool = False) -> torch.Tensor:
    """Bounded sharing: Eq. (3)-(4) where a query of character c reads, beyond its own frame's keys, only the shared
    tokens (other frames' samples, bank) labelled c; background queries (label 0) read background tokens when
    `share_background`; unknown ones (label < 0) their own frame only. No query ever weighs another character's
    shared token: its attention mass there is exactly zero, since those keys are not in its call.

    Layouts as the two kernels above: token-major q [R, Nq, C], k, v [R, L, C], bank [M, C]; or `heads_first`
    q [R, H, Nq, D], k, v [R, H, L, D], bank [H, M, D]. query_labels[i]: [Nq] labels of row i's queries;
    sample_labels[j]: labels of samples[j]; bank_labels: [M]. One host attention call per (row, label) present,
    each over at most that row's own keys and its share of the shared ones (so never more memory than unbounded
    CSA)."""
    axis = 1 if heads_first else 0  # the token axis of one row (and of the bank)
    out = None
    for i in range(len(query_labels)):
        if i in sources[i]:
            raise ValueError(f"consistent self-attention: frame {i} may not sample its own tokens")
        labels = query_labels[i].to(q.device)
        for label in labels.unique().tolist():
            queries = (labels == label).nonzero().flatten()
            keys, values = [k[i]], [v[i]]
            if label > 0 or (label == 0 and share_background):
                for j in sources[i]:
                    picked = samples[j][sample_labels[j] == label].to(k.device)
                    if picked.numel():
                        keys.append(k[j].index_select(axis, picked))
                        values.append(v[j].index_select(axis, picked))
                for start, length in (bank_spans[i] if bank_spans else ()):
                    picked = (bank_labels[start:start + length] == label).nonzero().flatten()
                    if picked.numel():
                        picked = (picked + start).to(k.device)
                        keys.append(bank_k.index_select(axis, picked).to(k.dtype))
                        values.append(bank_v.index_select(axis, picked).to(v.dtype))
            kk = torch.cat(keys, dim=axis) if len(keys) > 1 else keys[0]
            vv = torch.cat(values, dim=axis) if len(values) > 1 else values[0]
            whole = queries.numel() == labels.numel()  # one label in the row: its queries as they are, no copy
            part = attention((q[i] if whole else q[i].index_select(axis, queries))[None], kk[None], vv[None])[0]
            if out is None:
                out = part.new_empty(q.shape[0], q.shape[axis + 1], part.shape[-1])
            if whole:
                out[i] = part
            else:
                out[i].index_copy_(0, queries, part)
            del part, kk, vv, keys, values
    return out


def rows_within(budget_bytes: int, n_keys: int, dim: int, element_size: int, logit_rows: int = 0) -> int:
    """How many rows of gathered keys and values ([rows, n_keys, dim] each), plus `logit_rows` x n_keys fp32 logits
    per row (heads x queries, where the host's attention materialises them), fit a memory budget (at least 1)."""
    per_row = 2 * n_keys * dim * element_size + logit_rows * n_keys * 4
    return max(1, budget_bytes // max(per_row, 1))


def _gather(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """pool[index] for a [G, L] index into [P, D] rows; index_select is about twice as fast as advanced indexing."""
    return torch.index_select(pool, 0, index.flatten()).view(*index.shape, pool.shape[-1])


def sliding_windows(n_frames: int, window: int) -> list[list[int]]:
    """Algorithm 1's windows: W consecutive frames, stride ceil(W / 2), the last one ending at the last frame."""
    if window <= 1 or n_frames <= window:
        return [list(range(n_frames))]
    stride = max(1, math.ceil(window / 2))
    starts = list(range(0, n_frames - window + 1, stride))
    if starts[-1] != n_frames - window:
        starts.append(n_frames - window)
    return [list(range(s, s + window)) for s in starts]


def windowed(rows: int, window: int, run: Callable[[list[int]], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Algorithm 1: run CSA inside each window of frames and average the outputs of the windows covering a frame."""
    windows = sliding_windows(rows, window)
    if len(windows) == 1:
        return run(windows[0])
    total = torch.zeros_like(like)
    count = torch.zeros(rows, dtype=like.dtype, device=like.device)
    for members in windows:
        total[members] += run(members)
        count[members] += 1
    return total / count.view(-1, *([1] * (like.ndim - 1)))


class ReferenceBank:
    """The reference frames' sampled tokens S_j per layer, CFG half and sigma (Sec. 3.1, "reference images").

    Entries are keyed by sigma, not by call count, so samplers that call the model several times per step read the
    step they are at. Stored in `dtype` on `storage` (the CPU by default); `read` streams one layer's entry to the
    device that needs it. `device_budget` bytes may stay on the compute device when storage is "auto".
    """

    def __init__(self, dtype: torch.dtype | None = torch.float16, storage: str = "cpu",
                 device_budget: int = 1 << 30):
        if storage not in ("cpu", "device", "auto"):
            raise ValueError(f"bank storage must be 'cpu', 'device' or 'auto', not {storage!r}")
        self.dtype, self.storage, self.device_budget = dtype, storage, device_budget
        self.entries: dict[tuple, dict[float, dict[int, torch.Tensor]]] = {}
        self.labels: dict[tuple, dict[float, dict[int, torch.Tensor]]] = {}  # identity routing: whose token is it
        self._device_bytes = 0

    def _place(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.detach().to(self.dtype or tokens.dtype)
        keep = self.storage == "device" or (
            self.storage == "auto" and self._device_bytes + tokens.nbytes <= self.device_budget)
        if keep or tokens.device.type == "cpu":
            if tokens.device.type != "cpu":
                self._device_bytes += tokens.nbytes
            return tokens.clone()
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=torch.cuda.is_available())
        host.copy_(tokens)
        return host

    def write(self, layer: tuple, half: int, sigma: float, frame: int, tokens: torch.Tensor,
              labels: torch.Tensor | None = None) -> None:
        """Store S_frame of one layer, CFG half (0 cond, 1 uncond) and step sigma (and, routed, its tokens'
        labels: kept on the CPU as int16)."""
        self.entries.setdefault((layer, half), {}).setdefault(float(sigma), {})[frame] = self._place(tokens)
        if labels is not None:
            self.labels.setdefault((layer, half), {}).setdefault(float(sigma), {})[frame] = \
                labels.detach().to("cpu", torch.int16)

    def frames(self) -> set[int]:
        return {f for by_sigma in self.entries.values() for by_frame in by_sigma.values() for f in by_frame}

    def nearest_sigma(self, layer: tuple, half: int, sigma: float) -> float | None:
        """The stored sigma closest to `sigma` in log space (equal schedules give exact matches)."""
        by_sigma = self.entries.get((layer, half))
        if not by_sigma:
            return None
        return min(by_sigma, key=lambda s: abs(math.log(max(s, 1e-12)) - math.log(max(sigma, 1e-12))))

    def read(self, layer: tuple, half: int, sigma: float, frames: Sequence[int],
             device: torch.device) -> dict[int, torch.Tensor]:
        """The stored S_f of the given frames at the nearest sigma, moved to `device` (one layer at a time)."""
        key = self.nearest_sigma(layer, half, sigma)
        if key is None:
            return {}
        stored = self.entries[(layer, half)][key]
        return {f: stored[f].to(device, non_blocking=True) for f in frames if f in stored}

    def read_labels(self, layer: tuple, half: int, sigma: float, frames: Sequence[int]) -> dict[int, torch.Tensor]:
        """The labels written with the tokens `read` returns (same nearest sigma); frames without are left out."""
        key = self.nearest_sigma(layer, half, sigma)
        stored = self.labels.get((layer, half), {}).get(key, {}) if key is not None else {}
        return {f: stored[f].long() for f in frames if f in stored}

    def nbytes(self) -> int:
        return sum(t.nbytes for by_sigma in self.entries.values() for by_frame in by_sigma.values()
                   for t in by_frame.values())

    def device_nbytes(self) -> int:
        return sum(t.nbytes for by_sigma in self.entries.values() for by_frame in by_sigma.values()
                   for t in by_frame.values() if t.device.type != "cpu")

    def clear(self) -> None:
        self.entries.clear()
        self.labels.clear()
        self._device_bytes = 0
