"""InternVL2 conversation templates as Jinja chat templates for `tokenizer.apply_chat_template`.

The pieces of each template (headers, turn end, system prompt) live in `internvl_sft.data.template`, which
builds the training ids; this module renders the same pieces as Jinja so a saved tokenizer formats prompts
identically: the system turn, then every message as `<header><content><turn end>`, no newline in between.
`<image>` placeholders stay plain text; expanding them into image-context tokens is the dataset's job.
"""

from __future__ import annotations

import json

from internvl_sft.data.template import INTERNVL_SYSTEM_PROMPT, ChatTemplate, get_template

HERMES2_SYSTEM = INTERNVL_SYSTEM_PROMPT


def jinja_string(text: str) -> str:
    """A Jinja string literal holding `text` exactly (Jinja unescapes string literals like Python)."""
    return json.dumps(text, ensure_ascii=False)


def turn(header: str, content: str, template: ChatTemplate) -> str:
    """Jinja expression of one turn."""
    return f"{{{{- {jinja_string(header)} + {content} + {jinja_string(template.turn_end)} -}}}}"


def chat_template_for(name: str) -> str:
    """Jinja chat template rendering conversations exactly as the upstream template `name` does.

    A leading `system` message replaces the default system prompt. Other roles than `user` and `assistant`
    after it, or non-string contents, raise an error at render time. Unknown names raise ValueError.
    """
    template = get_template(name)
    content = "(message['content'] | trim)" if template.strip_text else "message['content']"
    return "".join(
        [
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set system_message = messages[0]['content'] -%}{%- set turns = messages[1:] -%}",
            f"{{%- else -%}}{{%- set system_message = {jinja_string(template.system_prompt)} -%}}",
            "{%- set turns = messages -%}{%- endif -%}",
            "{{- bos_token -}}" if template.bos else "",
            turn(template.system_header, "system_message", template),
            "{%- for message in turns -%}",
            "{%- if message['content'] is not string -%}",
            "{{- raise_exception('chat template: message content must be a string') -}}",
            "{%- elif message['role'] == 'user' -%}",
            turn(template.user_header, content, template),
            "{%- elif message['role'] == 'assistant' -%}",
            turn(template.assistant_header, content, template),
            "{%- else -%}",
            "{{- raise_exception('chat template: unknown role ' + message['role'] + '; use user or assistant') -}}",
            "{%- endif -%}",
            "{%- endfor -%}",
            f"{{%- if add_generation_prompt -%}}{{{{- {jinja_string(template.assistant_header)} -}}}}{{%- endif -%}}",
        ]
    )
