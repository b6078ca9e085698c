"""Tensor and expert parallelism inside the network: which rank this process is, and the collectives.

A rank's network is the same `Model`, built with a `Parallel` context. The modules ask it for their
local sizes (heads, groups, channels, experts, vocabulary rows: what export/sharding.py gives the
rank) and it does the communication at the few places the sharding needs it:

    embeddings         vocabulary rows split: masked lookup, all-reduce       VocabEmbedding
    attention o_proj   row-parallel: all-reduce                               Parallel.row_parallel
    Mamba out_proj     row-parallel: all-reduce (the gated RMSNorm is per group, and a rank holds
                       whole groups, so it stays local)
    MLP down_proj      row-parallel: all-reduce
    MoE                routed experts (ep: the rank's whole experts, for every token the replicated
                       router sends them; tp: the rank's slice of every expert) plus the shared
                       expert's slice: partial sums added, one all-reduce per layer
    lm_head            vocabulary rows split: all-gather of the logits        VocabHead

Row-parallel biases are replicated and must enter the all-reduced sum once: rank 0's part keeps
its bias, the other ranks' parts drop theirs.

World size 1 (`SINGLE`) is the unsharded network: every size is the model's and every collective a
no-op, so there is one code path. The collectives run on gloo (CPU) or NCCL (GPU) and carry no
gradient: sharded networks are for inference. Traced into a graph (torch.compile, torch.export) they
are torch's functional collectives (`_c10d_functional.all_reduce` / `all_gather_into_tensor`, each
followed by `wait_tensor`), named by the process group's name, which AOTInductor compiles into a
package that runs them in the group of that name (aot_build.py); run eagerly they are torch.distributed's
calls, which release the GIL while they wait (a functional collective called from Python holds it, and
gloo's worker thread, freeing a finished all-gather's tensors, waits for it: a deadlock). A package holds the
GIL too, so gloo must have let go of the tensors of the eager collectives before it first (`settle`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...export.options import MOE_PARALLEL


@dataclass(frozen=True)
class Parallel:
    """Rank `rank` of `world_size` tensor-parallel ranks; `moe` says how routed experts are split:
    "ep" whole experts per rank, "tp" a slice of every expert's intermediate channels."""

    world_size: int = 1
    rank: int = 0
    moe: str = "ep"
    group: Any = field(default=None, compare=False)  # torch.distributed ProcessGroup; None: the default one
    # the tensors lent to eager collectives (settle)
    lent: list = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self):
        if self.moe not in MOE_PARALLEL:
            raise ValueError(f"--moe-parallel {self.moe!r}: expected one of {', '.join(MOE_PARALLEL)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank}: must be in [0, {self.world_size})")

    @classmethod
    def from_process_group(cls, moe: str = "ep", group=None) -> "Parallel":
        """This process's place in the initialized process group (world size 1 when there is none)."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return cls(moe=moe)
        return cls(dist.get_world_size(group), dist.get_rank(group), moe, group)

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    # ---- what this rank holds ------------------------------------------------------------------
    def part(self, count: int) -> tuple[int, int]:
        """[start, stop) of this rank's equal share of `count` units (heads, groups, rows)."""
        if count % self.world_size:
            raise ValueError(f"{count} units do not split into {self.world_size} equal parts")
        share = count // self.world_size
        return self.rank * share, (self.rank + 1) * share

    def local(self, count: int) -> int:
        """How many of `count` units this rank holds."""
        start, stop = self.part(count)
        return stop - start

    def kv_heads(self, count: int) -> int:
        """KV heads held: an equal share, or one replicated head when the ranks outnumber them."""
        return 1 if self.world_size > count else self.local(count)

    def experts(self, count: int) -> range:
        """Global ids of the routed experts held (whole with ep, sliced with tp)."""
        return range(*self.part(count)) if self.moe == "ep" else range(count)

    @property
    def expert_parallel(self) -> "Parallel":
        """The context each routed expert is built with: sliced over the ranks with tp, whole with ep."""
        return self if self.moe == "tp" else SINGLE

    # ---- communication -------------------------------------------------------------------------
    @property
    def group_name(self) -> str:
        """The process group's name, by which the functional collectives (and a compiled package) find it: `group`'s,
        else the default group's (DEFAULT_GROUP before torch.distributed is initialized, e.g. in a build)."""
        import torch.distributed as dist

        if self.group is not None:
            return self.group.group_name
        return dist.group.WORLD.group_name if dist.is_initialized() else DEFAULT_GROUP

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x (eagerly: in place)."""
        if not self.sharded:
            return x
        import torch.distributed as dist

        if torch.compiler.is_compiling():
            c10d = torch.ops._c10d_functional
            return c10d.wait_tensor(c10d.all_reduce(x, "sum", self.group_name))
        self._lend(lambda x: dist.all_reduce(x, group=self.group), x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x [..., n] concatenated in rank order along the last dimension: [..., world_size * n]."""
        if not self.sharded:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        if torch.compiler.is_compiling():
            c10d = torch.ops._c10d_functional
            parts = c10d.wait_tensor(c10d.all_gather_into_tensor(x, self.world_size, self.group_name))
        else:
            parts = x.new_empty(self.world_size * x.shape[0], *x.shape[1:])  # (gloo: the ranks' x concatenated)
            self._lend(lambda parts, x: dist.all_gather_into_tensor(parts, x, group=self.group), parts, x)
        return parts.view(self.world_size, *x.shape).movedim(0, -2).flatten(-2)  # [W, ..., n] -> [..., W * n]

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank (in place; between steps, never inside a step graph)."""
        if self.sharded:
            import torch.distributed as dist

            self._lend(lambda x: dist.broadcast(x, src=0, group=self.group), x)
        return x

    def _lend(self, collective, *tensors: torch.Tensor) -> None:
        """collective(*aliases): a torch.distributed call on aliases of `tensors` (their storage) that only their
        `Lent` records hold, so that a count of an alias's Python holders tells when gloo has let go of it (settle).
        Aliases gloo has let go of are forgotten here."""
        self.lent[:] = [lent for lent in self.lent if lent.held()]
        records = [Lent(t.detach()) for t in tensors]
        for lent in records:
            lent.mark()
        collective(*(lent.alias for lent in records))
        self.lent.extend(records)

    def settle(self) -> None:
        """Wait until gloo's worker threads have let go of the tensors of the eager collectives run so far. Call it
        before running a compiled package's collectives from Python: the package holds the GIL while it waits for them,
        and a gloo thread dropping its hold of a Python tensor (a finished collective's work) needs the GIL, with the
        group's work queue locked: a deadlock, which the other ranks see as a timeout at their next collective.
        (Sleeping releases the GIL to the gloo thread.)"""
        for lent in self.lent:
            while lent.held():
                time.sleep(SETTLE_POLL_S)
        self.lent.clear()

    def row_parallel(self, linear: nn.Module, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """`linear(x)` for a row-parallel layer: x [..., in] is this rank's share of the input (its slice of
        the features, whose columns `linear` holds, or a partial sum), and the ranks' products add up to
        the output. reduce=False returns this rank's part for a caller that adds more parts before one
        all-reduce. The replicated bias enters the sum once: rank 0's part keeps it, the others' drop it.
        Any linear-like module works (quantized ones included): it is called, not unpacked."""
        y = linear(x)
        if self.sharded and self.rank != 0 and getattr(linear, "bias", None) is not None:
            y = y - linear.bias
        return self.all_reduce(y) if reduce else y


class Lent:
    """A tensor lent to an eager collective, held here (and by nothing else of Python's) until gloo lets go of it.

    While C++ holds a tensor that has a Python object, the tensor holds a reference to that object; the C++ holder
    that lets go last drops it, taking the GIL (PyObject preservation, c10/util/intrusive_ptr.h). So the count of the
    object's Python references, back to what it was before the collective, says that gloo's thread is done with it,
    GIL included. (Its C++ holder count drops before that thread takes the GIL, and a package started in between
    deadlocks; an object freed by that thread releases the GIL while it is freed: neither can tell.)"""

    def __init__(self, alias: torch.Tensor):
        self.alias, self.refs = alias, 0

    def mark(self) -> None:
        """Count the alias's references before lending it (the same expression as held's: the same temporaries)."""
        self.refs = sys.getrefcount(self.alias)

    def held(self) -> bool:
        return sys.getrefcount(self.alias) > self.refs


SINGLE = Parallel()
SETTLE_POLL_S = 1e-4
# the name torch gives the default process group (the first group a process creates: `init_process_group`'s, as
# runtime/launcher.py and torchrun make it)
DEFAULT_GROUP = "0"


class VocabEmbedding(nn.Embedding):
    """The embedding table's rows of this rank's vocabulary range. ids [...] -> [..., D]: each rank looks
    up the ids it holds (zeros for the others) and the all-reduce assembles every row."""

    def __init__(self, vocab_size: int, dim: int, parallel: Parallel = SINGLE):
        start, stop = parallel.part(vocab_size)
        super().__init__(stop - start, dim)
        self.start, self.parallel = start, parallel

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # nn.init on a meta tensor is pointless, and imports torch._dynamo (seconds)
            super().reset_parameters()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.parallel.sharded:
            return super().forward(ids)
        local = ids - self.start
        held = (local >= 0) & (local < self.num_embeddings)
        rows = super().forward(local.masked_fill(~held, 0)).masked_fill(~held[..., None], 0)
        return self.parallel.all_reduce(rows)


class VocabHead(nn.Linear):
    """The lm_head's rows of this rank's vocabulary range. x [..., D] -> logits [..., V], all-gathered."""

    def __init__(self, dim: int, vocab_size: int, parallel: Parallel = SINGLE):
        super().__init__(dim, parallel.local(vocab_size), bias=False)
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_gather(super().forward(x))
