"""Chat and instruction rows -> token ids and a loss mask, for supervised finetuning (SFT) data in prepare.py.

Two steps per row. Normalise: map the role names datasets use onto one vocabulary and turn a malformed row into a
reason (one of SKIP_REASONS) that the caller counts, instead of an exception in the middle of a long prepare.
Render: the text the model will see at inference (the tokenizer's own chat template, or the instruct template
sample.py --template instruct uses), tokenized in one piece, with a mask that is 1 on the tokens the loss is
taken on: what the assistant says, and the token that ends its turn, so that the model learns to stop.

    messages, reason = normalise_chat(row)              # or normalise_instruct(row) -> example
    ids, mask = render_chat(tokenizer, messages)        # or render_instruct(tokenizer, example)
"""
import os

# why a row was skipped; "too_long" is the caller's (it knows the sequence length), the rest are found here
SKIP_REASONS = ("missing_field", "not_a_list", "empty", "bad_message", "unknown_role", "empty_content",
                "no_assistant", "too_long")
# role names seen in chat datasets (OpenAI, ShareGPT, Gemini) -> the names chat templates expect
ROLE_ALIASES = {"assistant": "assistant", "bot": "assistant", "gpt": "assistant", "model": "assistant",
                "user": "user", "human": "user", "system": "system"}
# identical to sample.py's --template instruct, so that a finetuned model is prompted the way it was trained
INSTRUCT_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
# the Alpaca form for rows whose "input" holds the material the instruction is about
INSTRUCT_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


# ----------------------------------------------------------------------------------------------------------
# Normalising rows: (value, None) for a usable row, (None, reason) for one to skip

def is_well_formed(message):
    return (isinstance(message, dict) and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str))


def normalise_chat(row, field="messages"):
    """-> (messages, None) with messages = [{"role": normalised role, "content": str}, ...], or (None, reason).
    The reasons are checked in SKIP_REASONS' order over the whole conversation, so a row that is wrong in
    several ways is counted under its most basic fault. Content is kept as is: whitespace can be meaningful."""
    messages = row.get(field)
    if messages is None:
        return None, "missing_field"
    if not isinstance(messages, list):
        return None, "not_a_list"
    if not messages:
        return None, "empty"
    if not all(is_well_formed(m) for m in messages):
        return None, "bad_message"
    roles = [ROLE_ALIASES.get(m["role"].strip().lower()) for m in messages]
    if None in roles:
        return None, "unknown_role"
    if any(not m["content"].strip() for m in messages):
        return None, "empty_content"
    if "assistant" not in roles:
        return None, "no_assistant"
    # a new dict per message: arrow rows carry other keys (name, tool calls as None) that templates may render
    return [{"role": role, "content": m["content"]} for role, m in zip(roles, messages)], None


def normalise_instruct(row, instruction="instruction", input="input", output="output"):
    """-> ({"instruction": str, "input": str ("" if absent/None), "output": str}, None), or (None, reason).
    The keyword arguments name the row's keys, for datasets that call them e.g. prompt/response."""
    if row.get(instruction) is None or row.get(output) is None:
        return None, "missing_field"
    example = {"instruction": row[instruction], "input": "" if row.get(input) is None else row[input],
               "output": row[output]}
    if not all(isinstance(value, str) for value in example.values()):
        return None, "bad_message"
    if not example["instruction"].strip() or not example["output"].strip():
        return None, "empty_content"
    return example, None


# ----------------------------------------------------------------------------------------------------------
# Rendering: the whole text is tokenized once, so the ids are exactly those the model sees at inference (pieces
# tokenized apart can merge differently at their seams); the mask comes from character offsets into that text

def tokenize_with_mask(tokenizer, text, spans):
    """(ids, mask) of `text`: mask 1 on the tokens that start inside one of the character `spans` [start, end)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"the tokenizer '{tokenizer.name_or_path}' is a slow (Python) tokenizer; the loss mask is "
                         f"found from character offsets, which only fast (Rust) tokenizers give")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in encoding["offset_mapping"]]
    for lo, hi in spans:
        if not any(lo <= start < hi for start in starts):
            raise ValueError(f"no token of the tokenizer '{tokenizer.name_or_path}' starts inside the characters "
                             f"[{lo}, {hi}) to be learned ({text[lo:hi][:60]!r}); its offsets cannot place the mask")
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start in starts]
    return [int(i) for i in encoding["input_ids"]], mask


def render_template(tokenizer, messages, add_generation_prompt=False):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def generation_prompt(tokenizer, messages, j):
    """The rendering of messages[:j] followed by the header that opens an assistant turn."""
    if j > 0:
        return render_template(tokenizer, messages[:j], add_generation_prompt=True)
    # an opening assistant turn has no conversation before it to render (transformers refuses an empty one); what
    # the template writes before the content (SmolLM2: its default system prompt, then the header) is what two
    # one-message conversations that differ only in their content share
    a, b = (render_template(tokenizer, [{**messages[0], "content": c}]) for c in ("a", "b"))
    return os.path.commonprefix([a, b])


def assistant_span(tokenizer, messages, j, full):
    """[start, end) of assistant turn j in the full rendering: its content and the end-of-turn token(s), not the
    whitespace the template writes after them (the model has stopped by then)."""
    prompt = generation_prompt(tokenizer, messages, j)
    through = render_template(tokenizer, messages[:j + 1])
    if not (through.startswith(prompt) and full.startswith(through)):
        raise ValueError(f"the chat template of the tokenizer '{tokenizer.name_or_path}' does not render "
                         f"conversations prefix by prefix (at message {j}, an assistant turn): the text before a "
                         f"turn changes with what comes after it, so the turn cannot be found in the whole "
                         f"conversation (templates that drop earlier reasoning or mark the last turn do this)")
    return len(prompt), len(through.rstrip())


def render_chat(tokenizer, messages):
    """-> (ids: list[int], mask: list[int]) the tokenizer's own chat template rendering, tokenized; mask 1 on
    assistant tokens (each turn's content and the token that ends it). `messages` as normalise_chat gives them."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer '{tokenizer.name_or_path}' has no chat template to render conversations "
                         f"with; use instruction rows (render_instruct) or a tokenizer that has one")
    full = render_template(tokenizer, messages)
    spans = [assistant_span(tokenizer, messages, j, full) for j, m in enumerate(messages) if m["role"] == "assistant"]
    return tokenize_with_mask(tokenizer, full, spans)


def render_instruct(tokenizer, example):
    """-> (ids, mask): INSTRUCT_PROMPT(_WITH_INPUT) + output + tokenizer.eos_token; mask 1 on the output tokens
    and the eos token. An input that is only whitespace counts as no input. `example` as normalise_instruct
    gives it."""
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ValueError(f"the tokenizer '{tokenizer.name_or_path}' has no eos token: instruction finetuning ends "
                         f"each response with it, so that the model learns where to stop")
    template = INSTRUCT_PROMPT_WITH_INPUT if example["input"].strip() else INSTRUCT_PROMPT
    prompt = template.format(instruction=example["instruction"], input=example["input"])
    text = prompt + example["output"] + eos
    ids, mask = tokenize_with_mask(tokenizer, text, [(len(prompt), len(text))])
    if ids[-1] != tokenizer.eos_token_id:
        raise ValueError(f"the eos token {eos!r} of the tokenizer '{tokenizer.name_or_path}' is not one token "
                         f"(id {tokenizer.eos_token_id}) in the text; the response would not end with it")
    return ids, mask
