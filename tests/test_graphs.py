"""The recorded step of `train.fast.cuda_graphs`: what a graph computes equals the fast path's loss and gradients,
padded answer slots add nothing, and replayed gradients reach autograd scaled as the loss was. Recording and
replaying themselves need a GPU (`pytest -m gpu`, tests/test_fast.py)."""

import dataclasses
import functools

import pytest
import torch

from internvl_sft.data.dataset import answer_positions
from internvl_sft.fast import Tiles, answer_loss, summed_cross_entropy
from internvl_sft.graphs import AnswerLossGraphs, ReplayedGradients, answer_slots, compile_kind, padded_answers
from test_fast import FAST, LORA, padded_batch, training_model


@pytest.mark.parametrize(("count", "slots"), [(1, 64), (64, 64), (65, 128), (290, 320), (335, 384), (2100, 2560)])
def test_answer_slots_round_up_to_a_quarter_of_the_power_of_two(count, slots):
    assert answer_slots(count) == slots


def test_answer_slots_waste_at_most_a_quarter_beyond_the_smallest_size():
    for count in range(1, 5000):
        slots = answer_slots(count)
        assert count <= slots < count + max(64, count / 4)


def test_padded_answers_point_at_the_first_position_with_ignored_targets():
    rows, columns, targets = padded_answers(torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([7, 8]), 4)
    assert rows.tolist() == [1, 2, 0, 0] and columns.tolist() == [3, 4, 0, 0] and targets.tolist() == [7, 8, -100, -100]


def graphs_of(model) -> AnswerLossGraphs:
    base = model.get_base_model()
    return AnswerLossGraphs(base.model.language_model, base.lm_head, base.forward.causal_masks,
                            functools.partial(summed_cross_entropy, chunk_tokens=0))


def test_the_recorded_function_gives_the_fast_loss_and_gradients_with_padded_slots(tiny_native, random_lora_b):
    """What a graph records, run eagerly on the CPU: the summed loss over padded answer slots and its gradients
    (the trained projector's through the input embeddings) equal the fast path's own."""
    model = training_model(tiny_native, dataclasses.replace(LORA, freeze_mlp=False), FAST, random_lora_b)
    batch = padded_batch(model.config)
    fast = model.get_base_model().forward
    embeds, _ = fast.language_inputs(batch["input_ids"], None, batch["pixel_values"], Tiles(None, None))
    positions = answer_positions(batch["labels"])
    rows, columns = positions
    hidden = model.get_base_model().model.language_model(inputs_embeds=embeds).last_hidden_state
    expected = answer_loss(hidden, batch["labels"], model.get_base_model().lm_head, positions=positions)
    graphs = graphs_of(model)
    inputs = graphs.gradient_inputs(embeds)
    expected_gradients = torch.autograd.grad(expected * positions.shape[1], inputs)

    slots = padded_answers(rows, columns, batch["labels"][rows, columns + 1], answer_slots(positions.shape[1]) + 64)
    total, gradients = graphs.loss_and_gradients(embeds, *slots)
    torch.testing.assert_close(total, expected.detach() * positions.shape[1])
    assert embeds.requires_grad and len(gradients) == len(inputs) == len(graphs.trained_parameters) + 1
    for gradient, wanted in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, wanted)


def test_the_recorded_function_without_gradients_is_the_summed_loss_alone(tiny_native, random_lora_b):
    """An evaluation's graph: the same summed loss over padded slots, and no gradients."""
    model = training_model(tiny_native, LORA, FAST, random_lora_b).eval()
    batch = padded_batch(model.config)
    fast = model.get_base_model().forward
    positions = answer_positions(batch["labels"])
    rows, columns = positions
    with torch.no_grad():
        embeds, _ = fast.language_inputs(batch["input_ids"], None, batch["pixel_values"], Tiles(None, None))
        hidden = model.get_base_model().model.language_model(inputs_embeds=embeds).last_hidden_state
        expected = answer_loss(hidden, batch["labels"], model.get_base_model().lm_head, positions=positions)
        slots = padded_answers(rows, columns, batch["labels"][rows, columns + 1], answer_slots(positions.shape[1]))
        total, gradients = graphs_of(model).loss_and_gradients(embeds, *slots)
    torch.testing.assert_close(total, expected * positions.shape[1])
    assert gradients == [] and not total.requires_grad


def test_replayed_gradients_reach_each_input_times_the_gradient_passed_down():
    weight = torch.nn.Parameter(torch.ones(3))
    unused = torch.nn.Parameter(torch.ones(2))
    embeds = torch.zeros(2, requires_grad=True)
    replayed = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0]), None]
    loss = ReplayedGradients.apply(torch.tensor(6.0), replayed, embeds, weight, unused)
    (loss / 4).backward()
    assert loss.item() == 6.0
    assert embeds.grad.tolist() == [0.25, 0.5] and weight.grad.tolist() == [0.75, 1.0, 1.25] and unused.grad is None
    ReplayedGradients.apply(torch.tensor(6.0), replayed, embeds, weight, unused).backward()
    assert weight.grad.tolist() == [3.75, 5.0, 6.25]  # accumulated as autograd does


def test_a_new_compile_kind_is_a_batch_of_one_an_unaligned_length_one_needing_gradients_or_an_evaluation():
    kinds = {compile_kind(torch.zeros(batch, length, 4, requires_grad=grad))
             for batch, length, grad in ((16, 64, False), (9, 1920, False), (16, 72, False))}
    assert kinds == {(False, True, False, True)}
    assert compile_kind(torch.zeros(1, 64, 4)) == (True, True, False, True)
    assert compile_kind(torch.zeros(16, 60, 4)) == (False, False, False, True)
    assert compile_kind(torch.zeros(16, 64, 4, requires_grad=True)) == (False, True, True, True)
    with torch.no_grad():
        assert compile_kind(torch.zeros(16, 64, 4)) == (False, True, False, False)


def test_graphs_take_training_steps_and_evaluations_attended_causally_alone(tiny_native, random_lora_b):
    model = training_model(tiny_native, LORA, dataclasses.replace(FAST, compile=True, cuda_graphs=True), random_lora_b)
    fast = model.get_base_model().forward
    causal = fast.causal_masks
    model.train()
    assert fast.takes_graphs(causal)
    assert not fast.takes_graphs(torch.ones(2, 5, dtype=torch.long))  # a padding mask kept: left-padded
    with torch.no_grad():
        assert not fast.takes_graphs(causal)  # training mode (dropout) without gradients: nothing recorded for it
    model.eval()
    assert not fast.takes_graphs(causal)
    with torch.no_grad():
        assert fast.takes_graphs(causal)
        assert not fast.takes_graphs(torch.ones(2, 5, dtype=torch.long))
    assert not training_model(tiny_native, LORA, FAST, random_lora_b).get_base_model().forward.takes_graphs(causal)


def test_graphs_refuse_a_language_model_that_builds_its_own_masks(tiny_native, random_lora_b):
    fast = training_model(tiny_native, LORA, FAST, random_lora_b).get_base_model().forward
    fast.causal_masks = None  # as for layers with sliding windows
    with pytest.raises(ValueError, match="cuda_graphs needs a language model whose every layer attends"):
        fast.answer_loss_graphs()


def test_held_leaf_nodes_are_the_ones_later_graphs_use(tiny_native, random_lora_b):
    """The gradient nodes of the trained parameters, created once by the graphs (on their recording stream, on a
    GPU), are the ones every later autograd graph, such as the next step's `ReplayedGradients`, connects to."""
    model = training_model(tiny_native, LORA, FAST, random_lora_b)
    graphs = graphs_of(model)
    graphs.hold_leaf_nodes(torch.zeros(2, 3))
    held = {id(p): graphs.leaf_edges[id(p)].node for p in graphs.trained_parameters}
    assert len(graphs.leaf_edges) == len(held) > 0
    loss = ReplayedGradients.apply(torch.tensor(1.0), [None] * len(held), *graphs.trained_parameters)
    later = [node for node, _ in loss.grad_fn.next_functions[1:]]  # after the loss the replay computed
    assert all(node is held[id(p)] for node, p in zip(later, graphs.trained_parameters))
