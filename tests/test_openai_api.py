"""The OpenAI API as clients use it, through the official `openai` SDK against a live server: no field is
silently ignored, OpenAI's sampling fields (logit_bias, presence/frequency penalties, echo with prompt
logprobs, top_logprobs up to 20) and vLLM's /tokenize, /detokenize and /tokenizer_info."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from serve_fixtures import LiveServer, make_model, tokenizer  # noqa: F401 (tokenizer: a fixture)

from murmur.infer.engine import Engine
from murmur.infer.sampling import SamplingParams
from murmur.serve.app import create_app
from murmur.settings.serve import ServeSettings

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny-api"


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer.vocab_size, max_seq_len=128)


@pytest.fixture(scope="module")
def live(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=8)
    app = create_app(ServeSettings(default_max_tokens=8, max_prompt_chars=2000), engine=engine, model_name=MODEL)
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=30)


def chat(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}], **kw)


def refusal(call) -> dict:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value.body


# ---- never silently ignore -----------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("audio", {"voice": "alloy", "format": "mp3"}), ("modalities", ["audio"]),
                                         ("prediction", {"type": "content", "content": "x"}),
                                         ("functions", [{"name": "f"}]), ("reasoning_effort", "high")])
def test_openai_parameters_murmur_lacks_are_refused_by_name(client, field, value):
    body = refusal(lambda: chat(client, extra_body={field: value}))
    assert body["param"] == field and body["code"] == "unsupported_parameter"
    assert "does not support" in body["message"]


def test_unknown_fields_are_refused_at_every_level(client):
    assert refusal(lambda: chat(client, extra_body={"temprature": 0.5}))["param"] == "temprature"
    body = refusal(lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi", "colour": "red"}]))
    assert body["param"] == "messages.0.colour" and "Unrecognized request argument" in body["message"]
    assert refusal(lambda: client.completions.create(model=MODEL, prompt="hi", suffix="!"))["param"] == "suffix"
    assert refusal(lambda: chat(client, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {}, "extra": 1}}))["param"] == "response_format.json_schema.extra"


def test_murmur_extensions_and_echoed_assistant_fields_are_accepted(client):
    reply = chat(client, max_tokens=3, extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
                                                   "ignore_eos": True})
    assert reply.usage.completion_tokens == 3
    history = [{"role": "user", "content": "hi"}, reply.choices[0].message.model_dump(),
               {"role": "user", "content": "and?"}]
    assert client.chat.completions.create(model=MODEL, messages=history, max_tokens=2).choices[0].message


# ---- logit_bias and penalties --------------------------------------------------------------------------

def test_logit_bias_forces_and_bans_tokens(client, tokenizer):
    [token] = tokenizer.encode("a")
    forced = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0,
                                       logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == "a" * 5
    free = client.completions.create(model=MODEL, prompt="hello", max_tokens=1, temperature=0, logprobs=0)
    first = free.choices[0].logprobs.tokens[0]
    [first_id] = tokenizer.encode(first, specials_as_text=True) or [None]
    banned = client.completions.create(model=MODEL, prompt="hello", max_tokens=1, temperature=0, logprobs=0,
                                       logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.tokens[0] != first


def test_logit_bias_is_bounded(client, tokenizer):
    too_many = {str(i): 1 for i in range(301)}
    assert refusal(lambda: chat(client, logit_bias=too_many))["param"] == "logit_bias"
    body = refusal(lambda: chat(client, logit_bias={str(tokenizer.vocab_size + 5): 1}))
    assert body["param"] == "logit_bias" and "token id" in body["message"]
    assert refusal(lambda: chat(client, logit_bias={"12": 101}))["param"] == "logit_bias"
    assert refusal(lambda: chat(client, logit_bias={"x1": 1}))["param"] == "logit_bias"


def test_penalties_follow_openais_formula():
    from murmur.infer.sampling import apply_penalties

    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    counts = torch.tensor([[0, 1, 3, 0]])
    got = apply_penalties(logits, counts, [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)])
    assert torch.allclose(got, torch.tensor([[1.0, 2.0 - 0.5 - 0.25, 3.0 - 0.5 - 0.75, 0.5]]))


def reference_greedy(model, prompt: list[int], steps: int, presence: float, frequency: float,
                     bias: dict[int, float]) -> list[int]:
    """Greedy decoding with OpenAI's penalties recomputed from scratch each step (no cache, no batching)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()) if out else \
                torch.zeros_like(logits)
            logits = logits - presence * (counts > 0).float() - frequency * counts.float()
            for token, value in bias.items():
                logits[token] += value
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


def test_penalties_and_bias_in_the_engine_match_a_reference_decoder(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=4)
    prompts = [tokenizer.encode(text) for text in ("hello world", "the quick brown fox", "coffee")]
    settings = [(0.0, 0.0, {}), (2.0, 0.0, {}), (0.0, 2.0, {5: 3.0}), (1.0, 1.5, {7: -100.0})]
    for presence, frequency, bias in settings:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, presence_penalty=presence,
                                frequency_penalty=frequency, logit_bias=bias)
        got = [c.token_ids for c in engine.generate(prompts, params)]
        assert got == [reference_greedy(model, p, 12, presence, frequency, bias) for p in prompts]
    # The penalties change greedy output here, so the comparison above is not vacuous.
    plain = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    penalised = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                        frequency_penalty=2.0))
    assert [c.token_ids for c in plain] != [c.token_ids for c in penalised]


def test_penalty_ranges_are_checked(client):
    assert refusal(lambda: chat(client, presence_penalty=2.5))["param"] == "presence_penalty"
    assert refusal(lambda: chat(client, frequency_penalty=-3))["param"] == "frequency_penalty"


# ---- echo and logprobs ---------------------------------------------------------------------------------

def prompt_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logprobs = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_returns_the_prompt_and_its_logprobs(client, model, tokenizer, stream):
    prompt = "the quick brown fox jumps"
    ids = tokenizer.encode(prompt)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=3, echo=True)
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        token_logprobs = [lp for c in chunks if c.choices and c.choices[0].logprobs
                          for lp in c.choices[0].logprobs.token_logprobs]
        tops = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.top_logprobs]
    else:
        choice = client.completions.create(**kw).choices[0]
        text, token_logprobs, tops = choice.text, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs
    assert text.startswith(prompt) and len(text) > len(prompt)
    assert len(token_logprobs) == len(ids) + 1 and token_logprobs[0] is None and tops[0] is None
    assert token_logprobs[1:len(ids)] == pytest.approx(prompt_logprobs(model, ids), abs=1e-4)
    # Keyed by text, alternatives that decode alike (partial UTF-8 bytes) share a key: at most 3 each.
    assert all(1 <= len(top) <= 3 for top in tops[1:])
    assert all(max(top.values()) >= lp - 1e-5 for top, lp in zip(tops[1:], token_logprobs[1:]))


def test_echo_of_token_ids_and_of_several_prompts(client, tokenizer):
    ids = tokenizer.encode("hello world")
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, echo=True, temperature=0)
    assert reply.choices[0].text.startswith("hello world")
    reply = client.completions.create(model=MODEL, prompt=["coffee", "music"], n=2, max_tokens=1, echo=True)
    assert [c.text[:len(p)] for c, p in zip(reply.choices, ["coffee"] * 2 + ["music"] * 2)] == \
        ["coffee", "coffee", "music", "music"]


def test_top_logprobs_up_to_20(client):
    choice = client.completions.create(model=MODEL, prompt="hello", max_tokens=2, logprobs=20).choices[0]
    assert all(10 <= len(top) <= 20 for top in choice.logprobs.top_logprobs)  # keyed by text: some collide
    assert refusal(lambda: client.completions.create(model=MODEL, prompt="hello", logprobs=21))["param"] == "logprobs"
    reply = chat(client, max_tokens=2, logprobs=True, top_logprobs=20)
    assert all(len(c.top_logprobs) == 20 for c in reply.choices[0].logprobs.content)


# ---- /tokenize, /detokenize, /tokenizer_info -----------------------------------------------------------

def test_tokenize_and_detokenize_in_vllms_shape(live, tokenizer):
    text = "héllo wörld <|im_end|>"
    got = httpx.post(f"{live.url}/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert got["tokens"] == tokenizer.encode(text) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 128
    assert got["token_strs"] == [tokenizer.tokenizer.id_to_token(i) for i in got["tokens"]]
    messages = [{"role": "user", "content": "hi"}]
    chat_ids = httpx.post(f"{live.url}/tokenize", json={"messages": messages}).json()["tokens"]
    assert chat_ids == tokenizer.render_chat(messages, add_generation_prompt=True)
    back = httpx.post(f"{live.url}/detokenize", json={"model": MODEL, "tokens": got["tokens"]}).json()
    assert back == {"prompt": text}
    info = httpx.get(f"{live.url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and "im_start" in info["chat_template"]


def test_tokenize_is_bounded_and_checked(live, tokenizer):
    def error(path, body):
        response = httpx.post(f"{live.url}{path}", json=body)
        assert response.status_code == 400
        return response.json()["error"]

    assert error("/tokenize", {"prompt": "x" * 2001})["param"] == "prompt"
    assert error("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]})["param"] == "prompt"
    assert error("/detokenize", {"tokens": [tokenizer.vocab_size]})["param"] == "tokens"
    assert error("/tokenize", {"prompt": "x", "truncate": 3})["param"] == "truncate"
