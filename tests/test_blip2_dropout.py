"""Dropout of the Q-Former and OPT: where it falls, where its probabilities come from, and that it
draws the same masks as transformers' ``Blip2QFormerModel`` / ``OPTForCausalLM`` in train mode."""
import pytest
import torch
from torch import nn

from blip2 import Blip2OPT
from blip2.config import normalize_config, opt_args, qformer_args
from blip2.modules.opt import OPTAttention, OPTForCausalLM
from blip2.modules.qformer import MultiHeadAttention, QFormer
from tests._util import randomize_, rel_err
from tests.blip2_fixtures import NUM_QUERIES, one_torch_thread, tiny_blip2_config, tiny_pixels

VOCAB = 300
_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def dropout_config(hidden: float, attention: float, opt: float, opt_attention: float):
    """The tiny ``Blip2Config`` with the given Q-Former and OPT dropout probabilities."""
    config = tiny_blip2_config(VOCAB, image_token_index=None)
    config.qformer_config.hidden_dropout_prob = hidden
    config.qformer_config.attention_probs_dropout_prob = attention
    config.text_config.dropout, config.text_config.attention_dropout = opt, opt_attention
    return config


def probabilities(module: nn.Module) -> dict[str, list[float]]:
    """The p of every hidden dropout and of every attention's probability dropout in ``module``."""
    return {"hidden": [m.p for m in module.modules() if isinstance(m, nn.Dropout)],
            "attention": [m.dropout for m in module.modules() if isinstance(m, (MultiHeadAttention, OPTAttention))]}


def logits(model: Blip2OPT, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    ids = torch.tensor([[2, 10, 11, 12], [1, 2, 13, 14]])
    return model(tiny_pixels(2), ids, (ids != 1).long())  # (B, Q+T, V)


def test_defaults_are_transformers_config_defaults():
    from transformers import Blip2QFormerConfig, OPTConfig

    cfg = normalize_config({})
    q, t = Blip2QFormerConfig(), OPTConfig()
    assert qformer_args(cfg)["hidden_dropout"] == q.hidden_dropout_prob == 0.1
    assert qformer_args(cfg)["attention_dropout"] == q.attention_probs_dropout_prob == 0.1
    assert (opt_args(cfg)["dropout"], opt_args(cfg)["attention_dropout"]) == (t.dropout, t.attention_dropout) == (0.1, 0.0)


def test_probabilities_come_from_the_config():
    model = Blip2OPT.from_config(dropout_config(0.3, 0.2, 0.25, 0.05))
    # Q-Former: input + 3 self-attention outputs + 2 cross-attention outputs (layers 0, 2) + 3 query FFNs
    assert probabilities(model.qformer) == {"hidden": [0.3] * 9, "attention": [0.2] * 5}
    assert probabilities(model.language_model) == {"hidden": [0.25] * 2, "attention": [0.05] * 2}
    assert probabilities(model.vision_model) == {"hidden": [], "attention": []}


def test_dropout_adds_no_state_dict_keys():
    from transformers import Blip2ForConditionalGeneration

    config = dropout_config(0.3, 0.2, 0.25, 0.05)
    ref_keys = set(Blip2ForConditionalGeneration(config).state_dict())
    assert set(Blip2OPT.from_config(config).state_dict()) == ref_keys


@torch.no_grad()
def test_train_mode_varies_and_zero_probabilities_equal_eval():
    noisy = randomize_(Blip2OPT.from_config(dropout_config(0.3, 0.3, 0.3, 0.3)), seed=1)
    quiet = randomize_(Blip2OPT.from_config(dropout_config(0.0, 0.0, 0.0, 0.0)), seed=1)
    eval_out = logits(noisy.eval(), seed=0)
    assert torch.equal(eval_out, logits(noisy, seed=1))  # eval mode draws nothing
    noisy.train()
    first, second = logits(noisy, seed=0), logits(noisy, seed=1)
    assert rel_err(first, eval_out) > 1e-3 and rel_err(second, first) > 1e-3
    assert torch.equal(first, logits(noisy, seed=0))  # the same seed draws the same masks
    assert torch.equal(logits(quiet.train(), seed=0), eval_out)
    noisy.qformer.eval()  # dropout in the language model alone
    assert rel_err(logits(noisy, seed=0), eval_out) > 1e-3


def test_qformer_train_mode_matches_transformers_mask_for_mask():
    from transformers import Blip2QFormerModel

    config = dropout_config(0.3, 0.2, 0.1, 0.0)
    config.qformer_config.use_qformer_text_input = True
    ref = randomize_(Blip2QFormerModel(config.qformer_config), seed=3).train()
    ours = QFormer(**qformer_args(normalize_config(config))).train()
    ours.load_state_dict(ref.state_dict(), strict=True)
    queries, text, image = torch.randn(2, NUM_QUERIES, 24), torch.randn(2, 5, 24), torch.randn(2, 17, 32)
    torch.manual_seed(7)
    expected = ref(query_embeds=torch.cat([queries, text], dim=1), query_length=NUM_QUERIES,
                   encoder_hidden_states=image).last_hidden_state
    torch.manual_seed(7)
    got = ours(queries, image, text)
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got, ours.eval()(queries, image, text)) > 1e-2  # the masks were really drawn


def test_opt_train_mode_matches_transformers_mask_for_mask():
    from transformers import OPTForCausalLM as RefOPT

    config = dropout_config(0.1, 0.1, 0.3, 0.2)
    ref = randomize_(RefOPT(config.text_config), seed=4).train()
    ours = OPTForCausalLM(**opt_args(normalize_config(config))).train()
    ours.load_state_dict(ref.state_dict(), strict=True)
    embeds, mask = torch.randn(2, 6, 32), torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    torch.manual_seed(7)
    expected = ref(inputs_embeds=embeds, attention_mask=mask).logits
    torch.manual_seed(7)
    got = ours(embeds, mask)
    valid = mask.bool()
    assert rel_err(got[valid], expected[valid]) <= 1e-5
    assert rel_err(got[valid], ours.eval()(embeds, mask)[valid]) > 1e-2


def test_gradient_checkpointing_recomputes_the_same_masks():
    lm = randomize_(OPTForCausalLM(**opt_args(normalize_config(dropout_config(0.1, 0.1, 0.3, 0.3)))), seed=5)
    embeds, mask = torch.randn(2, 6, 32, requires_grad=True), torch.ones(2, 6, dtype=torch.long)
    grads = []
    for recompute in (False, True):
        lm.decoder.gradient_checkpointing = recompute
        torch.manual_seed(7)
        grads.append(torch.autograd.grad(lm(embeds, mask).square().mean(), embeds)[0])
    assert rel_err(grads[1], grads[0]) <= 1e-6
