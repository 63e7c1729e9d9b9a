"""RQ-VAE tokenizer: item semantic embedding -> a tuple of codes (a semantic ID).

An MLP encoder maps the item embedding to a latent z. Residual quantisation then
picks, at each layer l, the codeword nearest to what the layers before it left
over:

    r_0 = z,    c_l = argmin_k ||r_l - C[l,k]||²,    r_{l+1} = r_l - C[l, c_l]

so that  z = Σ_l C[l, c_l] + r_L  exactly. The decoder reconstructs the embedding
from the quantised latent Σ_l C[l, c_l] (straight-through gradient to the encoder).
Loss (van den Oord et al. 2017, per layer):

    ||x - x̂||² + Σ_l ( ||sg(r_l) - C[l,c_l]||² + β ||r_l - sg(C[l,c_l])||² )

A ``regularizer`` (LETTER's collaborative and diversity losses, ``soda.letter``) adds its
terms to that loss; it sees the quantisation, the items' rows and the codebooks.

Items that share all L codes get one extra code, their rank among the colliding
items, which makes every semantic ID unique (TIGER §3.1).

Soft code distributions (for SODA) come from ``soda_kernels.codebook_log_softmax``
on the per-layer residuals r_0..r_{L-1} and the codebooks (L, K, d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import soda_kernels as sk
from soda.progress import Progress


@dataclass
class TokenizerConfig:
    """RQ-VAE defaults from TIGER (Rajput et al., "Recommender Systems with Generative
    Retrieval", NeurIPS 2023, §4): 3 layers x 256 codes, 32-d latent, MLP 512-256-128,
    commitment 0.25, k-means initialisation, batch 1024, 20k epochs. TIGER's optimiser (Adagrad,
    lr 0.4) diverges with this loss scale; Adam at lr 1e-3 trains stably."""

    num_layers: int = 3
    codebook_size: int = 256
    latent_dim: int = 32
    hidden_dims: tuple[int, ...] = (512, 256, 128)
    commitment: float = 0.25
    kmeans_init: bool = True
    kmeans_iterations: int = 50
    temperature: float = 1.0  # of the soft code distributions
    lr: float = 1e-3
    batch_size: int = 1024
    epochs: int = 20_000


@dataclass
class Quantized:
    """One pass of residual quantisation over N latents.

    latent (N, d); residuals (N, L, d): r_0..r_{L-1}, the input of each layer;
    codes (N, L); codewords (N, L, d): C[l, codes[:, l]]; last_residual (N, d): r_L.
    """

    latent: torch.Tensor
    residuals: torch.Tensor
    codes: torch.Tensor
    codewords: torch.Tensor
    last_residual: torch.Tensor

    @property
    def straight_through(self) -> torch.Tensor:
        """The quantised latent Σ_l C[l, c_l] (N, d) with the latent's gradient (straight-through)."""
        return self.latent + (self.codewords.sum(dim=1) - self.latent).detach()


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """Residual-quantised autoencoder over item embeddings of size ``input_dim``.

    regularizer: None, or a module ``(quantized, rows, codebooks) -> scalar`` added to the loss
    (trained, frozen and saved with the tokenizer).
    """

    def __init__(self, input_dim: int, config: TokenizerConfig, regularizer: nn.Module | None = None):
        super().__init__()
        self.config = config
        dims = [input_dim, *config.hidden_dims, config.latent_dim]
        self.encoder = mlp(dims)
        self.decoder = mlp(dims[::-1])
        self.codebooks = nn.Parameter(torch.randn(config.num_layers, config.codebook_size, config.latent_dim) * 0.1)
        self.regularizer = regularizer

    def quantize(self, latent: torch.Tensor) -> Quantized:
        """Residual quantisation of latent (N, d), nearest codeword per layer."""
        residual = latent
        residuals, codes, codewords = [], [], []
        for codebook in self.codebooks:
            code = nearest_code(residual, codebook)
            codeword = codebook[code]
            residuals.append(residual)
            codes.append(code)
            codewords.append(codeword)
            residual = residual - codeword.detach()
        return Quantized(
            latent=latent,
            residuals=torch.stack(residuals, dim=1),
            codes=torch.stack(codes, dim=1),
            codewords=torch.stack(codewords, dim=1),
            last_residual=residual,
        )

    def layer_residuals(self, layer_latents: torch.Tensor) -> torch.Tensor:
        """Residual quantisation of one latent per layer (SODA's user side): (N, L, d) -> residuals (N, L, d).

        Layer l's residual is layer_latents[:, l] minus the codewords chosen (nearest, hard,
        no gradient, as in ``quantize``) at layers < l.
        """
        residuals, chosen = [], torch.zeros_like(layer_latents[:, 0])
        for layer, codebook in enumerate(self.codebooks):
            residual = layer_latents[:, layer] - chosen
            residuals.append(residual)
            chosen = chosen + codebook[nearest_code(residual, codebook)].detach()
        return torch.stack(residuals, dim=1)

    def forward(self, embeddings: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, Quantized]:
        """Embeddings (N, D) -> (loss, quantisation); loss = reconstruction + quantisation
        (+ the regularizer's terms, which need rows (N,): the items' rows in the full item table)."""
        quantized = self.quantize(self.encoder(embeddings))
        residuals, codewords = quantized.residuals, quantized.codewords
        reconstruction_loss = F.mse_loss(self.reconstruct(quantized), embeddings, reduction="none").sum(-1).mean()
        codebook_loss = ((residuals.detach() - codewords) ** 2).sum(-1).mean(0).sum()
        commitment_loss = ((residuals - codewords.detach()) ** 2).sum(-1).mean(0).sum()
        loss = reconstruction_loss + codebook_loss + self.config.commitment * commitment_loss
        if self.regularizer is not None:
            if rows is None:
                raise ValueError("this tokenizer has a regularizer: pass the items' rows")
            loss = loss + self.regularizer(quantized, rows, self.codebooks)
        return loss, quantized

    def reconstruct(self, quantized: Quantized) -> torch.Tensor:
        """The decoder's reconstruction (N, D) of the quantised latents (straight-through)."""
        return self.decoder(quantized.straight_through)

    def code_log_probs(
        self, residuals: torch.Tensor, temperature: float | None = None, backend: str = "auto"
    ) -> torch.Tensor:
        """Soft code distributions: residuals (N, L, d) -> log p (N, L, K) over each layer's codewords,
        p_k = softmax_k(−‖r_l − C[l,k]‖² / τ): the nearer codeword has the higher probability."""
        tau = self.config.temperature if temperature is None else temperature
        return sk.codebook_log_softmax(residuals, self.codebooks, temperature=tau, backend=backend)

    @torch.no_grad()
    def kmeans_init(self, embeddings: torch.Tensor) -> None:
        """Set each layer's codebook to k-means centroids of that layer's residuals (N, D)."""
        residual = self.encoder(embeddings)
        for codebook in self.codebooks:
            codebook.copy_(kmeans(residual, self.config.codebook_size, self.config.kmeans_iterations))
            residual = residual - codebook[nearest_code(residual, codebook)]

    @torch.no_grad()
    def semantic_ids(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Unique semantic IDs: embeddings (N, D) -> codes (N, L + 1), the last one de-duplicating."""
        codes = self.quantize(self.encoder(embeddings)).codes.cpu()
        return torch.cat([codes, collision_rank(codes)[:, None]], dim=1)


def nearest_code(residual: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword, no gradient: residual (N, d), codebook (K, d) -> (N,)."""
    return torch.cdist(residual.detach(), codebook.detach()).argmin(dim=-1)


def kmeans(points: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    """Lloyd's k-means: points (N, d) -> centroids (k, d); an empty cluster keeps its centroid."""
    start = torch.randperm(len(points))[:k]
    if len(start) < k:  # fewer points than clusters: reuse points, slightly jittered
        start = torch.randint(len(points), (k,))
    centroids = points[start] + 1e-3 * torch.randn(k, points.shape[1], device=points.device)
    for _ in range(iterations):
        assignment = torch.cdist(points, centroids).argmin(dim=-1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k).to(points.dtype)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
    return centroids


def collision_rank(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, L) -> (N,): each row's rank among the earlier rows with the same codes."""
    _, group = torch.unique(codes, dim=0, return_inverse=True)
    rank = torch.zeros(len(codes), dtype=torch.long)
    seen: dict[int, int] = {}
    for row, g in enumerate(group.tolist()):
        rank[row] = seen.get(g, 0)
        seen[g] = rank[row].item() + 1
    return rank


def codebook_stats(semantic_ids: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Collision rate (items sharing their L codes with an earlier item) and per-layer usage."""
    codes = semantic_ids[:, :-1]
    stats = {"collision_rate": (semantic_ids[:, -1] > 0).float().mean().item()}
    for layer in range(codes.shape[1]):
        stats[f"usage_layer{layer}"] = codes[:, layer].unique().numel() / codebook_size
    stats["max_extra_code"] = semantic_ids[:, -1].max().item()
    return stats


def train_tokenizer(model: RQVAE, embeddings: torch.Tensor, progress: bool = True) -> list[float]:
    """Train the RQ-VAE on item embeddings (N, D) with Adam; returns the loss per epoch."""
    config = model.config
    if config.kmeans_init:
        model.kmeans_init(embeddings[torch.randperm(len(embeddings))[: config.batch_size]])
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    losses = []
    epochs = Progress(range(config.epochs), "rq-vae", enabled=progress)
    for _ in epochs:
        epoch_loss = 0.0
        for batch in torch.randperm(len(embeddings)).split(config.batch_size):
            loss, _ = model(embeddings[batch], batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item() * len(batch)
        losses.append(epoch_loss / len(embeddings))
        epochs.set_postfix(f"loss {losses[-1]:.4f}")
    return losses
