"""The runtime's greedy decoding equals the numpy reference's, token for token, and a chat that
reuses its KV cache produces exactly the tokens of the same conversation run from scratch."""

import pytest
from bundle_reference import reference_for, reference_greedy
from tiny_models import make_tiny_model, save_tiny_model

import edgellm
from edgellm.export.exporter import export_model

PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return",
    '{"name": "edgellm", "size":',
    "東京は日本の首都です。",
    "<|im_start|>user\nWrite a poem about the sea.<|im_end|>\n<|im_start|>assistant\n",
]
N_TOKENS = 64


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_bundle(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = make_tiny_model(request.param, tie=request.param == "llama", heads=6, kv_heads=2, hidden=96)
    bundle = folder / "bundle"
    export_model(save_tiny_model(model, folder / "hf"), bundle)
    return bundle


def runtime_greedy(model, prompt_ids, n=N_TOKENS) -> list[int]:
    tokens = [
        c.token_id
        for c in model.stream(prompt_ids, max_tokens=n, temperature=0, stop_token_ids=())
        if c.token_id is not None
    ]
    assert len(tokens) == n
    return tokens


def check_greedy_parity(bundle, chunked: int) -> None:
    reference = reference_for(bundle)
    models = {chunk: edgellm.load(bundle, prefill_chunk=chunk, context_length=256) for chunk in (256, chunked)}
    try:
        for prompt in PROMPTS:
            ids = models[256].encode(prompt)
            expected = reference_greedy(reference, ids, N_TOKENS)
            for chunk, model in models.items():
                assert runtime_greedy(model, ids) == expected, (prompt, f"prefill chunk {chunk}")
    finally:
        for model in models.values():
            model.close()


def test_tiny_model_greedy_tokens_equal_the_reference_with_and_without_chunked_prefill(tiny_bundle):
    check_greedy_parity(tiny_bundle, chunked=3)


def test_smollm2_greedy_tokens_equal_the_reference_with_and_without_chunked_prefill(smollm2_bundle):
    check_greedy_parity(smollm2_bundle, chunked=5)


def converse(model, questions, **options) -> tuple[list[list[int]], list[int]]:
    """Answer each question in one session; returns each answer's tokens and the cached counts."""
    session = model.chat_session(system="You are a helpful assistant.", max_tokens=24, temperature=0, **options)
    answers, cached = [], []
    for question in questions:
        chunks = list(session.send(question))
        answers.append([c.token_id for c in chunks if c.token_id is not None])
        cached.append(chunks[-1].stats.cached_tokens)
    return answers, cached, session


def check_chat_reuse(bundle) -> None:
    questions = ["Hi! My name is Anna.", "What is my name?", "Tell me a fact about the sea."]
    with edgellm.load(bundle, context_length=512) as model:
        answers, cached, session = converse(model, questions)
        assert cached[0] == 0 and all(c > 0 for c in cached[1:])  # later turns reused the cache
        history = session.messages
    with edgellm.load(bundle, context_length=512) as fresh:
        for turn in range(1, len(questions)):
            # The conversation up to this turn from a cold cache gives the same answer tokens.
            fresh.generator.cached_ids.clear()
            fresh.backend.reset()
            upto = history[: 1 + 2 * turn + 1]  # system, earlier pairs, this turn's question
            ids = fresh.encode_chat(upto)
            tokens = [c.token_id for c in fresh.stream(ids, max_tokens=24, temperature=0) if c.token_id is not None]
            assert tokens == answers[turn], f"turn {turn}"


def test_tiny_chat_with_kv_reuse_equals_the_conversation_run_from_scratch(tiny_bundle):
    check_chat_reuse(tiny_bundle)


def test_smollm2_chat_with_kv_reuse_equals_the_conversation_run_from_scratch(smollm2_bundle):
    check_chat_reuse(smollm2_bundle)
