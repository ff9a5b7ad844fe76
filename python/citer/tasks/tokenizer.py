"""A word-level tokenizer for a task's text, with single-digit number tokens.

Built with the `tokenizers` library and saved as a Hugging Face tokenizer.json, so that
transformers' AutoTokenizer and citer both load it; decode(encode(text)) == text.
"""
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def train_tokenizer(texts: Iterable[str]):
    """-> a transformers PreTrainedTokenizerFast (pad 0, bos 1, eos 2, unk 3)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    # spaces become "\u2581" glued to the next piece; pieces are words, single digits, symbols
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False),
        pre_tokenizers.Split(Regex("\u2581?[A-Za-z]+|\u2581?\\d|\u2581?[^A-Za-z\\d\u2581]"), behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
