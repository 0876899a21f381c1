"""Held-out loss, probe scoring and routing counts, each checked against a brute-force reference."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from flexmoe.data import Probe
from flexmoe.eval.knowledge import (
    continuation_ids,
    document_nll,
    heldout_loss,
    normalised_scores,
    option_loglikelihoods,
    probe_accuracy,
    probes_loglikelihoods,
)
from flexmoe.models.routing import RoutingCounter
from flexmoe.models import moe_layers

from helpers.tiny import FAMILY_NAMES, VOCAB, save_tokenizer, tiny_model


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.pad_token = "<pad>"
    return tokenizer


class BigramLM(torch.nn.Module):
    """A language model whose next-token distribution depends on the current token only: its
    decoder's hidden state is the token's one-hot vector, its output embedding the logit table."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])

    def get_decoder(self):
        return lambda input_ids, attention_mask=None: SimpleNamespace(
            last_hidden_state=F.one_hot(input_ids, VOCAB).float())

    def get_output_embeddings(self):
        return lambda hidden: hidden @ self.table


def _bigram(seed: int = 0) -> BigramLM:
    return BigramLM(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2)


# ------------------------------------------------------------------ held-out loss

def test_heldout_loss_equals_per_text_reference(word_tokenizer):
    model = tiny_model("qwen2_moe")
    texts = ["w5 w6 w7", "w10 w11 w12 w13 w14 w15 w16", "w20", "w30 w31 w30 w31"]
    total, count = 0.0, 0
    for text in texts:  # one unpadded sequence at a time: bos + text + eos
        ids = [1] + word_tokenizer(text, add_special_tokens=False)["input_ids"] + [2]
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        total += F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    assert heldout_loss(model, word_tokenizer, texts, max_length=64, batch_size=3) == pytest.approx(total / count, rel=1e-5)


def test_heldout_loss_truncates_to_max_length(word_tokenizer):
    model = _bigram()
    text = "w5 w6 w7 w8 w9"
    ids = [1, 5, 6, 7]  # max_length 4 keeps bos + three words
    logprobs = F.log_softmax(model.table, dim=-1)
    expected = -sum(logprobs[a, b].item() for a, b in zip(ids, ids[1:])) / 3
    assert heldout_loss(model, word_tokenizer, [text], max_length=4) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------ probes

def test_continuation_puts_the_space_on_the_option(word_tokenizer):
    context, option = continuation_ids(word_tokenizer, "w5 w6 ", "w7 w8")
    assert context == [1, 5, 6] and option == [7, 8]


def test_option_loglikelihoods_on_a_hand_built_bigram_model(word_tokenizer):
    model = _bigram(seed=1)
    logprobs = F.log_softmax(model.table, dim=-1)
    result = option_loglikelihoods(model, word_tokenizer, "w5 w6", ["w7", "w8 w9 w10"])
    # option "w7": log p(7|6); option "w8 w9 w10": log p(8|6) + log p(9|8) + log p(10|9)
    assert result[0][0] == pytest.approx(logprobs[6, 7].item(), abs=1e-5) and result[0][1] == 1
    expected = logprobs[6, 8] + logprobs[8, 9] + logprobs[9, 10]
    assert result[1][0] == pytest.approx(expected.item(), abs=1e-5) and result[1][1] == 3


def test_probes_batched_across_questions_score_as_each_question_alone(word_tokenizer):
    """Rows of different probes and lengths share padded batches; the scores must not notice."""
    model = tiny_model("qwen2_moe", seed=3)
    model.eval()
    questions = [("w5 w6", ["w7", "w8 w9 w10"]), ("w11", ["w12 w13", "w14"]), ("w15 w16 w17 w18", ["w19", "w20"])]
    batched = probes_loglikelihoods(model, word_tokenizer, questions, batch_size=4)
    for (question, options), scores in zip(questions, batched):
        alone = [option_loglikelihoods(model, word_tokenizer, question, [option])[0] for option in options]
        assert [n for _, n in scores] == [n for _, n in alone]
        assert [ll for ll, _ in scores] == pytest.approx([ll for ll, _ in alone], abs=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_option_scores_equal_the_full_forward_of_every_family(family, word_tokenizer):
    """Probes run the LM head on the option tokens only; the full forward's log-probs must agree."""
    model = tiny_model(family, seed=4)
    model.eval()
    questions = [("w5 w6", ["w7", "w8 w9 w10"]), ("w11 w3 w4 w9", ["w12 w13", "w14"])]
    scored = probes_loglikelihoods(model, word_tokenizer, questions, batch_size=3)
    for (question, options), scores in zip(questions, scored):
        for option, (loglikelihood, count) in zip(options, scores):
            context, option_ids = continuation_ids(word_tokenizer, question, option)
            row = torch.tensor([context + option_ids])
            with torch.no_grad():
                logprobs = F.log_softmax(model(input_ids=row).logits[0, :-1].float(), dim=-1)
            expected = sum(logprobs[t - 1, row[0, t]].item() for t in range(len(context), row.shape[1]))
            assert count == len(option_ids) and loglikelihood == pytest.approx(expected, abs=1e-4)


def test_option_scores_of_a_flex_model_equal_its_full_forward(word_tokenizer):
    """A PEFT-wrapped model carrying a graft: the decoder-plus-LM-head path keeps LoRA and graft."""
    from flexmoe.models import add_lora, graft

    model = tiny_model("qwen2_moe", seed=6)
    graft(model, {layer.name: [1] for layer in moe_layers(model)}, gate_init_bias=1.0)
    model = add_lora(model, "attention", r=2, seed=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or ".graft." in name:  # LoRA away from zero, graft away from its copy
                param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    model.eval()
    (scores,) = probes_loglikelihoods(model, word_tokenizer, [("w5 w6", ["w7 w8", "w9"])])
    for option, (loglikelihood, _) in zip(["w7 w8", "w9"], scores):
        context, option_ids = continuation_ids(word_tokenizer, "w5 w6", option)
        row = torch.tensor([context + option_ids])
        with torch.no_grad():
            logprobs = F.log_softmax(model(input_ids=row).logits[0, :-1].float(), dim=-1)
        expected = sum(logprobs[t - 1, row[0, t]].item() for t in range(len(context), row.shape[1]))
        assert loglikelihood == pytest.approx(expected, abs=1e-4)


def test_normalisations_pick_different_options_on_a_hand_built_case():
    loglikelihoods = [(-6.0, 3), (-4.0, 1)]  # a long option with a low sum, a short one with a higher sum
    options = ["abcdef", "ab"]
    assert normalised_scores(loglikelihoods, options, "bytes") == [-1.0, -2.0]
    assert normalised_scores(loglikelihoods, options, "tokens") == [-2.0, -4.0]
    assert normalised_scores(loglikelihoods, options, "none") == [-6.0, -4.0]
    with pytest.raises(ValueError):
        normalised_scores(loglikelihoods, options, "words")


def test_probe_accuracy_counts_argmax_hits(word_tokenizer):
    table = torch.full((VOCAB, VOCAB), -5.0)
    table[10, 20] = table[11, 21] = 5.0  # w10 -> w20 and w11 -> w21 are near certain
    model = BigramLM(table)
    options = ["w20", "w21", "w22", "w23"]
    probes = [Probe("w10", options, 0, "noun.x"), Probe("w11", options, 1, "noun.x"),
              Probe("w10", options, 2, "noun.x"), Probe("w11", options, 3, "noun.x")]
    assert probe_accuracy(model, word_tokenizer, probes) == 0.5


# ------------------------------------------------------------------ routing

def _brute_force_selection(family: str, router, x: torch.Tensor, top_k: int) -> list[list[int]]:
    """Selected experts per token, recomputed from the router weight with plain Python."""
    weight = router.weight.detach().double()
    selections = []
    for token in x.reshape(-1, weight.shape[1]).double():
        logits = [float(v) for v in weight @ token]
        if family == "deepseek_v3":
            scores = [1 / (1 + math.exp(-v)) + float(b) for v, b in zip(logits, router.e_score_correction_bias)]
            size = len(scores) // router.num_group
            groups = [scores[g * size:(g + 1) * size] for g in range(router.num_group)]
            group_score = [sum(sorted(g, reverse=True)[:2]) for g in groups]
            kept = sorted(range(router.num_group), key=lambda g: -group_score[g])[: router.topk_group]
            allowed = [i for i in range(len(scores)) if i // size in kept]
            selections.append(sorted(allowed, key=lambda i: -scores[i])[:top_k])
        else:  # softmax is monotone, so the top-k of the probabilities is the top-k of the logits
            selections.append(sorted(range(len(logits)), key=lambda i: -logits[i])[:top_k])
    return selections


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if f != "phimoe"])
def test_routing_counts_equal_brute_force(family):
    model = tiny_model(family, seed=3)
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    layers = moe_layers(model)
    captured = {}
    handles = [layer.router.register_forward_pre_hook(
        lambda module, args, name=layer.name: captured.__setitem__(name, args[0].detach().clone()))
        for layer in layers]
    with RoutingCounter(model) as routing:
        routing.observe(input_ids)
    for handle in handles:
        handle.remove()
    for layer in layers:
        expected = torch.zeros(layer.num_experts, dtype=torch.long)
        for chosen in _brute_force_selection(family, layer.router, captured[layer.name], layer.top_k):
            for expert in chosen:
                expected[expert] += 1
        assert routing.counts[layer.name].tolist() == expected.tolist(), layer.name
        assert routing.tokens[layer.name] == input_ids.numel()


def test_routing_excludes_padding_and_changes_nothing():
    model = tiny_model("qwen2_moe", seed=2)
    input_ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=mask)
    with RoutingCounter(model) as padded:
        padded.observe(input_ids, mask)
    with torch.no_grad(), RoutingCounter(model):
        hooked = model(input_ids=input_ids, attention_mask=mask)
    assert torch.equal(hooked.logits, plain.logits) and hooked.aux_loss is None
    with RoutingCounter(model) as unpadded:  # the same tokens without the padded tail
        unpadded.observe(input_ids[:1])
        unpadded.observe(input_ids[1:, :5])
    for name in padded.counts:
        assert padded.tokens[name] == 13
        assert padded.counts[name].tolist() == unpadded.counts[name].tolist()


def test_routing_statistics_hand_computed():
    model = tiny_model("qwen2_moe")
    routing = RoutingCounter(model)
    name = routing.layers[0].name
    routing.counts[name] = torch.tensor([6, 2, 0, 0, 0, 0, 0, 0])
    assert routing.load(name).tolist() == [0.75, 0.25, 0, 0, 0, 0, 0, 0]
    assert routing.entropy(name) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    mean = 1 / 8
    expected_std = math.sqrt(((0.75 - mean) ** 2 + (0.25 - mean) ** 2 + 6 * mean ** 2) / 8)
    assert routing.load_std(name) == pytest.approx(expected_std)
    routing.counts[name] = torch.full((8,), 5)
    assert routing.entropy(name) == pytest.approx(math.log(8)) and routing.load_std(name) == pytest.approx(0)


def test_hooks_are_removed_on_exit():
    model = tiny_model("qwen2_moe")
    with RoutingCounter(model) as routing:
        pass
    model(input_ids=torch.tensor([[5, 6, 7]]))
    assert all(count.sum() == 0 for count in routing.counts.values())
    with pytest.raises(RuntimeError):
        routing.observe(torch.tensor([[5, 6]]))


def test_routing_counted_in_the_loss_pass_equals_a_separate_count(word_tokenizer):
    """document_nll with a RoutingCounter counts exactly the scored tokens (bos + text + eos, cut
    to max_length; padding left out), as observing those rows one at a time does."""
    model = tiny_model("qwen2_moe", seed=5)
    model.eval()
    texts = ["w5 w6 w7", "w10 w11 w12 w13 w14 w15 w16", "w20 w21", "w30 w31 w30 w31 w9 w8"]
    with RoutingCounter(model) as fused:
        per_doc = document_nll(model, word_tokenizer, texts, max_length=6, batch_size=3, routing=fused)
    with RoutingCounter(model) as separate:
        for text in texts:
            ids = ([1] + word_tokenizer(text, add_special_tokens=False)["input_ids"] + [2])[:6]
            separate.observe(torch.tensor([ids]))
    assert [count for _, count in per_doc] == [4, 5, 3, 5]
    for name in separate.counts:
        assert fused.tokens[name] == separate.tokens[name] == 5 + 6 + 4 + 6  # every row's tokens
        assert fused.counts[name].tolist() == separate.counts[name].tolist()
