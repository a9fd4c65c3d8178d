"""Inference requests: what the front ends hand in, and their validation.

Both front ends (gRPC, HTTP) build an :class:`InferenceRequest` and call
:func:`prepare`, which checks everything *before* the request reaches routing or the
engine, and raises :class:`~deltaserve.server.errors.InvalidRequestError` naming the
field. A refused request changes nothing.

Prompt semantics (the same as vLLM's): ``prompt`` is raw text, tokenized as is (the
tokenizer adds BOS). With ``chat=True`` (``/v1/chat/completions``, or
``GenerateRequest.chat``) the messages go through the base model's chat template
first. One image per request: if an image is attached and the prompt has no image
placeholder, the base's image part is put in front; vLLM expands the placeholder to the
image's feature tokens. Both come from the base (:func:`image_placeholder`): the token is
the tokenizer's ``image_token`` (``<image>``, Qwen2-VL's ``<|image_pad|>``), the part is
what the base's chat template writes for an image (``"<image>\\n"``,
``<|vision_start|><|image_pad|><|vision_end|>``).
"""

from __future__ import annotations

import io
import json
import math
import re
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

from deltaserve.server.config import ServeConfig
from deltaserve.server.engine import Sampling
from deltaserve.server.errors import InvalidRequestError

IMAGE_PLACEHOLDER = "<image>"
"""The image token of a tokenizer that names none (and the tiny LLaVA base's)."""
_MARK = "\x00deltaserve-text\x00"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_STOP_STRINGS = 4
MAX_N = 8
MAX_LOGPROBS = 20
MAX_SCHEMA_BYTES = 64 * 1024


@dataclass
class SamplingFields:
    """Sampling values as sent; ``None`` means "not set" (server default)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    """vLLM's extension: generate ``max_tokens`` even past end-of-sequence (fixed-length answers for benchmarks)."""
    n: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    logprobs: int | None = None
    """Alternatives per generated token to return with their log-probabilities (0: only the
    sampled token's); None: no log-probabilities."""
    response_format: dict[str, Any] | None = None
    """OpenAI's ``response_format``: ``{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": …}}``."""


@dataclass
class InferenceRequest:
    """One generation request, front-end independent."""

    prompt: str = ""
    """Raw prompt; ignored when ``messages`` is given."""
    image: bytes | None = None
    """Encoded image (PNG, JPEG, …), at most one."""
    task: str | None = None
    """A registered task, the base model's name, ``"auto"`` or None (= auto)."""
    sampling: SamplingFields = field(default_factory=SamplingFields)
    request_id: str | None = None
    chat: bool = False
    """Apply the chat template to ``prompt`` as one user turn."""
    messages: list[dict[str, Any]] | None = None
    """Chat messages (``{"role", "content"}``; content a string or text/image parts); implies ``chat``."""
    stream: bool = True
    """The caller wants output as it is generated; False: the whole answer at once (the engine
    then hands over one final output per choice instead of one per token)."""
    api: str = "grpc"
    """Which front end sent it (a metrics label)."""


@dataclass
class PreparedRequest:
    """A validated request, ready for routing and the engine."""

    request_id: str
    prompt_token_ids: list[int]
    prompt_tokens: int
    """Prompt length as the engine counts it (image placeholder expanded)."""
    sampling: Sampling
    image: Any
    """Decoded RGB ``PIL.Image`` or None."""
    user_text: str
    """What the user asked (last user turn, no template): the router's input."""


def decode_image(data: bytes, config: ServeConfig):
    """Decode an untrusted image, refusing oversized data *before* decompressing pixels."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > config.max_image_bytes:
        raise InvalidRequestError(f"`image` is {len(data)} bytes; the limit is {config.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            width, height = img.size
            if width * height > config.max_image_pixels:
                raise InvalidRequestError(
                    f"`image` is {width}×{height} pixels; the limit is {config.max_image_pixels} pixels"
                )
            img.load()
            return img.convert("RGB")
    except InvalidRequestError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        if isinstance(exc, UnidentifiedImageError):  # PIL's message names its in-memory buffer object
            raise InvalidRequestError(
                "`image` is not an image format the server reads (PNG, JPEG, WebP, GIF, BMP…)"
            ) from None
        raise InvalidRequestError(f"`image` could not be decoded: {exc}") from None


def _sampling(fields: SamplingFields, prompt_tokens: int, max_model_len: int, config: ServeConfig) -> Sampling:
    room = max_model_len - prompt_tokens
    if fields.max_tokens is None:
        max_tokens = min(config.default_max_tokens, room)
    else:
        max_tokens = fields.max_tokens
        if max_tokens <= 0:
            raise InvalidRequestError(f"`max_tokens` must be at least 1, got {max_tokens}")
        if max_tokens > config.max_tokens_limit:
            raise InvalidRequestError(f"`max_tokens` {max_tokens} is above the server limit {config.max_tokens_limit}")
        if max_tokens > room:
            raise InvalidRequestError(
                f"`max_tokens` {max_tokens} does not fit: the prompt takes {prompt_tokens} of the model's {max_model_len} tokens"
            )
    temperature = 1.0 if fields.temperature is None else float(fields.temperature)
    if not math.isfinite(temperature) or not 0.0 <= temperature <= 2.0:
        raise InvalidRequestError(f"`temperature` must be within [0, 2], got {fields.temperature}")
    top_p = 1.0 if fields.top_p is None else float(fields.top_p)
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidRequestError(f"`top_p` must be within (0, 1], got {fields.top_p}")
    top_k = 0 if fields.top_k is None else int(fields.top_k)
    if top_k < 0:
        raise InvalidRequestError(f"`top_k` must be 0 (off) or positive, got {top_k}")
    if len(fields.stop) > MAX_STOP_STRINGS or any(not s or len(s) > 64 for s in fields.stop):
        raise InvalidRequestError(f"`stop` takes at most {MAX_STOP_STRINGS} non-empty strings of ≤ 64 characters")
    for i, s in enumerate(fields.stop):
        _check_text(s, f"stop[{i}]")
    if fields.seed is not None and not 0 <= fields.seed < 2**63:
        raise InvalidRequestError(f"`seed` must be an integer in [0, 2^63), got {fields.seed}")
    n = 1 if fields.n is None else fields.n
    if not 1 <= n <= MAX_N:
        raise InvalidRequestError(f"`n` must be within [1, {MAX_N}], got {n}")
    if n > 1 and temperature == 0.0:
        raise InvalidRequestError(f"`n` must be 1 with greedy sampling (`temperature` 0), got {n}")
    min_p = _ranged(fields.min_p, "min_p", 0.0, 0.0, 1.0)
    presence = _ranged(fields.presence_penalty, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _ranged(fields.frequency_penalty, "frequency_penalty", 0.0, -2.0, 2.0)
    repetition = _ranged(fields.repetition_penalty, "repetition_penalty", 1.0, 0.0, 2.0)
    if repetition <= 0.0:
        raise InvalidRequestError(f"`repetition_penalty` must be within (0, 2], got {fields.repetition_penalty}")
    min_tokens = 0 if fields.min_tokens is None else fields.min_tokens
    if not 0 <= min_tokens <= max_tokens:
        raise InvalidRequestError(f"`min_tokens` must be within [0, max_tokens = {max_tokens}], got {min_tokens}")
    if fields.logprobs is not None and not 0 <= fields.logprobs <= MAX_LOGPROBS:
        raise InvalidRequestError(
            f"`top_logprobs` / `logprobs` must be within [0, {MAX_LOGPROBS}], got {fields.logprobs}"
        )
    json_schema, json_object = _response_format(fields.response_format)
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=fields.seed,
        stop=list(fields.stop),
        ignore_eos=bool(fields.ignore_eos),
        n=n,
        min_p=min_p,
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=repetition,
        min_tokens=min_tokens,
        logprobs=fields.logprobs,
        json_schema=json_schema,
        json_object=json_object,
    )


def _ranged(value: float | None, name: str, default: float, low: float, high: float) -> float:
    if value is None:
        return default
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequestError(f"`{name}` must be within [{low:g}, {high:g}], got {value}")
    return value


def _response_format(fmt: dict[str, Any] | None) -> tuple[dict | None, bool]:
    """OpenAI ``response_format`` → (JSON schema, any-JSON-object flag)."""
    if fmt is None:
        return None, False
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None, False
    if kind == "json_object":
        return None, True
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequestError("`response_format.json_schema.schema` must be a JSON schema object")
        if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
            raise InvalidRequestError(f"`response_format.json_schema.schema` is larger than {MAX_SCHEMA_BYTES} bytes")
        return schema, False
    raise InvalidRequestError("`response_format.type` must be `text`, `json_object` or `json_schema`")


def _check_text(value: str, field: str) -> None:
    """Text must be encodable as UTF-8: JSON can carry a lone UTF-16 surrogate (``"\\ud800"``), no tokenizer can."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"`{field}` contains an unpaired UTF-16 surrogate at character {exc.start}") from None


def _chat_prompt(tokenizer, messages: list[dict[str, Any]]) -> tuple[str, str]:
    """Render chat messages with the model's template; return (prompt, last user text)."""
    if not messages:
        raise InvalidRequestError("`messages` must not be empty")
    user_text = ""
    for i, message in enumerate(messages):
        if message.get("role") not in ("system", "user", "assistant"):
            raise InvalidRequestError(f"`messages[{i}].role` must be system, user or assistant")
        content = message.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        else:
            raise InvalidRequestError(f"`messages[{i}].content` must be a string or a list of parts")
        _check_text(text, f"messages[{i}].content")
        if message["role"] == "user":
            user_text = text
    if messages[-1].get("role") != "user":
        raise InvalidRequestError("the last message must come from the user")
    try:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template error is the request's fault (odd message structure)
        raise InvalidRequestError(f"`messages` do not fit the model's chat template: {exc}") from None
    return prompt, user_text


def image_placeholder(tokenizer) -> tuple[str, str]:
    """(image token, image part) of the base: the token that stands for one image in a prompt (the tokenizer's
    ``image_token``), and the text the base's chat template writes for an image part — what goes in front of a
    prompt that has none, so that a raw prompt meets the model as a rendered chat would."""
    cached = getattr(tokenizer, "_deltaserve_image_placeholder", None)
    if cached is not None:
        return cached
    token = getattr(tokenizer, "image_token", None) or IMAGE_PLACEHOLDER
    part = f"{token}\n"
    try:
        render = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": [*image, {"type": "text", "text": _MARK}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for image in ([{"type": "image"}], [])
        ]
        with_image, without = render
        head = without.index(_MARK)
        # the template inserts the image part just before the text: same head, then the part
        if with_image[:head] == without[:head] and token in with_image[head : with_image.index(_MARK)]:
            part = with_image[head : with_image.index(_MARK)]
    except Exception:  # no chat template (or one that cannot render an image part): the token and a newline
        pass
    try:
        tokenizer._deltaserve_image_placeholder = (token, part)
    except AttributeError:
        pass
    return token, part


def prepare(
    req: InferenceRequest, *, tokenizer, max_model_len: int, image_tokens, config: ServeConfig
) -> PreparedRequest:
    """Validate ``req`` and turn it into token ids + engine sampling parameters. ``image_tokens(height, width)``:
    the feature tokens an image expands to (its placeholder is one token of ``ids``)."""
    if req.request_id is not None and req.request_id != "" and not _REQUEST_ID.fullmatch(req.request_id):
        raise InvalidRequestError("`request_id` must be 1-128 characters of [A-Za-z0-9._:-]")
    request_id = req.request_id or uuid.uuid4().hex

    image = decode_image(req.image, config) if req.image else None
    image_token, image_part = image_placeholder(tokenizer)
    if req.messages is not None:
        prompt, user_text = _chat_prompt(tokenizer, req.messages)
    else:
        if not req.prompt or not req.prompt.strip():
            raise InvalidRequestError("`prompt` must not be empty")
        _check_text(req.prompt, "prompt")
        user_text = req.prompt
        prompt = req.prompt
        if req.chat:
            content = (
                [{"type": "image"}, {"type": "text", "text": req.prompt}]
                if image is not None and image_token not in req.prompt
                else req.prompt
            )
            prompt, user_text = _chat_prompt(tokenizer, [{"role": "user", "content": content}])
    if not user_text.strip() and image is None:
        raise InvalidRequestError("`prompt` must not be empty")

    placeholders = prompt.count(image_token)
    if image is not None and placeholders == 0:
        prompt = f"{image_part}{prompt}"
        placeholders = 1
    if placeholders > 1:
        raise InvalidRequestError(
            f"at most one image per request; the prompt has {placeholders} `{image_token}` placeholders"
        )
    if placeholders == 1 and image is None:
        raise InvalidRequestError(f"the prompt contains `{image_token}` but no image was sent")

    # A rendered chat carries its own BOS (the template's); a raw prompt gets the tokenizer's,
    # exactly as vLLM's OpenAI server does for /v1/chat/completions and /v1/completions.
    chat = req.messages is not None or req.chat
    ids = tokenizer(prompt, add_special_tokens=not chat).input_ids
    prompt_tokens = len(ids) + (image_tokens(image.height, image.width) - 1 if image is not None else 0)
    if prompt_tokens >= max_model_len:
        raise InvalidRequestError(
            f"the prompt is {prompt_tokens} tokens; the model's context is {max_model_len} tokens (including the answer)"
        )
    sampling = _sampling(req.sampling, prompt_tokens, max_model_len, config)
    return PreparedRequest(
        request_id=request_id,
        prompt_token_ids=ids,
        prompt_tokens=prompt_tokens,
        sampling=sampling,
        image=image,
        user_text=user_text.strip(),
    )
