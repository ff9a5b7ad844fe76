"""A byte-level BPE tokenizer for a task's text, built with the `tokenizers` library.

It uses exactly the pipeline of transformers' Qwen2 tokenizer (NFC, Qwen's split regex
with single-digit numbers, byte-level BPE, "<|endoftext|>" as eos/pad), because
transformers' AutoTokenizer rebuilds a Qwen2 folder's tokenizer with that pipeline from
tokenizer.json's vocab and merges: only then do AutoTokenizer, a plain
PreTrainedTokenizerFast and citer all tokenize the same way. decode(encode(text)) == text.
"""
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

EOS = "<|endoftext|>"
# The chat template of a task tokenizer: a user turn becomes the task's "Q: ... A:" prompt
# (the format the demo pair was trained on); assistant turns are its answers; others are dropped.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }} A:"
                 "{% elif m['role'] == 'assistant' %}{{ m['content'] }}" + EOS + "{% endif %}{% endfor %}")


def _qwen2_regex() -> str:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return PRETOKENIZE_REGEX


def train_tokenizer(texts: Iterable[str], vocab_size: int = 400):
    """-> a transformers PreTrainedTokenizerFast (id 0 = <|endoftext|> = bos = eos = pad).

    As in Qwen2, bos is the same token as eos and is never prepended by encoding."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_qwen2_regex()), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast
