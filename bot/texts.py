"""The bot's own words, in one catalog keyed by message id (never scattered through code)."""

from __future__ import annotations

EN: dict[str, str] = {
    "start": (
        "Hi! I'm Parley, an assistant powered by an OpenAI model.\n\n"
        "Write to me and I'll answer. This chat keeps its own conversation, so I remember "
        "what we talked about, even after I restart.\n\n{commands}"
    ),
    "help": (
        "Write a message and I'll answer it, keeping the context of this chat.\n\n{commands}"
    ),
    "commands": (
        "Commands:\n"
        "/start - what this bot does\n"
        "/help - this help\n"
        "/reset - forget this chat's conversation and start a new one"
    ),
    "reset_done": "Started a new conversation. I've forgotten what we talked about here.",
    "unsupported": (
        "Sorry, I can't read that kind of message yet. Please send me text or a photo."
    ),
    "admin_only": "Sorry, that command is only for the bot's admins.",
    "describe": "Describe this image.",
    "describe_many": "Describe these images.",
    "image.too_large": "That file is too big for me: I can download files up to {limit} MB.",
    "image.empty": "That file is empty.",
    "image.not_an_image": "That file doesn't look like an image I can read.",
    "image.truncated": "That image seems to be cut off or damaged. Could you send it again?",
    "image.unsupported_format": "I can read JPEG, PNG, WebP and GIF images; please send one of those.",
    "image.too_many_pixels": "That image is too large to process (too many pixels).",
    "image.too_many_frames": "That animation is too long; send a still image or a shorter GIF.",
    "image.download_failed": "I couldn't download that image from Telegram. Please try again.",
    "image.some_skipped": "I skipped {count} of the images: {reason}",
    "empty_text": "Your message is empty. Please write something for me to answer.",
    "error.rate_limited": (
        "The model is getting too many requests right now. Please try again in a minute."
    ),
    "error.timeout": "The model took too long to answer. Please try again.",
    "error.unreachable": "I couldn't reach the model service. Please try again in a moment.",
    "error.interrupted": "The answer was cut off on the way. Please try again.",
    "error.server_error": "The model service had a problem. Please try again in a moment.",
    "error.auth": "The bot isn't set up correctly to use the model. Its admin has been told.",
    "error.not_found": "The configured model isn't available. The bot's admin needs to fix this.",
    "error.bad_request": "The model couldn't handle that message. Try rephrasing it.",
    "error.empty_answer": "The model gave an empty answer. Please try rephrasing.",
    "error.unknown": "Something went wrong while answering. Please try again.",
}


def t(key: str, **values: object) -> str:
    """The English text for `key`, formatted with `values` (falls back to a generic error)."""
    text = EN.get(key) or EN["error.unknown"]
    return text.format(**values) if values else text
