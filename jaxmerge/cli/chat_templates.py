"""Chat templates a merge config may name (mergekit's ``chat_template``), and the choice of ``auto``.

Each named template renders a conversation in its model family's prompt format, as
``transformers`` renders chat templates (Jinja with ``trim_blocks`` and ``lstrip_blocks``),
to the same text as mergekit 0.1.5's template of that name.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

TEMPLATES = {
    "chatml": (
        "{%- for m in messages -%}{{ '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"),
    "llama3": (
        "{%- for m in messages -%}{{ (bos_token if loop.first else '') ~ '<|start_header_id|>' ~ m['role'] ~ "
        "'<|end_header_id|>\\n\\n' ~ (m['content'] | trim) ~ '<|eot_id|>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"),
    "mistral": (
        "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
        "{%- set turns = messages[1:] if system is not none else messages -%}{{ bos_token }}"
        "{%- for m in turns -%}"
        "{%- if (m['role'] == 'user') == loop.index0 is odd -%}"
        "{{ raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') }}{%- endif -%}"
        "{%- if m['role'] == 'user' -%}"
        "{{ ' [INST] ' ~ (system ~ '\\n\\n' if loop.first and system is not none else '') ~ m['content'] ~ ' [/INST]' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ ' ' ~ m['content'] ~ eos_token }}"
        "{%- else -%}{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
        "initial optional system message!') }}{%- endif -%}{%- endfor -%}"),
    "alpaca": (
        "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
        "{{ (systems | last).content | trim if systems else '' }}{{ '\\n\\n' }}"
        "{%- set headers = {'user': 'Instruction', 'assistant': 'Response', 'user_context': 'Input'} -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] in headers -%}"
        "{{ '### ' ~ headers[m['role']] ~ ':\\n' ~ (m['content'] | trim) ~ ('' if loop.last else '\\n\\n') }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{ '### Response:\\n' }}{%- endif -%}"),
    "exaone": (
        "{%- for m in messages -%}"
        "{%- if loop.first and m['role'] != 'system' -%}{{ '        [|system|][|endofturn|]\\n\\n' }}{%- endif -%}"
        "{{ '    [|' ~ m['role'] ~ '|]' ~ m['content'] ~ '\\n        ' ~ "
        "('\\n' if m['role'] == 'user' else '[|endofturn|]\\n') ~ '\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '    [|assistant|]\\n' }}{%- endif -%}"),
}


def model_template(model: Path) -> str | None:
    """The chat template saved with a model: ``chat_template.jinja``, else the tokenizer config's
    (its ``default`` one when it holds several)."""
    if (model / "chat_template.jinja").is_file():
        return (model / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        template = json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) else None


def resolve_template(value: str, models: list[Path]) -> str | None:
    """The template text a config's ``chat_template`` asks for: a named one, the most common of
    the ``models``' own templates for ``'auto'`` (the first seen among equals; None when none has
    one), or the value itself."""
    if value in TEMPLATES:
        return TEMPLATES[value]
    if value != "auto":
        return value
    found = [t.strip() for t in map(model_template, models) if t and t.strip()]
    return Counter(found).most_common(1)[0][0] if found else None
