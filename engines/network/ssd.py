"""The Mamba-2 SSD scan, chunked, in plain torch: the prefill of one Mamba-2 layer.

The recurrence, per head h (state S [P, N]), for t = 0..T-1:

    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T        y_t = S_t C_t

computed chunk by chunk as in the Mamba-2 paper ("state space duality"): within a chunk the output
is a masked attention-like product; between chunks only the [P, N] states travel. Sequences of
any length are padded to a multiple of the chunk size with dt = 0, which leaves the state
unchanged, so the final state is exact. The D skip term is not included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """a [..., L] -> [..., L, L] with out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the diagonal.

    exp(out) is the decay from step j to step i. Computed with a masked cumulative sum, not as a
    difference of cumulative sums, for numerical stability.
    """
    L = a.shape[-1]
    below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    out = a[..., :, None].expand(*a.shape, L).masked_fill(~below, 0).cumsum(dim=-2)
    on_or_below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device))
    return out.masked_fill(~on_or_below, -torch.inf)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk_size: int, initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked selective scan.

    x [b, T, H, P], dt [b, T, H] (already softplus'ed and clamped), A [H] (negative),
    B, C [b, T, G, N] (G groups, each shared by H/G consecutive heads),
    initial_state [b, H, P, N] or None (zeros).
    Returns y [b, T, H, P] and the final state [b, H, P, N], both float32.
    """
    b, T, H, P = x.shape
    G = B.shape[2]
    x, dt, A = x.float(), dt.float(), A.float()
    B = B.float().repeat_interleave(H // G, dim=2)  # [b, T, H, N]
    C = C.float().repeat_interleave(H // G, dim=2)
    pad = -T % chunk_size

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [b, T, ...] -> [b, c, l, ...], zero padded
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.unflatten(1, (-1, chunk_size))

    X = chunks(x * dt[..., None])  # [b, c, l, H, P]: input already scaled by dt
    B, C = chunks(B), chunks(C)  # [b, c, l, H, N]
    a = chunks(A * dt).permute(0, 3, 1, 2)  # [b, H, c, l]: log-decay of each step
    a_cum = a.cumsum(dim=-1)

    # 1. within each chunk: y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1..i}) X_j
    decay = torch.exp(segment_sum(a))  # [b, H, c, l, l]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, X)

    # 2. the state each chunk adds, decayed to the chunk's end
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, H, c, l]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, X)

    # 3. carry states across chunks: state entering chunk z (and the final state)
    if initial_state is None:
        initial_state = torch.zeros(b, H, P, B.shape[-1], dtype=torch.float32, device=x.device)
    states = torch.cat([initial_state.float()[:, None], chunk_states], dim=1)  # [b, c+1, H, P, N]
    chunk_decay = torch.exp(segment_sum(F.pad(a_cum[..., -1], (1, 0))))  # [b, H, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    entering, final_state = states[:, :-1], states[:, -1]

    # 4. what the entering state contributes to each output of the chunk
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(a_cum))

    y = (y_diag + y_off).flatten(1, 2)[:, :T]
    return y, final_state
