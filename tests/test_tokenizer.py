"""Tokenizers: special tokens, chat template, save/load."""

import pytest

import dllm
from dllm.tokenizer import TokenizerError


def test_char_tokenizer_round_trips_text_and_knows_special_tokens(char_tokenizer):
    text = "reverse: abc => cba"
    ids = char_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert char_tokenizer.decode(ids) == text
    special = dllm.special_ids(char_tokenizer)
    assert None not in special.values()
    assert len(set(special.values())) == 4  # mask, eos (= pad, as in LLaDA), eot, bos are distinct
    assert special["pad_token_id"] == special["eos_token_id"]


def test_chat_template_is_llama3_style(char_tokenizer):
    text = char_tokenizer.apply_chat_template([{"role": "user", "content": "add 1+2"}], tokenize=False,
                                              add_generation_prompt=True)
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nadd 1+2<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_template_shows_tools_and_writes_calls_as_a_trained_answer_writes_them(char_tokenizer):
    """With tools, a `tools` turn lists each function as JSON; an assistant turn's tool_calls follow its content
    exactly as dllm.tool_calls renders the answer a model is trained on (and the server parses), so the model sees
    its earlier calls as it wrote them."""
    from dllm.tool_calls import render_tool_calls

    tools = [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]
    calls = [{"type": "function", "function": {"name": "w", "arguments": {"c": "p"}}},
             {"type": "function", "function": {"name": "w", "arguments": '{"c": "r"}'}}]
    user = [{"role": "user", "content": "rain?"}]
    prompt = char_tokenizer.apply_chat_template(user, tools=tools, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith('<|startoftext|><|start_header_id|>tools<|end_header_id|>\n\n{"name": "w", "parameters": '
                             '{"type": "object"}}<|eot_id|><|start_header_id|>user')
    for content in (None, "let me see"):
        turn = {"role": "assistant", "content": content, "tool_calls": calls}
        whole = char_tokenizer.apply_chat_template(user + [turn], tools=tools, tokenize=False)
        assert whole == prompt + render_tool_calls(content, calls, "hermes") + "<|eot_id|>"
    assert "tools" not in char_tokenizer.apply_chat_template(user, tokenize=False)  # no tools: as before


def test_bpe_tokenizer_trains_and_reloads(tmp_path):
    tok = dllm.train_tokenizer(["hello world, hello ray"] * 20, kind="bpe", vocab_size=300)
    tok.save_pretrained(str(tmp_path))
    again = dllm.load_tokenizer(tmp_path)
    assert again.decode(again("hello ray", add_special_tokens=False)["input_ids"]) == "hello ray"
    assert again.mask_token_id == tok.mask_token_id and again.eot_token_id == tok.eot_token_id


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        dllm.load_tokenizer(tmp_path)
