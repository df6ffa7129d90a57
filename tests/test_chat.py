"""Chat templates render exactly as transformers renders them, and a chat session that outgrows
its context drops the oldest turns after the system prompt."""

import pytest
from tiny_models import CHATML_TEMPLATE
from transformers import PreTrainedTokenizerFast

import edgellm
from edgellm.bundle.manifest import read_manifest
from edgellm.errors import ContextOverflowError, InvalidSettingError
from edgellm.generate.chat_template import ChatTemplateError, render_chat

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! ✨"},
        {"role": "user", "content": "日本語で答えて"},
    ],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]
GUARDED = (
    "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('System message must be first') }}{% endif %}{{ m['content'] }}{% endfor %}"
)


@pytest.fixture(scope="module")
def smollm2_template(smollm2_bundle):
    manifest = read_manifest(smollm2_bundle)
    return manifest.chat_template, manifest.tokenizer.special_tokens, smollm2_bundle


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_equals_transformers_apply_chat_template(smollm2_template, messages, add_generation_prompt):
    template, special, bundle = smollm2_template
    for source in (template, CHATML_TEMPLATE):
        hf = PreTrainedTokenizerFast(tokenizer_file=str(bundle / "tokenizer.json"))
        hf.chat_template = source
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert (
            render_chat(source, messages, add_generation_prompt=add_generation_prompt, special_tokens=special)
            == expected
        )


def test_raise_exception_in_a_template_is_a_clear_error():
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]
    with pytest.raises(ChatTemplateError, match="System message must be first"):
        render_chat(GUARDED, messages)


@pytest.mark.parametrize("messages", [[], "hello", [{"role": "robot", "content": "x"}], [{"role": "user"}]])
def test_malformed_messages_are_refused(messages):
    with pytest.raises(InvalidSettingError):
        render_chat(CHATML_TEMPLATE, messages)


@pytest.fixture(scope="module")
def tiny_bundle(tiny_llama_bundle):
    return tiny_llama_bundle


def test_a_long_chat_drops_the_oldest_turns_but_keeps_the_system_prompt(tiny_bundle):
    with edgellm.load(tiny_bundle, context_length=160) as model:
        session = model.chat_session(system="You are a tiny test model.", max_tokens=16, temperature=0)
        for i in range(12):
            list(session.send(f"Question number {i}: tell me about the sea and the sky."))
        assert session.dropped_turns > 0
        assert session.messages[0]["role"] == "system"
        assert session.messages[-2]["content"].startswith("Question number 11")
        ids = model.encode_chat(session.messages)
        assert len(ids) <= 160


def test_a_single_message_larger_than_the_context_fails_and_leaves_the_session_usable(tiny_bundle):
    with edgellm.load(tiny_bundle, context_length=64) as model:
        session = model.chat_session(max_tokens=8, temperature=0)
        with pytest.raises(ContextOverflowError):
            list(session.send("sea " * 200))
        assert session.turns == []
        assert "".join(c.text for c in session.send("Hi")) is not None
