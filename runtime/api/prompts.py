"""Text to token ids, shared by generation and /tokenize: the model-name check, tokenizing and chat templates,
each failure a 400 (or 404) that names the field."""
from semipd.runtime.protocol import APIError, bad_request


def check_model(engine, name: str | None) -> None:
    if name is not None and name != engine.model_name:
        raise APIError(404, f"model: the model '{name}' does not exist; this server serves "
                            f"'{engine.model_name}'", type="not_found_error", param="model", code="model_not_found")


def encode(tokenizer, text: str, param: str, add_special_tokens: bool) -> list[int]:
    try:
        return tokenizer(text, add_special_tokens=add_special_tokens).input_ids
    except (TypeError, ValueError, UnicodeError):       # the tokenizer's own words would mean nothing here
        raise bad_request(f"{param}: the text cannot be tokenized", param) from None


def render_chat(tokenizer, messages, add_generation_prompt: bool = True, continue_final_message: bool = False,
                tools: list[dict] | None = None) -> str:
    if not tokenizer.chat_template:
        raise bad_request("messages: this model has no chat template; use /v1/completions", "messages")
    try:
        return tokenizer.apply_chat_template([m.for_template() for m in messages], tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message)
    except Exception as e:      # the template itself may reject a conversation (e.g. role order)
        raise bad_request(f"messages: the chat template rejected them: {e}", "messages") from None
