"""InternVL2 chat templates and token-level label masking.

A conversation is a sequence of (role, text) turns with roles `system` (optional, first), `human` and `gpt`.
Ids are built piece by piece (headers, texts, image tokens, turn ends) and the labels come from the very
same pieces, so they always line up with the ids: upstream re-tokenises text pieces to find the answer
spans and drops a sample when the lengths disagree ("tokenization mismatch"); that cannot happen here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
INTERNVL_SYSTEM_PROMPT = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)

Turn = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """The prompt format of one LLM family.

    Every turn is `header + text + turn_end`, with no separator in between; the system turn always comes
    first (a leading `system` turn of the data replaces `system_prompt`). `bos` prepends the tokenizer's
    BOS token to the ids (InternLM2 and Phi-3 tokenizers add it themselves upstream); `strip_text` strips
    the text of every human and gpt turn, as upstream's InternLM2 preprocessing does.
    """

    name: str
    system_prompt: str
    system_header: str
    user_header: str
    assistant_header: str
    turn_end: str
    bos: bool = False
    strip_text: bool = False

    @property
    def stop_token(self) -> str:
        """Generation ends when the model closes its turn."""
        return self.turn_end


HERMES_2 = ChatTemplate(
    name="Hermes-2",
    system_prompt=INTERNVL_SYSTEM_PROMPT,
    system_header="<|im_start|>system\n",
    user_header="<|im_start|>user\n",
    assistant_header="<|im_start|>assistant\n",
    turn_end="<|im_end|>",
)
TEMPLATES = {
    template.name: template
    for template in (
        HERMES_2,
        dataclasses.replace(HERMES_2, name="internlm2-chat", bos=True, strip_text=True),
        ChatTemplate(
            name="phi3-chat",
            system_prompt=INTERNVL_SYSTEM_PROMPT,
            system_header="<|system|>\n",
            user_header="<|user|>\n",
            assistant_header="<|assistant|>\n",
            turn_end="<|end|>",
            bos=True,
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids of a conversation and their labels (-100 where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


@dataclasses.dataclass(frozen=True)
class Piece:
    """A stretch of the prompt: text to tokenise or ready ids, and whether the loss covers it."""

    content: str | list[int]
    trained: bool = False


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


def render(
    template: ChatTemplate,
    conversations: Sequence[Turn],
    add_generation_prompt: bool = False,
    image_token_counts: Sequence[int] | None = None,
) -> str:
    """The prompt as a string (without BOS); `<image>` stays a placeholder unless image_token_counts is given."""
    pieces = prompt_pieces(template, conversations, add_generation_prompt)
    if image_token_counts is None:
        return "".join(piece.content for piece in pieces)
    slots = split_at_images(pieces)
    check_image_count(slots.count(None), len(image_token_counts))
    images = iter(IMG_START + IMG_CONTEXT * count + IMG_END for count in image_token_counts)
    return "".join(next(images) if piece is None else piece.content for piece in slots)


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    conversations: Sequence[Turn],
    image_token_counts: Sequence[int],
) -> Encoded:
    """Ids and labels of a full conversation; the loss covers each answer and its closing turn_end."""
    if not conversations or conversations[-1][0] != "gpt":
        raise ValueError("a training conversation must end with a gpt answer")
    return encode_pieces(tokenizer, template, prompt_pieces(template, conversations), image_token_counts)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    conversations: Sequence[Turn],
    image_token_counts: Sequence[int],
) -> list[int]:
    """Ids of a conversation that ends with a human turn, followed by the assistant header (for generation)."""
    if not conversations or conversations[-1][0] != "human":
        raise ValueError("a generation prompt must end with a human turn")
    pieces = prompt_pieces(template, conversations, add_generation_prompt=True)
    return encode_pieces(tokenizer, template, pieces, image_token_counts).input_ids


def prompt_pieces(
    template: ChatTemplate, conversations: Sequence[Turn], add_generation_prompt: bool = False
) -> list[Piece]:
    check_roles(conversations)
    system_prompt, turns = split_system(template, conversations)
    pieces = [Piece(template.system_header), Piece(system_prompt), Piece(template.turn_end)]
    for role, text in turns:
        answer = role == "gpt"
        pieces.append(Piece(template.assistant_header if answer else template.user_header))
        pieces.append(Piece(clean(template, text), trained=answer))
        pieces.append(Piece(template.turn_end, trained=answer))
    if add_generation_prompt:
        pieces.append(Piece(template.assistant_header))
    return [piece for piece in pieces if piece.content]


def check_roles(conversations: Sequence[Turn]) -> None:
    """Roles must be an optional leading `system`, then human and gpt in turn, starting with human."""
    offset = 1 if conversations and conversations[0][0] == "system" else 0
    for index, (role, _) in enumerate(conversations[offset:]):
        expected = "human" if index % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"turn {index + offset + 1} has role {role!r}, expected {expected!r}")


def split_system(template: ChatTemplate, conversations: Sequence[Turn]) -> tuple[str, Sequence[Turn]]:
    if conversations and conversations[0][0] == "system":
        return conversations[0][1], conversations[1:]
    return template.system_prompt, conversations


def clean(template: ChatTemplate, text: str) -> str:
    return text.strip() if template.strip_text else text


def encode_pieces(
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    pieces: list[Piece],
    image_token_counts: Sequence[int],
) -> Encoded:
    slots = split_at_images(pieces)
    check_image_count(slots.count(None), len(image_token_counts))
    images = iter(image_ids(tokenizer, count) for count in image_token_counts)
    pieces = [Piece(next(images)) if piece is None else piece for piece in slots]
    if template.bos:
        pieces.insert(0, Piece([bos_token_id(tokenizer)]))
    texts = [piece.content for piece in pieces if isinstance(piece.content, str)]
    tokenized = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    input_ids: list[int] = []
    labels: list[int] = []
    for piece in pieces:
        ids = next(tokenized) if isinstance(piece.content, str) else piece.content
        input_ids.extend(ids)
        labels.extend(ids if piece.trained else [IGNORE_INDEX] * len(ids))
    return Encoded(input_ids, labels)


def split_at_images(pieces: list[Piece]) -> list[Piece | None]:
    """The pieces with every `<image>` cut out as an image slot (None), in prompt order."""
    slots: list[Piece | None] = []
    for piece in pieces:
        if IMAGE_PLACEHOLDER not in piece.content:
            slots.append(piece)
            continue
        if piece.trained:
            raise ValueError(f"an answer contains the image placeholder {IMAGE_PLACEHOLDER}")
        first, *rest = piece.content.split(IMAGE_PLACEHOLDER)
        slots.append(Piece(first))
        for text in rest:
            slots.extend([None, Piece(text)])
    return [slot for slot in slots if slot is None or slot.content]


def image_ids(tokenizer: PreTrainedTokenizerBase, count: int) -> list[int]:
    """`<img>` + `<IMG_CONTEXT>` x count + `</img>`: the ids one image's `count` features replace."""
    start, context, end = (token_id(tokenizer, token) for token in (IMG_START, IMG_CONTEXT, IMG_END))
    return [start] + [context] * count + [end]


def check_image_count(placeholders: int, images: int) -> None:
    if placeholders != images:
        raise ValueError(f"conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {images} image(s)")


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """Id of a single special token, read from the tokenizer (never hard-coded: it differs per release)."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or tokenizer.convert_ids_to_tokens(ids[0]) != token:
        raise ValueError(f"tokenizer has no token {token!r}")
    return ids[0]


def bos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.bos_token_id is None:
        raise ValueError("the template needs a BOS token but the tokenizer has none")
    return tokenizer.bos_token_id
