"""The tokenizer an SLM/LLM pair shares: loading it from a model folder (transformers
AutoTokenizer) or a GGUF file's metadata, the check that both models have the same one, and the
vocabulary limit."""
import json
import os
import re
from typing import Optional

from citer.engine.models.gguf import gguf_file, read_gguf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
GGUF_PADDING = re.compile(r"\[PAD(\d+)\]")  # llama.cpp names the ids past the real vocabulary [PAD<id>]

# transformers 5 writes its fast tokenizers' class as "TokenizersBackend", which transformers 4
# does not have; "PreTrainedTokenizerFast" is that class under both names. Without
# model_input_names, transformers 4's PreTrainedTokenizerFast also returns token_type_ids, which
# a Qwen2 model's generate() rejects.
PORTABLE = {"tokenizer_class": "PreTrainedTokenizerFast", "model_input_names": ["input_ids", "attention_mask"]}


def save_tokenizer(tok, path: str) -> None:
    """tok.save_pretrained(path), with a tokenizer_config.json that transformers 4 and 5 both load
    the same way (the shipped demo folders and `citer convert`'s output are read by whatever
    transformers users have)."""
    tok.save_pretrained(path)
    fn = os.path.join(path, "tokenizer_config.json")
    with open(fn) as f:
        cfg = json.load(f)
    cfg.update(PORTABLE)
    with open(fn, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


def load_tokenizer(path: str, checkpoint=None):
    """-> a transformers tokenizer, or None when the folder (or GGUF file) has no tokenizer.
    checkpoint: the GGUF file already read (engine.models.gguf.read_gguf)."""
    gguf = checkpoint.path if checkpoint is not None else gguf_file(path)
    if gguf is not None:
        return gguf_tokenizer(gguf, checkpoint)
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def gguf_tokenizer(fn: str, checkpoint=None):
    """The tokenizer a GGUF file's metadata describes (vocabulary, merges, special tokens, chat
    template), built by transformers as AutoTokenizer.from_pretrained(folder, gguf_file=name)
    builds it. TokenizersBackend (PreTrainedTokenizerFast) is named directly: AutoTokenizer would
    first read the whole file once more with gguf.GGUFReader for the model config (~10 s on a
    152K-token vocabulary) only to pick the class; the tokenizer is the same (tests compare)."""
    ckpt = checkpoint or read_gguf(fn)
    if not ckpt.has_tokenizer:
        return None
    from transformers import PreTrainedTokenizerFast

    folder, name = os.path.split(os.path.abspath(fn))
    tok = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)
    if ckpt.added_tokens:  # a file without token types says nothing of which tokens are whole
        _drop_stray_tokens(tok, {t for t, _ in ckpt.added_tokens})
    _add_whole_tokens(tok, ckpt.added_tokens)
    _name_special_tokens(tok, ckpt.metadata)
    return tok


SPECIAL_ATTRS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _drop_stray_tokens(tok, whole: set) -> None:
    """Take back the added tokens that the file does not mark whole. transformers' GGUF readers
    add some of their own: 5.17 makes "<s>" and "</s>" added special tokens of a Qwen2 file (new
    ids past the vocabulary, or Qwen2.5's plain BPE token "</s>" then matched whole), and the
    Qwen2 reader adds <|im_start|>-style tokens whether or not the file has them. llama.cpp, and
    the HF folder the file came from, split such text like any other."""
    from tokenizers import Tokenizer

    stray = {t.content for t in tok.added_tokens_decoder.values()} - whole
    if not stray:
        return
    state = json.loads(tok.backend_tokenizer.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] not in stray]
    # tokenizers has no call that removes an added token; transformers 4 and 5 both keep their
    # tokenizer in _tokenizer and read added tokens, lengths and ids from it
    tok._tokenizer = Tokenizer.from_str(json.dumps(state))
    for attr in SPECIAL_ATTRS:
        if getattr(tok, attr) in stray:
            setattr(tok, attr, None)  # _name_special_tokens names them from the file's ids


def _name_special_tokens(tok, meta) -> None:
    """bos/eos/pad/unk as the file's ids name them. transformers 4.x leaves them unset and 5.17
    sets "<s>"/"</s>" on Qwen2 files; chat templates that print bos_token (Llama 3's) need them."""
    for attr, key in zip(SPECIAL_ATTRS, ("bos", "eos", "padding", "unknown")):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= int(i) < len(tok):
            setattr(tok, attr, tok.convert_ids_to_tokens(int(i)))


def _add_whole_tokens(tok, added) -> None:
    """Make every token the file marks CONTROL (like <|im_start|>) or USER_DEFINED (like
    <tool_call> or <think>) an added token, matched whole in text as llama.cpp matches it; CONTROL
    ones are special (dropped by decode(skip_special_tokens=True)). transformers 5.2x does this
    itself; 4.x skips USER_DEFINED tokens and then cuts them into pieces."""
    from tokenizers import AddedToken

    have, vocab = set(tok.added_tokens_encoder), tok.get_vocab()
    for special in (True, False):
        new = [AddedToken(t, special=special, normalized=False) for t, s in added
               if s == special and t not in have and t in vocab and not GGUF_PADDING.fullmatch(t)]
        if new:
            tok.add_tokens(new, special_tokens=special)


def shared_vocab(tok) -> dict:
    """get_vocab() without llama.cpp's padding entries ("[PAD151665]" at id 151665, ...): a GGUF
    file lists a token for every row of the embedding, an HF tokenizer only its real tokens."""
    return {t: i for t, i in tok.get_vocab().items()
            if not ((m := GGUF_PADDING.fullmatch(t)) and int(m.group(1)) == i)}


def check_same_tokenizer(slm_tok, llm_tok, slm_path: str, llm_path: str) -> None:
    """Routing mixes the two models' tokens in one sequence: their tokenizers must agree."""
    if slm_tok is None or llm_tok is None:
        return
    if shared_vocab(slm_tok) != shared_vocab(llm_tok):
        raise ValueError(
            f"the SLM ({slm_path!r}) and LLM ({llm_path!r}) have different tokenizers "
            f"(vocabularies of {len(slm_tok)} and {len(llm_tok)} tokens differ); "
            "token-level routing needs one shared vocabulary"
        )


def vocab_limit(slm_cfg, llm_cfg, tokenizer: Optional[object], slm_path: str, llm_path: Optional[str]) -> int:
    """The token ids both models can read and emit.

    Equal config vocab sizes: all of them. Different sizes (e.g. Qwen2-1.5B's 151936 vs
    Qwen2-72B's 152064 padded embeddings) are allowed only with one shared tokenizer
    that fits in the smaller; tokens are then chosen among the shared ids.
    """
    sizes = [c.vocab_size for c in (slm_cfg, llm_cfg) if c is not None]
    common = min(sizes)
    if len(set(sizes)) > 1 and (tokenizer is None or len(tokenizer) > common):
        raise ValueError(
            f"the SLM ({slm_path!r}) and LLM ({llm_path!r}) have different vocabularies "
            f"({slm_cfg.vocab_size} vs {llm_cfg.vocab_size} tokens) and no shared tokenizer that fits both; "
            "token-level routing needs one shared vocabulary"
        )
    top = max(tokenizer.get_vocab().values(), default=-1) if tokenizer is not None else -1
    if top >= common:
        folder = slm_path if slm_cfg is not None else llm_path
        raise ValueError(f"the tokenizer of {folder!r} has token ids up to {top}, but the model's embedding has "
                         f"{common} rows (vocab_size): a tokenizer from another model?")
    return common
