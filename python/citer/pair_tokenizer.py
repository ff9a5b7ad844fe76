"""The tokenizer an SLM/LLM pair shares: loading it from a model folder (transformers
AutoTokenizer), the check that both folders have the same one, and the vocabulary limit."""
import os
from typing import Optional

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str):
    """-> a transformers tokenizer, or None when the folder has no tokenizer files."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def check_same_tokenizer(slm_tok, llm_tok, slm_path: str, llm_path: str) -> None:
    """Routing mixes the two models' tokens in one sequence: their tokenizers must agree."""
    if slm_tok is None or llm_tok is None:
        return
    if slm_tok.get_vocab() != llm_tok.get_vocab():
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
    if llm_cfg is None or slm_cfg is None:
        return (slm_cfg or llm_cfg).vocab_size
    if slm_cfg.vocab_size == llm_cfg.vocab_size:
        return slm_cfg.vocab_size
    common = min(slm_cfg.vocab_size, llm_cfg.vocab_size)
    if tokenizer is None or len(tokenizer) > common:
        raise ValueError(
            f"the SLM ({slm_path!r}) and LLM ({llm_path!r}) have different vocabularies "
            f"({slm_cfg.vocab_size} vs {llm_cfg.vocab_size} tokens) and no shared tokenizer that fits both; "
            "token-level routing needs one shared vocabulary"
        )
    return common
