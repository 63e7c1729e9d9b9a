"""TIGER: a T5-style encoder-decoder that reads a history as semantic-ID tokens and
generates the next item's semantic ID, with beam search constrained to valid items.

Tokens: 0 is padding, 1 begins a decoded sequence, and code c at level l is token
``2 + offset[l] + c`` (each level has its own range, as in TIGER). An item with
semantic ID (c_0, ..., c_{C-1}) becomes C tokens; a history of T items becomes T·C
encoder tokens.

The T5 blocks (Raffel et al. 2020): pre-norm RMSNorm, no biases, ReLU feed-forward,
a learned relative position bias (bucketed, computed once per stack and shared by its
layers), dropout on the embeddings, feed-forward and residual branches (not on attention
weights, which would force PyTorch's slow math attention path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from soda.data import PAD

BOS = 1
FIRST_CODE_TOKEN = 2


@dataclass
class RecommenderConfig:
    """TIGER's encoder-decoder (Rajput et al., NeurIPS 2023, §4): 4 encoder and 4 decoder
    layers, d_model 128, 6 heads of 64, feed-forward 1024, ReLU, dropout 0.1; beam 20.
    Relative position buckets are T5's (32 buckets, max distance 128)."""

    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    d_model: int = 128
    num_heads: int = 6
    head_dim: int = 64
    d_ff: int = 1024
    dropout: float = 0.1
    relative_buckets: int = 32
    relative_max_distance: int = 128
    beam_size: int = 20


class Attention(nn.Module):
    """Multi-head attention without biases; ``bias`` (B|1, H, Tq, Tk) is added to the scores."""

    def __init__(self, config: RecommenderConfig):
        super().__init__()
        inner = config.num_heads * config.head_dim
        self.num_heads = config.num_heads
        self.query = nn.Linear(config.d_model, inner, bias=False)
        self.key_value = nn.Linear(config.d_model, 2 * inner, bias=False)
        self.out = nn.Linear(inner, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, Tq, d_model), memory (B, Tk, d_model) -> (B, Tq, d_model)."""
        batch, length, _ = x.shape
        query = self.query(x).view(batch, length, self.num_heads, -1).transpose(1, 2)
        key, value = self.key_value(memory).view(batch, memory.shape[1], 2, self.num_heads, -1).unbind(2)
        key, value = key.transpose(1, 2), value.transpose(1, 2)  # (B, H, Tk, head_dim)
        if bias.requires_grad and x.device.type == "cpu":
            # A learned bias needs its gradient, which PyTorch's fused CPU attention does not give:
            # scaled_dot_product_attention falls back to its math path (a "safe" softmax that
            # scans every row for -inf). The same softmax(q·kᵀ/√d + bias)·v written out costs
            # 7% less of a CPU training step.
            scores = torch.baddbmm(
                bias.expand(batch, -1, length, -1).flatten(0, 1),
                query.flatten(0, 1),
                key.flatten(0, 1).transpose(1, 2),
                alpha=query.shape[-1] ** -0.5,
            )
            attended = (scores.softmax(-1) @ value.flatten(0, 1)).view(batch, self.num_heads, length, -1)
        else:
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        return self.out(attended.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Sequential):
    def __init__(self, config: RecommenderConfig):
        super().__init__(
            nn.Linear(config.d_model, config.d_ff, bias=False),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.d_ff, config.d_model, bias=False),
        )


class Block(nn.Module):
    """T5 layer: self-attention, cross-attention (decoder only), feed-forward; each pre-norm and residual."""

    def __init__(self, config: RecommenderConfig, cross_attention: bool):
        super().__init__()
        self.self_norm, self.self_attention = nn.RMSNorm(config.d_model), Attention(config)
        if cross_attention:
            self.cross_norm, self.cross_attention = nn.RMSNorm(config.d_model), Attention(config)
        self.ff_norm, self.ff = nn.RMSNorm(config.d_model), FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, self_bias, memory=None, memory_bias=None) -> torch.Tensor:
        """x (B·G, T, d_model): G sequences per row of memory (B, Tk, d_model), e.g. the beams of a
        user; each attends to itself and to its row of memory."""
        normed = self.self_norm(x)
        x = x + self.dropout(self.self_attention(normed, normed, self_bias))
        if memory is not None:
            # queries never attend to each other here, so a row's G sequences attend as one:
            # (B, G·T) queries against (B, Tk) keys, no copy of memory per sequence
            queries = self.cross_norm(x).view(memory.shape[0], -1, x.shape[-1])
            x = x + self.dropout(self.cross_attention(queries, memory, memory_bias).view_as(x))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class RelativePositionBias(nn.Module):
    """T5's learned bias per head and bucket of the relative position (key - query)."""

    def __init__(self, config: RecommenderConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = config.relative_buckets, config.relative_max_distance
        self.bias = nn.Embedding(config.relative_buckets, config.num_heads)

    def forward(self, query_length: int, key_length: int) -> torch.Tensor:
        """-> (1, H, query_length, key_length)."""
        device = self.bias.weight.device
        relative = torch.arange(key_length, device=device)[None] - torch.arange(query_length, device=device)[:, None]
        buckets = torch.zeros_like(relative)
        num_buckets = self.num_buckets
        if self.bidirectional:
            num_buckets //= 2
            buckets += (relative > 0).long() * num_buckets
            distance = relative.abs()
        else:
            distance = (-relative).clamp(min=0)
        exact = num_buckets // 2  # half the buckets for exact small distances, half log-spaced
        log_spaced = (
            exact
            + (
                torch.log(distance.float().clamp(min=1) / exact)
                / math.log(self.max_distance / exact)
                * (num_buckets - exact)
            ).long()
        )
        buckets += torch.where(distance < exact, distance, log_spaced.clamp(max=num_buckets - 1))
        return self.bias(buckets).permute(2, 0, 1)[None]


class Trie:
    """Prefix tree of the valid semantic IDs as a dense table, for vectorised constrained decoding.

    ``children[node, code]`` is the node reached from ``node`` by ``code`` (-1: no valid item
    continues that way); node 0 is the root; ``leaf_item[node]`` is the item (1..N) whose full
    semantic ID ends at ``node`` (0 elsewhere).
    """

    def __init__(self, semantic_ids: torch.Tensor, width: int):
        """semantic_ids (N, C) of items 1..N, unique rows; width: the largest level vocabulary."""
        num_items, depth = semantic_ids.shape
        children = torch.full((1 + depth * num_items, width), -1, dtype=torch.long)
        parent = torch.zeros(num_items, dtype=torch.long)
        num_nodes = 1
        for level in range(depth):
            keys = parent * width + semantic_ids[:, level]
            unique_keys, inverse = torch.unique(keys, return_inverse=True)
            new_nodes = num_nodes + torch.arange(len(unique_keys))
            children[unique_keys // width, unique_keys % width] = new_nodes
            parent = num_nodes + inverse
            num_nodes += len(unique_keys)
        if len(parent.unique()) != num_items:
            raise ValueError("semantic IDs are not unique: two items share a full code tuple")
        self.children = children[:num_nodes]
        self.leaf_item = torch.zeros(num_nodes, dtype=torch.long)
        self.leaf_item[parent] = torch.arange(1, num_items + 1)

    def to(self, device: torch.device) -> Trie:
        self.children, self.leaf_item = self.children.to(device), self.leaf_item.to(device)
        return self


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of states (B, T, d) over the positions where mask (B, T) is True -> (B, d)."""
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


class TIGER(nn.Module):
    """Generative retrieval over semantic IDs (Rajput et al. 2023).

    semantic_ids (N, C): the codes of items 1..N, the last level de-duplicating;
    codebook_size: K, the vocabulary of each of the first C - 1 levels;
    extra_codes: the vocabulary of the de-duplicating level (default: what semantic_ids
    needs; larger when the codes are re-derived during training, as SODA does).
    """

    def __init__(
        self,
        semantic_ids: torch.Tensor,
        codebook_size: int,
        config: RecommenderConfig,
        extra_codes: int | None = None,
    ):
        super().__init__()
        self.config = config
        num_items, depth = semantic_ids.shape
        self.level_sizes = [codebook_size] * (depth - 1) + [extra_codes or int(semantic_ids[:, -1].max()) + 1]
        offsets = torch.tensor([0, *self.level_sizes[:-1]]).cumsum(0)
        self.level_starts = [FIRST_CODE_TOKEN + int(o) for o in offsets]
        # (N + 1, C) tokens of each item; row 0 = padding
        self.register_buffer("item_tokens", torch.zeros(num_items + 1, depth, dtype=torch.long), persistent=False)
        self.set_semantic_ids(semantic_ids)

        vocab_size = FIRST_CODE_TOKEN + sum(self.level_sizes)
        self.embedding = nn.Embedding(vocab_size, config.d_model, padding_idx=PAD)
        self.encoder_bias = RelativePositionBias(config, bidirectional=True)
        self.decoder_bias = RelativePositionBias(config, bidirectional=False)
        self.encoder = nn.ModuleList(Block(config, cross_attention=False) for _ in range(config.num_encoder_layers))
        self.decoder = nn.ModuleList(Block(config, cross_attention=True) for _ in range(config.num_decoder_layers))
        self.encoder_norm = nn.RMSNorm(config.d_model)
        self.decoder_norm = nn.RMSNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.d_model, vocab_size, bias=False)

    def _apply(self, fn, recurse=True):
        """Module.to/cuda/cpu also move the trie (plain tensors, not buffers: they need no saving)."""
        super()._apply(fn, recurse)
        self.trie.to(self.item_tokens.device)
        return self

    def set_semantic_ids(self, semantic_ids: torch.Tensor) -> None:
        """(Re)build the item tokens and the trie from semantic_ids (N, C)."""
        if int(semantic_ids[:, -1].max()) >= self.level_sizes[-1]:
            raise ValueError(
                f"semantic_ids need {int(semantic_ids[:, -1].max()) + 1} de-duplicating codes; "
                f"the model has {self.level_sizes[-1]} (raise extra_codes)"
            )
        device = self.item_tokens.device
        self.item_tokens[1:] = semantic_ids.to(device) + torch.tensor(self.level_starts, device=device)
        self.trie = Trie(semantic_ids.cpu(), max(self.level_sizes)).to(device)

    def encode(self, histories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """histories (B, T) item ids, 0 = padding -> states (B, T·C, d_model), key mask (B, T·C)."""
        tokens = self.item_tokens[histories].flatten(1)
        mask = tokens != PAD
        padding = torch.zeros(mask.shape, device=tokens.device).masked_fill(~mask, float("-inf"))[:, None, None]
        bias = self.encoder_bias(tokens.shape[1], tokens.shape[1]) + padding
        x = self.dropout(self.embedding(tokens))
        for block in self.encoder:
            x = block(x, bias)
        return self.dropout(self.encoder_norm(x)), mask

    def user_representation(self, histories: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder states over the history's real tokens: (B, T) -> (B, d_model)."""
        return mean_pool(*self.encode(histories))

    def decode(self, states: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Decoder over tokens (B·G, t) starting with BOS, G sequences per user (G = 1, or the beams),
        attending to the users' states (B, T·C, d_model), mask (B, T·C) -> hidden (B·G, t, d_model)."""
        length = tokens.shape[1]
        causal = torch.full((length, length), float("-inf"), device=tokens.device).triu(1)
        self_bias = self.decoder_bias(length, length) + causal
        memory_bias = torch.zeros(mask.shape, device=tokens.device).masked_fill(~mask, float("-inf"))[:, None, None]
        x = self.dropout(self.embedding(tokens))
        for block in self.decoder:
            x = block(x, self_bias, states, memory_bias)
        return self.dropout(self.decoder_norm(x))

    def first_decoder_state(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The decoder's state at BOS (what predicts the first code) -> (B, d_model)."""
        bos = torch.full((states.shape[0], 1), BOS, dtype=torch.long, device=states.device)
        return self.decode(states, mask, bos)[:, 0]

    def level_logits(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        """Logits over level ``level``'s codes: hidden (..., d_model) -> (..., level_sizes[level])."""
        start = self.level_starts[level]
        return F.linear(hidden, self.head.weight[start : start + self.level_sizes[level]])

    def param_groups(self) -> list[dict]:
        """One AdamW group: every parameter at the trainer's learning rate."""
        return [{"params": list(self.parameters())}]

    def start_epoch(self, epoch: int) -> None:
        """Nothing changes between epochs."""

    def loss(self, histories: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Code cross-entropy, mean over levels: histories (B, T), targets (B,) -> scalar."""
        return self.decoder_loss(*self.encode(histories), targets)

    def decoder_loss(self, states: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``loss`` from encoder states (B, T·C, d_model) and their mask (B, T·C)."""
        target_tokens = self.item_tokens[targets]
        bos = torch.full_like(target_tokens[:, :1], BOS)
        hidden = self.decode(states, mask, torch.cat([bos, target_tokens[:, :-1]], dim=1))
        losses = [
            F.cross_entropy(
                self.level_logits(hidden[:, level], level),
                target_tokens[:, level] - self.level_starts[level],
            )
            for level in range(len(self.level_sizes))
        ]
        return torch.stack(losses).mean()

    @torch.no_grad()
    def recommend(self, histories: torch.Tensor, k: int) -> torch.Tensor:
        """Top-k items by beam search constrained to valid semantic IDs: (B, T) -> (B, k), 0 = none."""
        beam = max(k, self.config.beam_size)
        return self.beam_search(histories, beam)[0][:, :k]

    @torch.no_grad()
    def beam_search(self, histories: torch.Tensor, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched beam search over the trie: (B, T) -> items (B, beam) best first, log-probs (B, beam).

        Every beam follows trie edges only, so every returned item is a valid item; a beam
        with no valid continuation has score -inf and item 0.
        """
        batch = histories.shape[0]
        states, mask = self.encode(histories)  # once per user, shared by its beams
        nodes = torch.zeros(batch, beam, dtype=torch.long, device=histories.device)
        scores = torch.full((batch, beam), float("-inf"), device=histories.device)
        scores[:, 0] = 0.0  # one live beam at the root
        tokens = torch.full((batch, beam, 1), BOS, dtype=torch.long, device=histories.device)
        for level, size in enumerate(self.level_sizes):
            hidden = self.decode(states, mask, tokens.flatten(0, 1))[:, -1]
            log_probs = self.level_logits(hidden, level).log_softmax(-1).view(batch, beam, size)
            child = self.trie.children[nodes][..., :size]  # (B, beam, size)
            candidates = (scores[..., None] + log_probs.masked_fill(child < 0, float("-inf"))).flatten(1)
            scores, chosen = candidates.topk(beam, dim=1)
            source_beam, code = chosen // size, chosen % size
            nodes = child.flatten(1).gather(1, chosen).clamp(min=0)  # dead beams park at the root
            previous = tokens.gather(1, source_beam[..., None].expand(-1, -1, tokens.shape[2]))
            tokens = torch.cat([previous, (code + self.level_starts[level])[..., None]], dim=2)
        items = self.trie.leaf_item[nodes].masked_fill(scores.isinf(), 0)
        return items, scores
