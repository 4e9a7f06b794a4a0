"""sample.py: cached decoding against full recomputation, sampling rules, streaming text, the script end to end,
and the real SmolLM2-135M-Instruct answering a question."""
import io
import json
import os
import sys
from dataclasses import asdict

import pytest
import torch

from checkpoints import save_checkpoint
from conftest import make_tiny_llama, needs_cxx, run_script
from hf_interop import from_pretrained, load_model, load_tokenizer, tokenizer_source
from model import GPT, GPTConfig
from sample import Sampling, TextStream, eos_token_ids, format_prompt, generate, next_token


def tiny_gpt(seed=0, **overrides):
    """A random GPT with spread-out weights, so greedy choices are decisive rather than near-ties."""
    kwargs = dict(vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, head_dim=8, mlp_hidden=48,
                  max_seq_len=128, tie_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**kwargs)).init_weights(std=0.3)
    return model.eval()


@torch.no_grad()
def greedy_by_recomputing(model, prompt, n):
    """The reference: run the whole sequence through the model (no cache) for every new token."""
    idx = torch.tensor([prompt])
    for _ in range(n):
        idx = torch.cat((idx, model.logits(idx)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx[0, len(prompt):].tolist()


def test_cached_greedy_equals_recomputing_the_whole_sequence_full_attention():
    model = tiny_gpt()
    prompt = [5, 17, 3, 88, 42, 7]
    assert list(generate(model, prompt, 50)) == greedy_by_recomputing(model, prompt, 50)


def test_cached_greedy_equals_recomputing_for_sliding_windows_beyond_the_window():
    # windows 4 and 8 in a mixed stack with a relu2 layer, like a distilled student; 6 + 40 tokens >> W
    model = tiny_gpt(seed=1, window=[4, None, 8], mlp_kind=["relu2", "swiglu", "relu2"])
    prompt = [9, 1, 60, 33, 2, 71]
    assert list(generate(model, prompt, 40)) == greedy_by_recomputing(model, prompt, 40)
    # a prompt longer than the window: the prefill leaves only the last W keys in the ring
    long_prompt = list(range(10, 30))
    assert list(generate(model, long_prompt, 30)) == greedy_by_recomputing(model, long_prompt, 30)


def test_sliding_window_layers_cache_only_w_positions():
    model = tiny_gpt(window=[4, None, 8])
    cache = model.new_cache(1, 100, "cpu", torch.float32)
    assert [layer.k.shape[2] for layer in cache.layers] == [4, 100, 8]


@needs_cxx
def test_compiled_decode_step_gives_eager_greedy_tokens_without_recompiling_as_the_cache_grows():
    model = tiny_gpt(seed=5)
    prompt = [5, 17, 3, 88, 42, 7]
    assert list(generate(model, prompt, 30, compile=True)) == list(generate(model, prompt, 30))
    # another prompt length and cache size: dynamic shapes must reuse the graph, not compile one per length
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = list(generate(model, prompt[:3], 40, compile=True))
    assert compiled == list(generate(model, prompt[:3], 40))
    # sliding windows: the ring buffer stops growing once full (a bounded recompile per window size)
    model = tiny_gpt(seed=1, window=[4, None, 8], mlp_kind=["relu2", "swiglu", "relu2"])
    assert list(generate(model, prompt, 30, compile=True)) == list(generate(model, prompt, 30))


def test_top_k_one_equals_greedy():
    model = tiny_gpt(seed=2)
    prompt = [1, 2, 3]
    greedy = list(generate(model, prompt, 30, temperature=0.0))
    top1 = list(generate(model, prompt, 30, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(5)))
    assert top1 == greedy


def test_same_seed_same_tokens_and_different_seed_different_tokens():
    model = tiny_gpt(seed=3)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return list(generate(model, [4, 5, 6], 40, temperature=1.0, top_p=0.95, generator=gen))

    assert draw(11) == draw(11)
    assert draw(11) != draw(12)


def test_generation_stops_at_any_eos_id_and_yields_it():
    model = tiny_gpt(seed=4)
    free = list(generate(model, [8, 9], 30))
    stop = free[5]
    first = free.index(stop)  # the first occurrence is where generation must end
    stopped = list(generate(model, [8, 9], 30, eos_ids={stop, 10 ** 6}))
    assert stopped == free[:first + 1]


def test_generation_stops_at_the_model_context():
    model = tiny_gpt(max_seq_len=20)
    assert len(list(generate(model, list(range(15)), 100))) == 5


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    draws = lambda p: {next_token(logits, None, Sampling(1.0, 0, p, 1.0), gen).item() for _ in range(300)}
    assert draws(0.5) == {0}  # 0.6 alone reaches 0.5
    assert draws(0.8) == {0, 1}  # 0.6 + 0.3 reaches 0.8; 0.1 never drawn
    assert draws(1.0) == {0, 1, 2}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    seen = torch.tensor([[True, False, True, False]])
    # token 0 (seen, 2.0 -> 1.0) loses to token 1 (unseen, 1.5)
    assert next_token(torch.tensor([[2.0, 1.5, -1.0, -3.0]]), seen, Sampling(0.0, 0, 1.0, 2.0), None).item() == 1
    # token 2 (seen, -1.0 -> -2.0) falls below token 3 (unseen, -1.5)
    assert next_token(torch.tensor([[-9.0, -9.0, -1.0, -1.5]]), seen, Sampling(0.0, 0, 1.0, 2.0), None).item() == 3
    # penalty 1.0 changes nothing
    assert next_token(torch.tensor([[2.0, 1.5, -1.0, -3.0]]), seen, Sampling(0.0, 0, 1.0, 1.0), None).item() == 0


@pytest.mark.parametrize("kwargs,message", [(dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
                                            (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k")])
def test_bad_sampling_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_gpt(), [1, 2], 3, **kwargs)  # refused at the call, before any token is asked for


def test_prompt_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match=r"context \(max_seq_len\) is 20"):
        generate(tiny_gpt(max_seq_len=20), list(range(25)), 3)


def test_repetition_penalty_marks_prompt_and_generated_tokens_as_seen():
    model = tiny_gpt(seed=0)
    prompt = [5, 17, 3, 88, 42, 7]
    plain = list(generate(model, prompt, 30))
    # without the penalty this model repeats itself and echoes the prompt, so the checks below can fail
    assert len(set(plain)) < len(plain) and set(plain) & set(prompt)
    penalised = list(generate(model, prompt, 30, repetition_penalty=1e6))
    assert len(penalised) == 30
    assert len(set(penalised)) == len(penalised), "a generated token came back despite the huge penalty"
    assert not set(penalised) & set(prompt), "a prompt token came back: the prompt must count as seen"


def test_streamed_text_equals_decoding_everything_including_multibyte_characters(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    text = "The river é grew 🙂 and the 東京 market opened. Ünïcödé ✓"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # the non-ASCII characters really are split over several byte tokens
    out = io.StringIO()
    stream = TextStream(tokenizer, out)
    pieces = []
    for token in ids:
        before = out.getvalue()
        stream.put(token)
        pieces.append(out.getvalue()[len(before):])
    stream.end()
    assert out.getvalue() == text + "\n"
    assert all("\ufffd" not in p for p in pieces)  # never prints half a character


def test_eos_ids_include_generation_config_list(tmp_path, bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    assert eos_token_ids(tokenizer, [str(tmp_path)]) == {tokenizer.eos_token_id, 0, 7}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert eos_token_ids(tokenizer, [str(tmp_path)]) == {tokenizer.eos_token_id, 5}


def test_chat_and_instruct_templates(tmp_path, bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    chat = tokenizer.decode(format_prompt(tokenizer, "Hi there", True, None, "tok"))
    assert chat == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    instruct = tokenizer.decode(format_prompt(tokenizer, "Hi there", False, "instruct", "tok"))
    assert instruct == "### Instruction:\nHi there\n\n### Response:\n"
    tokenizer.chat_template = None
    with pytest.raises(SystemExit, match="no chat template.*--template instruct"):
        format_prompt(tokenizer, "Hi there", True, None, "tok")


# ----------------------------------------------------------------------------------------------------------
# The script, as a user runs it

def test_script_prints_what_generate_draws_with_the_same_seed_from_a_student_checkpoint(tmp_path, bpe_tokenizer_dir):
    """A distill-style student (relu2 MLPs, sliding windows) saved as our checkpoint: the script's text is what
    generate draws in-process from the same seed, so it is reproducible, and samples differ from each other."""
    config = GPTConfig(vocab_size=512, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, head_dim=16, mlp_hidden=96,
                       max_seq_len=256, mlp_kind=["relu2", "swiglu", "relu2"], window=[8, None, 8])
    torch.manual_seed(0)
    model = GPT(config).init_weights(std=0.1)
    path = str(tmp_path / "final.pt")
    save_checkpoint(path, {"model": model.state_dict(), "model_config": asdict(config), "config": {}, "step": 0,
                           "tokenizer": bpe_tokenizer_dir})
    proc = run_script("sample.py", path, "--prompt", "The river", "--max-new-tokens", "40", "--temperature", "1.0",
                      "--top-k", "50", "--seed", "3", "--num-samples", "2")

    loaded, checkpoint = load_model(path)
    tokenizer = load_tokenizer(tokenizer_source(path, checkpoint))
    prompt_ids = format_prompt(tokenizer, "The river", False, None, bpe_tokenizer_dir)
    eos_ids = eos_token_ids(tokenizer, [bpe_tokenizer_dir])
    gen = torch.Generator().manual_seed(3)
    expected, texts = io.StringIO(), []
    for i in (1, 2):
        expected.write(f"---------- sample {i}/2\n")
        stream, start = TextStream(tokenizer, expected), expected.tell()
        for token in generate(loaded.eval(), prompt_ids, 40, temperature=1.0, top_k=50, eos_ids=eos_ids, generator=gen):
            if token not in eos_ids:
                stream.put(token)
        stream.end()
        texts.append(expected.getvalue()[start:])
    assert proc.stdout == expected.getvalue()  # stdout holds only the generated text
    assert len(texts[0].strip()) > 20 and texts[0] != texts[1]
    assert "tokens/s" in proc.stderr and "decode" in proc.stderr


def test_compare_prints_each_models_own_text_under_its_name_from_the_same_seed(tmp_path, tiny_llama_dir,
                                                                             bpe_tokenizer_dir):
    config = GPTConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_dim=16, mlp_hidden=96,
                       max_seq_len=256, mlp_kind="relu2")
    torch.manual_seed(1)
    student = str(tmp_path / "student.pt")
    save_checkpoint(student, {"model": GPT(config).init_weights(std=0.1).state_dict(), "model_config": asdict(config),
                              "config": {}, "step": 0, "tokenizer": bpe_tokenizer_dir})
    args = ["--prompt", "The river", "--max-new-tokens", "24", "--temperature", "0.9", "--seed", "5"]
    alone = [run_script("sample.py", model, *args).stdout for model in (student, tiny_llama_dir)]
    both = run_script("sample.py", student, "--compare", tiny_llama_dir, *args)
    assert both.returncode == 0, both.stderr
    assert both.stdout == f"========== {student}\n{alone[0]}========== {tiny_llama_dir}\n{alone[1]}"
    assert alone[0] != alone[1]


def test_script_errors_name_the_problem(tmp_path, tiny_llama_dir):
    broken = tmp_path / "step_000010.pt"
    broken.write_bytes(b"not a checkpoint at all")
    proc = run_script("sample.py", str(broken), "--prompt", "hi", check=False)
    assert proc.returncode != 0 and "step_000010.pt" in proc.stderr and "could not be read" in proc.stderr
    proc = run_script("sample.py", tiny_llama_dir, "--prompt", "hi", "--top-p", "0", check=False)
    assert proc.returncode != 0 and "top_p = 0.0" in proc.stderr
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("the river and the mountain " * 100)  # tiny_llama's context is 256 tokens
    proc = run_script("sample.py", tiny_llama_dir, "--prompt-file", str(long_prompt), check=False)
    assert proc.returncode != 0 and "context (max_seq_len) is 256" in proc.stderr


def run_main(monkeypatch, *args):
    """sample.main() in this process, as `python sample.py ARGS` runs it."""
    import sample

    for name in [n for n in vars(sample) if n.isupper()]:
        monkeypatch.setattr(sample, name, getattr(sample, name))  # main's configure() sets them: undone after the test
    monkeypatch.setattr(sys, "argv", ["sample.py", *map(str, args)])
    sample.main()


def test_script_refuses_a_bad_sampling_argument_in_one_line_before_loading_the_model(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match=r"^sample.py: temperature = -1.0; expected >= 0 \(0 = greedy\)$"):
        run_main(monkeypatch, tmp_path / "no_such_model", "--prompt", "hi", "--temperature", "-1")


def raise_bug(*args, **kwargs):
    raise ValueError("bug")


@pytest.mark.parametrize("broken", ["decode_tokens", "next_token"])  # on generate's eager path; in the decode loop
def test_script_lets_a_value_error_from_inside_generation_raise_with_its_traceback(monkeypatch, tiny_llama_dir,
                                                                                     broken):
    import sample

    monkeypatch.setattr(sample, broken, raise_bug)
    with pytest.raises(ValueError, match="^bug$"):
        run_main(monkeypatch, tiny_llama_dir, "--prompt", "hi", "--max-new-tokens", "3", "--temperature", "1.0")


def test_script_reads_the_prompt_from_stdin_and_stops_at_generation_config_eos(tmp_path, bpe_tokenizer_dir):
    import subprocess
    import sys

    from conftest import REPO

    path = make_tiny_llama(tmp_path / "hf", bpe_tokenizer_dir, seed=1)
    # find the first token greedy decoding produces, then declare it an EOS id in generation_config.json
    model = from_pretrained(path).eval()
    from transformers import AutoTokenizer
    prompt_ids = AutoTokenizer.from_pretrained(path).encode("The river")
    first = next(generate(model, prompt_ids, 1))
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [first]}, f)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), path, "--temperature", "0"],
                          input="The river", capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[1 tokens in" in proc.stderr  # stopped right at the EOS


def test_real_smollm2_instruct_answers_paris(smollm2_gguf):
    proc = run_script("sample.py", smollm2_gguf, "--chat", "--prompt", "What is the capital of France?",
                      "--temperature", "0", "--max-new-tokens", "40")
    assert "Paris" in proc.stdout, proc.stdout + proc.stderr
