"""Tokenizers: loading LLaDA-style tokenizer directories and training small ones for demos/tests.

Special tokens follow LLaDA: `<|startoftext|>` (BOS), `<|endoftext|>` (EOS), `<|mdm_mask|>` (MASK),
`<|start_header_id|>`/`<|end_header_id|>` and `<|eot_id|>` (EOT) for a Llama-3 style chat template.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .tool_calls import TOOL_CALL_FORMATS

BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
HEADER_START, HEADER_END, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
UNK = "<|unk|>"
SPECIAL_TOKENS = [UNK, BOS, EOS, MASK, HEADER_START, HEADER_END, EOT]

# Llama-3 style template as LLaDA uses it: BOS, then per message a header, the content and EOT;
# the generation prompt opens an assistant header. With tools (OpenAI's function tools), a `tools` turn first lists
# each function as JSON, one per line, and an assistant turn's tool_calls follow its content as hermes blocks,
# written exactly as dllm.tool_calls renders a trained answer (the server's tool_call_parser reads them back).
_CALL_START, _CALL_END = TOOL_CALL_FORMATS["hermes"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.index0 == 0 %}{{ bos_token }}"
    "{% if tools %}{{ '<|start_header_id|>tools<|end_header_id|>\n\n' }}"
    "{% for tool in tools %}{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ (tool.function if tool.function is defined else tool) | tojson }}{% endfor %}{{ '<|eot_id|>' }}{% endif %}"
    "{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + (message['content'] or '') | trim }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if not loop.first or (message['content'] or '') | trim %}{{ '\n' }}{% endif %}"
    "{{ '" + _CALL_START + "\n{\"name\": ' + call.function.name | tojson + ', \"arguments\": ' }}"
    "{% if call.function.arguments is string %}{{ call.function.arguments }}"
    "{% else %}{{ (call.function.arguments if call.function.arguments is defined else {}) | tojson }}{% endif %}"
    "{{ '}\n" + _CALL_END + "' }}"
    "{% endfor %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


class TokenizerError(ValueError):
    pass


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load `tokenizer.json` (+ `tokenizer_config.json`) from a checkpoint directory.

    The tokenizer must know MASK and EOS; `tokenizer.eot_token_id` is set when it has `<|eot_id|>`.
    No code from the directory is run (a fast tokenizer is built from the JSON file alone).
    """
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise TokenizerError(f"no tokenizer.json in {path}: a fast (Rust `tokenizers`) tokenizer file is required")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    vocab = tok.get_vocab()
    if tok.mask_token is None:
        if MASK not in vocab:
            raise TokenizerError(f"tokenizer in {path} has no mask token ({MASK}); a diffusion LM needs one")
        tok.mask_token = MASK
    if tok.eos_token is None:
        if EOS not in vocab:
            raise TokenizerError(f"tokenizer in {path} has no EOS token ({EOS})")
        tok.eos_token = EOS
    if tok.bos_token is None and BOS in vocab:
        tok.bos_token = BOS
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # LLaDA pads with EOS
    tok.eot_token_id = vocab.get(EOT)
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def train_tokenizer(texts: Iterable[str], kind: str = "char", vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small tokenizer on `texts` with LLaDA's special tokens and chat template.

    kind="char": one token per character seen (best for string-manipulation tasks);
    kind="bpe": byte-level BPE with `vocab_size` entries.
    """
    texts = list(texts)
    if not texts:
        raise TokenizerError("cannot train a tokenizer on no text")
    if kind == "char":
        alphabet = sorted({ch for text in texts for ch in text})
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
        core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        core.decoder = decoders.Fuse()
    elif kind == "bpe":
        core = Tokenizer(models.BPE(unk_token=None))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        core.train_from_iterator(texts, trainer=trainer)
    else:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose 'char' or 'bpe'")
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, mask_token=MASK,
                                  unk_token=UNK, pad_token=EOS,
                                  additional_special_tokens=[HEADER_START, HEADER_END, EOT])
    tok.chat_template = CHAT_TEMPLATE
    tok.eot_token_id = tok.convert_tokens_to_ids(EOT)
    return tok


def special_ids(tokenizer) -> dict[str, int | None]:
    """Token ids a model config needs, read off a tokenizer."""
    vocab = tokenizer.get_vocab()
    return {
        "mask_token_id": tokenizer.mask_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "eot_token_id": vocab.get(EOT),
        "bos_token_id": vocab.get(BOS),
        "pad_token_id": tokenizer.eos_token_id,
    }
