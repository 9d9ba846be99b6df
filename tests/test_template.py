import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from internvl_sft.data.template import (
    IGNORE_INDEX,
    INTERNVL_SYSTEM_PROMPT,
    encode_conversation,
    encode_prompt,
    get_template,
    render,
)

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
    "<ref>", "</ref>", "<box>", "</box>", "<s>",
]
CORPUS = [
    "system user assistant What is this? A cat. Describe the screen.",
    "请根据屏幕截图，执行任务：点击底部导航栏的“发现”选项",
    "操作：点击\n参数：[481, 472] 滑动 [704, 130] -> [83, 130]",
]
HERMES_CAT_PROMPT = (
    "<|im_start|>system\n你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。<|im_end|><|im_start|>user\n<image>\nWhat is this?<|im_end|>"
    "<|im_start|>assistant\nA cat.<|im_end|>"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with InternVL2's special tokens (and `<s>` as BOS for the templates that need one)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


def labelled_text(tokenizer, encoded) -> str:
    return tokenizer.decode([label for label in encoded.labels if label != IGNORE_INDEX])


def test_hermes2_renders_the_internvl2_1b_prompt_exactly():
    conversation = [("human", "<image>\nWhat is this?"), ("gpt", "A cat.")]
    assert render(get_template("Hermes-2"), conversation) == HERMES_CAT_PROMPT


def test_generation_prompt_ends_with_the_assistant_header():
    prompt = render(get_template("Hermes-2"), [("human", "Hi")], add_generation_prompt=True)
    assert prompt.endswith("<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n")


def test_phi3_and_internlm2_formats():
    conversation = [("human", " Hi "), ("gpt", "Yes")]
    phi3 = render(get_template("phi3-chat"), conversation)
    assert phi3 == f"<|system|>\n{INTERNVL_SYSTEM_PROMPT}<|end|><|user|>\n Hi <|end|><|assistant|>\nYes<|end|>"
    internlm2 = render(get_template("internlm2-chat"), conversation)
    assert internlm2 == (
        f"<|im_start|>system\n{INTERNVL_SYSTEM_PROMPT}<|im_end|><|im_start|>user\nHi<|im_end|>"
        "<|im_start|>assistant\nYes<|im_end|>"
    )
    assert get_template("phi3-chat").stop_token == "<|end|>"


def test_leading_system_turn_replaces_the_default_prompt():
    prompt = render(get_template("Hermes-2"), [("system", "Be brief."), ("human", "Hi"), ("gpt", "Yo")])
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi")


def test_single_image_ids_decode_to_the_expanded_prompt(tokenizer):
    template = get_template("Hermes-2")
    conversation = [("human", "<image>\nWhat is this?"), ("gpt", "A cat.")]
    encoded = encode_conversation(tokenizer, template, conversation, [3])
    expected = HERMES_CAT_PROMPT.replace("<image>", "<img>" + "<IMG_CONTEXT>" * 3 + "</img>")
    assert tokenizer.decode(encoded.input_ids) == expected
    assert render(template, conversation, image_token_counts=[3]) == expected
    assert encoded.input_ids.count(tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")) == 3
    assert labelled_text(tokenizer, encoded) == "A cat.<|im_end|>"


def test_labels_cover_exactly_each_answer_and_its_end_token(tokenizer):
    template = get_template("Hermes-2")
    conversation = [
        ("human", "<image>\n请根据屏幕截图，执行任务：点击"),
        ("gpt", "操作：点击\n参数：[481, 472]"),
        ("human", "<image>\nWhat is this?"),
        ("gpt", "滑动 [704, 130] -> [83, 130]"),
    ]
    encoded = encode_conversation(tokenizer, template, conversation, [2, 5])
    assert len(encoded.labels) == len(encoded.input_ids)
    assert tokenizer.decode(encoded.input_ids) == render(template, conversation, image_token_counts=[2, 5])
    assert labelled_text(tokenizer, encoded) == "操作：点击\n参数：[481, 472]<|im_end|>滑动 [704, 130] -> [83, 130]<|im_end|>"
    trained = [index for index, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    assert all(encoded.labels[index] == encoded.input_ids[index] for index in trained)
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    first = trained[0]
    assert encoded.input_ids[first - len(header) : first] == header
    assert encoded.labels[first - 1] == IGNORE_INDEX


def test_images_are_expanded_in_placeholder_order(tokenizer):
    template = get_template("Hermes-2")
    conversation = [("human", "<image> and <image>"), ("gpt", "A cat.")]
    encoded = encode_conversation(tokenizer, template, conversation, [1, 4])
    text = tokenizer.decode(encoded.input_ids)
    assert "<img><IMG_CONTEXT></img> and <img>" + "<IMG_CONTEXT>" * 4 + "</img>" in text


def test_text_only_conversation(tokenizer):
    template = get_template("Hermes-2")
    conversation = [("human", "Describe the screen."), ("gpt", "A cat.")]
    encoded = encode_conversation(tokenizer, template, conversation, [])
    assert tokenizer.decode(encoded.input_ids) == render(template, conversation)
    assert tokenizer.convert_tokens_to_ids("<img>") not in encoded.input_ids


def test_bos_templates_start_with_a_masked_bos(tokenizer):
    template = get_template("internlm2-chat")
    conversation = [("human", "Hi "), ("gpt", " A cat. ")]
    encoded = encode_conversation(tokenizer, template, conversation, [])
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.labels[0] == IGNORE_INDEX
    assert tokenizer.decode(encoded.input_ids[1:]) == render(template, conversation)
    assert labelled_text(tokenizer, encoded) == "A cat.<|im_end|>"


def test_phi3_labels(tokenizer):
    template = get_template("phi3-chat")
    conversation = [("human", "<image>\nHi"), ("gpt", "A cat.")]
    encoded = encode_conversation(tokenizer, template, conversation, [2])
    assert tokenizer.decode(encoded.input_ids[1:]) == render(template, conversation, image_token_counts=[2])
    assert labelled_text(tokenizer, encoded) == "A cat.<|end|>"


def test_encode_prompt_matches_the_generation_prompt(tokenizer):
    template = get_template("Hermes-2")
    conversation = [("human", "<image>\nWhat is this?"), ("gpt", "A cat."), ("human", "And this?")]
    ids = encode_prompt(tokenizer, template, conversation, [2])
    assert tokenizer.decode(ids) == render(template, conversation, add_generation_prompt=True, image_token_counts=[2])
    assert tokenizer.decode(ids).endswith("And this?<|im_end|><|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("conversation", "counts", "message"),
    [
        ([("human", "<image> <image>"), ("gpt", "x")], [1], "2 <image> placeholder"),
        ([("human", "hi"), ("gpt", "x")], [1], "0 <image> placeholder"),
        ([("gpt", "x"), ("gpt", "y")], [], "turn 1 has role 'gpt'"),
        ([("human", "hi"), ("human", "again")], [], "a training conversation must end with a gpt answer"),
        ([("human", "hi"), ("gpt", "<image>")], [1], "an answer contains the image placeholder"),
    ],
)
def test_bad_conversations_are_rejected(tokenizer, conversation, counts, message):
    with pytest.raises(ValueError, match=message):
        encode_conversation(tokenizer, get_template("Hermes-2"), conversation, counts)


def test_prompt_must_end_with_a_human_turn(tokenizer):
    with pytest.raises(ValueError, match="must end with a human turn"):
        encode_prompt(tokenizer, get_template("Hermes-2"), [("human", "hi"), ("gpt", "x")], [])


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(ValueError, match="Hermes-2, internlm2-chat, phi3-chat"):
        get_template("vicuna")


def test_tokenizer_without_image_tokens_is_named():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    with pytest.raises(ValueError, match="tokenizer has no token '<img>'"):
        encode_conversation(plain, get_template("Hermes-2"), [("human", "<image>"), ("gpt", "x")], [1])
