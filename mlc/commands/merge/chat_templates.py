"""Chat templates for `chat_template:`: the common formats by name, a model's own, or a Jinja string."""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}
NAMES = tuple(TEMPLATES)


def problem(choice: str) -> str | None:
    """Why a chat_template setting cannot be used, or None."""
    if choice == "auto" or choice in TEMPLATES or "{" in choice:
        return None
    return f"chat_template {choice!r} is not auto, one of {', '.join(NAMES)}, or a Jinja template"


def lookup(choice: str) -> str | None:
    """The template for a name or a literal Jinja template; None if it is neither."""
    if choice in TEMPLATES:
        return TEMPLATES[choice]
    return choice if "{" in choice else None


def read_template(model_dir: Path) -> str | None:
    """A model's own chat template (chat_template.jinja, else tokenizer_config.json), stripped."""
    jinja = Path(model_dir, "chat_template.jinja")
    if jinja.is_file():
        return jinja.read_text().strip() or None
    cfg = Path(model_dir, "tokenizer_config.json")
    if cfg.is_file():
        template = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(template, dict):
            template = template.get("default")
        return template.strip() if isinstance(template, str) and template.strip() else None
    return None


def write_template(out_dir: Path, template: str) -> None:
    """Store the template where transformers reads it first (chat_template.jinja) and nowhere else."""
    Path(out_dir, "chat_template.jinja").write_text(template)
    Path(out_dir, "chat_template.json").unlink(missing_ok=True)
    cfg = Path(out_dir, "tokenizer_config.json")
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        if data.pop("chat_template", None) is not None:
            cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
