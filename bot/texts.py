"""The bot's own words, in one catalog keyed by message id (never scattered through code)."""

from __future__ import annotations

EN: dict[str, str] = {
    "start": (
        "Hi! I'm Parley, an assistant powered by an OpenAI model.\n\n"
        "Write to me and I'll answer. This chat keeps its own conversation, so I remember "
        "what we talked about, even after I restart.\n\n{commands}"
    ),
    "help": ("Write a message and I'll answer it, keeping the context of this chat.\n\n{commands}"),
    "commands": (
        "Commands:\n"
        "/start - what this bot does\n"
        "/help - this help\n"
        "/reset - forget this chat's conversation and start a new one\n"
        "/forget - delete what the bot logged from you and keep you out of training data"
    ),
    "admin_commands": (
        "Admin commands:\n"
        "/train [since=YYYY-MM-DD] [chat=ID] [photos=on] - build a dataset and start fine-tuning\n"
        "/jobs - fine-tuning jobs\n"
        "/job ID - one job's details and loss chart\n"
        "/cancel ID - cancel a job\n"
        "/model [NAME] - the model in use, or switch it\n"
        "/export - the curated dataset as JSONL\n"
        "/stats - sentiment statistics"
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
    "image.unsupported_format": (
        "I can read JPEG, PNG, WebP and GIF images; please send one of those."
    ),
    "image.too_many_pixels": "That image is too large to process (too many pixels).",
    "image.too_many_frames": "That animation is too long; send a still image or a shorter GIF.",
    "image.download_failed": "I couldn't download that image from Telegram. Please try again.",
    "image.some_skipped": "I skipped {count} of the images: {reason}",
    "forwarded_command": "Forwarded commands are not run. Send the command yourself.",
    "train.building": "Building the dataset from the dialogue log…",
    "train.summary": (
        "Dataset ready ({description}).\n"
        "Examples: {examples} ({train} training, {validation} validation)\n"
        "Tokens: about {tokens:,}\n"
        "Base model: {model}\n"
        "Estimated cost: {cost}\n"
        "Left out: {dropped}\n"
        "Redacted: {redacted}"
    ),
    "train.problems": (
        "This dataset can't be used yet: {problems}. /export still gives you what there is."
    ),
    "train.confirm": "Start a fine-tuning job with it?",
    "train.start_button": "Start training",
    "train.cancel_button": "Cancel",
    "train.cancelled": "Cancelled. Nothing was uploaded.",
    "train.expired": "That dataset has expired. Run /train again.",
    "train.started": (
        "Started fine-tuning job {job_id} on {model}. I'll tell you when its status changes."
    ),
    "train.forbidden": (
        "OpenAI refused to create the job (403). OpenAI is winding down self-serve fine-tuning: "
        "most organisations can no longer create jobs, and nobody can after 2027-01-06. "
        "Use /export to download the dataset and train it elsewhere."
    ),
    "train.failed_to_start": (
        "Couldn't start the job ({kind}). Please try again later, or use /export."
    ),
    "train.bad_args": (
        "Usage: /train [since=YYYY-MM-DD] [chat=CHAT_ID] [photos=on|off]\nUnknown option: {arg}"
    ),
    "jobs.none": "No fine-tuning jobs yet. Start one with /train.",
    "jobs.offline": "(Couldn't reach the fine-tuning API: these are the bot's own records.)",
    "job.usage": "Usage: /job JOB_ID",
    "cancel.usage": "Usage: /cancel JOB_ID",
    "job.unknown": "I don't know a job with that id.",
    "job.unreachable": "Couldn't reach the fine-tuning API ({kind}).",
    "job.cancelled": "Job {job_id} is now {status}.",
    "job.status": "Fine-tuning job {job_id}: {status}.",
    "job.succeeded": "Fine-tuning job {job_id} succeeded. The new model is {model}.",
    "job.failed": "Fine-tuning job {job_id} failed: {error}",
    "job.use_button": "Use this model",
    "model.current": "The bot uses {model}.",
    "model.available": "Available models:\n{models}\n\nSwitch with /model NAME.",
    "model.unreachable": "Couldn't list the models ({kind}).",
    "model.unknown": "There is no model called {model} here.",
    "model.switched": "Switched: the bot now answers with {model}.",
    "export.caption": "The curated dataset: {examples} examples ({description}).",
    "export.empty": "There is nothing to export yet: no examples passed curation.",
    "forget.confirm": (
        "This deletes everything the bot logged from you and keeps you out of all future "
        "training data. It can't be undone. Continue?"
    ),
    "forget.yes": "Yes, forget me",
    "forget.no": "No",
    "forget.done": (
        "Done: I deleted {count} logged messages, and you will not be in any future dataset."
    ),
    "forget.kept": "Nothing was deleted.",
    "forget.not_yours": "This button is for the person who asked.",
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
