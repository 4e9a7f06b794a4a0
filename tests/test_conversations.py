"""conversations.py: normalising chat / instruction rows and rendering them as token ids with an SFT loss mask,
checked with the real SmolLM2-135M-Instruct tokenizer (ChatML with a default system prompt)."""
import os

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from conversations import (INSTRUCT_PROMPT, SKIP_REASONS, normalise_chat, normalise_instruct, render_chat,
                           render_instruct)

SYSTEM = "You answer in one short sentence."
CONVERSATION = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."},
                {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome is the capital of Italy."}]


@pytest.fixture(scope="module")
def smollm2():
    from hf_interop import embedded_smollm2_gguf

    folder, name = os.path.split(embedded_smollm2_gguf())
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture
def bpe(bpe_tokenizer_dir):
    """The conftest BPE tokenizer (plain ChatML template), fresh per test so that tests may change it."""
    return AutoTokenizer.from_pretrained(bpe_tokenizer_dir)


def masked_runs(tokenizer, ids, mask):
    """The decoded text of each contiguous run of masked tokens."""
    runs, run = [], []
    for i, m in zip(ids, mask + [0]):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer.decode(r) for r in runs]


def chatml_reference_mask(tokenizer, ids):
    """The ChatML rule stated on ids alone: 1 from after '<|im_start|>assistant\\n' through the next <|im_end|>."""
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    mask, inside, i = [0] * len(ids), False, 0
    while i < len(ids):
        if not inside and ids[i:i + len(header)] == header:
            inside, i = True, i + len(header)
            continue
        mask[i] = int(inside)
        inside = inside and ids[i] != end
        i += 1
    return mask


def assert_assistant_turns_masked(tokenizer, messages):
    ids, mask = render_chat(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert isinstance(ids, list) and isinstance(mask, list) and all(type(x) is int for x in ids + mask)
    assert masked_runs(tokenizer, ids, mask) == [m["content"] + "<|im_end|>" for m in messages
                                                 if m["role"] == "assistant"]
    assert mask == chatml_reference_mask(tokenizer, ids)
    unlearned = text
    for m in messages:  # every system and user token, every header, is outside the mask
        if m["role"] == "assistant":
            unlearned = unlearned.replace(m["content"] + "<|im_end|>", "", 1)
    assert tokenizer.decode([i for i, m in zip(ids, mask) if not m]) == unlearned
    newline = tokenizer.encode("\n", add_special_tokens=False)
    for i in range(1, len(ids)):
        if mask[i - 1] and not mask[i]:  # the newline after an assistant's <|im_end|> is not learned
            assert [ids[i]] == newline
    return ids, mask, text


# ----------------------------------------------------------------------------------------------------------
# Normalising

def test_role_aliases_map_to_the_canonical_roles_and_content_is_kept_as_is():
    row = {"conversations": [{"role": " USER ", "content": "  hi\n"}, {"role": "bot", "content": "a"},
                             {"role": "Human", "content": "b"}, {"role": "gpt", "content": "c "},
                             {"role": "user", "content": "d"}, {"role": "MODEL", "content": "e"}]}
    messages, reason = normalise_chat(row, field="conversations")
    assert reason is None
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages] == ["  hi\n", "a", "b", "c ", "d", "e"]


def test_arrow_rows_with_extra_keys_normalise_like_dicts():
    table = pa.Table.from_pylist([{"messages": [{"role": "user", "content": "hi", "name": None},
                                                {"role": "assistant", "content": "hello", "name": "bot1"}]}])
    messages, reason = normalise_chat(table.to_pylist()[0])
    assert reason is None
    assert messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("row, reason", [
    ({"text": "no messages here"}, "missing_field"),
    ({"messages": None}, "missing_field"),
    ({"messages": "user: hi"}, "not_a_list"),
    ({"messages": []}, "empty"),
    ({"messages": ["hi", {"role": "assistant", "content": "a"}]}, "bad_message"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "bad_message"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "a"}]}, "bad_message"),
    ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "a"}]}, "bad_message"),
    ({"messages": [{"role": 1, "content": "hi"}, {"role": "assistant", "content": "a"}]}, "bad_message"),
    ({"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "a"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": " \n"}, {"role": "assistant", "content": "a"}]}, "empty_content"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}, "no_assistant"),
])
def test_each_chat_skip_reason(row, reason):
    assert normalise_chat(row) == (None, reason)
    assert reason in SKIP_REASONS


def test_first_failing_reason_in_order_wins_over_message_order():
    row = {"messages": [{"role": "user", "content": ""}, {"role": "alien", "content": "x"}, {"role": "user"}]}
    assert normalise_chat(row) == (None, "bad_message")
    row["messages"].pop()
    assert normalise_chat(row) == (None, "unknown_role")


@pytest.mark.parametrize("row, reason", [
    ({"output": "o"}, "missing_field"),
    ({"instruction": "i", "output": None}, "missing_field"),
    ({"instruction": 3, "output": "o"}, "bad_message"),
    ({"instruction": "i", "input": ["x"], "output": "o"}, "bad_message"),
    ({"instruction": "  ", "output": "o"}, "empty_content"),
    ({"instruction": "i", "output": "\n"}, "empty_content"),
])
def test_each_instruct_skip_reason(row, reason):
    assert normalise_instruct(row) == (None, reason)
    assert reason in SKIP_REASONS


def test_instruct_keys_can_be_renamed_and_input_defaults_to_empty():
    row = {"prompt": "Add 2 and 3.", "context": None, "response": "5"}
    example, reason = normalise_instruct(row, instruction="prompt", input="context", output="response")
    assert reason is None and example == {"instruction": "Add 2 and 3.", "input": "", "output": "5"}


# ----------------------------------------------------------------------------------------------------------
# Rendering chats

def test_multi_turn_mask_is_exactly_assistant_content_and_im_end(smollm2):
    ids, mask, text = assert_assistant_turns_masked(smollm2, CONVERSATION)
    assert text.startswith("<|im_start|>system\n" + SYSTEM)  # the given system prompt replaces the default one


def test_conversation_without_system_prompt_gets_the_default_one_unmasked(smollm2):
    ids, mask, text = assert_assistant_turns_masked(smollm2, CONVERSATION[1:])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert mask.index(1) > len(smollm2.encode(text[:text.index("<|im_start|>user")], add_special_tokens=False))


def test_assistant_speaking_first_is_masked_after_the_default_system_prompt(smollm2):
    messages = [{"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Good day."}]
    assert_assistant_turns_masked(smollm2, messages)


def test_other_chat_templates_are_masked_the_same_way(bpe):
    assert_assistant_turns_masked(bpe, CONVERSATION)


def test_tokenizer_without_chat_template_is_refused(bpe):
    bpe.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(bpe, CONVERSATION)


def test_template_that_renders_the_last_turn_differently_is_refused(bpe):
    bpe.chat_template = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] }}: "
                         "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="prefix by prefix.*message 2"):
        render_chat(bpe, CONVERSATION)


# ----------------------------------------------------------------------------------------------------------
# Rendering instructions

@pytest.mark.parametrize("input_text", ["", "The quick brown fox jumps over the lazy dog."])
def test_instruct_mask_is_exactly_output_and_eos(smollm2, input_text):
    example = {"instruction": "Count the words.", "input": input_text, "output": "There are 9 words."}
    ids, mask = render_instruct(smollm2, example)
    assert masked_runs(smollm2, ids, mask) == ["There are 9 words.<|im_end|>"]
    assert ids[-1] == smollm2.eos_token_id and mask[-1] == 1
    prompt = smollm2.decode([i for i, m in zip(ids, mask) if not m])
    assert prompt.startswith("### Instruction:\nCount the words.\n\n")
    assert ("### Input:\n" + input_text in prompt) == bool(input_text)
    assert prompt.endswith("### Response:\n") and mask == sorted(mask)  # the prompt comes first, all 0


def test_instruct_prompt_is_the_one_sample_py_prompts_with(smollm2):
    from sample import format_prompt

    ids = format_prompt(smollm2, "Name a colour.", chat=False, template="instruct", tokenizer_from="smollm2")
    assert ids == smollm2.encode(INSTRUCT_PROMPT.format(instruction="Name a colour."), add_special_tokens=True)


def test_instruct_without_eos_token_is_refused(bpe):
    bpe.eos_token = None
    with pytest.raises(ValueError, match="no eos token"):
        render_instruct(bpe, {"instruction": "i", "input": "", "output": "o"})
