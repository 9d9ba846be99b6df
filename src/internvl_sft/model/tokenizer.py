"""A small byte-level BPE tokenizer trained on a corpus, with the special tokens of one InternVL2 LLM family.

Every family gets the same learned byte-level BPE (Qwen2's pre-tokenisation); what differs is the set of
special tokens and which of them are BOS / EOS / pad / unk, as in the tokenizer of that InternVL2 size.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2's pre-tokenisation: letters in runs, every digit alone, punctuation runs, newlines, spaces.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Appended after the learned vocabulary in this order, as in InternVL2-1B (there `<IMG_CONTEXT>` is 151648).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 32768
INTERNVL_TOKENS = SPECIAL_TOKENS[3:]  # <img> ... </box>: added to every LLM's vocabulary by InternVL


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """Special tokens of one family: `leading` take the first ids (sentencepiece style), `appended` follow the
    learned vocabulary in order. `tokenizer_class` is what tokenizer_config.json names for native loading."""

    leading: tuple[str, ...]
    appended: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    unk: str | None
    tokenizer_class: str

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return self.leading + self.appended


QWEN2_TOKENIZER = TokenizerSpec(
    leading=(), appended=SPECIAL_TOKENS, bos=None, eos=EOS_TOKEN, pad=PAD_TOKEN, unk=None,
    tokenizer_class="Qwen2Tokenizer",
)
# InternLM2 (InternVL2-2B/8B): <unk> <s> </s> first, chat and InternVL tokens added after the vocabulary.
INTERNLM2_TOKENIZER = TokenizerSpec(
    leading=("<unk>", "<s>", "</s>"), appended=("<|im_start|>", EOS_TOKEN, *INTERNVL_TOKENS),
    bos="<s>", eos="</s>", pad="</s>", unk="<unk>", tokenizer_class="PreTrainedTokenizerFast",
)
# Phi-3 (InternVL2-4B): Llama-style leading tokens, Phi-3's chat tokens, then InternVL's.
PHI3_TOKENIZER = TokenizerSpec(
    leading=("<unk>", "<s>", "</s>"),
    appended=("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", *INTERNVL_TOKENS),
    bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>", tokenizer_class="PreTrainedTokenizerFast",
)


def empty_qwen2_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with Qwen2's normaliser, pre-tokeniser and decoder."""
    tokenizer = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(corpus: Iterable[str], vocab_size: int, spec: TokenizerSpec = QWEN2_TOKENIZER) -> Tokenizer:
    """Train a byte-level BPE of at most `vocab_size` tokens (the leading specials included), then append the
    spec's other special tokens.

    All 256 byte symbols are in the vocabulary, so any text encodes; decoding gives back its NFC form.
    """
    minimum = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"tokenizer vocab_size {vocab_size} is below the {minimum} byte symbols")
    tokenizer = empty_qwen2_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[special_token(token) for token in spec.leading],
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer.add_special_tokens([special_token(token) for token in spec.appended])
    return tokenizer


def special_token(token: str) -> AddedToken:
    return AddedToken(token, special=True, normalized=False)


def tokenizer_config(tokenizer: Tokenizer, chat_template: str, spec: TokenizerSpec = QWEN2_TOKENIZER) -> dict:
    """tokenizer_config.json loaded by plain `AutoTokenizer.from_pretrained` (no remote code)."""
    added = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in spec.special_tokens
    }
    roles = {spec.bos, spec.pad, spec.unk}  # the EOS stays listed, as Qwen2's own config lists <|im_end|>
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [token for token in spec.special_tokens if token not in roles],
        "bos_token": spec.bos,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": spec.eos,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": spec.pad,
        "split_special_tokens": False,
        "tokenizer_class": spec.tokenizer_class,
        "unk_token": spec.unk,
    }


def save_tokenizer(
    tokenizer: Tokenizer, out_dir: Path, chat_template: str, spec: TokenizerSpec = QWEN2_TOKENIZER
) -> None:
    """Write tokenizer.json and tokenizer_config.json into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [token for token in spec.special_tokens if tokenizer.token_to_id(token) is None]
    if missing:
        raise ValueError(f"{out_dir}: tokenizer lacks special tokens {missing}")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(tokenizer, chat_template, spec)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
