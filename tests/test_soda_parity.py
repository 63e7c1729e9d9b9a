"""The joint models train the same on the fused Triton kernels (the interpreter on CPU) as on
the PyTorch path: TIGER + SODA (distributional_bpr) and ETEGRec + SODA (its SIA term's soft
assignments through codebook_log_softmax, too)."""

import pytest
import torch

from soda.alignment import SODA, JointModel, Schedule, SODAConfig
from soda.etegrec import ETEGRec, ETEGRecConfig
from soda.letter import LETTERConfig, LETTERLosses
from soda.recommender import TIGER, RecommenderConfig
from soda.tokenizer import RQVAE, TokenizerConfig
from tests.test_soda_train import NUM_ITEMS, cyclic_split

EPOCHS, STEPS_PER_EPOCH, BATCH = 4, 6, 8
JOINT_VARIANTS = ("tiger+soda", "letter+soda", "etegrec", "etegrec+soda")


SCHEDULE_FIELDS = ("warmup_epochs", "cycles", "cycle_length", "tokenizer_lr")


def tiny_soda(seed: int = 0, variant: str = "tiger+soda", **options) -> JointModel:
    """Tokenizer (L=2, K=8, d=4) + one-layer TIGER without dropout, initialised from ``seed``,
    joined as ``variant`` (one of JOINT_VARIANTS; LETTER's CF embeddings random) with every
    alignment weight 1; ``options``: Schedule's fields (default: no warm-up, cycles without end)
    and SODAConfig's (the backend goes to ETEGRec's too)."""
    torch.manual_seed(seed)
    embeddings = torch.randn(NUM_ITEMS, 8)
    regularizer = None
    if variant.startswith("letter"):
        regularizer = LETTERLosses(torch.randn(NUM_ITEMS, 6), 4, LETTERConfig(clusters=3, recluster_every=4))
    tokenizer_config = TokenizerConfig(num_layers=2, codebook_size=8, latent_dim=4, hidden_dims=(16,))
    tokenizer = RQVAE(8, tokenizer_config, regularizer)
    tokenizer.kmeans_init(embeddings)
    recommender_config = RecommenderConfig(
        num_encoder_layers=1, num_decoder_layers=1, d_model=16, num_heads=2, head_dim=8, d_ff=32, dropout=0.0
    )
    recommender = TIGER(tokenizer.semantic_ids(embeddings), 8, recommender_config, extra_codes=NUM_ITEMS)
    schedule_options = {name: value for name, value in options.items() if name in SCHEDULE_FIELDS}
    soda_options = {name: value for name, value in options.items() if name not in SCHEDULE_FIELDS}
    schedule = Schedule(**{"warmup_epochs": 0, "cycles": 100, **schedule_options})
    soda = SODAConfig(weight=1.0, user_hidden=16, **soda_options)
    if variant.startswith("etegrec"):
        config = ETEGRecConfig(schedule, sia_weight=1.0, psa_weight=1.0, user_hidden=16, backend=soda.backend)
        return ETEGRec(recommender, tokenizer, embeddings, config, soda if variant.endswith("+soda") else None)
    return SODA(recommender, tokenizer, embeddings, soda, schedule)


def train_tiny_soda(
    backend: str, epochs: int = EPOCHS, losses: list[float] | None = None, variant: str = "tiger+soda"
) -> JointModel:
    """``tiny_soda``; 24 steps: tokenizer, recommender, tokenizer, frozen-tokenizer epochs.
    Appends the loss of each step to ``losses``."""
    split = cyclic_split()
    model = tiny_soda(variant=variant, warmup_epochs=0, cycles=2, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for epoch in range(epochs):
        model.start_epoch(epoch)
        for step in range(STEPS_PER_EPOCH):
            batch = torch.arange(step * BATCH, (step + 1) * BATCH)
            loss = model.loss(split.train.histories[batch], split.train.targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if losses is not None:
                losses.append(loss.item())
    return model


@pytest.mark.parametrize("variant", ["tiger+soda", "etegrec+soda"])
def test_triton_and_torch_backends_train_alike(variant):
    triton_losses, torch_losses = [], []
    triton_model = train_tiny_soda("triton", losses=triton_losses, variant=variant)
    torch_model = train_tiny_soda("torch", losses=torch_losses, variant=variant)
    assert len(torch_losses) >= 20
    relative = [abs(a - b) / abs(b) for a, b in zip(triton_losses, torch_losses, strict=True)]
    assert max(relative) < 1e-4, relative
    triton_parameters = dict(triton_model.named_parameters())
    for name, value in torch_model.named_parameters():
        torch.testing.assert_close(triton_parameters[name], value, rtol=1e-4, atol=1e-4, msg=name)
