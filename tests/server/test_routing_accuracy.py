"""The ``auto`` router, in process (no vLLM): accuracy on held-out prompts of the tuning world, and its decisions.

A reduced version of ``bench/routing.py`` (same code: :mod:`deltaserve.server.routing_eval`):
the two downstream tasks registered with 24 training prompts each; their held-out prompts
must reach them, the general tasks' and free-form prompts the base (issue criterion: ≥ 95 %).
"""

from __future__ import annotations

import pytest

from deltaserve.server import routing_eval as E
from deltaserve.server.routing import RouteQuery, TaskCard, load_router

EXAMPLES = 24


@pytest.fixture(scope="module")
def world():
    from deltaserve.tuning.world import WorldConfig

    # Small splits; test samples are a prefix of the full world's test split.
    return E.world_dirs(WorldConfig(general_train=8, downstream_train=120, val=10, test=60))


@pytest.fixture(scope="module")
def cards(world) -> list[TaskCard]:
    return E.task_cards(world[0], EXAMPLES, seed=0)


@pytest.fixture(scope="module")
def router(tiny_base, cards):
    router = load_router("auto", {}, base_dir=str(tiny_base))  # the defaults: what `deltaserve serve` runs
    router.update(cards)
    return router


def test_held_out_prompts_reach_their_expert_and_open_world_prompts_the_base(world, cards, router):
    queries = E.held_out_queries(*world, split="test") + E.open_world_queries()
    report = E.evaluate(router, queries, [c.name for c in cards])
    table = E.confusion_table(report)
    assert report.n >= 400 and sum(q.row == E.ROW_FREE for q in queries) >= 50
    assert report.expert_accuracy >= 0.95, f"right expert {report.expert_accuracy:.1%}\n{table}\n{report.errors[:10]}"
    assert report.open_world_accuracy >= 0.95, f"to base {report.open_world_accuracy:.1%}\n{table}\n{report.errors[:10]}"
    for row in (*[c.name for c in cards], E.ROW_GENERAL, E.ROW_FREE):
        assert report.accuracy[row] >= 0.9, f"{row}: {report.accuracy[row]:.1%}\n{table}"


def test_decision_carries_router_score_and_reason(world, router):
    from deltaserve.tuning.data import load_task

    sample = load_task(world[0] / "relations", splits=("test",))["test"][0]
    decision = router.route(RouteQuery(sample.prompt, sample.load_image()))
    assert decision.expert == "relations" and decision.router == "auto"
    assert router.threshold <= decision.score <= 1.0
    assert "`relations`" in decision.reason and "threshold" in decision.reason
    assert router.scores(RouteQuery(sample.prompt))["relations"] == pytest.approx(decision.score)


def test_below_threshold_goes_to_the_base(tiny_base, cards, router):
    free = router.route(RouteQuery("What is the capital of France?"))
    assert free.expert is None and 0.0 <= free.score < router.threshold
    assert "open world" in free.reason and "threshold" in free.reason

    # The same task prompt meets the base when the threshold is above its score.
    prompt = cards[0].examples[0][0]
    assert router.route(RouteQuery(prompt)).expert == cards[0].name
    strict = load_router("auto", {"threshold": "1.01"}, base_dir=str(tiny_base))
    strict.update(cards)
    decision = strict.route(RouteQuery(prompt))
    assert decision.expert is None and decision.score < 1.01 and "open world" in decision.reason

    # A fragment of a task's phrasing is not that task ("Where is the X?" is the base's `position` task).
    fragment = router.route(RouteQuery("Where is the red square?"))
    assert fragment.expert is None, fragment


def test_no_registered_task_means_base(tiny_base):
    router = load_router("auto", {}, base_dir=str(tiny_base))
    router.update([TaskCard("empty", "lora", "no examples", [])])
    decision = router.route(RouteQuery("Which digit is written here?"))
    assert decision.expert is None and decision.reason


def test_image_evidence_comes_from_the_base_vision_tower(world, tiny_base, cards):
    from deltaserve.tuning.data import load_task

    router = load_router("auto", {"image_weight": "0.3"}, base_dir=str(tiny_base))
    router.update(cards)
    sample = load_task(world[0] / "digits", splits=("test",))["test"][0]
    evidence = router.components(RouteQuery(sample.prompt, sample.load_image()))
    assert evidence["digits"].image is not None and evidence["digits"].image > evidence["relations"].image
    assert router.route(RouteQuery(sample.prompt, sample.load_image())).expert == "digits"
    assert router.components(RouteQuery(sample.prompt))["digits"].image is None  # no image: text alone


def test_unknown_options_are_refused(tiny_base):
    with pytest.raises(ValueError, match="unknown option"):
        load_router("auto", {"treshold": "0.5"}, base_dir=str(tiny_base))
    with pytest.raises(ValueError, match="text"):
        load_router("auto", {"text": "bm25"}, base_dir=str(tiny_base))
