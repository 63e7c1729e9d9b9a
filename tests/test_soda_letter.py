"""LETTER's tokenizer losses on hand-checkable cases: collaborative InfoNCE, clustering, diversity."""

import math

import pytest
import torch

import soda.letter
from soda.letter import (
    LETTERConfig,
    LETTERLosses,
    cluster_codewords,
    collaborative_alignment,
    diversity_loss,
    diversity_positives,
)
from soda.tokenizer import RQVAE, TokenizerConfig


def test_collaborative_alignment_is_in_batch_infonce_on_inner_products():
    torch.manual_seed(0)
    quantized, cf = torch.randn(5, 3), torch.randn(5, 3)
    expected = 0.0
    for i in range(5):
        scores = [float(quantized[i] @ cf[j]) for j in range(5)]
        expected -= scores[i] - math.log(sum(math.exp(s) for s in scores))
    assert collaborative_alignment(quantized, cf).item() == pytest.approx(expected / 5, rel=1e-5)


def test_letter_losses_weigh_the_collaborative_term_of_the_projected_cf_embeddings():
    torch.manual_seed(0)
    config = TokenizerConfig(num_layers=2, codebook_size=6, latent_dim=3, hidden_dims=(8,))
    cf_embeddings = torch.randn(10, 5)
    losses = LETTERLosses(cf_embeddings, 3, LETTERConfig(alignment_weight=0.5, diversity_weight=0.0, clusters=2))
    tokenizer = RQVAE(4, config, losses)
    embeddings, rows = torch.randn(4, 4), torch.tensor([7, 2, 9, 0])
    quantized = tokenizer.quantize(tokenizer.encoder(embeddings))
    projected = cf_embeddings[rows] @ losses.projection.weight.T  # SASRec's 5-d -> the 3-d latent
    expected = 0.5 * collaborative_alignment(quantized.codewords.sum(1), projected)
    torch.testing.assert_close(losses(quantized, rows, tokenizer.codebooks), expected)
    # the tokenizer adds it to its own loss, and needs the rows to look the CF embeddings up
    plain = RQVAE(4, config)
    plain.load_state_dict({k: v for k, v in tokenizer.state_dict().items() if not k.startswith("regularizer")})
    torch.testing.assert_close(tokenizer(embeddings, rows)[0], plain(embeddings)[0] + expected)
    with pytest.raises(ValueError, match="rows"):
        tokenizer(embeddings)


def test_codewords_are_reclustered_every_few_steps(monkeypatch):
    torch.manual_seed(0)
    clustered = []

    def record(codebooks, clusters, iterations):
        clustered.append(codebooks)
        return torch.zeros(codebooks.shape[:2], dtype=torch.long)

    monkeypatch.setattr(soda.letter, "cluster_codewords", record)
    losses = LETTERLosses(torch.randn(4, 5), 3, LETTERConfig(clusters=2, recluster_every=3))
    tokenizer = RQVAE(4, TokenizerConfig(num_layers=2, codebook_size=6, latent_dim=3, hidden_dims=(8,)))
    quantized, rows = tokenizer.quantize(torch.randn(4, 3)), torch.arange(4)
    codebooks = [torch.randn(2, 6, 3) for _ in range(4)]
    for step_codebooks in codebooks:
        losses(quantized, rows, step_codebooks)
    assert len(clustered) == 2  # steps 0 and 3 of 0..3
    assert clustered[0] is codebooks[0] and clustered[1] is codebooks[3]


def test_cluster_codewords_finds_separated_groups():
    torch.manual_seed(0)
    group = torch.tensor([0, 0, 1, 1, 0, 1])
    codebook = torch.stack([torch.tensor([10.0, 0.0]) if g else torch.tensor([-10.0, 0.0]) for g in group])
    codebook = codebook + 0.1 * torch.randn(6, 2)
    clusters = cluster_codewords(torch.stack([codebook, codebook.flip(0)]), 2, 10)
    for layer, expected in enumerate((group, group.flip(0))):
        same = clusters[layer][:, None] == clusters[layer][None, :]
        assert torch.equal(same, expected[:, None] == expected[None, :])


def test_diversity_positive_is_another_codeword_of_the_same_cluster():
    torch.manual_seed(0)
    clusters = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 0, 1, 0, 1]])  # layer 0: codeword 5 is alone
    codes = torch.randint(0, 6, (400, 2))
    positives = diversity_positives(codes, clusters)
    for layer in range(2):
        alone = codes[:, layer] == 5 if layer == 0 else torch.zeros(400, dtype=torch.bool)
        assert (positives[alone, layer] == -1).all()
        chosen, positive = codes[~alone, layer], positives[~alone, layer]
        assert (positive != chosen).all()
        assert torch.equal(clusters[layer][positive], clusters[layer][chosen])
    # every other member of the cluster gets drawn
    drawn = positives[codes[:, 0] == 2, 0]
    assert set(drawn.tolist()) == {3, 4}


def test_diversity_loss_by_hand():
    codebooks = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]]], requires_grad=True)  # L=1, K=3
    clusters = torch.tensor([[0, 0, 1]])
    codes = torch.tensor([[0], [2]])  # item 1's codeword is alone in its cluster: no term
    # item 0: anchor codeword 0, positive codeword 1 (its only cluster mate), candidates 1 and 2
    a01, a02 = 0.5, 0.0
    expected = -(a01 - math.log(math.exp(a01) + math.exp(a02)))
    loss = diversity_loss(codebooks, codes, clusters)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert codebooks.grad.abs().sum() > 0
    assert diversity_loss(codebooks, torch.tensor([[2]]), clusters).item() == 0.0  # no term at all, no NaN
