"""TIGER: the trie, beam search constrained to valid semantic IDs, and the attention's CPU path."""

import itertools

import torch
import torch.nn.functional as F

from soda.recommender import TIGER, Attention, RecommenderConfig, Trie

TINY = RecommenderConfig(
    num_encoder_layers=1,
    num_decoder_layers=1,
    d_model=16,
    num_heads=2,
    head_dim=8,
    d_ff=32,
    dropout=0.0,
    beam_size=5,
)


def sparse_semantic_ids() -> torch.Tensor:
    """12 items over 3 levels of 4 codes plus a de-duplicating code: few of the 4^3 tuples exist."""
    ids = [
        [0, 1, 2, 0],
        [0, 1, 2, 1],
        [0, 3, 0, 0],
        [1, 0, 0, 0],
        [1, 0, 1, 0],
        [1, 2, 3, 0],
        [2, 2, 2, 0],
        [2, 2, 2, 1],
        [2, 2, 2, 2],
        [3, 0, 1, 0],
        [3, 3, 3, 0],
        [3, 1, 0, 0],
    ]
    return torch.tensor(ids)


def test_trie_walks_to_every_item_and_nowhere_else():
    ids = sparse_semantic_ids()
    trie = Trie(ids, width=4)
    for codes in itertools.product(range(4), range(4), range(4), range(3)):
        node = 0
        for code in codes:
            node = trie.children[node, code].item() if node >= 0 else -1
        matches = (ids == torch.tensor(codes)).all(1).nonzero().flatten()
        if len(matches):
            assert node >= 0 and trie.leaf_item[node] == matches.item() + 1
        else:
            assert node == -1


def test_beam_search_emits_only_valid_items_in_exact_order():
    torch.manual_seed(0)
    ids = sparse_semantic_ids()
    model = TIGER(ids, codebook_size=4, config=TINY).eval()
    histories = torch.tensor([[0, 0, 3, 5], [1, 2, 3, 4], [0, 0, 0, 12]])
    items, scores = model.beam_search(histories, beam=len(ids))
    # With a beam as wide as the catalogue, constrained search returns every item exactly once,
    # scored by its sequence log-likelihood under teacher forcing, best first.
    for row in range(len(histories)):
        assert sorted(items[row].tolist()) == list(range(1, len(ids) + 1))
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    with torch.no_grad():
        for row, history in enumerate(histories):
            every_item = torch.arange(1, len(ids) + 1)
            repeated = history.expand(len(ids), -1)
            target_tokens = model.item_tokens[every_item]
            bos = torch.ones(len(ids), 1, dtype=torch.long)
            hidden = model.decode(*model.encode(repeated), torch.cat([bos, target_tokens[:, :-1]], 1))
            log_likelihood = sum(
                model.level_logits(hidden[:, level], level)
                .log_softmax(-1)
                .gather(1, (target_tokens[:, level] - model.level_starts[level])[:, None])
                .squeeze(1)
                for level in range(4)
            )
            torch.testing.assert_close(scores[row], log_likelihood[items[row] - 1])


def test_recommend_with_narrow_beam_returns_distinct_valid_items():
    torch.manual_seed(1)
    ids = sparse_semantic_ids()
    model = TIGER(ids, codebook_size=4, config=TINY).eval()
    histories = torch.randint(0, 13, (7, 6))
    histories[:, -1] = torch.arange(1, 8)
    top = model.recommend(histories, k=4)
    assert top.shape == (7, 4)
    assert ((top >= 1) & (top <= len(ids))).all()
    assert all(len(set(row)) == 4 for row in top.tolist())


def test_user_representation_is_mean_pooled_encoder_states():
    model = TIGER(sparse_semantic_ids(), codebook_size=4, config=TINY).eval()
    histories = torch.tensor([[0, 0, 3, 5]])
    states, mask = model.encode(histories)
    assert mask.sum() == 8  # two items x four code tokens
    torch.testing.assert_close(model.user_representation(histories), states[mask].mean(0, keepdim=True))


def test_attention_with_a_learned_bias_matches_scaled_dot_product_attention():
    """The CPU training path (a bias that needs its gradient) computes what SDPA computes."""
    torch.manual_seed(0)
    attention = Attention(TINY)
    x, memory = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    relative = torch.randn(1, 2, 5, 7, requires_grad=True)  # a learned bias, shared by the batch
    padding = torch.zeros(3, 1, 1, 7).masked_fill(torch.rand(3, 1, 1, 7) < 0.3, float("-inf"))
    padding[..., 0] = 0.0  # every row attends somewhere
    out = attention(x, memory, relative + padding)
    gradient = torch.randn_like(out)
    grads = torch.autograd.grad(out, [relative, *attention.parameters()], gradient)
    query = attention.query(x).view(3, 5, 2, 8).transpose(1, 2)
    key, value = attention.key_value(memory).view(3, 7, 2, 2, 8).unbind(2)
    expected = F.scaled_dot_product_attention(query, key.transpose(1, 2), value.transpose(1, 2), relative + padding)
    expected = attention.out(expected.transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(out, expected)
    expected_grads = torch.autograd.grad(expected, [relative, *attention.parameters()], gradient)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_decode_shares_a_users_states_among_its_beams():
    """Decoding G sequences per user against the user's states equals decoding each against a copy."""
    torch.manual_seed(2)
    model = TIGER(sparse_semantic_ids(), codebook_size=4, config=TINY).eval()
    states, mask = model.encode(torch.tensor([[0, 0, 3, 5], [1, 2, 3, 4]]))
    tokens = torch.randint(2, 10, (2 * 3, 2))  # three sequences per user
    grouped = model.decode(states, mask, tokens)
    copied = model.decode(states.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), tokens)
    torch.testing.assert_close(grouped, copied)
