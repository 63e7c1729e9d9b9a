"""ETEGRec: the soft assignment's sign, SIA and PSA against direct computations, and the schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from soda.alignment import RECOMMENDER, TOKENIZER, JointBatch
from soda.etegrec import ETEGRecConfig, PreferenceSemanticAlignment, SequenceItemAlignment
from soda.recommender import BOS, mean_pool
from soda.tokenizer import RQVAE, TokenizerConfig
from tests.test_soda_parity import BATCH, STEPS_PER_EPOCH, tiny_soda
from tests.test_soda_train import cyclic_split


def test_published_defaults():
    config = ETEGRecConfig()
    assert (config.sia_weight, config.psa_weight, config.psa_temperature) == (1e-4, 3e-4, 0.07)
    assert (config.schedule.cycle_length, config.schedule.tokenizer_lr, config.item_embeddings) == (2, 1e-4, "sasrec")


def test_soft_assignment_prefers_the_nearer_codeword():
    tokenizer = RQVAE(2, TokenizerConfig(num_layers=1, codebook_size=3, latent_dim=2, hidden_dims=(4,)))
    with torch.no_grad():
        tokenizer.codebooks.copy_(torch.tensor([[[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]]]))
    probabilities = tokenizer.code_log_probs(torch.tensor([[[0.9, 0.0]], [[2.6, 0.0]]]), temperature=0.5).exp()
    # distances² 0.81, 0.01, 4.41 and 6.76, 2.56, 0.16: softmax(−d²/τ), nearest first
    assert probabilities[0, 0].argsort(descending=True).tolist() == [1, 0, 2]
    assert probabilities[1, 0].argsort(descending=True).tolist() == [2, 1, 0]
    expected = torch.softmax(-torch.tensor([0.81, 0.01, 4.41]) / 0.5, dim=0)
    torch.testing.assert_close(probabilities[0, 0], expected)


def tiny_batch(model):
    """The first 8 training examples, with a target repeated, as the joint model would batch them."""
    split = cyclic_split()
    histories, targets = split.train.histories[:BATCH], split.train.targets[:BATCH].clone()
    targets[3] = targets[0]
    states, mask = model.recommender.encode(histories)
    items, positives = targets.unique(return_inverse=True)
    tokenizer = model.tokenizer
    quantized = tokenizer.quantize(tokenizer.encoder(model.item_embeddings[items - 1]))
    return JointBatch(states, mask, items, positives, quantized), targets


def soft_assignments(latent, codebooks, temperature):
    """Residual quantisation by hand: log softmax(−‖r_l − C[l]‖²/τ) per layer, (B, L, K)."""
    log_probs, residual = [], latent
    for codebook in codebooks:
        distances = ((residual[:, None] - codebook[None]) ** 2).sum(-1)
        log_probs.append(torch.log_softmax(-distances / temperature, dim=-1))
        residual = residual - codebook[distances.argmin(-1)]
    return torch.stack(log_probs, dim=1)


def test_sequence_item_alignment_is_the_symmetric_kl_of_softmax_minus_distance():
    model = tiny_soda(variant="etegrec")
    batch, targets = tiny_batch(model)
    config = ETEGRecConfig(sia_temperature=0.5, user_hidden=16, backend="torch")
    term = SequenceItemAlignment(16, 4, config)
    codebooks = model.tokenizer.codebooks.detach()
    log_q = soft_assignments(term.user_head(mean_pool(batch.states, batch.mask)), codebooks, 0.5)
    log_p = soft_assignments(model.tokenizer.encoder(model.item_embeddings[targets - 1]), codebooks, 0.5)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) + (log_q.exp() * (log_q - log_p)).sum(-1)  # (B, L)
    value = term(model, batch)
    torch.testing.assert_close(value, kl.sum(1).mean())
    # the public code's sign, softmax(+distance), gives another value
    flipped_q = torch.log_softmax(-log_q, dim=-1)
    flipped_p = torch.log_softmax(-log_p, dim=-1)
    flipped = ((flipped_p.exp() - flipped_q.exp()) * (flipped_p - flipped_q)).sum((1, 2)).mean()
    assert not torch.isclose(value, flipped, rtol=1e-2)
    assert term.weight == config.sia_weight


def test_first_decoder_state_is_the_teacher_forced_decoders_first_position():
    model = tiny_soda(variant="etegrec")
    batch, targets = tiny_batch(model)
    recommender = model.recommender
    tokens = torch.cat([torch.full((BATCH, 1), BOS), recommender.item_tokens[targets][:, :-1]], dim=1)
    torch.testing.assert_close(
        recommender.first_decoder_state(batch.states, batch.mask),
        recommender.decode(batch.states, batch.mask, tokens)[:, 0],
    )


def test_preference_semantic_alignment_is_two_way_infonce_without_same_item_negatives():
    model = tiny_soda(variant="etegrec")
    batch, targets = tiny_batch(model)
    term = PreferenceSemanticAlignment(16, 8, ETEGRecConfig())
    preferences = term.projection(model.recommender.first_decoder_state(batch.states, batch.mask))
    reconstructions = model.tokenizer.decoder(
        model.tokenizer.quantize(model.tokenizer.encoder(model.item_embeddings[targets - 1])).codewords.sum(1)
    )
    cosine = F.cosine_similarity(preferences[:, None], reconstructions[None], dim=-1) / 0.07  # (B, B)
    expected = 0.0
    for b in range(BATCH):
        negatives = [m for m in range(BATCH) if targets[m] != targets[b]]  # rows 0 and 3 share an item
        for scores in (cosine[b], cosine[:, b]):  # preference -> items, item -> preferences
            candidates = [b, *negatives]
            expected -= scores[b].item() - math.log(sum(math.exp(scores[m].item()) for m in candidates))
    assert term(model, batch).item() == pytest.approx(expected / BATCH, rel=1e-5)


def test_each_epoch_trains_the_side_its_phase_names():
    """ETEGRec's schedule with one warm-up and one finetune epoch, cycle 2: warm-up (no alignment),
    tokenizer, recommender, tokenizer, frozen finetune."""
    split = cyclic_split()
    model = tiny_soda(variant="etegrec", warmup_epochs=1, backend="torch")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    epochs = 5
    changed, phases = [], []
    for epoch in range(epochs):
        model.start_epoch(epoch)
        phases.append(model.phase if model.align else "warm-up")
        before = {name: value.clone() for name, value in model.named_parameters()}
        for step in range(STEPS_PER_EPOCH):
            batch = torch.arange(step * BATCH, (step + 1) * BATCH)
            histories, targets = split.train.histories[batch], split.train.targets[batch]
            loss = model.loss(histories, targets)
            if epoch == 0:  # warm-up: exactly the recommender's own loss, no alignment
                assert loss.item() == model.recommender.loss(histories, targets).item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        changed.append(
            {name.split(".")[0] for name, value in model.named_parameters() if not torch.equal(value, before[name])}
        )
    assert phases == ["warm-up", TOKENIZER, RECOMMENDER, TOKENIZER, RECOMMENDER]
    recommender_side, tokenizer_side = {"recommender", "alignments"}, {"tokenizer"}
    assert changed[0] == {"recommender"}  # the alignment heads get no gradient in the warm-up
    assert changed[1:] == [tokenizer_side, recommender_side, tokenizer_side, recommender_side]
