"""Request models of vLLM's /tokenize and /detokenize, with vLLM's field names and defaults.

/tokenize takes either a completions-style body (`prompt`) or a chat-style one (`messages`, rendered with the
model's chat template as /v1/chat/completions does), and answers
{"count", "max_model_len", "tokens", "token_strs"}; /detokenize takes {"tokens"} and answers {"prompt"}.
"""
from pydantic import BaseModel, ConfigDict, Field, model_validator

from semipd.runtime.protocol import ChatMessage


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    # vLLM's defaults differ by form: a prompt gets the BOS like /v1/completions; a chat template writes its own
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False

    @model_validator(mode="after")
    def _one_form(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: send either prompt (a string) or messages (a chat), not both or neither")
        if self.add_generation_prompt and self.continue_final_message and self.messages is not None:
            raise ValueError("continue_final_message: cannot be combined with add_generation_prompt; set "
                             "add_generation_prompt to false to continue the last message")
        return self

    @property
    def special_tokens(self) -> bool:
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.prompt is not None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[int] = Field(...)
