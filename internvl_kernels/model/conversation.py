"""Prompt templates used by InternVL-Chat ``chat()`` (the ``template`` field of config.json).

Semantics of the official InternVL ``conversation.py``: the "mpt" style is ``system + sep`` then, per turn,
``role + message + sep`` (an open assistant turn is the bare role). ``Hermes-2`` / ``internlm2-chat`` (InternVL2 on
Hermes / InternLM2) and ``phi3-chat`` (InternVL2-4B) close turns with ``<|im_end|>`` / ``<|end|>`` and no newline;
``internvl2_5`` (InternVL2.5 and InternVL3, every LLM) closes them with ``"<|im_end|>\n"``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

_INTERNVL_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
_INTERNVL25_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass
class Conversation:
    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    style: str  # "mpt" (ChatML-like) or "colon_two" (Vicuna)
    sep: str
    sep2: str | None = None
    messages: list = field(default_factory=list)

    def copy(self) -> "Conversation":
        return replace(self, messages=[list(m) for m in self.messages])

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def get_prompt(self) -> str:
        system = self.system_template.format(system_message=self.system_message)
        if self.style == "mpt":
            ret = system + self.sep
            for role, msg in self.messages:
                ret += role + msg + self.sep if msg else role
            return ret
        if self.style == "colon_two":
            seps = (self.sep, self.sep2)
            ret = system + seps[0]
            for i, (role, msg) in enumerate(self.messages):
                ret += role + ": " + msg + seps[i % 2] if msg else role + ":"
            return ret
        raise ValueError(f"unknown template style {self.style!r}")

    @property
    def stop_strings(self) -> list[str]:
        # the official chat() stops on ``sep.strip()`` (``"<|im_end|>\n"`` → ``"<|im_end|>"``)
        return [s.strip() for s in (self.sep, self.sep2) if s and s.strip()]


_TEMPLATES = {
    t.name: t
    for t in [
        Conversation("Hermes-2", "<|im_start|>system\n{system_message}", _INTERNVL_SYSTEM,
                     ("<|im_start|>user\n", "<|im_start|>assistant\n"), "mpt", "<|im_end|>"),
        Conversation("internlm2-chat", "<|im_start|>system\n{system_message}", _INTERNVL_SYSTEM,
                     ("<|im_start|>user\n", "<|im_start|>assistant\n"), "mpt", "<|im_end|>"),
        Conversation("phi3-chat", "<|system|>\n{system_message}", _INTERNVL_SYSTEM,
                     ("<|user|>\n", "<|assistant|>\n"), "mpt", "<|end|>"),
        # InternVL2.5 / InternVL3 (every LLM): ChatML turns, each closed by "<|im_end|>\n"
        Conversation("internvl2_5", "<|im_start|>system\n{system_message}", _INTERNVL25_SYSTEM,
                     ("<|im_start|>user\n", "<|im_start|>assistant\n"), "mpt", "<|im_end|>\n"),
        # the generic ChatML template (Qwen-style, default system prompt)
        Conversation("chatml", "<|im_start|>system\n{system_message}", "You are a helpful assistant.",
                     ("<|im_start|>user\n", "<|im_start|>assistant\n"), "mpt", "<|im_end|>\n"),
        Conversation("vicuna_v1.1", "{system_message}", _VICUNA_SYSTEM, ("USER", "ASSISTANT"), "colon_two", " ", "</s>"),
    ]
}
_TEMPLATES["llava_v1"] = replace(_TEMPLATES["vicuna_v1.1"], name="llava_v1")


def get_conv_template(name: str | None) -> Conversation:
    if name is None:
        name = "vicuna_v1.1"
    if name not in _TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(_TEMPLATES)}")
    return _TEMPLATES[name].copy()
