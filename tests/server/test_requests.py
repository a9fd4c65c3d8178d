"""Request validation without vLLM: :func:`prepare` and the service's routing of model names.

Unit tests pin ``prepare``'s documented behaviour; property-based tests (``hypothesis``) throw
arbitrary sampling values, prompts, chat messages and model names at it: whatever is refused
must be refused with a typed client error (never another exception), whatever is accepted must
lie within the documented bounds. The tokenizer and config are the tiny base's own.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import FakeEngine, make_lora_bundle, png_bytes

from deltaserve.server.config import EngineConfig, ServeConfig
from deltaserve.server.errors import InvalidRequestError, NotFoundError, status_of
from deltaserve.server.registry import DeltaRegistry
from deltaserve.server.requests import (
    _REQUEST_ID,
    IMAGE_PLACEHOLDER,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRINGS,
    InferenceRequest,
    SamplingFields,
    prepare,
)
from deltaserve.server.service import DeltaService

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
TASK = "alpha"
PROMPT = "What colour is the circle?"


@pytest.fixture(scope="module")
def service(tiny_base, tmp_path_factory) -> DeltaService:
    """The real service over a fake engine, with one registered LoRA task."""
    root = tmp_path_factory.mktemp("requests")
    engine = FakeEngine(tiny_base)
    config = ServeConfig(EngineConfig(model=str(tiny_base)), store=root / "store", router="explicit")
    registry = DeltaRegistry(config.store, tiny_base, engine, max_bundle_bytes=1 << 30)
    service = DeltaService(config, engine, registry)
    asyncio.run(registry.register(make_lora_bundle(tiny_base, root / "bundle", TASK, seed=1, examples=[])))
    return service


def _prepare(service: DeltaService, req: InferenceRequest):
    return prepare(
        req,
        tokenizer=service.engine.tokenizer,
        max_model_len=service.engine.max_model_len,
        image_tokens=service.image_tokens,
        config=service.config,
    )


# ---- prepare(): documented behaviour --------------------------------------------------------


def test_an_image_gets_a_placeholder_and_counts_as_its_feature_tokens(service, sample_images):
    prep = _prepare(service, InferenceRequest(prompt="What is it?", image=png_bytes(sample_images[0])))
    assert prep.prompt_token_ids == service.engine.tokenizer(f"{IMAGE_PLACEHOLDER}\nWhat is it?").input_ids
    assert prep.prompt_tokens == len(prep.prompt_token_ids) - 1 + 16  # (32 / 8)², CLS dropped
    assert service.image_tokens(32, 32) == 16
    assert prep.image.mode == "RGB" and prep.user_text == "What is it?"


@pytest.mark.parametrize(
    ("prompt", "with_image", "refusal"),
    [
        (f"{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER} two?", True, "at most one image"),
        (f"{IMAGE_PLACEHOLDER} where is it?", False, "no image was sent"),
        ("   ", False, "`prompt` must not be empty"),
        ("a\ud800b", False, "`prompt` contains an unpaired UTF-16 surrogate"),
    ],
)
def test_prompts_that_cannot_be_served_are_refused(service, sample_images, prompt, with_image, refusal):
    image = png_bytes(sample_images[0]) if with_image else None
    with pytest.raises(InvalidRequestError, match=refusal.replace("`", ".").replace("?", ".")):
        _prepare(service, InferenceRequest(prompt=prompt, image=image))


def test_the_default_max_tokens_shrinks_to_the_room_left_in_the_context(service):
    long = " ".join(["circle"] * 2000)
    ids = service.engine.tokenizer(long).input_ids
    room = 5
    prompt = service.engine.tokenizer.decode(ids[1 : service.engine.max_model_len - room])  # BOS re-added
    prep = _prepare(service, InferenceRequest(prompt=prompt))
    assert prep.prompt_tokens == service.engine.max_model_len - room
    assert prep.sampling.max_tokens == room < service.config.default_max_tokens
    with pytest.raises(InvalidRequestError, match="does not fit"):
        _prepare(service, InferenceRequest(prompt=prompt, sampling=SamplingFields(max_tokens=room + 1)))
    with pytest.raises(InvalidRequestError, match="the model's context"):
        _prepare(service, InferenceRequest(prompt=long))


def test_a_chat_is_rendered_with_the_template_and_one_bos(service):
    tokenizer = service.engine.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    prep = _prepare(service, InferenceRequest(messages=messages))
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prep.prompt_token_ids == tokenizer(rendered, add_special_tokens=False).input_ids
    assert prep.prompt_token_ids.count(tokenizer.bos_token_id) == 1
    assert prep.user_text == "Hello"
    with pytest.raises(InvalidRequestError, match="the last message must come from the user"):
        _prepare(service, InferenceRequest(messages=[*messages, {"role": "assistant", "content": "Hi"}]))
    surrogate = [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]
    with pytest.raises(InvalidRequestError, match="messages.0..content. contains an unpaired UTF-16 surrogate"):
        _prepare(service, InferenceRequest(messages=surrogate))


# ---- property-based: sampling values, prompts, messages ------------------------------------

INT_EDGES = [-(2**63), -1, 0, 1, 8, 9, 20, 21, 64, 1024, 1025, 2**31, 2**63 - 1, 2**63, 2**64, 2**70]
FLOAT_EDGES = [math.nan, math.inf, -math.inf, -2.5, -2.0, -0.0, 0.0, 1e-300, 1.0, 2.0, math.nextafter(2.0, 3.0)]
INT_FIELDS = ("max_tokens", "top_k", "seed", "n", "min_tokens", "logprobs")
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_ints = st.one_of(st.integers(-3, 40), st.sampled_from(INT_EDGES), st.integers(-(2**70), 2**70))
_floats = st.one_of(st.floats(-3, 3), st.sampled_from(FLOAT_EDGES), st.floats(), st.integers(-3, 3))
_text = st.one_of(
    st.text(max_size=40),
    st.text(max_size=20).map(lambda s: s + "\ud800"),  # JSON can carry a lone surrogate
    st.sampled_from(["", " ", IMAGE_PLACEHOLDER, f"{IMAGE_PLACEHOLDER} what?", "{{ x }}", "{% if %}"]),
)
_prompt = st.one_of(st.text(st.characters(categories=["L", "N", "Zs"]), min_size=1, max_size=40), _text)
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
_response_format = st.one_of(
    st.none(),
    _json,
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "xml", ""])}),
    st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries({"schema": _json})}),
)
_VALID = {  # the documented ranges (None: the server's default)
    "max_tokens": st.integers(1, 32),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(0, 50),
    "seed": st.integers(0, 2**63 - 1),
    "n": st.integers(1, MAX_N),
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0, 2, exclude_min=True),
    "min_tokens": st.integers(0, 4),
    "logprobs": st.integers(0, MAX_LOGPROBS),
    "stop": st.lists(st.text(min_size=1, max_size=8), max_size=MAX_STOP_STRINGS),
    "response_format": st.sampled_from([None, {"type": "text"}, {"type": "json_object"}]),
}
_WILD = {
    **{name: _ints for name in INT_FIELDS},
    **{name: _floats for name in FLOAT_FIELDS},
    "stop": st.lists(_text, max_size=MAX_STOP_STRINGS + 2),
    "response_format": _response_format,
}


@st.composite
def _sampling(draw):
    """Values within the documented ranges, then one or two fields anything of their type (edges
    often): so that both acceptance (the bounds) and each refusal are exercised."""
    fields = {name: draw(valid if name == "stop" else st.one_of(st.none(), valid)) for name, valid in _VALID.items()}
    for name in draw(st.lists(st.sampled_from(sorted(_WILD)), min_size=1, max_size=2, unique=True)):
        fields[name] = draw(_WILD[name])
    return SamplingFields(ignore_eos=draw(st.booleans()), **fields)


_part = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "image_url", "audio"]), "text": _text}),
    st.dictionaries(st.text(max_size=6), _json, max_size=2),
    _json,
)
_message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool", ""]), _json),
        "content": st.one_of(_text, st.lists(_part, max_size=3), _json),
    },
)
_request_id = st.one_of(st.none(), st.just(""), st.from_regex(r"[A-Za-z0-9._:-]{1,130}", fullmatch=True), _text)


@st.composite
def _image(draw):
    """None, arbitrary bytes, or a real PNG of random size."""
    import numpy as np
    from PIL import Image

    choice = draw(st.sampled_from(["none", "none", "bytes", "png"]))
    if choice == "none":
        return None
    if choice == "bytes":
        return draw(st.binary(max_size=64))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    return png_bytes(Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)))


_request = st.builds(
    InferenceRequest,
    prompt=_prompt,
    image=_image(),
    request_id=_request_id,
    chat=st.booleans(),
    messages=st.one_of(st.none(), st.none(), st.lists(_message, max_size=3)),
)


def _check_prepared(service: DeltaService, req: InferenceRequest) -> str:
    """``req`` is refused as invalid, or prepared within every documented bound: which of the two."""
    try:
        prep = _prepare(service, req)
    except InvalidRequestError:
        return "refused"
    s, config, max_model_len = prep.sampling, service.config, service.engine.max_model_len
    assert _REQUEST_ID.fullmatch(prep.request_id)
    assert prep.prompt_token_ids and 0 < prep.prompt_tokens < max_model_len
    assert 1 <= s.max_tokens <= min(config.max_tokens_limit, max_model_len - prep.prompt_tokens)
    assert 0.0 <= s.temperature <= 2.0 and 0.0 < s.top_p <= 1.0 and s.top_k >= 0
    assert s.seed is None or 0 <= s.seed < 2**63
    assert 1 <= s.n <= MAX_N and (s.n == 1 or s.temperature > 0)
    assert 0.0 <= s.min_p <= 1.0 and 0.0 < s.repetition_penalty <= 2.0
    assert -2.0 <= s.presence_penalty <= 2.0 and -2.0 <= s.frequency_penalty <= 2.0
    assert all(math.isfinite(v) for v in (s.temperature, s.top_p, s.min_p, s.presence_penalty, s.frequency_penalty))
    assert 0 <= s.min_tokens <= s.max_tokens
    assert s.logprobs is None or 0 <= s.logprobs <= MAX_LOGPROBS
    assert len(s.stop) <= MAX_STOP_STRINGS and all(0 < len(x) <= 64 and x.encode() for x in s.stop)
    assert s.json_schema is None or isinstance(json.loads(json.dumps(s.json_schema)), dict)
    prep.user_text.encode()  # what the router sees is valid text
    if prep.image is not None:
        assert prep.image.mode == "RGB" and math.prod(prep.image.size) <= config.max_image_pixels
    else:
        assert IMAGE_PLACEHOLDER not in service.engine.tokenizer.decode(prep.prompt_token_ids)
    return "accepted"


@pytest.mark.parametrize(
    ("field", "values"),
    [(f, INT_EDGES) for f in INT_FIELDS] + [(f, FLOAT_EDGES) for f in FLOAT_FIELDS],
)
def test_every_sampling_edge_is_refused_or_within_bounds(service, field, values):
    """Deterministic: each field's edge values with everything else at the defaults (and at a
    sampling temperature, which ``n`` > 1 needs)."""
    other = {"temperature": 1.0} if field != "temperature" else {}
    outcomes = {
        _check_prepared(service, InferenceRequest(prompt=PROMPT, sampling=SamplingFields(**other, **{field: value})))
        for value in values
    }
    assert outcomes == {"accepted", "refused"}  # the edges lie on both sides of the bounds


@FUZZ
@given(sampling=_sampling())
def test_any_sampling_values_are_prepared_within_bounds_or_refused_as_invalid(service, sampling):
    event(_check_prepared(service, InferenceRequest(prompt=PROMPT, sampling=sampling)))


@FUZZ
@given(req=_request)
def test_any_prompt_messages_image_and_id_are_prepared_within_bounds_or_refused_as_invalid(service, req):
    event(_check_prepared(service, req))


_model = st.one_of(st.none(), st.sampled_from(["", "auto", TASK, FakeEngine.model_name, "beta"]), _text)


@FUZZ
@given(model=_model, prompt=_prompt)
def test_any_model_name_is_routed_to_a_known_expert_or_refused(service, model, prompt):
    """``route`` is validation + routing (what ``submit`` does before the engine)."""
    try:
        routed = asyncio.run(service.route(InferenceRequest(prompt=prompt, task=model)))
    except (InvalidRequestError, NotFoundError) as exc:
        assert status_of(exc)[1] in (400, 404)
        event(type(exc).__name__)
        return
    event("routed")
    assert routed.expert in (FakeEngine.model_name, TASK)
    if model not in (None, "", "auto"):
        assert routed.expert == model


def test_the_fuzzed_service_state_is_untouched(service):
    """Nothing above registered, unregistered or left anything in flight."""
    assert service.registry.names() == [TASK] and service.inflight == 0
    assert list(Path(service.registry.store, "staging").iterdir()) == []


def test_refusals_name_the_field_not_server_objects(service):
    """An undecodable image, a non-string text part and bad ``stream_options`` are 400s that say what is wrong
    (before: PIL's "<_io.BytesIO object at 0x…>", a text object turned into its repr, ``include_usage: [1]`` taken as true)."""
    from deltaserve.server.http_api import ChatBody, _chat_messages
    from deltaserve.server.requests import decode_image

    with pytest.raises(InvalidRequestError) as exc:
        decode_image(b"not an image at all", service.config)
    assert "`image`" in str(exc.value) and "BytesIO" not in str(exc.value) and "0x" not in str(exc.value)
    with pytest.raises(InvalidRequestError, match=r"content\[0\]\.text` must be a string"):
        _chat_messages([{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}])
    for options, problem in (
        ({"include_usage": [1]}, "true or false"),
        ({"include_usage": "yes"}, "true or false"),
        ({"x": 1}, "unsupported"),
    ):
        body = ChatBody(model="base", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options=options)
        with pytest.raises(InvalidRequestError, match=problem):
            body.include_usage()
    assert (
        ChatBody(
            model="base", messages=[{"role": "user", "content": "hi"}], stream_options={"include_usage": True}
        ).include_usage()
        is True
    )


def test_the_image_placeholder_is_the_bases_own(tiny_base, tiny_qwen_base):
    """A raw prompt without a placeholder gets the part the base's chat template writes for an image."""
    from transformers import AutoTokenizer

    from deltaserve.server.requests import image_placeholder

    llava, qwen = (AutoTokenizer.from_pretrained(str(b)) for b in (tiny_base, tiny_qwen_base))
    assert image_placeholder(llava) == (IMAGE_PLACEHOLDER, f"{IMAGE_PLACEHOLDER}\n")
    assert image_placeholder(qwen) == ("<|image_pad|>", "<|vision_start|><|image_pad|><|vision_end|>")
