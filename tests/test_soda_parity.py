"""SODA trains the same on the fused Triton kernels (the interpreter on CPU) as on the PyTorch path."""

import torch

from soda.alignment import SODA, SODAConfig
from soda.recommender import TIGER, RecommenderConfig
from soda.tokenizer import RQVAE, TokenizerConfig
from tests.test_soda_train import NUM_ITEMS, cyclic_split

EPOCHS, STEPS_PER_EPOCH, BATCH = 4, 6, 8


def train_tiny_soda(backend: str, epochs: int = EPOCHS, losses: list[float] | None = None) -> SODA:
    """Tokenizer (L=2, K=8, d=4) + one-layer TIGER; 24 SODA steps: tokenizer, recommender,
    tokenizer, frozen-tokenizer epochs. Appends the loss of each step to ``losses``."""
    torch.manual_seed(0)
    split = cyclic_split()
    embeddings = torch.randn(NUM_ITEMS, 8)
    tokenizer = RQVAE(8, TokenizerConfig(num_layers=2, codebook_size=8, latent_dim=4, hidden_dims=(16,)))
    tokenizer.kmeans_init(embeddings)
    recommender_config = RecommenderConfig(
        num_encoder_layers=1, num_decoder_layers=1, d_model=16, num_heads=2, head_dim=8, d_ff=32, dropout=0.0
    )
    recommender = TIGER(tokenizer.semantic_ids(embeddings), 8, recommender_config, extra_codes=NUM_ITEMS)
    config = SODAConfig(weight=1.0, user_hidden=16, warmup_epochs=0, cycle_length=2, backend=backend)
    model = SODA(recommender, tokenizer, embeddings, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for epoch in range(epochs):
        model.start_epoch(epoch, epochs)
        for step in range(STEPS_PER_EPOCH):
            batch = torch.arange(step * BATCH, (step + 1) * BATCH)
            loss = model.loss(split.train.histories[batch], split.train.targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if losses is not None:
                losses.append(loss.item())
    return model


def test_triton_and_torch_backends_train_alike():
    triton_losses, torch_losses = [], []
    triton_model = train_tiny_soda("triton", losses=triton_losses)
    torch_model = train_tiny_soda("torch", losses=torch_losses)
    assert len(torch_losses) >= 20
    relative = [abs(a - b) / abs(b) for a, b in zip(triton_losses, torch_losses, strict=True)]
    assert max(relative) < 1e-4, relative
    triton_parameters = dict(triton_model.named_parameters())
    for name, value in torch_model.named_parameters():
        torch.testing.assert_close(triton_parameters[name], value, rtol=1e-4, atol=1e-4, msg=name)
