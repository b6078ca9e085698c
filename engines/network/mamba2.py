"""The Mamba-2 mixer.

    z, xBC, dt = in_proj(h)                         # [I], [I + 2GN], [H]    (I = H * P)
    xBC        = silu(causal_depthwise_conv1d(xBC)) # kernel K, with bias
    x, B, C    = split(xBC)                         # [H, P], [G, N], [G, N]
    A          = -exp(A_log);  dt = clamp(softplus(dt + dt_bias), time_step_limit)
    y          = SSM scan(x, dt, A, B, C) + D x     # state [H, P, N] per sequence, fp32
    out        = out_proj(gated_rmsnorm(y, z))      # rmsnorm per group of I/G channels of y * silu(z)

Prefill (no state, or more than MAX_STEP_TOKENS new tokens) runs the chunked SSD scan of
engines/ssd.py, continuing from and writing back the slot's conv window and SSM state when a
state is given. Decode (a state and at most MAX_STEP_TOKENS new tokens: one token, or the k+1
tokens of a speculative verify) runs the `causal_conv1d_update` and `mamba2_state_update` ops,
which update the pools in place.

Tensor parallel: a rank holds whole B/C groups and their heads; in_proj's rows and the conv's
channels are the rank's [z, x, B, C, dt] and [x, B, C] slices, so the layout above holds locally with
H and G divided by the ranks. The gated norm's groups are the B/C groups (I/G channels each), so it
stays local; out_proj is row-parallel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...export.spec import ModelSpec
from ...plugins.causal_conv1d_update import causal_conv1d_update
from ...plugins.mamba2_state_update import mamba2_state_update
from ...plugins.pool_rows import write_rows
from .norms import GatedRMSNorm
from .parallel import SINGLE, Parallel
from .ssd import ssd_scan
from .state import MambaState

MAX_STEP_TOKENS = 8  # new tokens per row up to which a call with a state runs the decode ops


class Mamba2Mixer(nn.Module):
    """x [B, T, D] -> [B, T, D]."""

    stateful = True

    def __init__(self, spec: ModelSpec, parallel: Parallel = SINGLE):
        super().__init__()
        D, H, P = spec.hidden_size, parallel.local(spec.mamba_num_heads), spec.mamba_head_dim
        G, N = parallel.local(spec.n_groups), spec.ssm_state_size
        I, conv_dim = H * P, H * P + 2 * G * N
        self.heads, self.head_dim, self.groups, self.state_size = H, P, G, N
        self.chunk_size, self.time_step_limit, self.parallel = spec.chunk_size, spec.time_step_limit, parallel
        self.in_proj = nn.Linear(D, I + conv_dim + H, bias=spec.use_bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, spec.conv_kernel, groups=conv_dim, bias=spec.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(I, spec.mamba_intermediate // spec.n_groups, spec.layer_norm_epsilon)
        self.out_proj = nn.Linear(I, D, bias=spec.use_bias)

    def forward(self, h: torch.Tensor, cache: MambaState | None = None, slots: torch.Tensor | None = None,
                past_lengths: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        I, GN = self.heads * self.head_dim, self.groups * self.state_size
        z, xBC, dt = self.in_proj(h).split([I, I + 2 * GN, self.heads], dim=-1)
        if cache is not None and h.shape[1] <= MAX_STEP_TOKENS and lengths is None:
            y = self.decode(xBC, dt, cache, slots, past_lengths)
        else:
            y = self.prefill(xBC, dt, cache, slots, past_lengths, lengths)
        return self.parallel.row_parallel(self.out_proj, self.norm(y, z).to(h.dtype))

    def split_xBC(self, xBC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, I + 2GN] -> x [B, T, H, P], B [B, T, G, N], C [B, T, G, N]."""
        I, GN = self.heads * self.head_dim, self.groups * self.state_size
        x, B, C = xBC.split([I, GN, GN], dim=-1)
        return (x.unflatten(-1, (self.heads, self.head_dim)), B.unflatten(-1, (self.groups, self.state_size)),
                C.unflatten(-1, (self.groups, self.state_size)))

    def prefill(self, xBC: torch.Tensor, dt: torch.Tensor, cache: MambaState | None, slots: torch.Tensor | None,
                past_lengths: torch.Tensor | None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Conv + chunked scan over all T tokens; y [B, T, I] fp32 (D term included). With `lengths` [B] (rows
        right-padded to T): dt is 0 past each row's length, which leaves the SSM state unchanged, and the conv
        window kept is the one ending at the row's last real token."""
        batch, K = xBC.shape[0], self.conv1d.kernel_size[0]
        if cache is None:
            conv_window = xBC.new_zeros(batch, xBC.shape[-1], K - 1)
            ssm_state = None
        else:  # continue each row's sequence; fresh rows (past 0) and padding rows start from zeros
            keep = ((past_lengths > 0) & (slots >= 0))[:, None, None]
            conv_window = cache.conv[slots.clamp(min=0)].to(xBC.dtype) * keep
            ssm_state = cache.ssm[slots.clamp(min=0)].float() * keep[..., None]
        inputs = torch.cat([conv_window, xBC.transpose(1, 2)], dim=-1)  # [B, C, K-1+T], oldest first
        xBC = F.silu(F.conv1d(inputs, self.conv1d.weight, self.conv1d.bias, groups=inputs.shape[1])).transpose(1, 2)
        x, B, C = self.split_xBC(xBC)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)
        if lengths is not None:
            dt = dt * (torch.arange(dt.shape[1], device=dt.device) < lengths[:, None])[..., None]
        A = -torch.exp(self.A_log.float())
        y, final_state = ssd_scan(x, dt, A, B, C, self.chunk_size, ssm_state)
        y = y + self.D.float()[:, None] * x.float()
        if cache is not None:
            if lengths is None:
                window = inputs[:, :, inputs.shape[-1] - (K - 1):]
            else:  # inputs lengths[b] .. lengths[b] + K - 2: the K-1 inputs up to the row's last real token
                ends = (lengths[:, None] + torch.arange(K - 1, device=inputs.device))[:, None]
                window = inputs.gather(2, ends.expand(-1, inputs.shape[1], -1))
            write_rows(cache.conv, slots, window)
            write_rows(cache.ssm, slots, final_state)
        return y.flatten(2)

    def decode(self, xBC: torch.Tensor, dt: torch.Tensor, cache: MambaState, slots: torch.Tensor,
               past_lengths: torch.Tensor) -> torch.Tensor:
        """Token-by-token state update through the decode ops; y [B, T, I] in the activation dtype."""
        slots = slots.to(torch.int32)  # (a fresh sequence's slot was zeroed by InferenceState.reset_fresh)
        conv_steps = ssm_steps = None
        if cache.steps is not None:  # speculative verify: keep the state after every token
            batch, T = xBC.shape[:2]
            conv_steps = cache.conv.new_empty(batch, T, *cache.conv.shape[1:])
            ssm_steps = cache.ssm.new_empty(batch, T, *cache.ssm.shape[1:])
            cache.steps.append((slots, conv_steps, ssm_steps))
        xBC = causal_conv1d_update(xBC, cache.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias, slots,
                                   activation="silu", intermediate_states=conv_steps)
        x, B, C = self.split_xBC(xBC)
        A = -torch.exp(self.A_log.float())
        y = mamba2_state_update(cache.ssm, x, dt, A, B, C, self.D, self.dt_bias, slots, dt_softplus=True,
                                dt_limit=self.time_step_limit, intermediate_states=ssm_steps)
        return y.flatten(2)
