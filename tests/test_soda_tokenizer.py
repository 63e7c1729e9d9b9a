"""The RQ-VAE tokenizer: residual identity, soft codes, unique semantic IDs."""

import torch

from soda.tokenizer import RQVAE, TokenizerConfig, codebook_stats, collision_rank, train_tokenizer

CONFIG = TokenizerConfig(
    num_layers=3, codebook_size=8, latent_dim=4, hidden_dims=(16,), epochs=60, batch_size=64, lr=1e-3
)


def trained_tokenizer() -> tuple[RQVAE, torch.Tensor]:
    torch.manual_seed(0)
    embeddings = torch.randn(60, 12)
    model = RQVAE(12, CONFIG)
    train_tokenizer(model, embeddings, progress=False)
    return model, embeddings


def test_residual_identity():
    model, embeddings = trained_tokenizer()
    with torch.no_grad():
        quantized = model.quantize(model.encoder(embeddings))
    codewords = model.codebooks[torch.arange(CONFIG.num_layers), quantized.codes]  # (N, L, d)
    torch.testing.assert_close(quantized.codewords, codewords)
    torch.testing.assert_close(codewords.sum(1) + quantized.last_residual, quantized.latent)
    # each layer's residual is the previous one minus its codeword
    torch.testing.assert_close(quantized.residuals[:, 1:], quantized.residuals[:, :-1] - codewords[:, :-1])
    # and each chosen code is the nearest codeword to that layer's residual
    distances = torch.cdist(quantized.residuals.transpose(0, 1), model.codebooks.detach())
    assert torch.equal(distances.argmin(-1).T, quantized.codes)


def test_soft_codes_peak_at_the_chosen_code():
    model, embeddings = trained_tokenizer()
    with torch.no_grad():
        quantized = model.quantize(model.encoder(embeddings))
        log_probs = model.code_log_probs(quantized.residuals)
    assert log_probs.shape == (60, CONFIG.num_layers, CONFIG.codebook_size)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(60, CONFIG.num_layers))
    assert torch.equal(log_probs.argmax(-1), quantized.codes)


def test_training_lowers_the_loss_and_ids_are_unique():
    torch.manual_seed(0)
    embeddings = torch.randn(60, 12)
    model = RQVAE(12, CONFIG)
    losses = train_tokenizer(model, embeddings, progress=False)
    assert losses[-1] < losses[0]
    ids = model.semantic_ids(embeddings)
    assert ids.shape == (60, CONFIG.num_layers + 1)
    assert len(torch.unique(ids, dim=0)) == 60
    stats = codebook_stats(ids, CONFIG.codebook_size)
    assert 0 < stats["usage_layer0"] <= 1 and 0 <= stats["collision_rate"] < 1


def test_collision_rank_counts_earlier_duplicates():
    codes = torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2], [3, 4], [0, 0]])
    assert collision_rank(codes).tolist() == [0, 0, 1, 2, 1, 0]
