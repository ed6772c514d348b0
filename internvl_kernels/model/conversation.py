"""Prompt templates used by InternVL-Chat ``chat()`` (the ``template`` field of config.json)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

_INTERNVL_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
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
        return [s for s in (self.sep, self.sep2) if s and s.strip()]


_TEMPLATES = {
    t.name: t
    for t in [
        Conversation("Hermes-2", "<|im_start|>system\n{system_message}", _INTERNVL_SYSTEM,
                     ("<|im_start|>user\n", "<|im_start|>assistant\n"), "mpt", "<|im_end|>"),
        Conversation("internlm2-chat", "<|im_start|>system\n{system_message}", _INTERNVL_SYSTEM,
                     ("<|im_start|>user\n", "<|im_start|>assistant\n"), "mpt", "<|im_end|>"),
        Conversation("phi3-chat", "<|system|>\n{system_message}", _INTERNVL_SYSTEM,
                     ("<|user|>\n", "<|assistant|>\n"), "mpt", "<|end|>"),
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
