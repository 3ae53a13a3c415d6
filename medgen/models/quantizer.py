"""Vector quantizer with an EMA codebook (van den Oord et al. 2017; Razavi et al. 2019).

Why our own instead of MONAI's `EMAQuantizer`: MONAI disables autocast and builds the full
(B*N x K) fp32 distance matrix; at 128^3 with downsampling 4 and 16384 codes that matrix is
32768 x 16384 x 4 B = 2 GiB per volume (forward only), and there is no dead-code restart. Here
the nearest-code search runs in row chunks under a fixed element budget, EMA statistics are
all-reduced under DDP so every process keeps the same codebook, the codebook is initialised and
dead codes are restarted from encodings of the current batch with the dynamics of Medical
Diffusion's codebook (TATS, after Dhariwal et al. 2020, Jukebox), and the module works inside
`torch.autocast` (it computes in fp32 internally and never lets autocast round distances).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Distance chunk: at most this many (row x code) fp32 elements at once (64 Mi x 4 B = 256 MiB).
DEFAULT_CHUNK_ELEMENTS = 1 << 26


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def nearest_code(flat: torch.Tensor, codebook: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """argmin_k ||flat_i - codebook_k||^2 for each row, without the full (N, K) matrix.

    flat (N, D), codebook (K, D) -> (N,) int64. ||x||^2 is constant per row and dropped:
    argmin_k (||e_k||^2 - 2 x.e_k). Computed in fp32 (autocast off) so near ties are not
    decided by bf16 rounding.
    """
    n, k = flat.shape[0], codebook.shape[0]
    rows = max(1, min(n, chunk_elements // max(k, 1)))
    with torch.autocast(device_type=flat.device.type, enabled=False):
        flat, codebook = flat.float(), codebook.float()
        e_sq = codebook.pow(2).sum(1)  # (K,)
        out = torch.empty(n, dtype=torch.long, device=flat.device)
        for start in range(0, n, rows):
            chunk = flat[start:start + rows]
            # (rows, K) = ||e||^2 - 2 x e^T ; addmm fuses the scale and the add
            dist_chunk = torch.addmm(e_sq.unsqueeze(0), chunk, codebook.t(), beta=1.0, alpha=-2.0)
            out[start:start + rows] = dist_chunk.argmin(1)
    return out


class VectorQuantizer(nn.Module):
    """EMA vector quantizer for latents of shape (B, D, *spatial).

    Args:
        num_codes: codebook size K.
        dim: code dimension D (= latent channels).
        commitment: beta in the commitment loss beta * ||z - sg(e)||^2 (van den Oord 2017).
        decay: EMA decay gamma of the codebook statistics (Razavi 2019 use 0.99).
        eps: Laplace smoothing of the cluster sizes.
        dead_threshold: a code whose EMA cluster size N_k (expected uses per step) is below this
            after a training step is moved onto a random encoding of the batch, and moved again
            at every step until N_k reaches the threshold. Its statistics are kept, not reset: N_k
            grows by (1 - decay) * n_k per step, so a code comes back to life only by winning,
            on average, more than `dead_threshold` encodings per step for a while (from N_k = 0
            at n_k uses per step: log(1 - threshold / n_k) / log(decay) steps). These are the
            dynamics of Medical Diffusion's codebook (restart_thres 1.0); 0 disables restarts.
        chunk_elements: memory budget of the nearest-code search (rows x codes per chunk).

    The first training step initialises every code from a random encoding of its batch, before
    quantizing, with cluster size 1 (as Medical Diffusion); a codebook whose cluster sizes are
    all zero counts as never trained, so a resumed or loaded codebook is not initialised again.

    Buffers (not parameters; the EMA updates them): `embed` (K, D), `cluster_size` (K),
    `embed_sum` (K, D).
    """

    def __init__(self, num_codes: int, dim: int, commitment: float = 0.25, decay: float = 0.99,
                 eps: float = 1e-5, dead_threshold: float = 1e-2, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        super().__init__()
        self.num_codes, self.dim = int(num_codes), int(dim)
        self.commitment, self.decay, self.eps = float(commitment), float(decay), float(eps)
        self.dead_threshold, self.chunk_elements = float(dead_threshold), int(chunk_elements)
        embed = torch.randn(self.num_codes, self.dim) / math.sqrt(self.dim)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.zeros(self.num_codes))
        self.register_buffer("embed_sum", embed.clone() * 0)
        self._trained: bool | None = None  # cache of "any cluster size > 0" (see `_init_codebook`)

    def _load_from_state_dict(self, *args, **kwargs):
        self._trained = None  # new statistics: look again at the next training step
        return super()._load_from_state_dict(*args, **kwargs)

    @staticmethod
    def _flatten(z: torch.Tensor) -> torch.Tensor:
        # (B, D, *S) -> (B * prod(S), D)
        return z.movedim(1, -1).reshape(-1, z.shape[1])

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Code index per latent position: (B, D, *S) -> (B, *S) int64."""
        idx = nearest_code(self._flatten(z.detach()), self.embed, self.chunk_elements)
        return idx.view(z.shape[0], *z.shape[2:])

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Code vectors for indices: (B, *S) -> (B, D, *S) fp32."""
        return F.embedding(idx, self.embed).movedim(-1, 1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Quantize; returns (z_q with straight-through gradient, commitment loss, stats).

        stats: `perplexity` (exp entropy of the batch code histogram), `usage` (fraction of
        codes used in the batch), `restarted` (dead codes moved onto batch encodings this step), `indices`.
        """
        in_dtype = z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            flat = self._flatten(z)  # (N, D)
            if self.training:
                candidates = self._candidates(flat.detach())  # (K, D)
                self._init_codebook(candidates)
            idx = nearest_code(flat.detach(), self.embed, self.chunk_elements)  # (N,)
            # (N,) -> (B, *S, D) -> (B, D, *S); looked up before the EMA step updates the codebook
            z_q = F.embedding(idx, self.embed).view(*z.shape[:1], *z.shape[2:], self.dim).movedim(-1, 1)
            counts = torch.bincount(idx, minlength=self.num_codes).float()  # (K,) this process
            restarted = torch.zeros((), device=z.device)
            if self.training:
                counts, restarted = self._ema_update(flat.detach(), idx, counts, candidates)
            elif _distributed():
                dist.all_reduce(counts)
            loss = self.commitment * F.mse_loss(z, z_q.detach())
            z_q = z + (z_q - z).detach()  # straight-through estimator
            probs = counts / counts.sum().clamp_min(1)
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            usage = (counts > 0).float().mean()
        stats = {"perplexity": perplexity.detach(), "usage": usage.detach(), "restarted": restarted,
                 "indices": idx.view(z.shape[0], *z.shape[2:])}
        return z_q.to(in_dtype) if in_dtype != torch.float32 else z_q, loss, stats

    @torch.no_grad()
    def _candidates(self, flat: torch.Tensor) -> torch.Tensor:
        """K encodings of the batch drawn without replacement, the same on every process (TATS's
        `_tile`): with fewer encodings than codes they are repeated and jittered by N(0, 0.01^2 / D)."""
        if flat.shape[0] < self.num_codes:
            flat = flat.repeat(-(-self.num_codes // flat.shape[0]), 1)
            flat = flat + torch.randn_like(flat) * (0.01 / math.sqrt(self.dim))
        new = flat[torch.randperm(flat.shape[0], device=flat.device)[:self.num_codes]]  # (K, D)
        if _distributed():
            dist.broadcast(new, src=0)
        return new

    @torch.no_grad()
    def _init_codebook(self, candidates: torch.Tensor) -> None:
        """Before the first training step: every code onto a batch encoding, with one use."""
        if not self._trained:
            self._trained = bool(self.cluster_size.sum() > 0)  # host sync until the first step
        if not self._trained:
            self.embed.copy_(candidates)
            self.embed_sum.copy_(candidates)
            self.cluster_size.fill_(1.0)
            self._trained = True

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor, candidates: torch.Tensor):
        """EMA codebook step (Razavi 2019, appendix): N_k <- g N_k + (1-g) n_k, m_k <- g m_k + (1-g) sum z,
        e_k = m_k / N_k (Laplace-smoothed), then the dead-code restart. Batch statistics are summed
        over processes first."""
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, flat)  # (K, D)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        used = (self.cluster_size > 0).unsqueeze(1)
        self.embed.copy_(torch.where(used, self.embed_sum / smoothed.clamp_min(1e-12).unsqueeze(1), self.embed))
        # dead codes onto the candidates; N_k and m_k stay as they are, so a code stays "dead"
        # (and keeps moving) until its own uses lift N_k to the threshold
        dead = (self.cluster_size < self.dead_threshold).unsqueeze(1)  # (K, 1), equal on all processes
        self.embed.copy_(torch.where(dead, candidates, self.embed))
        return counts, dead.sum().float()
